"""Interventions inside the shared decode batch, each a small operator applied per row by a mask.

- ``Ablation``: ``h <- h - (h . r) r`` for each row's active directions. Each ``ablate`` policy
  contributes its probe's difference-of-class-means direction at each layer the probe reads
  (unit-normalised).
- ``Steering``: ``h <- h + s r`` at a direction's layer, ``s`` the row's strength (``refuse`` policies
  steer along the model's refusal direction, ``steer`` policies and dials along their own,
  ``probes.direction``).

Which rows an operator acts on is a ``[rows, n_directions]`` mask (or strengths) set before every
forward pass, so sequences with and without interventions share one batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from probes.direction import Direction
from probes.probe import LinearProbe


class Ablation:
    def __init__(self, probes: Sequence[LinearProbe]) -> None:
        layers = sorted({layer for probe in probes for layer in probe.layers})
        d_model = probes[0].direction.shape[1] if probes else 0
        self.directions: dict[int, torch.Tensor] = {}
        for layer in layers:
            rows = np.zeros((len(probes), d_model), dtype=np.float32)
            for j, probe in enumerate(probes):
                if layer in probe.layers:
                    vector = probe.direction[probe.layers.index(layer)].astype(np.float64)
                    rows[j] = vector / (np.linalg.norm(vector) or 1.0)
            self.directions[layer] = torch.from_numpy(rows)
        self.count = len(probes)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.directions)

    def apply(self, layer: int, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``hidden[rows, pos, d_model]`` with the directions ``mask[rows, n]`` selects projected out."""
        if layer not in self.directions or not bool(mask.any()):
            return hidden
        directions = self.directions[layer].to(hidden.dtype)  # [n, d_model]
        coefficients = (hidden @ directions.T) * mask[:, None, :].to(hidden.dtype)  # [rows, pos, n]
        return hidden - coefficients @ directions


class Steering:
    """Activation addition inside the shared decode batch: ``h <- h + s * r`` at each direction's layer, with
    ``s`` each row's strength for it (``[rows, n_directions]``; 0 where a row is not steered)."""

    def __init__(self, directions: Sequence[Direction]) -> None:
        layers = sorted({direction.layer for direction in directions})
        d_model = directions[0].vectors.shape[1] if directions else 0
        self.vectors: dict[int, torch.Tensor] = {}
        for layer in layers:
            rows = np.zeros((len(directions), d_model), dtype=np.float32)
            for j, direction in enumerate(directions):
                if direction.layer == layer:
                    rows[j] = direction.vector(layer)
            self.vectors[layer] = torch.from_numpy(rows)
        self.count = len(directions)

    def apply(self, layer: int, hidden: torch.Tensor, strengths: torch.Tensor) -> torch.Tensor:
        """``hidden[rows, pos, d_model]`` plus each row's steering at ``layer``."""
        if layer not in self.vectors or not bool(strengths.any()):
            return hidden
        return hidden + (strengths.to(hidden.dtype) @ self.vectors[layer].to(hidden.dtype))[:, None, :]
