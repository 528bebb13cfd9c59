"""The int8 numeric path: int8 weights per output channel, every input row (token) quantised on its own.

Two choices keep int8 hidden states close to float32 and the same wherever a token is computed:

- Per-row quantisation. torch's dynamic int8 Linear quantises its input with one scale for the whole
  tensor, so a token's result would depend on every other token in the call: the same prompt would
  compute differently alone, in a batch, or after a cached prefix, and features taken in training (one
  prompt per pass) would drift from those seen while serving (many rows per step). ``RowInt8Linear``
  scales each row to a maximum magnitude of 1 and appends a frame row holding +1 and -1, which pins the
  tensor's range to [-1, 1]: every row is quantised with the same fixed parameters, relative to its own
  magnitude, whatever else is in the call.
- Smoothing (as in SmoothQuant). A few input channels carry most of a token's magnitude, so the
  activation grid leaves the rest almost nothing. Each input channel is divided by ``s = range ** alpha``
  (``range``: its largest magnitude over a fixed set of calibration prompts) and the weights' columns
  multiplied by ``s``: the product is unchanged in exact arithmetic, the quantisation error is not. Too
  little smoothing starves the activations, too much the weights, and where the balance lies differs
  from product to product: each input gets the ``alpha`` of ``ALPHAS`` whose products' output error on
  the calibration prompts is least. ``s`` depends on the input alone, so products that read the same
  input (q/k/v fused or not) quantise identically.

Activations get 8 bits where the CPU's int8 kernel accumulates exactly (VNNI, AMX), and 7 where its
pairwise 16-bit sums would saturate on 8 (``activation_bits``).
"""

from __future__ import annotations

import functools
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

ALPHAS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # s = range ** alpha, chosen per input; 0 is no smoothing
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
    """``nn.Linear`` on int8 weights (per output channel) with smoothed, per-row dynamic input quantisation.

    ``smooth`` divides the input's channels and multiplies the weight's columns (none: no smoothing).
    """

    def __init__(self, linear: nn.Linear, smooth: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        smooth = torch.ones(self.in_features) if smooth is None else smooth
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


def smoothing(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cache_dir: Path | None = None, fingerprint: str = ""
) -> dict[nn.Module, torch.Tensor]:
    """Every ``nn.Linear``'s smoothing divisor per input channel, chosen on ``CALIBRATION`` from the float model.

    With ``cache_dir``, the divisors are kept there as safetensors, keyed by the float model's
    ``fingerprint``, the calibration prompts' tokens, ``ALPHAS`` and the activation bits: a later load
    of the same model reads them instead of running the prompts.
    """
    prompts = [
        render_messages(tokenizer, [{"role": "user", "content": text}], span_message=0).ids for text in CALIBRATION
    ]
    names = {module: name for name, module in model.named_modules() if type(module) is nn.Linear}
    recipe = [fingerprint, prompts, ALPHAS, _FLOOR, activation_bits()]
    key = hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:24]
    stored = cache_dir / "int8-smoothing" / f"{key}.safetensors" if cache_dir and fingerprint else None
    if stored is not None and stored.is_file():
        saved = load_file(stored)
        if set(saved) == set(names.values()):
            return {module: saved[name] for module, name in names.items()}
    groups = _calibration_inputs(model, list(names), prompts)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        chosen = list(pool.map(lambda group: _best_divisor(*group), groups))
    divisors = {module: divisor for (members, _), divisor in zip(groups, chosen, strict=True) for module in members}
    if stored is not None:
        _save_atomically({names[module]: value for module, value in divisors.items()}, stored)
    return divisors


