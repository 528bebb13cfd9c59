"""Thresholds for policies served together: the share of ordinary traffic that any of them flags stays in budget.

Each policy's own threshold keeps its dev false positives within its target; served together, their
flags add up. :func:`fit_set_shift` finds one shift, in logits, that moves every flagging policy's
threshold until the whole set flags at most ``max_fpr`` of a sample of ordinary traffic; the policies
that block or intervene keep the thresholds they were validated at. It is one number for
the set, not a threshold per policy, so that it follows the traffic's score distribution rather than
the few prompts of the sample that some policy flags. A set's flag is then "some policy's logit
exceeds its own threshold's by more than the shift".

The ordinary traffic is ToxicChat's non-toxic prompts that no policy's recipe picks, split in two halves
by a hash of the text: thresholds are fitted on one and checked on the other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from probes.data import Dataset
from probes.eval.defaults import recipe_splits
from probes.eval.evaluate import probe_scores
from probes.eval.lodo import TRAFFIC
from probes.eval.presets import RECIPES
from probes.eval.sources import read_source
from probes.lm.model import LoadedModel
from probes.probe import LinearProbe, logit, shifted

_PAST = 1e-4  # logits


@dataclass(frozen=True)
class SetScores:
    """Each policy's scores of the two halves of held-out ordinary traffic and of its own dev positives."""

    fit: dict[str, np.ndarray]
    check: dict[str, np.ndarray]
    positives: dict[str, np.ndarray]
    rows: tuple[int, int]  # traffic rows in the fit and check halves


def score_set(
    lm: LoadedModel, probes: Mapping[str, LinearProbe], data_dir: Path, *, cache_dir: Path | None = None
) -> SetScores:
    """``probes`` by policy name; each must be a preset's (``guard train --preset``), whose dev rows it reads."""
    recipes = {name: probe.manifest.get("data", {}).get("preset") for name, probe in probes.items()}
    unknown = sorted(name for name, recipe in recipes.items() if recipe not in RECIPES)
    if unknown:
        raise ValueError(
            f"{unknown}: fitting a set needs probes trained by `guard train --preset`, so that the traffic it fits "
            "on is traffic they never trained on"
        )
    fit, check = held_out_traffic(data_dir, sorted(set(recipes.values())))

    def scores(probe: LinearProbe, data: Dataset) -> np.ndarray:
        return probe_scores(lm, probe, data, cache_dir=cache_dir, progress=False)

    def dev_positives(recipe: str) -> Dataset:
        return Dataset(tuple(r for r in recipe_splits(recipe, data_dir)[1].rows if r.label == 1))

    return SetScores(
        fit={name: scores(probe, fit) for name, probe in probes.items()},
        check={name: scores(probe, check) for name, probe in probes.items()},
        positives={name: scores(probe, dev_positives(recipes[name])) for name, probe in probes.items()},
        rows=(len(fit.rows), len(check.rows)),
    )


def set_fpr(
    scores: Mapping[str, np.ndarray],
    thresholds: Mapping[str, float],
    shift: float = 0.0,
    fixed: Set[str] = frozenset(),
    scales: Mapping[str, float] | None = None,
) -> float:
    """The share of rows that any policy flags, the thresholds of all but ``fixed`` moved by ``shift`` logits,
    times the policy's ``scales`` (its probe's ``calibration_slope``; 1 where none is given)."""
    scales = scales or {}
    moved = {name: t if name in fixed else shifted(t, shift * scales.get(name, 1.0)) for name, t in thresholds.items()}
    return float(np.mean(np.any([scores[name] > t for name, t in moved.items()], axis=0)))


def fit_set_shift(
    traffic: Mapping[str, np.ndarray],
    thresholds: Mapping[str, float],
    max_fpr: float,
    fixed: Set[str] = frozenset(),
    scales: Mapping[str, float] | None = None,
) -> float:
    """The smallest shift (in logits, at least 0) that, added to the threshold of every policy but ``fixed`` (times
    its ``scales``, as in :func:`set_fpr`), leaves at most ``max_fpr`` of the traffic rows scoring above any
    policy's threshold. ``traffic[name]`` are the policy's scores of the same rows, in the same order."""
    scales = scales or {}
    rows = len(next(iter(traffic.values())))
    held = np.any([traffic[name] > thresholds[name] for name in fixed], axis=0) if fixed else np.zeros(rows, bool)
    allowed = int(np.floor(max_fpr * rows + 1e-9)) - int(held.sum())  # rows the moving policies may still flag
    if allowed < 0:
        raise ValueError(
            f"the policies whose thresholds stay flag {held.mean():.3f} of the traffic alone, over {max_fpr}"
        )
    moving = [name for name in thresholds if name not in fixed]
    if not moving:
        return 0.0
    margins = np.max(
        [(logit(traffic[name]) - logit(thresholds[name])) / scales.get(name, 1.0) for name in moving], axis=0
    )[~held]
    ranked = np.sort(margins)[::-1]
    # just past the first row it must stop flagging, so that float32 scores and thresholds still keep it out
    return float(max(0.0, ranked[allowed] + _PAST)) if allowed < len(ranked) else 0.0


def held_out_traffic(data_dir: Path, recipes: Sequence[str]) -> tuple[Dataset, Dataset]:
    """ToxicChat's non-toxic prompts that none of ``recipes`` picks (train or dev), as two halves: (fit, check)."""
    used = {row.key for name in recipes for part in recipe_splits(name, data_dir)[:2] for row in part.rows}
    rows = [r for r in read_source(TRAFFIC, data_dir) if r.label == 0 and r.key not in used]
    fit = tuple(r for r in rows if _fit_half(r.key))
    return Dataset(fit), Dataset(tuple(r for r in rows if not _fit_half(r.key)))


def _fit_half(key: str) -> bool:
    return hashlib.sha256(f"set:{key}".encode()).digest()[0] < 128
