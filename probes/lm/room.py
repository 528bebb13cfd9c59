"""A cache layer's keys and values as views of larger buffers, so that tokens, rows and long rows join in place.

A decode batch is left-padded: the newest token of every row sits in the same column, and a row whose
history is shorter starts later (``probes.lm.batch``). Kept as plain tensors, every change of shape
copies every row over the whole width: a decode step that appends a column, a row of 3,000 tokens that
joins rows of 200 (each is padded to 3,000), a row that leaves. A ``Room`` keeps the batch as a view
``buffer[:rows, :, left:right]`` of buffers with spare rows below and spare columns on the right, and
spare columns on the left once a long row needed them:

- a decode step writes its column at ``right`` (``append``);
- a row joins in a spare row, right-aligned (``add``): only its own columns are written, and a row
  longer than the batch moves ``left`` into the spare columns (or the buffers grow) without touching
  the others;
- rows leave or reorder (``keep``): each moved row copies its own columns only, and ``left`` follows
  the longest row left.

Whatever the buffers are reallocated for, each row's own columns are copied and nothing else, so no
operation costs more than the rows' contents. The columns before a row's first are padding: left
unwritten, unless ``zero_padding`` (for a step that attends over padding under a mask, whose values
must then be finite: a masked weight of 0 times a NaN is NaN), and then zero.

The rooms are found by the cache layer they back (``backing``): a step appends in place into the room
the batch built, and a layer whose tensors were replaced (concatenated, or indexed) is no longer backed.
"""

from __future__ import annotations

import weakref

import torch

ROOM = 64  # spare columns, at least, on the right of buffers when they are (re)allocated

_rooms: weakref.WeakKeyDictionary[object, Room] = weakref.WeakKeyDictionary()


