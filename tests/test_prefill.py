"""The prefix cache of the lean prefill: kept prefixes stay as computed, the least recently used goes first."""

from __future__ import annotations

import torch

from probes.lm.prefix import PrefixCache


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
    assert list(prefixes._kept) == [a, c]
    assert prefixes.segment(ids, 0).cache.get_seq_length() == 0  # no split: nothing looked up
    assert b not in prefixes._kept
