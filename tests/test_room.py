"""The batch cache's rooms: whatever rows join, decode, move and leave, each row's columns are what plain
left-padded tensors (concatenated and indexed at every change) hold, and only its own columns are copied."""

from __future__ import annotations

import random

import pytest
import torch

from probes.lm import room as rooms
from probes.lm.room import Room

HEADS, DIM = 2, 4


def columns(length: int) -> torch.Tensor:
    return torch.randn(1, HEADS, length, DIM)


def pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Left-pad ``[rows, heads, n, dim]`` with zeros to ``width`` columns."""
    extra = width - tensor.shape[2]
    return torch.cat([tensor.new_zeros((tensor.shape[0], HEADS, extra, DIM)), tensor], dim=2)


@pytest.mark.parametrize("zero_padding", [False, True], ids=["unwritten", "zeroed"])
@pytest.mark.parametrize("seed", range(6))
def test_a_room_holds_every_rows_columns_as_plain_tensors_would(monkeypatch, seed, zero_padding):
    monkeypatch.setattr(rooms, "ROOM", 3)  # the buffers fill up and grow often
    generator = random.Random(seed)
    torch.manual_seed(seed)
    first = columns(5)
    room = Room(first, first.clone(), [0], zero_padding=zero_padding)
    expected, lengths = first.clone(), [5]
    for _ in range(60):
        action = generator.choice(["append", "append", "add", "keep"])
        if action == "append":
            new = torch.randn(len(lengths), HEADS, 1, DIM)
            room.append(new, new.clone())
            expected, lengths = torch.cat([expected, new], dim=2), [n + 1 for n in lengths]
        elif action == "add" and len(lengths) < 9:
            length = generator.choice([1, 4, expected.shape[2] + generator.randint(1, 30)])
            new = columns(length)
            room.add(new, new.clone())
            width = max(expected.shape[2], length)
            expected, lengths = torch.cat([pad(expected, width), pad(new, width)]), [*lengths, length]
        elif action == "keep" and len(lengths) > 1:
            rows = generator.sample(range(len(lengths)), generator.randint(1, len(lengths)))
            if generator.random() < 0.5:
                rows.sort()  # mostly rows leaving, in order; else rows reordered too
            room.keep(rows)
            lengths = [lengths[r] for r in rows]
            expected = expected[rows][:, :, expected.shape[2] - max(lengths) :]
        assert room.keys.shape == expected.shape
        for row, length in enumerate(lengths):
            assert torch.equal(room.keys[row, :, -length:], expected[row, :, -length:])
            assert torch.equal(room.values[row, :, -length:], expected[row, :, -length:])
        if zero_padding:
            assert torch.equal(room.keys, expected) and torch.equal(room.values, expected)


def test_rows_leaving_at_the_front_move_nothing_and_a_long_row_joins_by_its_own_columns():
    short = [columns(3) for _ in range(4)]
    room = Room(torch.cat(short), torch.cat(short), [0] * 4, spare_rows=4)
    buffer = room.key_buffer
    long = columns(40)
    before = [room.key_buffer[row].clone() for row in range(4)]
    room.add(long, long.clone())
    assert room.key_buffer is not buffer  # wider than the spare columns: new buffers, rows copied by their columns
    assert room.keys.shape == (5, HEADS, 40, DIM)
    assert all(torch.equal(room.keys[row, :, -3:], before[row][:, :3]) for row in range(4))
    buffer = room.key_buffer
    moved = room.keys[1:].clone()
    room.keep([1, 2, 3, 4])  # the first row leaves: the view starts a row later, nothing is copied
    assert room.key_buffer is buffer and room.keys.data_ptr() == buffer[1, :, room.left].data_ptr()
    assert torch.equal(room.keys[:, :, -3:], moved[:, :, -3:])