class Room:
    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        firsts: list[int],
        *,
        spare_rows: int = 0,
        zero_padding: bool = False,
    ) -> None:
        """Buffers holding ``keys``/``values`` ``[rows, kv_heads, columns, head_dim]``, row ``r`` from column
        ``firsts[r]`` on (what lies before is padding, not copied)."""
        self.zero_padding = zero_padding
        self.rows, width = keys.shape[0], keys.shape[2]
        self.base = 0  # the buffers' row that is the batch's first: rows leaving at the front move nothing
        self._allocate(keys, self.rows + spare_rows, width + max(ROOM, width // 2))
        self.left, self.right = min(firsts, default=0), width
        self.firsts = list(firsts)  # each row's first own column, in the buffers
        for row, first in enumerate(firsts):
            self._write(row, keys[row, :, first:], values[row, :, first:])
        self._pad(range(self.rows))
        self._view()

    @property
    def keys(self) -> torch.Tensor:
        return self._keys

    @property
    def values(self) -> torch.Tensor:
        return self._values

    @property
    def width(self) -> int:
        return self.right - self.left

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's next columns ``[rows, kv_heads, n, head_dim]``; returns the views."""
        added = keys.shape[2]
        if self.right + added > self.key_buffer.shape[2]:
            self._reallocate(self.key_buffer.shape[0], 0, max(ROOM, self.width // 2, added))
        slots = slice(self.base, self.base + self.rows)
        self.key_buffer[slots, :, self.right : self.right + added] = keys
        self.value_buffer[slots, :, self.right : self.right + added] = values
        self.right += added
        return self._view()

    def add(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One more row, ``[1, kv_heads, length, head_dim]``, right-aligned; returns the views."""
        length, capacity = keys.shape[2], self.key_buffer.shape[0]
        if self.base + self.rows == capacity or length > self.right:
            rows = capacity if self.rows < capacity else 2 * self.rows
            self._reallocate(rows, max(0, length - self.width), max(ROOM, self.width // 2))
        self.firsts.append(self.right - length)
        self._write(self.rows, keys[0], values[0])
        self.rows += 1
        grown = self.firsts[-1] < self.left
        self.left = min(self.left, self.firsts[-1])
        self._pad(range(self.rows) if grown else [self.rows - 1])
        return self._view()

    def keep(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Only ``rows``, in that order; returns the views (``left`` moves to the longest row kept).

        The kept rows land on the run of the buffers' rows that moves the fewest columns: rows leaving
        at the front move nothing, rows leaving at the back neither.
        """
        sizes = [self.right - first for first in self.firsts]
        slot = [self.base + row for row in rows]  # each kept row's slot now

        def cost(base: int) -> int:
            return sum(sizes[row] for k, row in enumerate(rows) if slot[k] != base + k)

        base = min(range(self.base, self.base + self.rows - len(rows) + 1), key=cost)
        moves = [(base + k, slot[k], rows[k]) for k in range(len(rows)) if slot[k] != base + k]
        # in target order: a row moving down is read before anything lands on it; a row moving up may be
        # overwritten first, so it is copied out beforehand
        early = {source: self._own(source, row) for target, source, row in moves if source < target}
        for target, source, row in sorted(moves):
            own = early.get(source) or self._own(source, row, copy=False)
            self._write(target - self.base, *own)
        self.base, self.rows = base, len(rows)
        self.firsts = [self.firsts[row] for row in rows]
        self.left = min(self.firsts, default=self.right)
        self._pad([target - base for target, _, _ in moves])  # what the rows moved from left there
        return self._view()

    def _own(self, slot: int, row: int, copy: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Row ``row``'s own columns at buffer row ``slot``: copied, to outlive a move onto their slot."""
        columns = slice(self.firsts[row], self.right)
        keys, values = self.key_buffer[slot, :, columns], self.value_buffer[slot, :, columns]
        return (keys.clone(), values.clone()) if copy else (keys, values)

    def _write(self, row: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """``keys``/``values`` ``[kv_heads, n, head_dim]`` as row ``row``'s own columns, ending at ``right``."""
        columns = slice(self.right - keys.shape[1], self.right)
        self.key_buffer[self.base + row, :, columns] = keys
        self.value_buffer[self.base + row, :, columns] = values

    def _pad(self, rows: range | list[int]) -> None:
        if self.zero_padding:
            for row in rows:
                self.key_buffer[self.base + row, :, self.left : self.firsts[row]] = 0
                self.value_buffer[self.base + row, :, self.left : self.firsts[row]] = 0

    def _allocate(self, like: torch.Tensor, rows: int, columns: int) -> None:
        shape = (rows, like.shape[1], columns, like.shape[3])
        self.key_buffer, self.value_buffer = like.new_empty(shape), like.new_empty(shape)

    def _reallocate(self, rows: int, spare_left: int, spare_right: int) -> None:
        """New buffers of ``rows`` rows with ``spare_left`` more columns before ``left`` and ``spare_right``
        after ``right``; each row's own columns move, and nothing else."""
        owns = [self._own(self.base + row, row) for row in range(self.rows)]
        width = self.width
        self._allocate(self.key_buffer, rows, spare_left + width + spare_right)
        shift = spare_left - self.left
        self.base, self.left, self.right = 0, spare_left, spare_left + width
        self.firsts = [first + shift for first in self.firsts]
        for row, (keys, values) in enumerate(owns):
            self._write(row, keys, values)
        self._pad(range(self.rows))

    def _view(self) -> tuple[torch.Tensor, torch.Tensor]:
        slots = slice(self.base, self.base + self.rows)
        self._keys = self.key_buffer[slots, :, self.left : self.right]
        self._values = self.value_buffer[slots, :, self.left : self.right]
        return self._keys, self._values


def backing(layer: object) -> Room | None:
    """The room whose views are ``layer``'s keys and values, if they still are."""
    room = _rooms.get(layer)
    return room if room is not None and room.keys is layer.keys and room.values is layer.values else None


def adopt(layer: object, firsts: list[int] | None = None, *, spare_rows: int = 0, zero_padding: bool = False) -> Room:
    """``layer``'s room, made from its tensors if none backs it; ``layer``'s keys and values become its views.

    Row ``r`` holds its own columns from ``firsts[r]`` on (of ``layer.keys``; ``None``: every column is a
    row's own). A room that backs the layer takes them on, and ``zero_padding`` with them: one made by a
    decode step knows nothing of the batch's padding.
    """
    room = backing(layer)
    if room is None:
        rows = layer.keys.shape[0]
        room = Room(layer.keys, layer.values, firsts or [0] * rows, spare_rows=spare_rows, zero_padding=zero_padding)
        layer.keys, layer.values = room.keys, room.values
        _rooms[layer] = room
    elif firsts is not None:
        room.firsts = [room.left + first for first in firsts]
        room.zero_padding = zero_padding
    return room
