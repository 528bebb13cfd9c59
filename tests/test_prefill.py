"""The prefix cache of the lean prefill: kept prefixes stay as computed, the least recently used goes first."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from probes.lm.prefix import PrefixCache
from probes.lm.step import Segment


def test_prefixes_are_kept_unchanged_and_the_least_recently_used_goes(tiny_lm):
    prefixes = PrefixCache(tiny_lm.decoder, tiny_lm.model.config, capacity=2)
    ids = tuple(tiny_lm.tokenizer("How do I bake bread today?")["input_ids"])
    a, b, c = ids[:3], ids[:4], ids[:5]
    with torch.inference_mode():
        segment = prefixes.segment(ids, 3)
        kept = [keys.clone() for keys, _ in prefixes._prefix(a)]
        tiny_lm.decoder.prefill([segment])  # extends the segment's cache, never the kept prefix
        assert segment.ids == ids[3:] and segment.cache.get_seq_length() == len(ids)
        assert all(torch.equal(k, keys) for k, (keys, _) in zip(kept, prefixes._prefix(a), strict=True))
        prefixes.segment(ids, 4)
        prefixes.segment(ids, 3)  # a is used again: b is now the least recent
        prefixes.segment(ids, 5)
    assert list(prefixes._kept) == [(a, None), (c, None)]
    assert prefixes.segment(ids, 0).cache.get_seq_length() == 0  # no split: nothing looked up
    assert (b, None) not in prefixes._kept


def test_a_prefix_under_an_intervention_is_kept_apart_and_computed_under_it(tiny_lm):
    prefixes = PrefixCache(tiny_lm.decoder, tiny_lm.model.config)
    ids = tuple(tiny_lm.tokenizer("How do I bake bread today?")["input_ids"])
    push = torch.randn(tiny_lm.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    calls = []

    def steering():
        calls.append(1)
        return lambda layer, hidden: hidden + push if layer == 0 else hidden

    with torch.inference_mode():
        plain = prefixes._prefix(ids[:4])
        steered = prefixes.segment(ids, 4, "push", steering).cache
        again = prefixes.segment(ids, 4, "push", steering).cache  # looked up: computed once
        reference = DynamicCache(config=tiny_lm.model.config)  # the same tokens, the same callback, no cache
        tiny_lm.decoder.prefill([Segment(ids[:4], reference)], steering())
    assert len(calls) == 2 and list(prefixes._kept) == [(ids[:4], None), (ids[:4], "push")]
    for index, (keys, _) in enumerate(plain):
        assert torch.equal(steered.layers[index].keys, again.layers[index].keys)
        assert torch.equal(steered.layers[index].keys, reference.layers[index].keys)
        if index > 0:  # layer 0's keys are computed before its output is steered
            assert not torch.allclose(steered.layers[index].keys, keys)
