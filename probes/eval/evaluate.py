"""Scoring a probe on a labelled dataset, side by side with text baselines trained on the probe's own rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from probes.data import Dataset
from probes.eval.baselines import BASELINES, fit_baseline
from probes.features import extract
from probes.lm.model import LoadedModel
from probes.metrics import binary_metrics
from probes.probe import LinearProbe


@dataclass(frozen=True)
class Scored:
    metrics: dict
    scores: np.ndarray


@dataclass(frozen=True)
class Evaluation:
    probe: Scored
    baselines: dict[str, Scored] = field(default_factory=dict)

    def as_json(self, probe: LinearProbe) -> dict:
        """Probe metrics at the top level, then identity and the baselines' metrics."""
        return {
            **self.probe.metrics,
            "probe": probe.name,
            "probe_version": probe.version,
            "layers": list(probe.layers),
            "pooling": probe.pooling,
            "baselines": {name: scored.metrics for name, scored in self.baselines.items()},
        }


def probe_scores(
    lm: LoadedModel, probe: LinearProbe, dataset: Dataset, *, cache_dir: Path | None = None, progress: bool = True
) -> np.ndarray:
    max_text_tokens = int(probe.manifest.get("max_text_tokens", 256))
    features = extract(
        lm,
        dataset,
        probe.layers,
        pooling=probe.pooling,
        max_text_tokens=max_text_tokens,
        cache_dir=cache_dir,
        progress=progress,
    )
    return probe.predict_proba(features)


def evaluate(
    lm: LoadedModel,
    probe: LinearProbe,
    dataset: Dataset,
    *,
    baseline_data: tuple[Dataset, Dataset] | None = None,
    baselines: tuple[str, ...] = BASELINES,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> Evaluation:
    """Probe metrics at its own threshold; with ``baseline_data`` (train, dev) the baselines' too."""
    scores = probe_scores(lm, probe, dataset, cache_dir=cache_dir, progress=progress)
    labels = dataset.labels
    result = {}
    if baseline_data is not None:
        target_fpr = float(probe.manifest.get("target_fpr", 0.01))
        for name in baselines:
            fitted = fit_baseline(name, *baseline_data, target_fpr, traffic_fpr=probe.manifest.get("traffic_fpr"))
            base_scores = fitted.scores(dataset)
            result[name] = Scored(binary_metrics(labels, base_scores, fitted.threshold), base_scores)
    return Evaluation(Scored(binary_metrics(labels, scores, probe.threshold), scores), result)
