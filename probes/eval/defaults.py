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
) -> tuple[dict[str, tuple[Dataset, Dataset, dict]], Callable[[str, Dataset], np.ndarray]]:
    """Each policy's train/dev split, and a lookup of a policy's features for any of its rows.

    Features come for ``config.layers`` (all layers when none), as each recipe reads its rows
    (``recipe_config``). The union of the texts of the policies that read alike is extracted once, at
    every layer (prompt recipes share most rows, reply recipes share none with them): one
    feature-cache entry each, so every command that asks for the same policies reuses them.
    """
    unknown = set(names) - set(RECIPES)
    if unknown:
        raise KeyError(f"unknown polic{'ies' if len(unknown) > 1 else 'y'} {sorted(unknown)}; known: {sorted(RECIPES)}")
    splits = {name: recipe_splits(name, data_dir, extra) for name in names}
    # every layer is extracted (one cache entry whichever layers a run concatenates), then sliced
    chosen = [normalise_layer(layer, lm.num_layers) for layer in config.layers] if config.layers else slice(None)
    configs = {name: replace(recipe_config(name, config), layers=None) for name in names}
    reads = {name: (RECIPES[name].stage, configs[name].pooling, configs[name].max_text_tokens) for name in names}
    features, index = {}, {}
    for reading in sorted(set(reads.values())):
        alike = [name for name in names if reads[name] == reading]
        union = deduplicate(
            Row(row.text, 0, row.prompt) for name in alike for row in (*splits[name][0].rows, *splits[name][1].rows)
        )
        features[reading] = extract_candidates(lm, union, configs[alike[0]], cache_dir=cache_dir, progress=progress)
        index[reading] = {row.key: i for i, row in enumerate(union.rows)}

    def rows_of(name: str, data: Dataset) -> np.ndarray:
        reading = reads[name]
        return features[reading][[index[reading][row.key] for row in data.rows]][:, chosen]

    return splits, rows_of


def recipe_config(name: str, config: TrainConfig, *, own_rule: bool = True) -> TrainConfig:
    """``config`` as policy ``name`` reads its rows: a recipe may fix its pooling and how many tokens it reads, and,
    with ``own_rule`` (the command names no threshold rule), its threshold rule."""
    recipe = RECIPES[name]
    config = replace(
        config,
        pooling=recipe.pooling or config.pooling,
        max_text_tokens=recipe.max_text_tokens or config.max_text_tokens,
    )
    if not own_rule:
        return config
    return replace(
        config,
        target_fpr=config.target_fpr if recipe.target_fpr is None else recipe.target_fpr,
        traffic_fpr=config.traffic_fpr if recipe.traffic_fpr is None else recipe.traffic_fpr,
    )


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
    own_rule: bool = True,
) -> dict[str, TrainResult]:
    """``extra``: hand-labelled rows added to every named policy's train split (see ``recipe_splits``);
    ``own_rule``: a recipe's threshold rule, where it has one, replaces ``config``'s."""
    config = config or PRESET_CONFIG
    splits, rows_of = recipe_features(lm, names, data_dir, config, cache_dir=cache_dir, progress=progress, extra=extra)
    results = {}
    for name, (train, dev, provenance) in splits.items():
        own = recipe_config(name, config, own_rule=own_rule)
        result = train_probe(
            lm,
            train,
            dev,
            name,
            own,
            provenance=provenance,
            features=(rows_of(name, train), rows_of(name, dev)),
            progress=progress,
        )
        if is_reply_data(dev):  # an output-stage policy: thresholded as the server streams it
            result = replace(result, probe=calibrate(lm, result.probe, dev, own.target_fpr))
        result.probe.save(out_dir / name)
        results[name] = result
    return results
