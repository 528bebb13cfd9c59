"""Prompts on their way through prefill, a chunk at a time.

A prompt longer than one pass's token budget is prefilled over several passes, each continuing its
cache where the last one stopped, with decode steps of the running batch between them: a long prompt
costs the running streams a bounded stall per pass, never its whole prefill at once. Chunks of
several prompts share a pass. The tokens the prompt-stage policies read may span chunks: their
per-token contributions are gathered chunk by chunk and scored once the prompt is complete.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from guard.engine.reply import Reply
from probes.lm.step import Segment


@dataclass(eq=False)
class Lane:
    """One cache a prompt's tokens go into: ``ids`` (every token, any cached prefix included), ``done`` in the cache."""

    ids: tuple[int, ...]
    cache: DynamicCache
    done: int

    @property
    def left(self) -> int:
        return len(self.ids) - self.done


@dataclass(eq=False)
class PromptWork:
    """A reply's prefill: its lanes in order (the scored one first; a legacy completion generates from a
    second), the scored span in the first lane's ids, and what the finished chunks gave."""

    reply: Reply
    lanes: list[Lane]
    span: tuple[int, int]
    parts: list[torch.Tensor] = field(default_factory=list)  # the span's contributions so far, in order
    logits: torch.Tensor | None = None  # next-token logits after the last lane's last token

    @property
    def finished(self) -> bool:
        return all(lane.left == 0 for lane in self.lanes)


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


def plan(works: list[PromptWork], budget: int) -> list[Chunk]:
    """The next pass: chunks of ``works`` in order, ``budget`` tokens in all (a work's chunks are consecutive).

    A lane goes on only once the lane before it is complete, and each cache gets one chunk a pass.
    """
    chunks: list[Chunk] = []
    row = 0
    for work in works:
        for index, lane in enumerate(work.lanes):
            if budget == 0:
                return chunks
            if lane.left == 0:
                continue
            take = min(lane.left, budget)
            chunks.append(Chunk(work, index, lane.done, lane.done + take, row))
            row, budget = row + take, budget - take
            if take < lane.left:
                break  # the rest of this lane (and any after it) in a later pass
    return chunks
