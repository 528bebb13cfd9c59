"""Directional ablation inside the shared decode batch: ``h <- h - (h . r) r`` for each row's active directions.

Each ``ablate`` policy contributes its probe's difference-of-class-means direction at each layer the
probe reads (unit-normalised). Which rows ablate which directions is a ``[rows, n_directions]`` mask
set before every forward pass, so sequences with and without ablation share one batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

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
