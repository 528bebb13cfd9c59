"""A lean forward for Llama-family models: one token a row, each layer's output handed to a callback.

In a one-token decode step, transformers' forward spends much of its time outside the matrix products
(mask construction, cache bookkeeping, per-module dispatch), and on int8 every product also pays a
fixed cost for quantising its input. This step computes the same layers with the model's own weights
in fewer operations: q/k/v are one product, gate/up another, the rotary embedding is applied to
queries and keys together (``tests/bench/bench_overhead.py``). It computes what transformers computes
to 1e-5 on float paths, and on int8 too up to the rounding of its fused products (every Linear
quantises each row on its own, ``probes.lm.quantize``).

It decodes (``forward``: one new token per sequence) and prefills (``prefill``: several prompts packed
into one pass, each attending to its own tokens); a decode step may carry prompt chunks in its own pass
(``forward``'s ``segments``). ``compiled=True`` runs its layers through
``torch.compile``: what lies between the matrix products (norms, rotary embedding, the int8 products'
row scaling, the activation) becomes a few fused kernels, while the int8 products, the attention and
the per-layer callback stay Python-side operators (``guard::int8_linear``, ``guard::attend``,
``guard::layer_out``, ``probes.lm.ops``; ``tests/bench/bench_compiled.py``). Compiled on
float32 activations (the float32 and int8 models), a decode step's attention is also one call of a
C kernel for the whole batch (``probes.lm.attention``) instead of torch's attention once per run of
rows with the same first column (``tests/bench/bench_attention.py``).

Training features run through transformers with forward hooks (``probes.lm.hooks``); serving runs every
pass through a step and its per-layer callback. The fused float weights are the
originals' storage (the q/k/v and gate/up modules become views of them), so on the float paths
nothing is duplicated; on int8 the fused products are quantised as well, per output channel, which
gives each output the same int8 weights as the separate product it replaces.
"""

from __future__ import annotations

import functools
import threading
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from probes.lm import ops
from probes.lm.attention import decode_attention
from probes.lm.room import adopt

OnLayer = Callable[[int, torch.Tensor], torch.Tensor]
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
SUPPORTED = frozenset({"llama"})
IN_PLACE_FROM = 128  # cached columns from which a decode step appends in place (``DecodeStep._append``)


class Step(Protocol):
    """What the engine decodes and prefills with: ``DecodeStep``, or ``TransformersStep`` for other architectures."""

    compiled: bool  # passes run through torch.compile (eagerly until warm, with ``eager_until_warm``)
    warm: bool  # compiled by ``warm_up``
    reads_padding: bool  # a step attends over a batch's padding columns (masked): they must hold finite values
    concurrent_passes: bool  # passes may run on two threads at once (each thread's callbacks are its own)
    mixes: bool  # a decode step can carry prefill segments in its pass (``segments``)

    def __call__(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        mask: torch.Tensor | None = None,
        on_layer: OnLayer | None = None,
        segments: Sequence[Segment] = (),
    ) -> torch.Tensor: ...

    def prefill(self, segments: Sequence[Segment], on_layer: OnLayer | None = None) -> torch.Tensor: ...

    def warm_up(self) -> None: ...


@dataclass(frozen=True)
class Segment:
    """One sequence's new tokens for ``DecodeStep.prefill``: ``cache`` holds the tokens before them, and grows."""

    ids: tuple[int, ...]
    cache: DynamicCache


