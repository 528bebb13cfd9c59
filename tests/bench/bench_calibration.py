"""Benchmark: are the shipped prompt probes' probabilities calibrated on sources they never saw, and does
Platt scaling or isotonic regression fix them?

On the folds of ``guard benchmark-policies`` (``probes.eval.lodo``: each source held out in turn, with
held-out ordinary traffic in every test set), a probe is trained per fold as shipped, and its
probabilities on the held-out set are compared with the labels by the expected calibration error (ten
equal-width bins; the mean gap between a bin's mean probability and its share of positives, weighted
by its rows). Calibrators, each a monotone map of the probe's logit:

- ``raw``: the probe's own probability;
- ``platt_dev`` / ``isotonic_dev``: fitted on the fold's dev split (rows of the training sources the
  probe did not train on);
- ``platt_lodo`` / ``isotonic_lodo``: fitted on the other folds' held-out sets, each scored by its own
  fold's probe: what a probe's score means on a source it never saw. A shipped calibrator would be
  fitted on every fold's held-out set this way.

Prints per policy and held-out source the ECE of each, and the means; writes JSON. Features come from
the feature cache of ``guard train --preset`` (extracted on first use).

    .venv/bin/python tests/bench/bench_calibration.py [--policy harmful_request ...] [--dtype int8]
        [--out tests/bench/results/calibration.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from guard.settings import Settings
from probes.data import Dataset
from probes.eval.defaults import PRESET_CONFIG, recipe_config, recipe_features
from probes.eval.lodo import fold_probes
from probes.eval.presets import RECIPES
from probes.lm.model import DEFAULT_MODEL, NUMERIC_PATHS, load_model
from probes.probe import logit

BINS = 10
METHODS = ("raw", "platt_dev", "isotonic_dev", "platt_lodo", "isotonic_lodo")


def ece(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Expected calibration error over ``BINS`` equal-width bins of the probability."""
    bins = np.minimum((probabilities * BINS).astype(int), BINS - 1)
    gaps = [
        abs(labels[bins == b].mean() - probabilities[bins == b].mean()) * np.sum(bins == b)
        for b in range(BINS)
        if np.any(bins == b)
    ]
    return float(sum(gaps) / len(labels))


def platt(scores: np.ndarray, labels: np.ndarray):
    model = LogisticRegression(C=1e4).fit(logit(scores)[:, None], labels)
    return lambda p: model.predict_proba(logit(p)[:, None])[:, 1]


def isotonic(scores: np.ndarray, labels: np.ndarray):
    return IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(scores, labels).predict


def fold_scores(lm, name: str, dataset: Dataset, rows_of) -> list[dict]:
    """Per fold: the held-out source's name, its labels, and the fold probe's probabilities on dev and test."""
    return [
        {
            "heldout": fold.heldout,
            "dev": (np.asarray(fold.dev.labels), scores(fold.dev)),
            "test": (np.asarray(fold.test.labels), scores(fold.test)),
        }
        for fold, _, scores in fold_probes(
            lm, name, dataset, rows_of(name, dataset), recipe_config(name, PRESET_CONFIG)
        )
    ]


def calibrated(scored: list[dict]) -> list[dict]:
    """Each fold's held-out ECE under each method."""
    rows = []
    for k, fold in enumerate(scored):
        labels, scores = fold["test"]
        others = [f["test"] for j, f in enumerate(scored) if j != k]
        pooled = (np.concatenate([o[0] for o in others]), np.concatenate([o[1] for o in others]))
        maps = {
            "raw": lambda p: p,
            "platt_dev": platt(fold["dev"][1], fold["dev"][0]),
            "isotonic_dev": isotonic(fold["dev"][1], fold["dev"][0]),
            "platt_lodo": platt(pooled[1], pooled[0]),
            "isotonic_lodo": isotonic(pooled[1], pooled[0]),
        }
        rows.append(
            {"heldout": fold["heldout"], "n": len(labels), **{m: ece(labels, maps[m](scores)) for m in METHODS}}
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    prompt_policies = [name for name, recipe in RECIPES.items() if recipe.stage == "prompt"]
    parser.add_argument("--policy", action="append", choices=prompt_policies, help="default: every prompt policy")
    parser.add_argument("--dtype", choices=NUMERIC_PATHS, default="int8")
    parser.add_argument("--out", type=Path, default=Path("tests/bench/results/calibration.json"))
    args = parser.parse_args()
    settings = Settings()
    names = args.policy or prompt_policies
    lm = load_model(DEFAULT_MODEL, dtype=args.dtype, cache_dir=settings.cache_dir)
    splits, rows_of = recipe_features(lm, names, settings.data_dir, PRESET_CONFIG, cache_dir=settings.cache_dir)
    report = {}
    for name in names:
        train, dev, _ = splits[name]
        table = calibrated(fold_scores(lm, name, Dataset(train.rows + dev.rows), rows_of))
        means = {m: float(np.mean([row[m] for row in table])) for m in METHODS}
        report[name] = {"folds": table, "mean": means}
        for row in table:
            print(f"{name} {row['heldout']:<24} " + " ".join(f"{m} {row[m]:.3f}" for m in METHODS))
        print(f"{name} {'MEAN':<24} " + " ".join(f"{m} {means[m]:.3f}" for m in METHODS))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"dtype": args.dtype, "policies": report}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
