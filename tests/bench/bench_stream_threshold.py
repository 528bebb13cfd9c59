"""Benchmark: a shipped reply probe's dev split scored whole, and token by token as a server streams it.

A stream fires at its first token above the threshold. This prints, for the shipped probe of the numeric
path, the dev FPR, TPR and AUROC of: the whole-reply mean at the pooled threshold (what ``guard eval``
scores); the running mean per token at that same threshold; and the moving average per token at the
streamed threshold the probe was calibrated with (``probes.stream``, what the server uses). Writes JSON.

    .venv/bin/python tests/bench/bench_stream_threshold.py [--policy harmful_reply] [--dtype float32]
        [--out tests/bench/results/stream_threshold.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from probes.catalog import load_shipped
from probes.data import default_data_dir
from probes.eval.defaults import recipe_splits
from probes.features import token_states
from probes.lm.model import load_model
from probes.probe import sigmoid
from probes.stream import ema


def rates(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    return {
        "threshold": threshold,
        "fpr": float((scores[labels == 0] > threshold).mean()),
        "tpr": float((scores[labels == 1] > threshold).mean()),
        "auroc": float(roc_auc_score(labels, scores)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="harmful_reply")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, default=Path("tests/bench/results/stream_threshold.json"))
    args = parser.parse_args()
    lm = load_model(dtype=args.dtype)
    probe = load_shipped(args.policy, model_fingerprint=lm.fingerprint)
    if probe.stream is None:
        raise SystemExit(f"{args.policy} is not calibrated to stream (a prompt policy?)")
    alpha, streamed = probe.stream
    _, dev, _ = recipe_splits(args.policy, default_data_dir())
    weight, bias = probe.folded()
    whole, running, moving = (np.zeros(len(dev.rows)) for _ in range(3))
    for i, states in token_states(lm, dev, probe.layers, max_text_tokens=probe.manifest["max_text_tokens"]):
        logits = np.einsum("tld,ld->t", states.astype(np.float64), weight)
        means = np.cumsum(logits) / np.arange(1, len(logits) + 1)
        whole[i], running[i] = sigmoid(means[-1] + bias), sigmoid(means + bias).max()
        moving[i] = sigmoid(ema(logits, alpha) + bias).max()
    labels = np.asarray(dev.labels)
    report = {
        "policy": args.policy,
        "dtype": args.dtype,
        "whole_reply_mean": rates(labels, whole, probe.threshold),
        "running_mean_per_token": rates(labels, running, probe.threshold),
        "moving_average_per_token_streamed": rates(labels, moving, streamed),
    }
    for name, row in report.items():
        if isinstance(row, dict):
            print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