def _calibration_inputs(
    model: PreTrainedModel, linears: list[nn.Module], prompts: list[list[int]]
) -> list[tuple[list[nn.Module], torch.Tensor]]:
    """The products grouped by the input they share (q/k/v, gate/up), each group with its inputs' rows."""
    seen: dict[nn.Module, list[torch.Tensor]] = {module: [] for module in linears}
    order: list[nn.Module] = []

    def record(module: nn.Module, args: tuple) -> None:
        if not seen[module]:
            order.append(module)
        seen[module].append(args[0].detach().reshape(-1, args[0].shape[-1]).float())

    hooked = [m.register_forward_pre_hook(record) for m in linears]
    try:
        with torch.inference_mode():
            for ids in prompts:
                model(input_ids=torch.tensor([ids]))
    finally:
        for hook in hooked:
            hook.remove()
    groups: list[tuple[list[nn.Module], torch.Tensor]] = []
    for module in order:  # a product called right after another on the same rows reads the same input
        rows = torch.cat(seen.pop(module))
        if groups and groups[-1][1].shape == rows.shape and torch.equal(groups[-1][1], rows):
            groups[-1][0].append(module)
        else:
            groups.append(([module], rows))
    return groups


def _best_divisor(members: list[nn.Module], rows: torch.Tensor) -> torch.Tensor:
    """Of ``range ** alpha`` over ``ALPHAS``, the divisor whose products' summed relative error is least."""
    floor = rows.abs().amax(0).clamp_min(_FLOOR)
    with torch.inference_mode():
        wants = [member(rows) for member in members]

        def error(divisor: torch.Tensor) -> float:
            gots = [RowInt8Linear(member, divisor)(rows) for member in members]
            return sum(float((got - want).norm() / want.norm()) for got, want in zip(gots, wants, strict=True))

        return min((floor**alpha for alpha in ALPHAS), key=error)


def _save_atomically(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write then rename: a reader (another replica on the same cache) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=".smoothing-", dir=path.parent)
    os.close(handle)
    try:
        save_file({name: value.clone() for name, value in tensors.items()}, staging)  # one copy per product
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)


def quantize_int8(model: nn.Module, divisors: Mapping[nn.Module, torch.Tensor] | None = None) -> None:
    """Swap every ``nn.Linear`` under ``model`` for a ``RowInt8Linear`` (smoothed by ``divisors``), in place.

    The products are quantised and packed on every core at once (torch's operators release the GIL).
    """
    divisors = divisors or {}
    slots = [
        (parent, name, child)
        for parent in list(model.modules())
        for name, child in list(parent.named_children())
        if type(child) is nn.Linear
    ]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        swapped = list(pool.map(lambda slot: RowInt8Linear(slot[2], divisors.get(slot[2])), slots))
    for (parent, name, _), quantized in zip(slots, swapped, strict=True):
        setattr(parent, name, quantized)


@functools.cache
def activation_bits() -> int:
    """8 where this CPU's int8 product is exact on full-range activations, else 7.

    x86 kernels without VNNI add pairs of u8 x s8 products in 16 bits, which saturate on 8-bit
    activations (torch's ``reduce_range``). The check is one product whose exact value such a sum
    would clip: two channels at the top of the grid against the largest weights.
    """
    weight = torch.full((1, 64), 1.0)
    framed = torch.zeros((2, 64))
    framed[0] = 1.0
    framed[1, :2] = torch.tensor([1.0, -1.0])
    got = torch.ops.quantized.linear_dynamic(framed, PackedInt8(weight, False).packed, False)[0, 0]
    return 8 if abs(float(got) - 64.0) < 2.0 else 7  # saturated sums land near 0


class PackedInt8:
    """torch's packed int8 weight (per output channel, symmetric) for ``guard::int8_linear``, without a bias."""

    def __init__(self, weight: torch.Tensor, reduce_range: bool | None = None) -> None:
        self.reduce_range = activation_bits() == 7 if reduce_range is None else reduce_range  # 7-bit activations
        weight = weight.float()
        # torch.ao's per-channel symmetric observer: scale = max |w| / 127.5, at least float32's eps
        scale = torch.clamp(weight.abs().amax(1) / 127.5, min=torch.finfo(torch.float32).eps)
        zero = torch.zeros(weight.shape[0], dtype=torch.int64)
        quantized = torch.quantize_per_channel(weight, scale.double(), zero, 0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(quantized, None)
