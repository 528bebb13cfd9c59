"""Leave-one-dataset-out evaluation: does a policy hold up on a source it never saw?

For each source dataset that feeds a policy, train on every other source (layer, C and threshold
chosen on a dev split of those), then score the held-out source. Half of the ordinary-traffic
negatives (ToxicChat non-toxic, split by a hash of the text) are never trained on in any fold and
join every held-out set, so each fold also reports the false-positive rate on unseen ordinary
traffic, and positive-only sources still get an AUROC. TF-IDF and MiniLM baselines are trained on
exactly the same rows with the same protocol.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from probes.data import Dataset, Row, split
from probes.eval.baselines import BASELINES, cached, fit_baseline, minilm_embedder, texts_of
from probes.lm.layers import normalise_layer
from probes.lm.model import LoadedModel
from probes.metrics import binary_metrics
from probes.probe import LinearProbe
from probes.train import TrainConfig, dev_threshold, train_probe

TRAFFIC = TrainConfig.traffic_source


@dataclass(frozen=True)
class Fold:
    heldout: str
    train: Dataset
    dev: Dataset
    test: Dataset


def folds(dataset: Dataset, *, min_rows: int = 20) -> list[Fold]:
    """One fold per source with at least ``min_rows`` rows; the held-out traffic half joins every test set."""
    traffic = tuple(r for r in dataset.rows if reserved(r))
    held = {r.key for r in traffic}
    out = []
    for source in sorted({r.source for r in dataset.rows}):
        own = tuple(r for r in dataset.rows if r.source == source and r.key not in held)
        if len(own) < min_rows:
            continue
        rest = Dataset(tuple(r for r in dataset.rows if r.source != source and r.key not in held))
        train, dev = split(rest, seed=0)
        extra = () if source == TRAFFIC else traffic
        out.append(Fold(source, train, dev, Dataset(own + extra)))
    return out


def reserved(row: Row) -> bool:
    """Whether a row is in the half of ordinary traffic that no fold trains on and every test set holds."""
    return row.source == TRAFFIC and row.label == 0 and hashlib.sha256(f"traffic:{row.key}".encode()).digest()[0] < 128


def evaluate_folds(
    lm: LoadedModel,
    name: str,
    dataset: Dataset,
    features: np.ndarray,
    config: TrainConfig | None = None,
    baselines: Sequence[str] = BASELINES,
) -> list[dict]:
    """Per fold: probe and baseline metrics on the held-out source (plus held-out traffic)."""
    config = config or TrainConfig()
    # folds reuse the same rows: each is embedded once, and only when MiniLM is compared at all
    embed = cached(minilm_embedder(), texts_of(dataset)) if "minilm" in baselines else None
    results = []
    for fold, probe, scores in fold_probes(lm, name, dataset, features, config):
        labels = fold.test.labels
        row = {
            "heldout": fold.heldout,
            "n": len(labels),
            "positives": sum(labels),
            "probe": summarise(labels, scores(fold.test), probe.threshold, fold.test),
        }
        for baseline in baselines:
            fitted = fit_baseline(
                baseline,
                fold.train,
                fold.dev,
                probe.manifest["target_fpr"],
                traffic_fpr=probe.manifest["traffic_fpr"],
                embed=embed if baseline == "minilm" else None,
            )
            row[baseline] = summarise(labels, fitted.scores(fold.test), fitted.threshold, fold.test)
        results.append(row)
    return results


def fold_probes(
    lm: LoadedModel, name: str, dataset: Dataset, features: np.ndarray, config: TrainConfig
) -> Iterator[tuple[Fold, LinearProbe, Callable[[Dataset], np.ndarray]]]:
    """Per fold: the probe trained on it as shipped, and its probabilities for any of the dataset's rows."""
    index = {row.key: i for i, row in enumerate(dataset.rows)}
    # the layers ``features`` holds, in order: config.layers (as non-negative indices), else all of them
    candidates = [normalise_layer(k, lm.num_layers) for k in config.layers or range(features.shape[1])]
    for fold in folds(dataset):

        def x(data: Dataset) -> np.ndarray:
            return features[[index[r.key] for r in data.rows]]

        probe = train_probe(
            lm, fold.train, fold.dev, name, config, features=(x(fold.train), x(fold.dev)), progress=False
        ).probe
        columns = [candidates.index(k) for k in probe.layers]
        yield fold, probe, lambda data, x=x, probe=probe, columns=columns: probe.predict_proba(x(data)[:, columns])


