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

import warnings
from collections.abc import Mapping

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as QuantizedLinear
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from probes.lm import ops
from probes.lm.render import render_messages

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
        self.inner = _quantized(linear.weight.detach() * smooth)
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


def input_ranges(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> dict[nn.Module, torch.Tensor]:
    """Every ``nn.Linear``'s largest input magnitude per channel over ``CALIBRATION``, from the float model."""
    ranges: dict[nn.Module, torch.Tensor] = {}

    def record(module: nn.Module, args: tuple) -> None:
        seen = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0).float()
        ranges[module] = seen if module not in ranges else torch.maximum(ranges[module], seen)

    linears = [m for m in model.modules() if type(m) is nn.Linear]
    hooked = [m.register_forward_pre_hook(record) for m in linears]
    try:
        with torch.inference_mode():
            for text in CALIBRATION:
                encoded = render_messages(tokenizer, [{"role": "user", "content": text}], span_message=0)
                model(input_ids=torch.tensor([encoded.ids]))
    finally:
        for hook in hooked:
            hook.remove()
    return ranges


def quantize_int8(model: nn.Module, ranges: Mapping[nn.Module, torch.Tensor] | None = None) -> None:
    """Swap every ``nn.Linear`` under ``model`` for a ``RowInt8Linear`` (smoothed by ``ranges``), in place."""
    ranges = ranges or {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, RowInt8Linear(child, ranges.get(child)))


def _smoothing(input_range: torch.Tensor) -> torch.Tensor:
    return input_range.clamp_min(_FLOOR) ** SMOOTHING


def _quantized(weight: torch.Tensor) -> QuantizedLinear:
    """torch's dynamic int8 Linear with per-channel weights and no bias (the bias is added in float after)."""
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao; 2.13 has it
        warnings.simplefilter("ignore")
        from torch.ao.quantization import per_channel_dynamic_qconfig

        plain = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        plain.weight = nn.Parameter(weight.float(), requires_grad=False)
        plain.qconfig = per_channel_dynamic_qconfig
        return QuantizedLinear.from_float(plain)
