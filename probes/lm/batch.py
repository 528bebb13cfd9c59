"""The shared decode batch's KV cache: one row per sequence, aligned on shared columns.

Every sequence decodes in lockstep, so the newest token of every row sits in the same column. A row
whose history is shorter is left-padded (its attention mask is 0 there) and carries its own position
ids, so what it computes does not depend on its neighbours. Sequences join (their prefill cache is
left-padded to the batch width, or the batch is widened) and leave (rows are dropped, and columns
that are padding for every remaining row are trimmed) at token boundaries.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


class BatchCache:
    def __init__(self, config: object) -> None:
        self.config = config
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros((0, 0), dtype=torch.long)  # [rows, columns]

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    def add(self, row_cache: DynamicCache, length: int) -> int:
        """Append a single-row cache holding ``length`` tokens; returns the new row's index."""
        if self.cache is None or self.rows == 0:
            self.cache, self.mask = row_cache, torch.ones((1, length), dtype=torch.long)
            return 0
        if length > self.width:
            self._pad_left(length - self.width)
        pad = self.width - length
        for layer, new in zip(self.cache.layers, row_cache.layers, strict=True):
            layer.keys = torch.cat([layer.keys, _left_pad(new.keys, pad)], dim=0)
            layer.values = torch.cat([layer.values, _left_pad(new.values, pad)], dim=0)
        row_mask = torch.cat([torch.zeros(pad, dtype=torch.long), torch.ones(length, dtype=torch.long)])
        self.mask = torch.cat([self.mask, row_mask[None]], dim=0)
        return self.rows - 1

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order) and trim columns that are padding for all of them."""
        if rows == list(range(self.rows)):
            return  # nothing left or moved: no copy
        if not rows:
            self.cache, self.mask = None, torch.zeros((0, 0), dtype=torch.long)
            return
        index = torch.tensor(rows, dtype=torch.long)
        assert self.cache is not None
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index], layer.values[index]
        self.mask = self.mask[index]
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else self.width
        if start:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
            self.mask = self.mask[:, start:]

    def row(self, index: int, drop_last: int = 0) -> tuple[DynamicCache, int]:
        """A copy of one row as a single-row cache without its padding (and without its last ``drop_last`` tokens)."""
        assert self.cache is not None
        start = int(self.mask[index].nonzero()[0])
        end = self.width - drop_last
        single = DynamicCache(config=self.config)
        for i, layer in enumerate(self.cache.layers):
            keys = layer.keys[index : index + 1, :, start:end].clone()
            values = layer.values[index : index + 1, :, start:end].clone()
            single.update(keys, values, i)
        return single, end - start

    def step_mask(self) -> torch.Tensor:
        """The attention mask for the next decode step: every row attends to its history and its new token."""
        return torch.cat([self.mask, torch.ones((self.rows, 1), dtype=torch.long)], dim=1)

    def advance(self) -> None:
        """Record that the decode step appended one column for every row."""
        self.mask = torch.cat([self.mask, torch.ones((self.rows, 1), dtype=torch.long)], dim=1)

    def _pad_left(self, columns: int) -> None:
        assert self.cache is not None
        for layer in self.cache.layers:
            layer.keys, layer.values = _left_pad(layer.keys, columns), _left_pad(layer.values, columns)
        self.mask = torch.cat([torch.zeros((self.rows, columns), dtype=torch.long), self.mask], dim=1)


def _left_pad(tensor: torch.Tensor, columns: int) -> torch.Tensor:
    """Zero columns before the sequence axis of ``[batch, heads, pos, head_dim]``."""
    if columns == 0:
        return tensor
    shape = (*tensor.shape[:2], columns, tensor.shape[3])
    return torch.cat([tensor.new_zeros(shape), tensor], dim=2)
