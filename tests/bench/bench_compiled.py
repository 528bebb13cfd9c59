"""Benchmark: the lean step compiled (``torch.compile``, what ``guard serve`` runs) against it not compiled.

Two things, on one numeric path (``--dtype``), one torch thread, the same model:
- decode step time in-process for 1 and 8 rows, not compiled vs compiled, interleaved per round;
- the shipped probes on dev rows of every prompt-stage policy, scored as the server scores a prompt
  (a packed prefill after the cached template prefix, mean over the scored span): AUROC, FPR and TPR
  at the probe's threshold, for the training features (transformers' forward, what the probes were
  fitted on), the lean step and the compiled lean step, and how far each row's score moves.

Compiled code fuses float operations and rounds them differently; on int8 that moves some int8
roundings, so this measures what it costs the probes. Prints and writes JSON.

    .venv/bin/python tests/bench/bench_compiled.py [--dtype int8] [--rows 400] [--out tests/bench/results/compiled.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from prompts import BENIGN, SHIPPED
from sklearn.metrics import roc_auc_score
from transformers import DynamicCache

from probes.catalog import load_shipped
from probes.data import Dataset, default_data_dir
from probes.eval.defaults import recipe_splits
from probes.eval.evaluate import probe_scores
from probes.lm.batch import BatchCache
from probes.lm.model import LoadedModel, load_model
from probes.lm.prefix import PrefixCache
from probes.lm.render import encode_row, render_messages
from probes.lm.step import Segment
from probes.probe import LinearProbe


def step_ms(lm: LoadedModel, rows: int, steps: int) -> float:
    """Median ms of a decode step of ``rows`` rows (the first benign prompt each), after a packed prefill."""
    ids = render_messages(lm.tokenizer, [{"role": "user", "content": BENIGN[0]}], span_message=0).ids
    caches = [DynamicCache(config=lm.model.config) for _ in range(rows)]
    batch = BatchCache(lm.model.config)
    with torch.inference_mode():
        logits = lm.decoder.prefill([Segment(tuple(ids), cache) for cache in caches])
        for cache in caches:
            batch.add(cache, len(ids))
        token, position = logits.argmax(-1)[:, None], torch.full((rows, 1), len(ids))
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            logits = lm.decoder(token, position, batch.cache)
            times.append(time.perf_counter() - started)
            token, position = logits.argmax(-1)[:, None], position + 1
    return statistics.median(times) * 1000


def served_scores(lm: LoadedModel, probe: LinearProbe, dataset: Dataset, prefixes: PrefixCache) -> np.ndarray:
    """Each row's score as a prompt-stage policy computes it in the server, 8 rows a packed prefill."""
    limit = int(probe.manifest.get("max_text_tokens", 256))
    scores = []
    seen: dict[int, torch.Tensor] = {}  # this pass's outputs of the probe's layers

    def keep(layer: int, hidden: torch.Tensor) -> torch.Tensor:
        if layer in probe.layers:
            seen[layer] = hidden[:, 0].clone()
        return hidden

    for at in range(0, len(dataset.rows), 8):
        rows = [encode_row(lm.tokenizer, r.text, r.prompt, max_text_tokens=limit) for r in dataset.rows[at : at + 8]]
        segments = [prefixes.segment(tuple(row.ids), row.start) for row in rows]
        with torch.inference_mode():
            lm.decoder.prefill(segments, keep)
        starts = np.cumsum([0] + [len(s.ids) for s in segments])
        features = [
            np.stack([seen[layer][start : start + row.end - row.start].mean(0).numpy() for layer in probe.layers])
            for row, start in zip(rows, starts, strict=False)
        ]
        scores.append(probe.predict_proba(np.stack(features)))
    return np.concatenate(scores)


def detection(lm: LoadedModel, compiled: LoadedModel, sample: int) -> dict:
    """Per policy: AUROC / FPR / TPR at threshold per scoring path, and how far served scores are from training's."""
    out, rng = {}, np.random.default_rng(0)
    datasets = {}
    for name in SHIPPED:
        _, dev, _ = recipe_splits(name, default_data_dir())
        pick = rng.permutation(len(dev.rows))[:sample]
        datasets[name] = Dataset(tuple(dev.rows[i] for i in pick))
    scores: dict[str, dict[str, np.ndarray]] = {name: {} for name in SHIPPED}
    for path, model in (("training_features", lm), ("lean", lm), ("compiled", compiled)):
        prefixes = PrefixCache(model.decoder, model.model.config)
        for name, dataset in datasets.items():
            probe = load_shipped(name, model_fingerprint=model.fingerprint)
            if path == "training_features":
                scores[name][path] = probe_scores(model, probe, dataset, progress=False)
            else:
                scores[name][path] = served_scores(model, probe, dataset, prefixes)
    for name, dataset in datasets.items():
        labels, threshold = np.asarray(dataset.labels), load_shipped(name, model_fingerprint=lm.fingerprint).threshold
        row = {
            path: {
                "auroc": float(roc_auc_score(labels, s)),
                "fpr_at_threshold": float((s[labels == 0] > threshold).mean()),
                "tpr_at_threshold": float((s[labels == 1] > threshold).mean()),
            }
            for path, s in scores[name].items()
        }
        for path in ("lean", "compiled"):
            gap = np.abs(scores[name][path] - scores[name]["training_features"])
            row[path] |= {"mean_abs_score_gap": float(gap.mean()), "max_abs_score_gap": float(gap.max())}
        row["compiled_auroc_drop"] = row["lean"]["auroc"] - row["compiled"]["auroc"]
        row["compiled_fpr_shift"] = row["compiled"]["fpr_at_threshold"] - row["lean"]["fpr_at_threshold"]
        out[name] = row
        print(name, json.dumps(row), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="int8")
    parser.add_argument("--rows", type=int, default=400, help="dev rows per policy (a fixed random sample)")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("tests/bench/results/compiled.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    eager = load_model(dtype=args.dtype, threads=1)
    compiled = load_model(dtype=args.dtype, threads=1, compiled=True)
    compiled.decoder.warm_up()
    times: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for rows in (1, 8):
            for name, lm in (("lean", eager), ("compiled", compiled)):
                times.setdefault(f"{name}_{rows}_rows", []).append(step_ms(lm, rows, args.steps))
    speed = {key: statistics.median(values) for key, values in times.items()}
    speed |= {f"speedup_{rows}_rows": speed[f"lean_{rows}_rows"] / speed[f"compiled_{rows}_rows"] for rows in (1, 8)}
    print("decode step ms", json.dumps(speed), flush=True)
    found = detection(eager, compiled, args.rows)
    report = {"dtype": args.dtype, "rows_per_policy": args.rows, "step_ms": speed, "detection": found}
    print(json.dumps(report, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
