"""The one route for hidden states into the engine: every forward pass's layer callback.

Whatever runs the model (the lean step, compiled or not, or transformers' forward), each decoder
layer's output reaches ``LayerTap`` as ``[tokens, 1, d_model]``, one token a row, in the pass's row
order; a pass that calls back once per segment continues where the last call stopped. The tap applies
each row's ablations (``guard.interventions``) and keeps the layers the probes read.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from guard.interventions import Ablation, Steering
from probes.lm.step import OnLayer


class LayerTap:
    def __init__(
        self,
        ablations: Sequence[tuple[Ablation, torch.Tensor]],
        keep: Collection[int],
        steering: tuple[Steering, torch.Tensor] | None = None,
    ) -> None:
        """``ablations``: each probe set's directions and its mask ``[tokens, n_directions]`` for the pass's rows;
        ``steering``: the steered directions and their strengths ``[tokens, n_directions]``."""
        self.ablations, self.keep = ablations, keep
        # what steering adds, by layer, worked out once a pass: ``[tokens, d_model]``
        self.added = steering[0].additions(steering[1]) if steering is not None else {}
        self._parts: dict[int, list[torch.Tensor]] = {}
        self._rows: dict[int, int] = {}  # per layer: rows seen so far in this pass

    def __call__(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        start = self._rows.get(layer, 0)
        self._rows[layer] = start + hidden.shape[0]
        for ablation, mask in self.ablations:
            hidden = ablation.apply(layer, hidden, mask[start : start + hidden.shape[0]])
        if layer in self.added:
            hidden = hidden + self.added[layer][start : start + hidden.shape[0], None, :].to(hidden.dtype)
        if layer in self.keep:
            self._parts.setdefault(layer, []).append(hidden)
        return hidden

    def hidden(self, layer: int) -> torch.Tensor:
        """``[tokens, d_model]``: the layer's output for every row of the pass, as the next layer read it."""
        parts = self._parts[layer]
        whole = parts[0] if len(parts) == 1 else torch.cat(parts)
        return whole.reshape(-1, whole.shape[-1])


def joined(rows: int, first: LayerTap | None, rest: LayerTap | None) -> OnLayer | None:
    """The layer callback of a pass that serves two parties: ``first`` sees its first ``rows`` rows (a decode
    step's), ``rest`` the rows after them (the prompt chunks riding in it); ``None`` when neither taps."""
    if first is None and rest is None:
        return None

    def on_layer(layer: int, hidden: torch.Tensor) -> torch.Tensor:
        top, bottom = hidden[:rows], hidden[rows:]
        top = top if first is None else first(layer, top)
        return torch.cat([top, bottom if rest is None else rest(layer, bottom)])

    return on_layer