def summarise(labels: Sequence[int], scores: np.ndarray, threshold: float, test: Dataset) -> dict:
    """A held-out set's AUROC, AUPRC, TPR and FPR at ``threshold``, and the FPR on its ordinary-traffic rows."""
    m = binary_metrics(labels, scores, threshold)
    traffic = [s for s, r in zip(scores, test.rows, strict=True) if r.source == TRAFFIC and r.label == 0]
    return {
        "auroc": m["auroc"],
        "auprc": m["auprc"],
        "tpr_at_threshold": m["tpr_at_threshold"],
        "fpr_at_threshold": m["fpr_at_threshold"],
        "traffic_fpr": float(np.mean(np.asarray(traffic) > threshold)) if traffic else None,
    }


def scored_fold(fold: Fold, scores: dict[str, tuple[np.ndarray, np.ndarray]], config: TrainConfig) -> dict:
    """A fold's row for ways of scoring it, ``{name: (dev scores, test scores)}``: each is thresholded on dev
    by ``config``'s rule (the shipped one: its target FPR and traffic FPR) and summarised on the held-out set."""
    row = {"heldout": fold.heldout, "n": len(fold.test.rows), "positives": sum(fold.test.labels)}
    for name, (dev, test) in scores.items():
        threshold = dev_threshold(fold.dev, dev, config.target_fpr, config.traffic_fpr, config.traffic_source)
        row[name] = summarise(fold.test.labels, test, threshold, fold.test)
    return row


_TITLES = {"probe": "probe", "tfidf": "TF-IDF", "minilm": "MiniLM"}
_COLUMNS = ("auroc", "tpr_at_threshold", "traffic_fpr")  # a method comparison's means
_TABLE_COLUMNS = ("auroc", "auprc", "tpr_at_threshold", "fpr_at_threshold", "traffic_fpr")  # a policy's table


def markdown(tables: dict[str, list[dict]]) -> str:
    """One table per policy: rows are held-out sources, columns probe / TF-IDF / MiniLM (those evaluated)."""
    lines = []
    for name, rows in tables.items():
        models = [m for m in _TITLES if m in rows[0]]
        lines += [
            f"### `{name}`",
            "",
            f"| held-out source | n (pos) | AUROC {' / '.join(_TITLES[m] for m in models)} | AUPRC | "
            "TPR at threshold | FPR on held-out negatives | FPR on held-out traffic |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            cells = [" / ".join(_fmt(r[m][key]) for m in models) for key in _TABLE_COLUMNS]
            lines.append(f"| {r['heldout']} | {r['n']} ({r['positives']}) | {' | '.join(cells)} |")
        means = [" / ".join(_fmt(_mean(rows, m, key)) for m in models) for key in _TABLE_COLUMNS]
        lines += [f"| **mean** | | {' | '.join(means)} |", ""]
    return "\n".join(lines)


def compare_means(results: list[dict], methods: Sequence[str], title: str) -> tuple[dict[str, dict], str]:
    """Each method's metrics averaged over the folds, and a markdown table of them, a row a method."""
    means = {m: {key: _mean(results, m, key) for key in _COLUMNS} for m in methods}
    lines = [f"| {title} | mean AUROC | mean TPR at threshold | mean FPR on held-out traffic |", "|---|---|---|---|"]
    lines += [f"| {m} | " + " | ".join(_fmt(v) for v in values.values()) + " |" for m, values in means.items()]
    return means, "\n".join(lines)


def _mean(rows: list[dict], model: str, key: str) -> float | None:
    values = [r[model][key] for r in rows if r[model][key] is not None]
    return float(np.mean(values)) if values else None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
