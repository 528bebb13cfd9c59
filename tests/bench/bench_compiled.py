"""Benchmark: the lean step compiled (``torch.compile``, what ``guard serve`` runs) against it not compiled.

Two things, on one numeric path (``--dtype``), one torch thread, the same model:
- decode step time in-process for 1 and 8 rows, not compiled vs compiled, interleaved per round;
- the shipped probes on dev rows of every prompt-stage policy, their features extracted (as the server
  prefills a prompt) through the eager step, what they were trained on, and through the compiled one:
  AUROC, FPR and TPR at the probe's threshold, and how far each row's score moves.

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
from probes.lm.render import render_messages
from probes.lm.step import Segment


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


def detection(lm: LoadedModel, compiled: LoadedModel, sample: int) -> dict:
    """Per policy: AUROC / FPR / TPR at threshold, eager (the training features, which are the served
    states) and compiled, and how far each row's compiled score is from its eager one."""
    out, rng = {}, np.random.default_rng(0)
    for name in SHIPPED:
        _, dev, _ = recipe_splits(name, default_data_dir())
        pick = rng.permutation(len(dev.rows))[:sample]
        dataset = Dataset(tuple(dev.rows[i] for i in pick))
        probe = load_shipped(name, model_fingerprint=lm.fingerprint)
        labels = np.asarray(dataset.labels)
        scores = {
            path: probe_scores(model, probe, dataset, progress=False)
            for path, model in (("eager", lm), ("compiled", compiled))
        }
        row = {
            path: {
                "auroc": float(roc_auc_score(labels, s)),
                "fpr_at_threshold": float((s[labels == 0] > probe.threshold).mean()),
                "tpr_at_threshold": float((s[labels == 1] > probe.threshold).mean()),
            }
            for path, s in scores.items()
        }
        gap = np.abs(scores["compiled"] - scores["eager"])
        row["compiled"] |= {"mean_abs_score_gap": float(gap.mean()), "max_abs_score_gap": float(gap.max())}
        row["compiled_auroc_drop"] = row["eager"]["auroc"] - row["compiled"]["auroc"]
        row["compiled_fpr_shift"] = row["compiled"]["fpr_at_threshold"] - row["eager"]["fpr_at_threshold"]
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
