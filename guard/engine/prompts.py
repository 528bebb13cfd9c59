"""Prompts on their way through prefill, a chunk at a time.

A prompt is cut into chunks of ``probes.lm.prefix.CHUNK`` tokens at fixed places (counted from where its cached prefix
ends), whatever else runs: a chunk computes the same whether it shares a pass or not, so a reply does
not depend on the load it met (bitwise on int8). A pass takes whole chunks, of several prompts, and
several of one prompt (each continuing the one before it); while streams decode it takes only a few,
with decode steps of the running batch between passes, so a long prompt costs running streams a
bounded stall per pass, never its whole prefill at once. The tokens the prompt-stage policies read
may span chunks: their per-token contributions are gathered chunk by chunk and scored once the
prompt is complete.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from guard.engine.reply import Reply
from probes.lm.prefix import chunk_end
from probes.lm.step import Segment


@dataclass(eq=False)
class Lane:
    """One cache a prompt's tokens go into: ``ids`` (every token, any cached prefix included), ``done`` of them
    in the cache; its chunks start at ``origin`` (where the cached prefix ends) and every ``CHUNK`` after."""

    ids: tuple[int, ...]
    cache: DynamicCache
    done: int
    origin: int = 0

    def chunk_end(self, start: int) -> int:
        """Where the chunk that starts at ``start`` ends."""
        return chunk_end(len(self.ids), start, self.origin)


@dataclass(eq=False)
class PromptWork:
    """A reply's prefill: its lanes in order (the scored one first; a legacy completion generates from a
    second), the scored span in the first lane's ids, and what the finished chunks gave."""

    reply: Reply
    lanes: list[Lane]
    span: tuple[int, int]
    parts: list[torch.Tensor] = field(default_factory=list)  # the span's contributions so far, in order
    terms: list[torch.Tensor] = field(default_factory=list)  # explained: the same per layer, ``[tokens, layers, P]``
    shadow_parts: list[torch.Tensor] = field(default_factory=list)  # the shadow versions' contributions
    # the same three at the scored lane's last token, where the model is about to answer (``tail`` probes)
    tail: torch.Tensor | None = None
    tail_terms: torch.Tensor | None = None
    shadow_tail: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # next-token logits after the last lane's last token

    @property
    def finished(self) -> bool:
        return all(lane.done == len(lane.ids) for lane in self.lanes)


@dataclass(frozen=True)
class Chunk:
    """``work``'s lane ``lane``, tokens ``[start, stop)``, at rows ``[row, row + stop - start)`` of the pass."""

    work: PromptWork
    lane: int
    start: int
    stop: int
    row: int

    @property
    def segment(self) -> Segment:
        lane = self.work.lanes[self.lane]
        return Segment(lane.ids[self.start : self.stop], lane.cache)

    def span_rows(self) -> slice | None:
        """The pass rows of this chunk that hold scored tokens, if any."""
        if self.lane != 0:
            return None
        first, last = max(self.work.span[0], self.start), min(self.work.span[1], self.stop)
        return slice(self.row + first - self.start, self.row + last - self.start) if first < last else None

    def tail_row(self) -> slice | None:
        """The pass row of the scored lane's last token, if this chunk holds it."""
        if self.lane != 0 or self.stop != len(self.work.lanes[0].ids):
            return None
        return slice(self.row + self.stop - self.start - 1, self.row + self.stop - self.start)


def plan(works: list[PromptWork], budget: int) -> list[Chunk]:
    """The next pass: whole chunks of ``works`` in order, while they fit in ``budget`` tokens (one at least).

    A work's chunks are consecutive rows; a lane's follow each other, and a lane goes on only once the
    lane before it is complete.
    """
    chunks: list[Chunk] = []
    row = 0
    for work in works:
        for index, lane in enumerate(work.lanes):
            start = lane.done
            while start < len(lane.ids):
                stop = lane.chunk_end(start)
                if chunks and row + stop - start > budget:
                    return chunks
                chunks.append(Chunk(work, index, start, stop, row))
                row, start = row + stop - start, stop
    return chunks
