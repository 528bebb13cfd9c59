"""The default policies shipped inside the package, and training them reproducibly from the data pool.

``guard train --preset default`` runs :func:`train_recipes` for every recipe in ``probes.eval.presets``:
the union of all policies' texts is extracted once (all layers, cached on disk), then each policy is
split, swept and fitted on its own rows, and written to ``probes/shipped/<name>/``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from probes.catalog import SHIPPED_DIR
from probes.data import Dataset, Row, deduplicate, split
from probes.eval.presets import PRESET_LAYERS, RECIPES
from probes.lm.layers import normalise_layer
from probes.lm.model import LoadedModel
from probes.stream import calibrate, is_reply_data
from probes.train import TrainConfig, TrainResult, extract_candidates, train_probe

DEV_FRACTION = 0.2
NO_ROWS = Dataset(())
PRESET_CONFIG = TrainConfig(layers=PRESET_LAYERS)


def recipe_splits(name: str, data_dir: Path, extra: Dataset = NO_ROWS) -> tuple[Dataset, Dataset, dict]:
    """The recipe's train and dev split, ``extra`` rows added to the train split: rows labelled by hand (``guard
    feedback export``), whose label wins over the pool's for the same text."""
    dataset, provenance = RECIPES[name].rows(data_dir)
    train, dev = split(dataset, dev_fraction=DEV_FRACTION, seed=0)
    provenance = {**provenance, "dev_fraction": DEV_FRACTION}
    if extra.rows:
        keys = {row.key for row in extra.rows}
        train = Dataset(tuple(r for r in train.rows if r.key not in keys) + extra.rows)
        dev = Dataset(tuple(r for r in dev.rows if r.key not in keys))
        provenance["extra_rows"] = {"n": len(extra.rows), "sha256": extra.sha256()}
    return train, dev, provenance


def recipe_features(
    lm: LoadedModel,
    names: Sequence[str],
    data_dir: Path,
    config: TrainConfig,
    *,
    cache_dir: Path | None = None,
    progress: bool = True,
    extra: Dataset = NO_ROWS,
) -> tuple[dict[str, tuple[Dataset, Dataset, dict]], Callable[[Dataset], np.ndarray]]:
    """Each policy's train/dev split, and a lookup of features for any of their rows.

    Features come for ``config.layers`` (all layers when none). The union of the policies' texts is
    extracted once per stage, at every layer (prompt recipes share most rows,
    reply recipes share none with them): one feature-cache entry each, so every command that asks
    for the same policies reuses them.
    """
    unknown = set(names) - set(RECIPES)
    if unknown:
        raise KeyError(f"unknown polic{'ies' if len(unknown) > 1 else 'y'} {sorted(unknown)}; known: {sorted(RECIPES)}")
    splits = {name: recipe_splits(name, data_dir, extra) for name in names}
    # every layer is extracted (one cache entry whichever layers a run concatenates), then sliced
    chosen = [normalise_layer(layer, lm.num_layers) for layer in config.layers] if config.layers else slice(None)
    config = replace(config, layers=None)
    features, index = {}, {}
    for stage in sorted({RECIPES[name].stage for name in names}):
        union = deduplicate(
            Row(row.text, 0, row.prompt)
            for name, (train, dev, _) in splits.items()
            if RECIPES[name].stage == stage
            for row in (*train.rows, *dev.rows)
        )
        features[stage] = extract_candidates(lm, union, config, cache_dir=cache_dir, progress=progress)
        index.update({row.key: (stage, i) for i, row in enumerate(union.rows)})

    def rows_of(data: Dataset) -> np.ndarray:
        where = [index[row.key] for row in data.rows]
        stages = {stage for stage, _ in where}
        if len(stages) == 1:  # every recipe's rows are of one stage: one fancy-index copy
            return features[stages.pop()][[i for _, i in where]][:, chosen]
        return np.stack([features[stage][i][chosen] for stage, i in where])

    return splits, rows_of


def train_recipes(
    lm: LoadedModel,
    names: Sequence[str],
    data_dir: Path,
    out_dir: Path = SHIPPED_DIR,
    config: TrainConfig | None = None,
    *,
    cache_dir: Path | None = None,
    progress: bool = True,
    extra: Dataset = NO_ROWS,
) -> dict[str, TrainResult]:
    """``extra``: hand-labelled rows added to every named policy's train split (see ``recipe_splits``)."""
    config = config or PRESET_CONFIG
    splits, rows_of = recipe_features(lm, names, data_dir, config, cache_dir=cache_dir, progress=progress, extra=extra)
    results = {}
    for name, (train, dev, provenance) in splits.items():
        result = train_probe(
            lm,
            train,
            dev,
            name,
            config,
            provenance=provenance,
            features=(rows_of(train), rows_of(dev)),
            progress=progress,
        )
        if is_reply_data(dev):  # an output-stage policy: thresholded as the server streams it
            result = replace(result, probe=calibrate(lm, result.probe, dev, config.target_fpr))
        result.probe.save(out_dir / name)
        results[name] = result
    return results
