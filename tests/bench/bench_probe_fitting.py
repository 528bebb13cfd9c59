"""Benchmark: other ways to fit the probe than the shipped logistic regression, leave-one-dataset-out.

On the folds of ``guard benchmark-policies`` (``probes.eval.lodo``), with the shipped features (mean
pooling, layers 9, 15 and 21, standardised on each fold's train split) and the shipped threshold rule
(at most 1% of dev negatives and 1.5% of dev ordinary traffic flagged), four ways to fit the weights:

- ``logistic``: the shipped fit (``probes.train.train_probe``: L2 logistic regression, classes
  balanced, C chosen on dev AUROC);
- ``source_balanced``: the same with sample weights that give every source the same total weight
  within its label, so a large source does not set the direction alone;
- ``lda``: linear discriminant analysis with Ledoit-Wolf shrinkage of the covariance;
- ``mass_mean``: the difference of the class means (no covariance), reported to generalise better
  than logistic regression in some probing work.

Prints per held-out source and the mean AUROC, TPR at threshold and FPR on held-out ordinary traffic
per fit, side by side, and writes JSON. Features come from the cache ``guard train --preset default``
and ``guard benchmark-policies`` fill.

    .venv/bin/python tests/bench/bench_probe_fitting.py [--policy harmful_request]
        [--out tests/bench/results/probe_fitting.json]
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from lodo_report import finish, print_fold
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.linear_model import LogisticRegression

from guard.settings import Settings
from probes.data import Dataset
from probes.eval.defaults import PRESET_CONFIG, recipe_features
from probes.eval.lodo import Fold, folds, scored_fold
from probes.lm.model import LoadedModel, load_model
from probes.probe import sigmoid
from probes.train import _best, _dev_quality, train_probe

Scorer = Callable[[np.ndarray], np.ndarray]  # pooled features [n, layers, d] -> logits [n]
FITS = ("logistic", "source_balanced", "lda", "mass_mean")


def source_weights(data: Dataset) -> np.ndarray:
    """Per row: equal total weight for every source within a label, equal total weight per label; mean 1."""
    groups = Counter((r.source, r.label) for r in data.rows)
    per_label = Counter(label for _, label in groups)
    weights = np.array([1.0 / (groups[r.source, r.label] * per_label[r.label]) for r in data.rows])
    return weights * len(weights) / weights.sum()


def fit(name: str, lm: LoadedModel, fold: Fold, x_train: np.ndarray, x_dev: np.ndarray) -> Scorer:
    y_train, y_dev = np.asarray(fold.train.labels), np.asarray(fold.dev.labels)
    mean, scale = x_train.mean(0), x_train.std(0) + 1e-6

    def flat(x: np.ndarray) -> np.ndarray:
        return ((x - mean) / scale).reshape(len(x), -1)

    if name == "logistic":
        probe = train_probe(lm, fold.train, fold.dev, "probe", PRESET_CONFIG, features=(x_train, x_dev), progress=False)
        return probe.probe.decision_function
    if name == "source_balanced":
        weights = source_weights(fold.train)
        models = {
            c: LogisticRegression(C=c, max_iter=2000).fit(flat(x_train), y_train, sample_weight=weights)
            for c in PRESET_CONFIG.cs
        }
        best = models[_best({c: _dev_quality(m.decision_function(flat(x_dev)), y_dev) for c, m in models.items()})]
        return lambda x: best.decision_function(flat(x))
    if name == "lda":
        lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(flat(x_train), y_train)
        return lambda x: lda.decision_function(flat(x))
    if name == "mass_mean":
        direction = flat(x_train)[y_train == 1].mean(0) - flat(x_train)[y_train == 0].mean(0)
        projected = flat(x_train) @ direction  # standardised, so that sigmoid does not saturate
        return lambda x: (flat(x) @ direction - projected.mean()) / projected.std()
    raise ValueError(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="harmful_request")
    parser.add_argument("--out", type=Path, default=Path("tests/bench/results/probe_fitting.json"))
    args = parser.parse_args()
    settings = Settings()
    lm = load_model(settings.model, cache_dir=settings.cache_dir, dtype=settings.dtype)
    splits, rows_of = recipe_features(lm, [args.policy], settings.data_dir, PRESET_CONFIG, cache_dir=settings.cache_dir)
    train, dev, _ = splits[args.policy]
    dataset = Dataset(train.rows + dev.rows)
    features = rows_of(args.policy, dataset)
    index = {row.key: i for i, row in enumerate(dataset.rows)}
    results = []
    for fold in folds(dataset):

        def x(data: Dataset) -> np.ndarray:
            return features[[index[r.key] for r in data.rows]]

        scores = {}
        for name in FITS:
            score = fit(name, lm, fold, x(fold.train), x(fold.dev))
            scores[name] = sigmoid(score(x(fold.dev))), sigmoid(score(x(fold.test)))
        row = scored_fold(fold, scores, PRESET_CONFIG)
        results.append(row)
        print_fold(row, FITS)
    report = {"policy": args.policy, "layers": list(PRESET_CONFIG.layers)}
    finish(results, FITS, f"fit ({args.policy})", report, args.out)


if __name__ == "__main__":
    main()
