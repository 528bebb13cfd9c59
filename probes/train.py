"""Fitting linear probes: a layer sweep, regularisation picked on dev, a threshold for a target FPR.

The procedure, deterministic for a given dataset and seed:
1. Pooled features for every decoder layer (or the ``layers`` asked for) of the train and dev rows.
2. Layer sweep: one standardised logistic regression per layer at ``sweep_c``; the layer with the best
   dev AUROC wins (dev log-loss breaks near-ties). With ``layers`` given, those layers are concatenated
   and no sweep runs.
3. ``C`` chosen from ``cs`` on dev AUROC (log-loss breaks near-ties) for the chosen layer(s).
4. Threshold: the lowest score at which at most ``target_fpr`` of dev negatives are flagged and, with
   ``traffic_fpr`` set, at most ``traffic_fpr`` of the dev negatives from ``traffic_source`` (ordinary
   user traffic, whose false positives are the ones users see).
"""

from __future__ import annotations

import importlib.metadata
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, roc_auc_score

from probes.data import Dataset
from probes.features import extract
from probes.lm.hooks import HOOK_SITE
from probes.lm.layers import normalise_layer
from probes.lm.model import LoadedModel
from probes.metrics import binary_metrics, threshold_for_fpr
from probes.probe import LinearProbe, sigmoid

_TIE = 1e-3


@dataclass(frozen=True)
class TrainConfig:
    layers: tuple[int, ...] | None = None
    pooling: str = "mean"
    target_fpr: float = 0.01
    traffic_fpr: float | None = 0.015  # no effect when dev has no rows from traffic_source
    traffic_source: str = "toxicchat"
    cs: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)
    sweep_c: float = 0.01
    max_text_tokens: int = 256
    seed: int = 0


@dataclass(frozen=True)
class TrainResult:
    probe: LinearProbe
    layer_auroc: dict[int, float] = field(default_factory=dict)
    dev_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Fit:
    weight: np.ndarray
    bias: float
    mean: np.ndarray
    scale: np.ndarray

    def logits(self, x: np.ndarray) -> np.ndarray:
        return np.einsum("nld,ld->n", (x - self.mean) / self.scale, self.weight) + self.bias


def fit_linear(x: np.ndarray, y: np.ndarray, c: float, seed: int = 0) -> _Fit:
    """Standardise ``x[n, layers, d]`` and fit an L2 logistic regression on the flattened features."""
    mean = x.mean(axis=0)
    scale = x.std(axis=0) + 1e-6
    flat = ((x - mean) / scale).reshape(len(x), -1)
    model = LogisticRegression(C=c, max_iter=2000, class_weight="balanced", random_state=seed).fit(flat, y)
    return _Fit(model.coef_.reshape(x.shape[1:]).astype(np.float32), float(model.intercept_[0]), mean, scale)


