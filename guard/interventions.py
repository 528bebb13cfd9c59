"""Interventions inside the shared decode batch, each a small operator applied per row by a mask.

- ``Ablation``: ``h <- h - (h . r) r`` for each row's active directions. An ``ablate`` policy projects out
  either its probe's difference-of-class-means direction at each layer the probe reads, or a direction
  artifact's vector (the one at its recommended layer, chosen by its effect: ``guard directions``) at
  every layer, as Arditi et al. ablate (unit-normalised either way).
- ``Steering``: ``h <- h + s r`` at a direction's layer, ``s`` the row's strength (``refuse`` policies
  steer along the model's refusal direction, ``steer`` policies and dials along their own,
  ``probes.direction``).

Which rows an operator acts on is a ``[rows, n_directions]`` mask (or strengths) set before every
forward pass, so sequences with and without interventions share one batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from probes.direction import Direction
from probes.probe import LinearProbe


class Ablation:
    def __init__(self, vectors: Sequence[Mapping[int, np.ndarray]]) -> None:
        """``vectors``: for each ablated direction, the vector projected out at each layer it acts on."""
        layers = sorted({layer for by_layer in vectors for layer in by_layer})
        d_model = next((len(vector) for by_layer in vectors for vector in by_layer.values()), 0)
        self.directions: dict[int, torch.Tensor] = {}
        for layer in layers:
            rows = np.zeros((len(vectors), d_model), dtype=np.float32)
            for j, by_layer in enumerate(vectors):
                if layer in by_layer:
                    vector = np.asarray(by_layer[layer], dtype=np.float64)
                    rows[j] = vector / (np.linalg.norm(vector) or 1.0)
            self.directions[layer] = torch.from_numpy(rows)
        self.count = len(vectors)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.directions)

    def apply(self, layer: int, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``hidden[rows, pos, d_model]`` with the directions ``mask[rows, n]`` selects projected out."""
        if layer not in self.directions or not bool(mask.any()):
            return hidden
        directions = self.directions[layer].to(hidden.dtype)  # [n, d_model]
        # elementwise products and sums, not matrix products, whose kernels (and roundings) depend on the
        # number of rows: a row ablates bitwise alike alone or in any batch
        coefficients = (hidden[:, :, None, :] * directions).sum(-1) * mask[:, None, :].to(hidden.dtype)
        return hidden - (coefficients[..., None] * directions).sum(-2)


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
        self.steers_at = {layer: torch.tensor([d.layer == layer for d in directions]) for layer in layers}
        self.count = len(directions)

    def additions(self, strengths: torch.Tensor) -> dict[int, torch.Tensor]:
        """What each row's steering adds at each layer a direction steers at: ``[rows, d_model]`` by layer,
        for ``strengths`` ``[rows, n_directions]``; layers where every row's strength is 0 add nothing."""
        return {
            layer: (strengths[:, :, None] * vectors).sum(1)  # per row, bitwise alike in any batch
            for layer, vectors in self.vectors.items()
            if bool(strengths[:, self.steers_at[layer]].any())
        }


def probe_vectors(probe: LinearProbe) -> dict[int, np.ndarray]:
    """What ablating along a probe projects out: its difference of class means at each layer it reads."""
    return {layer: probe.direction[i] for i, layer in enumerate(probe.layers)}


def direction_vectors(direction: Direction) -> dict[int, np.ndarray]:
    """What ablating along a direction artifact projects out: its recommended layer's vector, at every layer."""
    return dict.fromkeys(direction.layers, direction.vector(direction.layer))
