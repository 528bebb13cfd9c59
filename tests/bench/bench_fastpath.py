"""Benchmark: the fast numeric paths (bfloat16, int8) against float32, on the shipped policies and on speed.

For each shipped policy, its probe scores the policy's dev rows under every path: AUROC (must not drop
by more than 0.01) and the false-positive rate on dev negatives at the probe's threshold (how far the
threshold's meaning shifts). bfloat16 serves the float32 probes; int8 serves probes trained on int8
features (``probes/shipped/int8``), and the float32 probes' AUROC on int8 features shows why. Then
each path's mean relative error of the hidden states against float32 over the benign prompts (every
fifth layer), and decode tokens/s of the guarded engine, all paths interleaved per prompt. Prints and
writes JSON.

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

from probes.catalog import load_shipped
from probes.data import default_data_dir
from probes.eval.defaults import recipe_splits
from probes.eval.evaluate import probe_scores
from probes.lm.model import NUMERIC_PATHS, LoadedModel, load_model
from probes.lm.render import render_messages

FAST = [path for path in NUMERIC_PATHS if path != "float32"]


def hidden_states(lm: LoadedModel, text: str) -> torch.Tensor:
    """``[layers + 1, tokens, d_model]`` for ``text`` as a user message in the chat template."""
    encoded = render_messages(lm.tokenizer, [{"role": "user", "content": text}], span_message=0)
    with torch.inference_mode():
        out = lm.model(input_ids=torch.tensor([encoded.ids]), output_hidden_states=True)
    return torch.stack(out.hidden_states)[:, 0].float()


def hidden_error(models: dict[str, LoadedModel]) -> dict[str, dict[int, float]]:
    """Per fast path and every fifth layer: mean over the benign prompts of |h - h_float32| / |h_float32|."""
    reference = [hidden_states(models["float32"], text) for text in BENIGN]
    out = {}
    for path in FAST:
        seen = [hidden_states(models[path], text) for text in BENIGN]
        layers = range(5, len(reference[0]), 5)
        errors = [
            [float((h[i] - r[i]).norm() / r[i].norm()) for i in layers] for h, r in zip(seen, reference, strict=True)
        ]
        out[path] = dict(zip(layers, np.mean(errors, axis=0).tolist(), strict=True))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("tests/bench/results/fastpath.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    models = {path: load_model(dtype=path) for path in NUMERIC_PATHS}
    detection = {}
    for name in SHIPPED:
        _, dev, _ = recipe_splits(name, default_data_dir())
        labels = np.asarray(dev.labels)
        row = {}
        reference = load_shipped(name, model_fingerprint=models["float32"].fingerprint)
        for path, lm in models.items():
            probe = load_shipped(name, model_fingerprint=lm.fingerprint)  # int8: the probe trained on int8
            scores = probe_scores(lm, probe, dev, progress=False)
            row[path] = {
                "auroc": float(roc_auc_score(labels, scores)),
                "fpr_at_threshold": float((scores[labels == 0] > probe.threshold).mean()),
            }
            if probe.version != reference.version:  # why it has its own: the float32 probe on this path
                foreign = probe_scores(lm, reference, dev, progress=False)
                row[path]["float32_probe_auroc"] = float(roc_auc_score(labels, foreign))
        for path in FAST:
            row[path]["auroc_drop"] = row["float32"]["auroc"] - row[path]["auroc"]
            row[path]["fpr_shift"] = row[path]["fpr_at_threshold"] - row["float32"]["fpr_at_threshold"]
        detection[name] = row
        print(name, json.dumps(row))
    error = hidden_error(models)
    print("hidden-state error against float32", json.dumps(error))
    guarded = configurations()["guarded"]
    runs: dict[str, list[dict]] = {path: [] for path in models}
    for _ in range(args.rounds):
        for prompt in BENIGN:
            for path, lm in models.items():
                runs[path] += run_engine(lm, guarded, [request(lm, prompt, args.tokens)])
    speed = {path: tokens_per_s(r) for path, r in runs.items()}
    report = {
        "detection": detection,
        "hidden_state_error": error,
        "guarded_decode_tokens_per_s": speed,
        **{
            path: {
                "speedup": speed[path] / speed["float32"],
                "max_auroc_drop": max(r[path]["auroc_drop"] for r in detection.values()),
                "max_abs_fpr_shift": max(abs(r[path]["fpr_shift"]) for r in detection.values()),
            }
            for path in FAST
        },
    }
    print(json.dumps(report, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
