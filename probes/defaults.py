"""The default policies shipped inside the package, and training them reproducibly from the data pool.

``guard train --preset default`` runs :func:`train_recipes` for every recipe in ``probes.presets``:
the union of all policies' texts is extracted once (all layers, cached on disk), then each policy is
split, swept and fitted on its own rows, and written to ``probes/shipped/<name>/``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from probes.data import Dataset, Row, deduplicate, split
from probes.layers import normalise_layer
from probes.model import LoadedModel
from probes.presets import RECIPES
from probes.probe import LinearProbe, ProbeError
from probes.train import TrainConfig, TrainResult, extract_candidates, train_probe

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
DEV_FRACTION = 0.2
# The shipped policies' method, chosen on the leave-one-dataset-out table (README "Default policies"):
# mean-pooled layers 9, 15 and 21 concatenated beat the best layer of a sweep on unseen sources.
PRESET_LAYERS = (9, 15, 21)
PRESET_CONFIG = TrainConfig(layers=PRESET_LAYERS)


def shipped_names() -> list[str]:
    return (
        sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / "manifest.json").is_file()) if SHIPPED_DIR.is_dir() else []
    )


def resolve_probe(reference: str | Path, model_fingerprint: str | None = None) -> Path:
    """A probe directory from a path, or from the name of a shipped default policy.

    Shipped policies exist per numeric path with its own fingerprint (``shipped/<name>`` for float32
    and bfloat16, ``shipped/int8/<name>``): the one trained on ``model_fingerprint`` wins.
    """
    path = Path(reference)
    if (path / "manifest.json").is_file():
        return path
    found = [
        candidate
        for candidate in (SHIPPED_DIR / str(reference), *sorted(SHIPPED_DIR.glob(f"*/{reference}")))
        if (candidate / "manifest.json").is_file()
    ]
    for candidate in found:
        if json.loads((candidate / "manifest.json").read_text()).get("model_fingerprint") == model_fingerprint:
            return candidate
    if found:
        return found[0]  # loading it with a fingerprint check then says which model it belongs to
    raise ProbeError(
        f"{reference!r} is neither a probe directory nor a shipped policy ({', '.join(shipped_names()) or 'none'})"
    )


def load_shipped(name: str, *, model_fingerprint: str | None = None) -> LinearProbe:
    return LinearProbe.load(resolve_probe(name, model_fingerprint), model_fingerprint=model_fingerprint)


def recipe_splits(name: str, data_dir: Path) -> tuple[Dataset, Dataset, dict]:
    dataset, provenance = RECIPES[name].rows(data_dir)
    train, dev = split(dataset, dev_fraction=DEV_FRACTION, seed=0)
    return train, dev, {**provenance, "dev_fraction": DEV_FRACTION}


def recipe_features(
    lm: LoadedModel,
    names: Sequence[str],
    data_dir: Path,
    config: TrainConfig,
    *,
    cache_dir: Path | None = None,
    progress: bool = True,
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
    splits = {name: recipe_splits(name, data_dir) for name in names}
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
) -> dict[str, TrainResult]:
    config = config or PRESET_CONFIG
    splits, rows_of = recipe_features(lm, names, data_dir, config, cache_dir=cache_dir, progress=progress)
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
        result.probe.save(out_dir / name)
        results[name] = result
    return results
