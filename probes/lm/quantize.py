"""The int8 numeric path: int8 weights per output channel, every input row (token) quantised on its own.

Two choices keep int8 hidden states close to float32 and the same wherever a token is computed:

- Per-row quantisation. torch's dynamic int8 Linear quantises its input with one scale for the whole
  tensor, so a token's result would depend on every other token in the call: the same prompt would
  compute differently alone, in a batch, or after a cached prefix, and features taken in training (one
  prompt per pass) would drift from those seen while serving (many rows per step). ``RowInt8Linear``
  scales each row to a maximum magnitude of 1 and appends a frame row holding +1 and -1, which pins the
  tensor's range to [-1, 1]: every row is quantised with the same fixed parameters, relative to its own
  magnitude, whatever else is in the call.
- Smoothing (as in SmoothQuant). A few input channels carry most of a token's magnitude, so the 7-bit
  activation grid leaves the rest almost nothing. Each input channel is divided by ``s = range ** 0.7``
  (its largest magnitude over a fixed set of calibration prompts) and the weights' columns multiplied by
  ``s``: the product is unchanged in exact arithmetic, the quantisation error is not
  (``tests/bench/bench_fastpath.py``, docs/benchmarks.md). ``s`` depends on the input alone, so
  products that read the same input (q/k/v fused or not) quantise identically.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from probes.lm import ops
from probes.lm.render import render_messages

# torch announces the end of its quantized tensors, which the int8 products rest on; 2.13 has them. Set
# once here, not per call: ``catch_warnings`` is not thread-safe, and weights are quantised on threads.
warnings.filterwarnings("ignore", message="torch.quantize_per_tensor, torch.quantize_per_channel", category=UserWarning)

SMOOTHING = 0.7  # s = range ** SMOOTHING; 0 is no smoothing
_FLOOR = 1e-2  # ranges below this (dead channels) are not amplified
CALIBRATION = (  # varied chat prompts, benign and sensitive: where the activation ranges are measured
    "What is the capital of France?",
    "Write a short poem about autumn leaves.",
    "How do I bake sourdough bread?",
    "Explain photosynthesis to a child.",
    "Give me three tips for a job interview.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "Tell me how to make a bomb at home.",
    "I hate them all, people like that should disappear.",
    "What dose of ibuprofen is safe for a headache?",
    "I feel hopeless and I keep thinking about hurting myself.",
    "Write a Python function that reverses a linked list.",
    "Translate 'good morning, how are you?' into Spanish and German.",
)


class RowInt8Linear(nn.Module):
    """``nn.Linear`` on int8 weights (per output channel) with smoothed, per-row dynamic input quantisation."""

    def __init__(self, linear: nn.Linear, input_range: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        smooth = torch.ones(self.in_features) if input_range is None else _smoothing(input_range)
        self.inner = PackedInt8(linear.weight.detach() * smooth)
        self.register_buffer("inverse", (1.0 / smooth).to(linear.weight.dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.register_buffer("handle", ops.handle(self.inner), persistent=False)
        self.register_buffer("frame", torch.zeros((1, self.in_features), dtype=linear.weight.dtype), persistent=False)
        self.frame[0, :2] = torch.tensor([1.0, -1.0])  # the row that pins the quantisation range to [-1, 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features) * self.inverse
        magnitude = rows.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
        framed = torch.cat([rows / magnitude, self.frame])
        out = torch.ops.guard.int8_linear(framed, self.handle, self.out_features)[:-1] * magnitude
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def input_ranges(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cache_dir: Path | None = None, fingerprint: str = ""
) -> dict[nn.Module, torch.Tensor]:
    """Every ``nn.Linear``'s largest input magnitude per channel over ``CALIBRATION``, from the float model.

    With ``cache_dir``, the ranges are kept there as safetensors, keyed by the float model's ``fingerprint``
    and the calibration prompts' tokens: a later load of the same model reads them instead of running
    the prompts.
    """
    prompts = [
        render_messages(tokenizer, [{"role": "user", "content": text}], span_message=0).ids for text in CALIBRATION
    ]
    names = {module: name for name, module in model.named_modules() if type(module) is nn.Linear}
    key = hashlib.sha256(json.dumps([fingerprint, prompts]).encode()).hexdigest()[:24]
    stored = cache_dir / "int8-ranges" / f"{key}.safetensors" if cache_dir and fingerprint else None
    if stored is not None and stored.is_file():
        saved = load_file(stored)
        if set(saved) == set(names.values()):
            return {module: saved[name] for module, name in names.items()}
    ranges = _measure_ranges(model, list(names), prompts)
    if stored is not None:
        _save_atomically({names[module]: value for module, value in ranges.items()}, stored)
    return ranges


def _measure_ranges(model: PreTrainedModel, linears: list[nn.Module], prompts: list[list[int]]) -> dict:
    ranges: dict[nn.Module, torch.Tensor] = {}

    def record(module: nn.Module, args: tuple) -> None:
        seen = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0).float()
        ranges[module] = seen if module not in ranges else torch.maximum(ranges[module], seen)

    hooked = [m.register_forward_pre_hook(record) for m in linears]
    try:
        with torch.inference_mode():
            for ids in prompts:
                model(input_ids=torch.tensor([ids]))
    finally:
        for hook in hooked:
            hook.remove()
    return ranges


def _save_atomically(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write then rename: a reader (another replica on the same cache) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=".ranges-", dir=path.parent)
    os.close(handle)
    try:
        save_file({name: value.contiguous() for name, value in tensors.items()}, staging)
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)


def quantize_int8(model: nn.Module, ranges: Mapping[nn.Module, torch.Tensor] | None = None) -> None:
    """Swap every ``nn.Linear`` under ``model`` for a ``RowInt8Linear`` (smoothed by ``ranges``), in place.

    The products are quantised and packed on every core at once (torch's operators release the GIL).
    """
    ranges = ranges or {}
    slots = [
        (parent, name, child)
        for parent in list(model.modules())
        for name, child in list(parent.named_children())
        if type(child) is nn.Linear
    ]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        swapped = list(pool.map(lambda slot: RowInt8Linear(slot[2], ranges.get(slot[2])), slots))
    for (parent, name, _), quantized in zip(slots, swapped, strict=True):
        setattr(parent, name, quantized)


def _smoothing(input_range: torch.Tensor) -> torch.Tensor:
    return input_range.clamp_min(_FLOOR) ** SMOOTHING


class PackedInt8:
    """torch's packed int8 weight (per output channel, symmetric) for ``guard::int8_linear``, without a bias."""

    def __init__(self, weight: torch.Tensor) -> None:
        weight = weight.float()
        # torch.ao's per-channel symmetric observer: scale = max |w| / 127.5, at least float32's eps
        scale = torch.clamp(weight.abs().amax(1) / 127.5, min=torch.finfo(torch.float32).eps)
        zero = torch.zeros(weight.shape[0], dtype=torch.int64)
        quantized = torch.quantize_per_channel(weight, scale.double(), zero, 0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(quantized, None)
