"""Calibrating a probe's probability for sources it never saw, chosen on leave-one-dataset-out folds.

A probe is trained per fold as shipped (``probes.eval.lodo.fold_probes``) and scores its held-out
source plus held-out ordinary traffic. Each calibrator is a monotone map of the probe's logit, fitted
on the *other* folds' held-out scores (each scored by its own fold's probe: what a score means on a
source its probe never saw) and judged on the fold left out, by the expected calibration error:

- ``raw``: the probe's own probability;
- ``platt``: ``sigmoid(slope * logit + intercept)``, fitted by logistic regression;
- ``isotonic``: isotonic regression of the label on the probability.

A shipped probe carries the winner of ``raw`` and ``platt`` (lowest mean ECE; ``platt`` only with a
positive slope), fitted on every fold's held-out scores and folded into its weight, bias and
threshold (``LinearProbe.calibrated``), so a server scores it calibrated at no cost and flags the
rows it flagged before (to float rounding at the threshold). Isotonic regression is a step function
that no linear probe carries; it is measured beside them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from probes.data import Dataset
from probes.eval.lodo import fold_probes
from probes.lm.model import LoadedModel
from probes.probe import LinearProbe, logit, sigmoid
from probes.train import TrainConfig

BINS = 10
METHODS = ("raw", "platt", "isotonic")
CARRIED = ("raw", "platt")  # the calibrators a linear probe carries

Calibrator = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Scored:
    """One fold's labels and its probe's probabilities, on the fold's dev split and on its held-out set."""

    heldout: str
    dev: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]


def ece(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Expected calibration error over ``BINS`` equal-width bins of the probability: the mean gap between a
    bin's mean probability and its share of positives, weighted by its rows."""
    bins = np.minimum((probabilities * BINS).astype(int), BINS - 1)
    gaps = [
        abs(labels[bins == b].mean() - probabilities[bins == b].mean()) * np.sum(bins == b)
        for b in range(BINS)
        if np.any(bins == b)
    ]
    return float(sum(gaps) / len(labels))


def fit_platt(probabilities: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """``(slope, intercept)`` of the logistic map of the logit that fits ``labels`` best."""
    model = LogisticRegression(C=1e4).fit(logit(probabilities)[:, None], labels)
    return float(model.coef_[0, 0]), float(model.intercept_[0])


def platt(probabilities: np.ndarray, labels: np.ndarray) -> Calibrator:
    slope, intercept = fit_platt(probabilities, labels)
    return lambda p: sigmoid(slope * logit(p) + intercept)


def isotonic(probabilities: np.ndarray, labels: np.ndarray) -> Calibrator:
    return IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(probabilities, labels).predict


FITS: dict[str, Callable[[np.ndarray, np.ndarray], Calibrator]] = {
    "raw": lambda p, y: lambda q: q,
    "platt": platt,
    "isotonic": isotonic,
}


def fold_scores(
    lm: LoadedModel, name: str, dataset: Dataset, features: np.ndarray, config: TrainConfig
) -> list[Scored]:
    """Per leave-one-dataset-out fold, the probe trained on it as shipped and its probabilities."""
    return [
        Scored(
            fold.heldout,
            (np.asarray(fold.dev.labels), scores(fold.dev)),
            (np.asarray(fold.test.labels), scores(fold.test)),
        )
        for fold, _, scores in fold_probes(lm, name, dataset, features, config)
    ]


def pooled(folds: Sequence[Scored]) -> tuple[np.ndarray, np.ndarray]:
    """The folds' held-out probabilities and labels, together."""
    return np.concatenate([f.test[1] for f in folds]), np.concatenate([f.test[0] for f in folds])


def heldout_table(folds: Sequence[Scored]) -> list[dict]:
    """Per fold, the held-out ECE of each method, fitted on the other folds' held-out scores."""
    rows = []
    for k, fold in enumerate(folds):
        labels, scores = fold.test
        others = pooled([f for j, f in enumerate(folds) if j != k])
        rows.append(
            {
                "heldout": fold.heldout,
                "n": len(labels),
                **{m: ece(labels, FITS[m](*others)(scores)) for m in METHODS},
            }
        )
    return rows


def mean_ece(table: Sequence[dict]) -> dict[str, float]:
    return {m: float(np.mean([row[m] for row in table])) for m in METHODS}


def calibrate(probe: LinearProbe, folds: Sequence[Scored]) -> tuple[LinearProbe, dict]:
    """``probe`` with the calibrator that a linear probe carries and that leads the held-out table, fitted on
    every fold; and the record of the choice (also in the probe's manifest under ``calibration``)."""
    table = heldout_table(folds)
    means = mean_ece(table)
    fitted = fit_platt(*pooled(folds))
    # a slope that is not positive ranks the held-out scores backwards: no calibration of this probe
    method = min(CARRIED if fitted[0] > 0 else ("raw",), key=lambda m: means[m])
    slope, intercept = fitted if method == "platt" else (1.0, 0.0)
    record = {
        "method": method,
        "slope": slope,
        "intercept": intercept,
        "platt_fitted": {"slope": fitted[0], "intercept": fitted[1]},
        "fitted_on": "every leave-one-dataset-out fold's held-out scores",
        "heldout_ece": means,
        "folds": table,
    }
    return probe.calibrated(slope, intercept, record), record
