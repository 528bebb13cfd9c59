"""Benchmark: other ways to score a row than the shipped mean pooling, leave-one-dataset-out.

A linear probe on mean-pooled features scores a row as the mean of its tokens' logits (plus the bias).
Scoring the same probe by the highest mean over any ``k`` consecutive tokens instead (``window_k``)
reacts to a short violating passage inside a long benign text, at the price of more false positives
on long benign texts. ``last`` is a probe trained on the last token's features, and
``mean_last_ensemble`` averages its logit with the mean-pooled probe's. All are measured on the
folds of ``guard benchmark-policies`` (``probes.eval.lodo``) with the shipped layers (9, 15 and 21): per
fold each probe is trained once, each scorer gets its own threshold on the fold's dev split by the
shipped rule (at most 1% of dev negatives and 1.5% of dev ordinary traffic flagged), and the
held-out source is scored. Prints per held-out source and the mean AUROC, TPR at threshold and FPR
on held-out ordinary traffic per scorer, side by side, and writes JSON.

    .venv/bin/python tests/bench/bench_window_pooling.py [--policy harmful_request] [--windows 4,8,16]
        [--out tests/bench/results/window_pooling.json]
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
from lodo_report import finish, print_fold

from probes.data import Dataset, default_data_dir
from probes.eval.defaults import PRESET_CONFIG, recipe_splits
from probes.eval.lodo import folds, scored_fold
from probes.features import token_states
from probes.lm.model import load_model
from probes.probe import sigmoid
from probes.train import train_probe


def window_max(logits: np.ndarray, window: int) -> float:
    """The highest mean of ``window`` consecutive values (the mean of all of them when there are fewer)."""
    if len(logits) <= window:
        return float(logits.mean())
    sums = np.convolve(logits, np.ones(window), mode="valid")
    return float(sums.max() / window)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="harmful_request")
    parser.add_argument("--windows", default="4,8,16")
    parser.add_argument("--out", type=Path, default=Path("tests/bench/results/window_pooling.json"))
    args = parser.parse_args()
    windows = [int(w) for w in args.windows.split(",")]
    lm = load_model()
    config = PRESET_CONFIG
    last_config = replace(config, pooling="last")
    train, dev, _ = recipe_splits(args.policy, default_data_dir())
    dataset = Dataset(train.rows + dev.rows)
    states = [np.zeros(0)] * len(dataset.rows)
    for i, tokens in token_states(lm, dataset, config.layers, max_text_tokens=config.max_text_tokens):
        states[i] = tokens.reshape(len(tokens), -1)  # [tokens, layers * d_model]
    bounds = np.cumsum([0] + [len(s) for s in states])
    flat = np.concatenate(states)
    pooled = np.stack([s.mean(0) for s in states]).reshape(len(states), len(config.layers), -1)
    last = np.stack([s[-1] for s in states]).reshape(len(states), len(config.layers), -1)
    index = {row.key: i for i, row in enumerate(dataset.rows)}
    scorers = ["mean", *(f"window_{w}" for w in windows), "last", "mean_last_ensemble"]
    results = []
    for fold in folds(dataset):

        def rows(data: Dataset) -> list[int]:
            return [index[r.key] for r in data.rows]

        features = (pooled[rows(fold.train)], pooled[rows(fold.dev)])
        probe = train_probe(lm, fold.train, fold.dev, args.policy, config, features=features, progress=False)
        weight, bias = probe.probe.folded()
        token_logits = flat @ weight.reshape(-1)
        per_row = [token_logits[bounds[i] : bounds[i + 1]] for i in range(len(states))]
        mean_logits = np.array([z.mean() for z in per_row]) + bias
        every = {"mean": sigmoid(mean_logits)}
        for window in windows:
            every[f"window_{window}"] = sigmoid(np.array([window_max(z, window) for z in per_row]) + bias)
        on_last = (last[rows(fold.train)], last[rows(fold.dev)])
        by_last = train_probe(lm, fold.train, fold.dev, args.policy, last_config, features=on_last, progress=False)
        last_weight, last_bias = by_last.probe.folded()
        last_logits = last.reshape(len(states), -1) @ last_weight.reshape(-1) + last_bias
        every["last"] = sigmoid(last_logits)
        every["mean_last_ensemble"] = sigmoid((mean_logits + last_logits) / 2)
        row = scored_fold(fold, {s: (every[s][rows(fold.dev)], every[s][rows(fold.test)]) for s in scorers}, config)
        results.append(row)
        print_fold(row, scorers)
    report = {"policy": args.policy, "layers": list(config.layers)}
    finish(results, scorers, f"scorer ({args.policy})", report, args.out)


if __name__ == "__main__":
    main()