class DecodeStep(nn.Module):
    reads_padding = False  # each row attends over its own columns only (``_attention``, ``probes.lm.attention``)
    concurrent_passes = True  # a pass's attention and layer callback are its thread's (``_passing``)
    mixes = True  # a decode step carries prefill segments in its pass (``forward``)

    def __init__(self, model: PreTrainedModel, compiled: bool = False) -> None:
        super().__init__()
        if not supports(model):
            covered = ", ".join(sorted(SUPPORTED))
            raise ValueError(f"DecodeStep covers {covered} models, not {model.config.model_type!r}")
        self.model = [model]  # a list: not a submodule, so quantising this module leaves the model alone
        config = model.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.eps = config.rms_norm_eps
        self.scaling = [layer.self_attn.scaling for layer in model.model.layers]
        self.qkv = nn.ModuleList()
        self.gate_up = nn.ModuleList()
        for layer in model.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            self.qkv.append(_fuse([attention.q_proj, attention.k_proj, attention.v_proj]))
            self.gate_up.append(_fuse([mlp.gate_proj, mlp.up_proj]))
        self.register_buffer("handle", ops.handle(self), persistent=False)
        # per thread: the pass it runs (its ``callbacks``), and whether it warms the compiled pass up
        self._local = threading.local()
        self.compiled = compiled
        self.warm = False  # compiled by ``warm_up``
        # set while another thread warms the step up: passes run eagerly until it is warm, rather than
        # compile at their first call
        self.eager_until_warm = False
        # decode attention through the C kernel: compiled, on float32 activations (float32 and int8 models)
        self.native = compiled and model.dtype == torch.float32
        self._compiled = _compile(self) if compiled else None

    @property
    def callbacks(self) -> tuple[Attend, OnLayer | None] | None:
        """The calling thread's current pass's ``(attend, on_layer)`` (``probes.lm.ops``)."""
        return getattr(self._local, "callbacks", None)

    def fused(self, inputs: Mapping[nn.Module, torch.Tensor]) -> dict[nn.Module, torch.Tensor]:
        """A per-input value of the model's products for the fused products (int8 smoothing, ``probes.lm.quantize``)."""
        out = {}
        for index, layer in enumerate(self.model[0].model.layers):
            out[self.qkv[index]] = inputs[layer.self_attn.q_proj]
            out[self.gate_up[index]] = inputs[layer.mlp.gate_proj]
        return out

    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        mask: torch.Tensor | None = None,
        on_layer: OnLayer | None = None,
        segments: Sequence[Segment] = (),
    ) -> torch.Tensor:
        """Logits ``[rows, vocab]`` for the next token after ``ids`` ``[rows, 1]`` at ``positions`` ``[rows, 1]``.

        ``cache`` grows by one column. ``mask`` ``[rows, columns + 1]`` (1 = attend) covers the cached
        columns and the new one; ``None`` when no row has padding. ``on_layer(layer, hidden)`` sees
        each layer's output ``[rows, 1, d_model]`` and returns what the next layer reads.

        ``segments`` ride in the same pass, packed after the rows as ``prefill`` packs them: ``on_layer``
        sees their tokens after the rows, and their logits follow the rows'. The products read every
        weight once for both, so a prompt's chunk costs the running rows less than a pass of its own.
        Each row and segment computes what it computes in a pass of its own, bitwise on int8.
        """
        run, native = self._runner()
        rows = ids.shape[0]
        attention = self._attention(mask, rows, native)

        def decode(index: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            past = cache.layers[index]
            self._append(past, key, value)
            return attention(query, past.keys, past.values, self.scaling[index])

        if not segments:
            with self._passing(decode, on_layer):
                return self._logits(run(ids, positions))
        packed_ids, packed_positions, ends, packed = self._packed(segments)

        def attend(index: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            top = decode(index, query[:rows], key[:rows], value[:rows])
            return torch.cat([top, packed(index, query[rows:], key[rows:], value[rows:])])

        with self._passing(attend, on_layer):
            hidden = run(torch.cat([ids, packed_ids]), torch.cat([positions, packed_positions]))
        return self._logits(hidden[torch.cat([torch.arange(rows), rows + torch.tensor(ends) - 1])])

    def prefill(self, segments: Sequence[Segment], on_layer: OnLayer | None = None) -> torch.Tensor:
        """Logits ``[segments, vocab]`` for the token after each segment's last one; every ``cache`` grows by its ids.

        The segments are packed: their tokens go through every product together, one token a row
        (``on_layer`` sees ``[tokens, 1, d_model]``, segment after segment), and each segment attends
        causally to its own cache and its own tokens only, in a call of its own. On int8 a segment's
        results are therefore bitwise those it gets alone (each row is quantised on its own); several
        prompts prefilled in one pass cost far less than one pass each, whose products re-read every
        weight for a few tokens. Segments may share a cache: each then continues where the one before it
        on that cache ends (its keys are in the cache by the time its layer attends), as in a pass of its own.
        """
        ids, positions, ends, attend = self._packed(segments)
        run, _ = self._runner()
        with self._passing(attend, on_layer):
            hidden = run(ids, positions)
        return self._logits(hidden[torch.tensor(ends) - 1])

    def _packed(self, segments: Sequence[Segment]) -> tuple[torch.Tensor, torch.Tensor, list[int], Attend]:
        """``segments`` packed for one pass: their ids and positions ``[tokens, 1]``, where each one's rows end,
        and the attention of those rows (each segment over its own cache and tokens)."""
        pasts = _pasts(segments)
        ends = torch.tensor([len(segment.ids) for segment in segments]).cumsum(0).tolist()
        bounds = list(zip([0, *ends[:-1]], ends, strict=True))
        ids = torch.tensor([[token] for segment in segments for token in segment.ids])
        positions = torch.cat([torch.arange(p, p + b - a) for p, (a, b) in zip(pasts, bounds, strict=True)])[:, None]
        masks = [_causal(b - a, p) for p, (a, b) in zip(pasts, bounds, strict=True)]

        def attend(index: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            out = torch.empty_like(query)  # [tokens, heads, 1, head_dim]: a segment's are [1, heads, n, head_dim]
            for segment, (a, b), mask in zip(segments, bounds, masks, strict=True):
                # views of the pass's buffers: the cache copies them in
                keys, values = self._extend(segment.cache, index, key[a:b].transpose(0, 2), value[a:b].transpose(0, 2))
                own = F.scaled_dot_product_attention(
                    query[a:b].transpose(0, 2), keys, values, attn_mask=mask, scale=self.scaling[index], enable_gqa=True
                )
                out[a:b] = own.transpose(0, 2)
            return out

        return ids, positions, ends, attend

    def warm_up(self) -> None:
        """Compile now rather than on the first requests: the pass for several rows, then for one.

        With ``eager_until_warm``, other threads decode eagerly until it returns: only this thread's passes
        run compiled while it warms up. Compiled code is specialised to the calling thread's torch thread
        count: warm up with the decoding thread's.
        """
        if self._compiled is None or self.warm:
            return
        cache = DynamicCache(config=self.model[0].config)
        self._local.warming = True
        try:
            with torch.inference_mode():
                self.prefill([Segment((0, 1), cache)])
                self(torch.tensor([[1]]), torch.tensor([[2]]), cache)
        except Exception as exc:  # most often: no C++ compiler on this machine
            raise RuntimeError(
                f"compiling the decode step failed ({type(exc).__name__}: {str(exc)[:300]}); "
                "install a C++ compiler (g++) or serve without compiling (GUARD_COMPILE=0, --no-compile)"
            ) from exc
        finally:
            self._local.warming = False
        self.warm = True

    def _runner(self) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], bool]:
        """This pass's layers, and whether its decode attention is the C kernel's: compiled, unless the step is
        to run eagerly until warm and is not (outside the thread warming it up)."""
        if self._compiled is None:
            return self._layers, False
        if self.warm or not self.eager_until_warm or getattr(self._local, "warming", False):
            return self._compiled, self.native
        return self._layers, False

    def _attention(self, mask: torch.Tensor | None, rows: int, native: bool) -> Callable[..., torch.Tensor]:
        """A step's attention ``(query, keys, values, scale)``, each row over its own columns, as it would alone.

        Compiled on float32 activations, the whole batch in one call of the C kernel
        (``probes.lm.attention``), given each row's first column; otherwise torch's, a call per run of rows
        with the same first column (``_attention``).
        """
        if native:
            starts = torch.zeros(rows, dtype=torch.int64) if mask is None else _first_columns(mask)
            return lambda query, keys, values, scale: decode_attention(query, keys, values, starts, scale)
        runs = _rows_by_start(mask)
        return lambda query, keys, values, scale: _attention(query, keys, values, runs, scale)

    def _append(self, past: object, key: torch.Tensor, value: torch.Tensor) -> None:
        """Add a step's keys and values ``[rows, kv_heads, 1, head_dim]`` to a cache layer, in place when there is room.

        Concatenating copies the whole cache at every step. From ``IN_PLACE_FROM`` columns on, the layer's
        tensors are instead views of buffers with spare columns, which later steps fill in place
        (``probes.lm.room``): the batch's own room, or one made here from the layer's tensors when none
        backs them (all their columns copied once).

        Below that, concatenating is as fast or faster: the fresh copy is still in the processor's cache
        when attention reads it (``tests/bench/bench_kv_cache.py``). Either way the logits are bitwise the same.
        """
        if past.keys.shape[2] < IN_PLACE_FROM:
            past.keys, past.values = torch.cat([past.keys, key], dim=2), torch.cat([past.values, value], dim=2)
            return
        past.keys, past.values = adopt(past).append(key, value)

    def _extend(
        self, cache: DynamicCache, index: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A prefill's keys and values ``[1, kv_heads, n, head_dim]`` added to a cache layer, which it returns:
        as a decode step's are (``_append``), so that a long prompt's chunks do not copy its whole cache
        at every pass."""
        layer = cache.layers[index] if index < len(cache.layers) else None
        if layer is None or not layer.is_initialized:
            return cache.update(keys, values, index)
        self._append(layer, keys, values)
        return layer.keys, layer.values

    @contextmanager
    def _passing(self, attend: Attend, on_layer: OnLayer | None) -> Iterator[None]:
        """This pass's attention and layer callback, for the ``guard::attend``/``guard::layer_out`` operators."""
        self._local.callbacks = (attend, on_layer)
        try:
            yield
        finally:
            self._local.callbacks = None

    def _layers(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Every decoder layer over ``ids`` ``[rows, 1]``, one token a row.

        Attention (which extends the cache) and the layer callback are the current pass's, reached
        through operators the compiler keeps opaque: everything between them compiles.
        """
        model = self.model[0]
        rows = ids.shape[0]
        hidden = model.model.embed_tokens(ids)
        cos, sin = model.model.rotary_emb(hidden, positions)
        cos, sin = cos[:, None], sin[:, None]
        for index, layer in enumerate(model.model.layers):
            attention, mlp = layer.self_attn, layer.mlp
            head_dim = attention.head_dim
            x = self._norm(hidden, layer.input_layernorm)
            qkv = self.qkv[index](x).view(rows, 1, -1, head_dim).transpose(1, 2)
            qk = _rotate(qkv[:, : self.heads + self.kv_heads], cos, sin)
            query, key = qk[:, : self.heads], qk[:, self.heads :]
            out = torch.ops.guard.attend(query, key, qkv[:, self.heads + self.kv_heads :], self.handle, index)
            hidden = hidden + attention.o_proj(out.transpose(1, 2).reshape(rows, 1, -1))
            x = self._norm(hidden, layer.post_attention_layernorm)
            gate, up = self.gate_up[index](x).chunk(2, dim=-1)
            hidden = torch.ops.guard.layer_out(hidden + mlp.down_proj(mlp.act_fn(gate) * up), self.handle, index)
        return hidden

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        model = self.model[0]
        return model.lm_head(model.model.norm(hidden))[:, -1]

    def _norm(self, hidden: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        if hidden.dtype == torch.float32:  # one kernel; transformers' RMSNorm computes the same in six
            return F.rms_norm(hidden, (hidden.shape[-1],), norm.weight, self.eps)
        return norm(hidden)  # lower precision: keep transformers' rounding order


def _compile(step: DecodeStep) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``step._layers`` through ``torch.compile``, one graph for one row and one for any other count.

    The compiler keeps its compiled variants per code object, and a model's are useless to another: each
    step compiles its own copy of the code, so one model's variants are never tried for another (their
    guards do not check which modules they run, ``_input_guards``), and several models in one process
    do not exhaust the compiler's limit of variants. bfloat16 chains are rounded after each operation,
    as eagerly.
    """
    code = DecodeStep._layers.__code__.replace()
    layers = types.FunctionType(code, DecodeStep._layers.__globals__, "_layers")
    options = {"emulate_precision_casts": True, "guard_filter_fn": _input_guards}
    compiled = torch.compile(types.MethodType(layers, step), dynamic=True, fullgraph=True, options=options)

    @functools.wraps(compiled)  # keeps what the compiler marks its function with (its variants are looked up by it)
    def run(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # The model's float attributes (norm epsilons, rotary scaling) are constants. Traced as symbols
        # (``dynamic=True`` makes floats symbolic too), they fail a compiler pass that then restarts the
        # whole analysis, and the restarted graph misses the compiled-code cache every time.
        with torch._dynamo.config.patch(specialize_float=True):
            return compiled(ids, positions)

    return run


def _input_guards(entries: Sequence[object]) -> list[bool]:
    """The guards a compiled pass checks at each call: its inputs' (``ids``, ``positions``) and global state's.

    Dynamo also guards thousands of facts about the model (every module's type, hooks and attributes,
    every weight's metadata), checked at every call (``tests/bench/bench_guards.py``). None of them
    can change: the model is fixed once loaded (hooks
    go on decoder layers, which this pass never calls), each step compiles its own copy of the code,
    and what a pass varies (attention over its cache, the layer callback) reaches the graph through
    opaque operators. Which graph runs (one row or several) rests on the input guards, which stay.
    """
    return [entry.name in ("", "ids", "positions") for entry in entries]


def _first_columns(mask: torch.Tensor) -> torch.Tensor:
    """Each row's first attended column ``[rows]`` under a left-padded ``mask`` ``[rows, columns]`` (1 = attend)."""
    return mask.shape[1] - mask.sum(1)


def _rows_by_start(mask: torch.Tensor | None) -> list[tuple[int, int, int]]:
    """Runs of consecutive rows with the same first attended column (left padding): ``[(start, first, end)]``.

    ``[]`` when no row has padding.
    """
    if mask is None:
        return []
    starts = _first_columns(mask).tolist()
    runs: list[tuple[int, int, int]] = []
    for row, start in enumerate(starts):
        if runs and runs[-1][0] == start and runs[-1][2] == row:
            runs[-1] = (start, runs[-1][1], row + 1)
        else:
            runs.append((start, row, row + 1))
    return runs


def _attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    runs: list[tuple[int, int, int]],
    scale: float,
) -> torch.Tensor:
    """Each row attends to its own columns only, as it would alone.

    One masked call over the padded batch would give the same result up to rounding, but its sums run
    over more columns in another order, and on int8 a rounding boundary can turn that into a different
    reply. So each run of rows starting at the same column gets a call of its own, on views of the
    cache (gathering the rows would copy their cache). Right padding, where every row's columns start
    at 0 as they do alone, does not make one masked call exact either, and it attends over every row's
    padding.
    """
    if not runs:
        return F.scaled_dot_product_attention(query, keys, values, scale=scale, enable_gqa=True)
    out = query.new_empty(query.shape)
    for start, first, end in runs:
        out[first:end] = F.scaled_dot_product_attention(
            query[first:end],
            keys[first:end, :, start:],
            values[first:end, :, start:],
            scale=scale,
            enable_gqa=True,
        )
    return out


def supports(model: PreTrainedModel) -> bool:
    """Whether ``DecodeStep`` computes what this model's own forward does."""
    config = model.config
    return config.model_type in SUPPORTED and not getattr(config, "sliding_window", None)


def _fuse(linears: list[nn.Linear]) -> nn.Linear:
    """One Linear computing ``linears`` side by side; the originals' weights become views of its weight."""
    weight = torch.cat([linear.weight for linear in linears])
    has_bias = linears[0].bias is not None
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, dtype=weight.dtype)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([linear.bias for linear in linears]), requires_grad=False)
    start = 0
    for linear in linears:
        end = start + linear.out_features
        linear.weight = nn.Parameter(fused.weight[start:end], requires_grad=False)
        if has_bias:
            linear.bias = nn.Parameter(fused.bias[start:end], requires_grad=False)
        start = end
    return fused


def _pasts(segments: Sequence[Segment]) -> list[int]:
    """Each segment's first position: its cache's length, after the segments before it on the same cache."""
    pasts, ends = [], {}
    for segment in segments:
        past = ends.get(id(segment.cache), segment.cache.get_seq_length())
        pasts.append(past)
        ends[id(segment.cache)] = past + len(segment.ids)
    return pasts


def _causal(new: int, past: int) -> torch.Tensor:
    """``[new, past + new]`` (True = attend): new token ``i`` sees the past and new tokens up to itself."""
    return torch.ones((new, past + new), dtype=torch.bool).tril(past)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, transformers' ``rotate_half`` convention."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin
