"""The running replies and their rows of the shared KV cache, kept together: row ``i`` is ``replies[i]``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import DynamicCache

from guard.engine.reply import Reply
from probes.lm.batch import BatchCache


class Batch:
    def __init__(self, config: object, zero_padding: bool = True) -> None:
        self.config, self.zero_padding = config, zero_padding
        self.replies: list[Reply] = []
        self.kv = BatchCache(config, zero_padding)

    def __len__(self) -> int:
        return len(self.replies)

    @property
    def cache(self) -> DynamicCache | None:
        return self.kv.cache

    def join(self, reply: Reply, cache: DynamicCache, length: int) -> None:
        """``reply`` joins as the last row, with its single-row ``cache`` of ``length`` tokens."""
        self.kv.add(cache, length)
        self.replies.append(reply)

    def keep(self, rows: list[int]) -> None:
        """Only ``rows``, in that order."""
        self.kv.keep(rows)
        self.replies = [self.replies[i] for i in rows]

    def drop(self, leaving: Callable[[Reply], bool]) -> None:
        """Every reply for which ``leaving`` is true leaves (it is called once per reply, in row order)."""
        rows = [i for i, reply in enumerate(self.replies) if not leaving(reply)]
        if len(rows) != len(self.replies):
            self.keep(rows)

    def take_out(self, reply: Reply, drop_last: int = 0) -> tuple[DynamicCache, int]:
        """``reply`` leaves; its row comes back as a single-row cache without its last ``drop_last`` tokens."""
        row = self.replies.index(reply)
        single, length = self.kv.row(row, drop_last=drop_last)
        self.keep([i for i in range(len(self.replies)) if i != row])
        return single, length

    def clear(self) -> list[Reply]:
        replies, self.replies, self.kv = self.replies, [], BatchCache(self.config, self.zero_padding)
        return replies

    def step_mask(self) -> torch.Tensor:
        return self.kv.step_mask()

    def advance(self) -> None:
        self.kv.advance()
