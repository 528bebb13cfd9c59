"""The shared decode batch's KV cache: one row per sequence, aligned on shared columns.

Every sequence decodes in lockstep, so the newest token of every row sits in the same column. A row
whose history is shorter is left-padded (its attention mask is 0 there) and carries its own position
ids, so what it computes does not depend on its neighbours. Sequences join (right-aligned, the batch
widening when one is longer) and leave (rows are dropped, and columns that are padding for every
remaining row are trimmed) at token boundaries.

Each layer's keys and values are views of a ``probes.lm.room.Room``: a row that joins or moves copies
its own columns only, whatever the batch's width, so a long prompt joining short rows costs its own
size, not the rows times its width. Padding columns hold whatever the buffers held, unless
``zero_padding`` (for a step whose attention reads them under a mask).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from probes.lm.room import adopt


class BatchCache:
    def __init__(self, config: object, zero_padding: bool = True) -> None:
        self.config, self.zero_padding = config, zero_padding
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
        firsts = self._firsts()
        for layer, new in zip(self.cache.layers, row_cache.layers, strict=True):
            room = adopt(layer, firsts, spare_rows=1, zero_padding=self.zero_padding)
            layer.keys, layer.values = room.add(new.keys, new.values)
        columns = max(self.width, length)
        row_mask = torch.cat([torch.zeros(columns - length, dtype=torch.long), torch.ones(length, dtype=torch.long)])
        self.mask = torch.cat([_left_pad(self.mask, columns - self.width), row_mask[None]], dim=0)
        return self.rows - 1

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order) and trim columns that are padding for all of them."""
        if rows == list(range(self.rows)):
            return  # nothing left or moved: no copy
        if not rows:
            self.cache, self.mask = None, torch.zeros((0, 0), dtype=torch.long)
            return
        firsts = self._firsts()
        assert self.cache is not None
        for layer in self.cache.layers:
            layer.keys, layer.values = adopt(layer, firsts, zero_padding=self.zero_padding).keep(rows)
        self.mask = self.mask[torch.tensor(rows, dtype=torch.long)]
        self.mask = self.mask[:, self.width - int(self.mask.sum(1).max()) :]

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

    def _firsts(self) -> list[int]:
        """Each row's first own column."""
        return (self.width - self.mask.sum(1)).tolist()


def _left_pad(mask: torch.Tensor, columns: int) -> torch.Tensor:
    """``columns`` zero columns before ``mask`` ``[rows, columns]``."""
    return torch.cat([mask.new_zeros((mask.shape[0], columns)), mask], dim=1)
