"""Decode attention for a left-padded batch in one call: a small C kernel, built on this machine at first use.

A decode step's rows have different histories, so the batch cache is left-padded and each row must
attend to its own columns only. ``torch``'s attention gives a row bitwise what it gets alone only
when it is called on that row's columns (``probes.lm.step._attention``: one call per run of rows with
the same start), and at eight rows of different lengths those calls cost more than their arithmetic.
This kernel takes the whole batch and each row's first column, and reads each row's own columns in
a fixed order, so a row's result is bitwise its result alone (``attention.c``). It reads the cache
through strides, so the cache may be views of larger buffers (``probes.lm.step._Room``).

Float32 only. It is compiled with the system C compiler (``$CC``, else ``cc``), the one
``torch.compile`` needs too, into a temporary file that is loaded and removed: a fraction of a
second, once per process, for this machine's instruction set.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("attention.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC")  # never -ffast-math: see attention.c


def decode_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, starts: torch.Tensor, scale: float
) -> torch.Tensor:
    """``query`` ``[rows, heads, 1, head_dim]`` over ``keys``/``values`` ``[rows, kv_heads, columns, head_dim]``.

    Row ``r`` attends to columns ``starts[r]:`` only. Returns ``[rows, heads, 1, head_dim]``.
    """
    rows, heads, tokens, head_dim = query.shape
    kv_heads, columns = keys.shape[1], keys.shape[2]
    if {query.dtype, keys.dtype, values.dtype} != {torch.float32} or keys.shape != values.shape:
        raise ValueError("decode_attention takes float32 queries, keys and values, keys shaped as values")
    if tokens != 1 or starts.shape != (rows,) or keys.shape[0] != rows or keys.shape[3] != head_dim or heads % kv_heads:
        raise ValueError("decode_attention: one query token and a start per row, heads a multiple of key/value heads")
    query, keys, values = query.contiguous(), _rows_of(keys), _rows_of(values)
    starts = starts.to(torch.int64).contiguous()
    out = torch.empty_like(query)
    scratch = torch.empty(heads // kv_heads * columns)
    refused = _kernel()(
        query.data_ptr(), keys.data_ptr(), values.data_ptr(), out.data_ptr(), scratch.data_ptr(), starts.data_ptr(),
        rows, heads, kv_heads, columns, head_dim, *keys.stride()[:3], *values.stride()[:3], scale,
    )  # fmt: skip
    if refused:
        raise ValueError(
            f"decode_attention: row {refused - 1} starts at {int(starts[refused - 1])}, not in 0-{columns - 1}"
        )
    return out


def _rows_of(cache: torch.Tensor) -> torch.Tensor:
    """``cache`` as the kernel reads it: each key or value contiguous (any other strides)."""
    return cache if cache.stride(3) == 1 else cache.contiguous()


@functools.cache
def _kernel() -> ctypes._CFuncPtr:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler found (set CC, or install gcc) to build the decode attention kernel")
    with tempfile.TemporaryDirectory(prefix="guard-attention-") as work:
        library = Path(work) / "attention.so"
        command = [compiler, *FLAGS, "-o", str(library), str(SOURCE), "-lm"]
        try:
            built = subprocess.run(command, capture_output=True, text=True)
        except OSError as exc:
            raise RuntimeError(f"building the decode attention kernel failed: {compiler}: {exc}") from exc
        if built.returncode:
            raise RuntimeError(f"building the decode attention kernel failed: {built.stderr.strip()[:500]}")
        function = ctypes.CDLL(str(library)).guard_decode_attention  # mapped: the file may go
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    function.argtypes = [pointer] * 6 + [size] * 11 + [ctypes.c_float]
    function.restype = ctypes.c_int64
    return function
