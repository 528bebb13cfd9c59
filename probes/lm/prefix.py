"""Prompt prefixes computed once, for any step's prefill (``probes.lm.step``, ``probes.lm.transformers_step``).

Every chat prompt starts with the same tokens (the template's system prompt and the user's role
marker), and a conversation's later turns repeat its earlier ones. The prefill of a prompt is always
split before the text the prompt-stage policies score, which is also where feature extraction for
training splits it (``probes.features``): the part before is looked up here, or computed alone and
kept, and only the rest goes through the packed pass. A hit changes nothing but the time: the same
tokens computed alone give the same cache.

After its prefix a prompt goes through prefill in chunks of ``CHUNK`` tokens cut at fixed places, counted
from the split, whatever pass a chunk shares: on int8 a prompt's states are then bitwise the same served
alone, served among others, or extracted for training.

A prefix computed under an intervention (a layer callback that steers or ablates it) is kept apart, under
the caller's name for that intervention: the same tokens under another intervention are another prefix.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch
from transformers import DynamicCache

from probes.lm.step import OnLayer, Segment, Step

PREFIXES = 16  # prefixes kept (least recently used dropped)
PREFIX_TOKENS = 128  # a prompt's template prefix up to this long is computed once and kept
CHUNK = 32  # prompt tokens a prefill chunk


def split_at(start: int) -> int:
    """Where a prompt whose scored text starts at ``start`` is split: the part before is a kept prefix."""
    return start if start <= PREFIX_TOKENS else 0


def chunk_end(length: int, start: int, split: int) -> int:
    """Where the chunk of a prompt of ``length`` tokens split at ``split`` that starts at ``start`` ends."""
    return min(length, start + CHUNK - (start - split) % CHUNK)


class PrefixCache:
    def __init__(self, step: Step, config: object, capacity: int = PREFIXES) -> None:
        self.step, self.config, self.capacity = step, config, capacity
        self._kept: OrderedDict[tuple[Hashable, ...], list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()

    def segment(
        self,
        ids: tuple[int, ...],
        split: int,
        intervention: Hashable = None,
        on_layer: Callable[[], OnLayer | None] = lambda: None,
    ) -> Segment:
        """``ids[split:]`` over a fresh cache holding ``ids[:split]`` (looked up, or computed and kept).

        ``intervention`` names what ``on_layer()`` (a fresh layer callback for a pass over the prefix alone)
        does to the prefix; ``None``: nothing, the model as it is."""
        cache = DynamicCache(config=self.config)
        if split:
            for index, (keys, values) in enumerate(self._prefix(ids[:split], intervention, on_layer)):
                cache.update(keys, values, index)  # a copy: the kept tensors are never extended in place
        return Segment(ids[split:], cache)

    def _prefix(
        self,
        prefix: tuple[int, ...],
        intervention: Hashable = None,
        on_layer: Callable[[], OnLayer | None] = lambda: None,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        key = (prefix, intervention)
        if key in self._kept:
            self._kept.move_to_end(key)
            return self._kept[key]
        cache = DynamicCache(config=self.config)
        self.step.prefill([Segment(prefix, cache)], on_layer())
        kept = [(layer.keys, layer.values) for layer in cache.layers]
        self._kept[key] = kept
        if len(self._kept) > self.capacity:
            self._kept.popitem(last=False)
        return kept
