"""Benchmark: the bfloat16 numeric path against float32, on the shipped policies and on decode speed.

For each shipped policy, its probe (trained on float32 features) scores the policy's dev rows under
both paths: AUROC (must not drop by more than 0.01) and the false-positive rate on dev negatives at
the probe's threshold (how far the threshold's meaning shifts). Then decode tokens/s of the guarded
engine, both paths interleaved per prompt. Prints and writes JSON.

    .venv/bin/python tests/bench/bench_fastpath.py [--tokens 48] [--out tests/bench/results/fastpath.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from bench_overhead import configurations, request, run_engine, tokens_per_s
from prompts import BENIGN, SHIPPED
from sklearn.metrics import roc_auc_score

from probes.defaults import load_shipped, recipe_splits
from probes.evaluate import probe_scores
from probes.model import load_model
from probes.sources import default_data_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("tests/bench/results/fastpath.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    models = {"float32": load_model(), "bfloat16": load_model(dtype="bfloat16")}
    detection = {}
    for name in SHIPPED:
        _, dev, _ = recipe_splits(name, default_data_dir())
        labels = np.asarray(dev.labels)
        row = {}
        for path, lm in models.items():
            probe = load_shipped(name, model_fingerprint=lm.fingerprint)
            scores = probe_scores(lm, probe, dev, progress=False)
            row[path] = {
                "auroc": float(roc_auc_score(labels, scores)),
                "fpr_at_threshold": float((scores[labels == 0] > probe.threshold).mean()),
            }
        row["auroc_drop"] = row["float32"]["auroc"] - row["bfloat16"]["auroc"]
        row["fpr_shift"] = row["bfloat16"]["fpr_at_threshold"] - row["float32"]["fpr_at_threshold"]
        detection[name] = row
        print(name, json.dumps(row))
    guarded = configurations()["guarded"]
    runs: dict[str, list[dict]] = {path: [] for path in models}
    for _ in range(args.rounds):
        for prompt in BENIGN:
            for path, lm in models.items():
                runs[path] += run_engine(lm, guarded, [request(lm, prompt, args.tokens)])
    speed = {path: tokens_per_s(r) for path, r in runs.items()}
    report = {
        "detection": detection,
        "guarded_decode_tokens_per_s": speed,
        "speedup_bfloat16": speed["bfloat16"] / speed["float32"],
        "max_auroc_drop": max(r["auroc_drop"] for r in detection.values()),
        "max_abs_fpr_shift": max(abs(r["fpr_shift"]) for r in detection.values()),
    }
    print(json.dumps(report, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