def train_probe(
    lm: LoadedModel,
    train: Dataset,
    dev: Dataset,
    name: str,
    config: TrainConfig | None = None,
    *,
    provenance: dict | None = None,
    features: tuple[np.ndarray, np.ndarray] | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a probe called ``name`` on ``train``, choosing layer, C and threshold on ``dev``.

    ``features`` (train, dev), when given, are pooled features already extracted for the candidate
    layers (all layers, or ``config.layers``) with ``config.pooling``; otherwise they are extracted here.
    """
    config = config or TrainConfig()
    for part, data in (("train", train), ("dev", dev)):
        counts = data.counts()
        if counts["positive"] < 2 or counts["negative"] < 2:
            raise ValueError(f"the {part} split needs at least 2 rows of each label, has {counts}")
    started = time.perf_counter()
    layers = _candidate_layers(lm, config.layers)
    if features is None:
        features = tuple(
            extract_candidates(lm, data, config, cache_dir=cache_dir, progress=progress) for data in (train, dev)
        )
    features = dict(zip(("train", "dev"), features, strict=True))
    extracted = time.perf_counter()
    y_train, y_dev = np.asarray(train.labels), np.asarray(dev.labels)
    layer_auroc: dict[int, float] = {}
    if config.layers is None:
        sweep = {}
        for j, layer in enumerate(layers):
            fit = fit_linear(features["train"][:, [j]], y_train, config.sweep_c, config.seed)
            sweep[j] = _dev_quality(fit.logits(features["dev"][:, [j]]), y_dev)
            layer_auroc[layer] = sweep[j][0]
        chosen = [_best(sweep)]
    else:
        chosen = list(range(len(layers)))
    x_train, x_dev = features["train"][:, chosen], features["dev"][:, chosen]
    fits = {c: fit_linear(x_train, y_train, c, config.seed) for c in config.cs}
    best_c = _best({c: _dev_quality(fit.logits(x_dev), y_dev) for c, fit in fits.items()})
    fit = fits[best_c]
    dev_scores = sigmoid(fit.logits(x_dev))
    threshold = dev_threshold(dev, dev_scores, config.target_fpr, config.traffic_fpr, config.traffic_source)
    train_scores = sigmoid(fit.logits(x_train))
    chosen_layers = tuple(layers[j] for j in chosen)
    manifest = {
        "model": {"name": lm.name, "num_layers": lm.num_layers, "hidden_size": lm.hidden_size},
        "model_fingerprint": lm.fingerprint,
        "hook_site": HOOK_SITE,
        "max_text_tokens": config.max_text_tokens,
        "target_fpr": config.target_fpr,
        "traffic_fpr": config.traffic_fpr,
        "traffic_source": config.traffic_source if config.traffic_fpr is not None else None,
        "regularisation_c": best_c,
        "metrics": {
            "dev": binary_metrics(y_dev, dev_scores, threshold),
            "train": binary_metrics(y_train, train_scores, threshold),
        },
        "layer_sweep_dev_auroc": {str(k): v for k, v in layer_auroc.items()},
        "data": {
            **(provenance or {}),
            "train_sha256": train.sha256(),
            "dev_sha256": dev.sha256(),
            "train_counts": train.counts(),
            "dev_counts": dev.counts(),
            "split_seed": config.seed,
        },
        "versions": _versions(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    probe = LinearProbe(
        name=name,
        layers=chosen_layers,
        weight=fit.weight,
        bias=fit.bias,
        mean=fit.mean.astype(np.float32),
        scale=fit.scale.astype(np.float32),
        direction=_class_mean_difference(x_train, y_train),
        threshold=threshold,
        pooling=config.pooling,
        manifest=manifest,
    )
    finished = time.perf_counter()
    seconds = {"extract": extracted - started, "fit": finished - extracted, "total": finished - started}
    return TrainResult(probe, layer_auroc, dev_scores, seconds)


def extract_candidates(
    lm: LoadedModel, dataset: Dataset, config: TrainConfig, *, cache_dir: Path | None = None, progress: bool = True
) -> np.ndarray:
    """Features of ``dataset`` for every layer training will consider under ``config``."""
    layers = _candidate_layers(lm, config.layers)
    return extract(
        lm,
        dataset,
        layers,
        pooling=config.pooling,
        max_text_tokens=config.max_text_tokens,
        cache_dir=cache_dir,
        progress=progress,
    )


def _candidate_layers(lm: LoadedModel, layers: Sequence[int] | None) -> list[int]:
    if layers is None:
        return list(range(lm.num_layers))
    resolved = [normalise_layer(layer, lm.num_layers) for layer in layers]
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"layers {list(layers)} name the same layer twice")
    return resolved


def dev_threshold(
    dev: Dataset,
    scores: np.ndarray,
    target_fpr: float,
    traffic_fpr: float | None = None,
    traffic_source: str = TrainConfig.traffic_source,
) -> float:
    """At most ``target_fpr`` of dev negatives flagged, and at most ``traffic_fpr`` of those from ``traffic_source``."""
    labels = np.asarray(dev.labels)
    threshold = threshold_for_fpr(scores[labels == 0], target_fpr)
    if traffic_fpr is None:
        return threshold
    traffic = [s for s, r in zip(scores, dev.rows, strict=True) if r.label == 0 and r.source == traffic_source]
    return max(threshold, threshold_for_fpr(traffic, traffic_fpr)) if traffic else threshold


def _dev_quality(logits: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    return float(roc_auc_score(y, logits)), float(log_loss(y, sigmoid(logits), labels=[0, 1]))


def _best(quality: dict) -> object:
    """Key with the highest AUROC; among keys within ``_TIE`` of it, the lowest log-loss."""
    top = max(auroc for auroc, _ in quality.values())
    near = [k for k, (auroc, _) in quality.items() if auroc >= top - _TIE]
    return min(near, key=lambda k: quality[k][1])


def _class_mean_difference(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x[y == 1].mean(axis=0) - x[y == 0].mean(axis=0)).astype(np.float32)


def _versions() -> dict[str, str]:
    names = ("guard", "torch", "transformers", "scikit-learn", "numpy")
    out = {}
    for dist in names:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out
