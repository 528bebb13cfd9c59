"""The probe bank: every active policy's probe scored for a whole batch with one matrix product per layer.

Each probe is folded to raw-feature weights (standardisation included) and placed in a per-layer
matrix ``W[layer]: [d_model, n_policies]``; probes that do not read a layer have zero columns there.
A policy's per-token logit contribution is ``sum_layer h[layer] @ W[layer]``; its score for a span is
``sigmoid(mean_over_tokens(contribution) + bias)``, which is exactly the probe applied to the
mean-pooled features it was trained on; a ``tail`` probe's is its contribution at the prompt's last token
(where the model is about to answer). A probe calibrated for streaming (``probes.stream``) scores a
reply by the moving average of its contributions instead (``alpha`` > 0), at its streamed threshold.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from guard.interventions import Ablation, direction_vectors, probe_vectors
from guard.policy import Action, Policy
from probes.direction import Direction
from probes.probe import LinearProbe, shifted


@dataclass(frozen=True)
class ProbeBank:
    names: tuple[str, ...]
    layers: tuple[int, ...]
    weights: dict[int, torch.Tensor]  # layer -> [d_model, n_policies]
    bias: torch.Tensor  # [n_policies]
    thresholds: torch.Tensor  # [n_policies]
    versions: tuple[str, ...]
    pooling: tuple[str, ...]
    alpha: torch.Tensor  # [n_policies]: the moving average's weight of a new token; 0: the running mean
    tail: torch.Tensor  # [n_policies] bool: reads the prompt's last token, not its text (``tail`` pooling)
    scales: torch.Tensor  # [n_policies]: each probe's calibration slope, its logits per uncalibrated logit

    @classmethod
    def build(
        cls, probes: Sequence[LinearProbe], thresholds: Sequence[float | None], names: Sequence[str]
    ) -> ProbeBank:
        layers = tuple(sorted({layer for probe in probes for layer in probe.layers}))
        d_model = probes[0].weight.shape[1] if probes else 0
        weights = {layer: np.zeros((d_model, len(probes)), dtype=np.float64) for layer in layers}
        bias = np.zeros(len(probes))
        for j, probe in enumerate(probes):
            folded, bias[j] = probe.folded()
            for i, layer in enumerate(probe.layers):
                weights[layer][:, j] = folded[i]
        chosen = [t if t is not None else _threshold(p) for p, t in zip(probes, thresholds, strict=True)]
        return cls(
            names=tuple(names),
            layers=layers,
            weights={k: torch.tensor(v, dtype=torch.float32) for k, v in weights.items()},
            bias=torch.tensor(bias, dtype=torch.float32),
            thresholds=torch.tensor(chosen, dtype=torch.float32),
            versions=tuple(p.version for p in probes),
            pooling=tuple(p.pooling for p in probes),
            alpha=torch.tensor([p.stream[0] if p.stream else 0.0 for p in probes], dtype=torch.float32),
            tail=torch.tensor([p.pooling == "tail" for p in probes], dtype=torch.bool),
            scales=torch.tensor([p.calibration_slope for p in probes], dtype=torch.float64),
        )

    def __len__(self) -> int:
        return len(self.names)

    def token_logits(self, hidden: dict[int, torch.Tensor]) -> torch.Tensor:
        """Per-token logit contributions, bias excluded: ``hidden[layer]: [..., d_model]`` -> ``[..., n_policies]``."""
        if not self.layers:
            raise ValueError("the probe bank is empty")
        total = hidden[self.layers[0]].float() @ self.weights[self.layers[0]]
        for layer in self.layers[1:]:
            total = total + hidden[layer].float() @ self.weights[layer]
        return total

    def layer_logits(self, hidden: dict[int, torch.Tensor]) -> torch.Tensor:
        """Per-token contributions layer by layer (``[n_layers, ..., n_policies]``, ``self.layers`` order): what
        ``token_logits`` sums, kept apart for an explanation."""
        return torch.stack([hidden[layer].float() @ self.weights[layer] for layer in self.layers])

    def scores(self, mean_logits: torch.Tensor) -> torch.Tensor:
        """Scores from mean per-token contributions ``[..., n_policies]``."""
        return torch.sigmoid(mean_logits + self.bias)


def _threshold(probe: LinearProbe) -> float:
    """A probe's own threshold: its streamed one when it streams (a policy's ``threshold`` overrides either)."""
    return probe.stream[1] if probe.stream else probe.threshold


def policy_thresholds(policies: Sequence[Policy], probes: Sequence[LinearProbe]) -> list[float]:
    """Each policy's threshold: its own ``threshold``, else its probe's, moved by the set's shift (in the probe's
    uncalibrated logits, so that calibrating a probe changes its scores, never what the set flags)."""
    return [
        shifted(_threshold(probe) if p.threshold is None else p.threshold, p.shift * probe.calibration_slope)
        for p, probe in zip(policies, probes, strict=True)
    ]


@dataclass(frozen=True)
class Shadow:
    """Shadow versions scored next to the active ones, never acted on: one column per shadowed policy."""

    bank: ProbeBank
    policies: torch.Tensor  # [n_shadowed] long: each column's policy index
    mean_pooled: torch.Tensor  # [n_shadowed] bool

    @classmethod
    def build(cls, policies: Sequence[Policy], probes: Mapping[str, LinearProbe]) -> Shadow | None:
        index = [i for i, p in enumerate(policies) if p.name in probes]
        if not index:
            return None
        chosen = [policies[i] for i in index]
        versions = [probes[p.name] for p in chosen]
        bank = ProbeBank.build(versions, policy_thresholds(chosen, versions), [p.name for p in chosen])
        pooled = torch.tensor([pool == "mean" for pool in bank.pooling], dtype=torch.bool)
        return cls(bank, torch.tensor(index, dtype=torch.long), pooled)


@dataclass(frozen=True)
class ProbeSet:
    """One version of every policy's probe: the scoring bank and the ablation directions built from it (or
    from the direction artifacts ``ablate`` policies name), and the shadow versions scored beside them.

    A request keeps the set it started with, so a hot reload never changes a reply mid-way.
    """

    probes: tuple[LinearProbe, ...]
    bank: ProbeBank
    ablation: Ablation
    mean_pooled: torch.Tensor  # [n_policies] bool: running mean (else last token)
    version: str  # names every policy's probe and ablated direction version: sets alike iff versions are equal
    shadows: Mapping[str, LinearProbe] = field(default_factory=dict)  # policy -> its shadow version's probe
    shadow: Shadow | None = None
    along: Mapping[str, Direction] = field(default_factory=dict)  # ablate policy -> the direction it ablates along

    @classmethod
    def build(
        cls,
        policies: Sequence[Policy],
        probes: Sequence[LinearProbe],
        shadows: Mapping[str, LinearProbe] = {},
        directions: Mapping[str, Direction] = {},
    ) -> ProbeSet:
        """``directions``: by the name policies give them, at least those the ``ablate`` policies name."""
        named = {p.name: p.along for p in policies if p.action is Action.ABLATE and p.along}
        missing = sorted(set(named.values()) - set(directions))
        if missing:
            raise ValueError(f"ablate policies ablate along directions that were not loaded: {missing}")
        return cls._assemble(policies, probes, shadows, {name: directions[along] for name, along in named.items()})

    @classmethod
    def _assemble(
        cls,
        policies: Sequence[Policy],
        probes: Sequence[LinearProbe],
        shadows: Mapping[str, LinearProbe],
        along: Mapping[str, Direction],
    ) -> ProbeSet:
        by_name = {p.name: p for p in policies}
        for policy, probe in [*zip(policies, probes, strict=True), *((by_name[k], v) for k, v in shadows.items())]:
            if probe.pooling == "tail" and policy.on_output:
                raise ValueError(
                    f"policy {policy.name}: probe {probe.name} reads the prompt's last token (pooling 'tail'), "
                    "so it serves on the prompt stage only"
                )
        bank = ProbeBank.build(probes, policy_thresholds(policies, probes), [p.name for p in policies])
        ablating = [(p, probe) for p, probe in zip(policies, probes, strict=True) if p.action is Action.ABLATE]
        ablation = Ablation(
            [direction_vectors(along[p.name]) if p.name in along else probe_vectors(probe) for p, probe in ablating]
        )
        pooled = torch.tensor([pool == "mean" for pool in bank.pooling], dtype=torch.bool)
        named = [f"{p.name}={probe.version}" for p, probe in zip(policies, probes, strict=True)]
        named += [f"{name}@{direction.version}" for name, direction in sorted(along.items())]
        version = hashlib.sha256(",".join(named).encode()).hexdigest()[:12]
        shadows = dict(shadows)
        return cls(tuple(probes), bank, ablation, pooled, version, shadows, Shadow.build(policies, shadows), along)

    @property
    def layers(self) -> set[int]:
        """Every layer a pass must keep for this set: its probes' and its shadows'."""
        return set(self.bank.layers) | set(self.shadow.bank.layers if self.shadow else ())

    def replace(self, policies: Sequence[Policy], name: str, probe: LinearProbe) -> ProbeSet:
        index = [p.name for p in policies].index(name)
        shadows = {k: v for k, v in self.shadows.items() if k != name or v.version != probe.version}
        probes = [probe if i == index else p for i, p in enumerate(self.probes)]
        return ProbeSet._assemble(policies, probes, shadows, self.along)

    def with_shadow(self, policies: Sequence[Policy], name: str, probe: LinearProbe | None) -> ProbeSet:
        """The same set with ``probe`` shadowing policy ``name`` (``None``: no shadow for it)."""
        shadows = {k: v for k, v in self.shadows.items() if k != name}
        if probe is not None:
            shadows[name] = probe
        return ProbeSet._assemble(policies, self.probes, shadows, self.along)

    def with_direction(self, policies: Sequence[Policy], direction: Direction) -> ProbeSet:
        """The same set with each ``ablate`` policy that names ``direction`` ablating along this version of it."""
        named = {p.name for p in policies if p.name in self.along and p.along == direction.name}
        if not named:
            return self
        along = {name: direction if name in named else d for name, d in self.along.items()}
        return ProbeSet._assemble(policies, self.probes, self.shadows, along)
