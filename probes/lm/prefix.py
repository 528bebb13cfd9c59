"""Prompt prefixes computed once, for any step's prefill (``probes.lm.step``, ``probes.lm.transformers_step``).

Every chat prompt starts with the same tokens (the template's system prompt and the user's role
marker), and a conversation's later turns repeat its earlier ones. The prefill of a prompt is always
split before the text the prompt-stage policies score, which is also where feature extraction for
training splits it (``probes.features``): the part before is looked up here, or computed alone and
kept, and only the rest goes through the packed pass. A hit changes nothing but the time: the same
tokens computed alone give the same cache.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from transformers import DynamicCache

from probes.lm.step import Segment, Step

PREFIXES = 16  # prefixes kept (least recently used dropped)


class PrefixCache:
    def __init__(self, step: Step, config: object, capacity: int = PREFIXES) -> None:
        self.step, self.config, self.capacity = step, config, capacity
        self._kept: OrderedDict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()

    def segment(self, ids: tuple[int, ...], split: int) -> Segment:
        """``ids[split:]`` over a fresh cache holding ``ids[:split]`` (looked up, or computed and kept)."""
        cache = DynamicCache(config=self.config)
        if split:
            for index, (keys, values) in enumerate(self._prefix(ids[:split])):
                cache.update(keys, values, index)  # a copy: the kept tensors are never extended in place
        return Segment(ids[split:], cache)

    def _prefix(self, prefix: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if prefix in self._kept:
            self._kept.move_to_end(prefix)
            return self._kept[prefix]
        cache = DynamicCache(config=self.config)
        self.step.prefill([Segment(prefix, cache)])
        kept = [(layer.keys, layer.values) for layer in cache.layers]
        self._kept[prefix] = kept
        if len(self._kept) > self.capacity:
            self._kept.popitem(last=False)
        return kept
