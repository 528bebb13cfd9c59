"""The decode attention kernel: torch's attention for every row over its own columns, bitwise the row alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from probes.lm import attention
from probes.lm.attention import decode_attention


def padded_batch(lengths: list[int], heads: int, kv_heads: int, head_dim: int, room: int = 0):
    """Queries, and left-padded keys and values that are views of buffers with ``room`` spare columns."""
    generator = torch.Generator().manual_seed(len(lengths) * 100 + head_dim)
    rows, width = len(lengths), max(lengths)
    query = torch.randn((rows, heads, 1, head_dim), generator=generator)
    buffers = torch.randn((2, rows, kv_heads, width + room, head_dim), generator=generator)
    keys, values = buffers[0].narrow(2, 0, width), buffers[1].narrow(2, 0, width)
    starts = torch.tensor([width - length for length in lengths])
    return query, keys, values, starts


def torch_rows(query, keys, values, starts, scale):
    return torch.cat([
        F.scaled_dot_product_attention(
            query[r : r + 1], keys[r : r + 1, :, s:], values[r : r + 1, :, s:], scale=scale, enable_gqa=True
        )
        for r, s in enumerate(starts.tolist())
    ])  # fmt: skip


# vectors: (9, 3, 64) the default model's shapes, (16, 2, 32) 8 query heads a key head, (4, 1, 128);
# plain loops: head_dim 24 or 8 (not a multiple of 16), or 10 query heads a key head
SHAPES = [(9, 3, 64), (16, 2, 32), (4, 1, 128), (4, 4, 24), (6, 2, 8), (20, 2, 16)]


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), SHAPES)
def test_each_row_gets_torchs_attention_over_its_own_columns(heads, kv_heads, head_dim):
    query, keys, values, starts = padded_batch([37, 5, 37, 1, 20], heads, kv_heads, head_dim, room=7)
    assert not keys.is_contiguous()  # read through strides, as the cache's views of its buffers
    got = decode_attention(query, keys, values, starts, 0.3)
    want = torch_rows(query, keys, values, starts, 0.3)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=2e-6, rtol=0)


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), SHAPES)
def test_a_row_is_bitwise_what_it_gets_alone_wherever_it_sits(heads, kv_heads, head_dim):
    lengths = [40, 3, 17, 40, 28]
    query, keys, values, starts = padded_batch(lengths, heads, kv_heads, head_dim, room=5)
    batched = decode_attention(query, keys, values, starts, 0.125)
    for row, start in enumerate(starts.tolist()):
        alone = decode_attention(
            query[row : row + 1],
            keys[row : row + 1, :, start:].contiguous(),
            values[row : row + 1, :, start:].contiguous(),
            torch.zeros(1, dtype=torch.int64),
            0.125,
        )
        assert torch.equal(batched[row : row + 1], alone), row


def test_what_it_does_not_take_is_refused():
    query, keys, values, starts = padded_batch([4, 2], 4, 4, 8)
    with pytest.raises(ValueError, match="float32"):
        decode_attention(query.bfloat16(), keys.bfloat16(), values.bfloat16(), starts, 1.0)
    with pytest.raises(ValueError, match="multiple"):
        decode_attention(query[:, :3], keys, values, starts, 1.0)
    with pytest.raises(ValueError, match="a start per row"):
        decode_attention(query, keys, values, starts[:1], 1.0)
    with pytest.raises(ValueError, match="one query token"):
        decode_attention(query.expand(-1, -1, 2, -1), keys, values, starts, 1.0)
    for start in (-1, 4):  # before the first column, or past the last: nothing read out of bounds
        with pytest.raises(ValueError, match=f"row 1 starts at {start}, not in 0-3"):
            decode_attention(query, keys, values, torch.tensor([0, start]), 1.0)


def test_without_a_c_compiler_it_says_so(monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    attention._kernel.cache_clear()
    query, keys, values, starts = padded_batch([3, 2], 4, 4, 8)
    try:
        with pytest.raises(RuntimeError, match="building the decode attention kernel failed: /nonexistent/cc"):
            decode_attention(query, keys, values, starts, 1.0)
    finally:
        monkeypatch.delenv("CC")
        attention._kernel.cache_clear()
    assert decode_attention(query, keys, values, starts, 1.0).shape == query.shape
