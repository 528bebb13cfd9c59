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
  fold's probe: what a probe's score means on a source it never saw. ``guard calibrate`` fits a
  shipped probe's calibrator on every fold's held-out set this way (``probes.eval.calibration``).

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

from guard.settings import Settings
from probes.data import Dataset
from probes.eval.calibration import FITS, ece, fold_scores, heldout_table
from probes.eval.defaults import PRESET_CONFIG, recipe_config, recipe_features
from probes.eval.presets import RECIPES
from probes.lm.model import DEFAULT_MODEL, NUMERIC_PATHS, load_model

METHODS = ("raw", "platt_dev", "isotonic_dev", "platt_lodo", "isotonic_lodo")


def calibrated(folds) -> list[dict]:
    """Each fold's held-out ECE under each method: fitted on the other folds' held-out sets, or on its own dev."""
    table = heldout_table(folds)
    for row, fold in zip(table, folds, strict=True):
        labels, scores = fold.test
        dev_labels, dev_scores = fold.dev
        for method in ("platt", "isotonic"):
            row[f"{method}_lodo"] = row.pop(method)
            row[f"{method}_dev"] = ece(labels, FITS[method](dev_scores, dev_labels)(scores))
    return table


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
        dataset = Dataset(train.rows + dev.rows)
        folds = fold_scores(lm, name, dataset, rows_of(name, dataset), recipe_config(name, PRESET_CONFIG))
        table = calibrated(folds)
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
