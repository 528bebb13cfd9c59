"""The generation loop: one thread owns the model and decodes every running request in one shared batch.

Requests join the batch after their own prefill (where prompt-stage policies score the last user
message) and leave it at token boundaries. Each decode step feeds every row's pending token, which
yields both that token's hidden states and the logits for the next one: output-stage policies score
the pending token *before* it is emitted, at the cost of a one-token delay and no extra pass.

- ``block``: the token that crosses the threshold is never emitted; the reply ends with
  ``content_filter``.
- ``ablate``: the policy's direction is projected out for the rest of the generation, and the step
  that produced the offending token is recomputed under ablation, so the token sent comes from the
  ablated pass.
- ``flag``: recorded in the verdicts, the text is untouched.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from guard.batch import BatchCache
from guard.events import (
    Emitted,
    Failed,
    Finished,
    GenerationRequest,
    Handle,
    PromptChecked,
    Verdict,
)
from guard.policy import Action, Policy
from guard.prefill import PREFILL_TOKENS, PrefixCache
from guard.sampling import sample
from guard.scoring import ProbeSet
from guard.textstream import TextStream
from probes.lm.hooks import hooks, layer_output, replace_output
from probes.lm.layers import decoder_layers
from probes.lm.model import LoadedModel
from probes.lm.step import Segment
from probes.probe import LinearProbe

log = logging.getLogger(__name__)
Timing = Callable[[str, float], None]  # (phase, seconds): "queue_wait", "prefill" or "decode_step"
# torch's default intra-op threads, read at import: a thread's own setting may differ (the server
# loads the model with one thread, guard.runtime)
TORCH_THREADS = torch.get_num_threads()


class QueueFull(RuntimeError):
    """More requests are waiting than the engine accepts; the caller should retry later."""


@dataclass
class _Sequence:
    handle: Handle
    probes: ProbeSet  # the probe versions this request started with
    stream: TextStream
    generator: torch.Generator | None
    active: torch.Tensor  # [n_policies] bool: this request's policies
    ablating: torch.Tensor  # [n_ablations] float: directions ablated for this row
    sums: torch.Tensor  # [n_policies] running sum of per-token logit contributions
    score: torch.Tensor  # [n_policies] the reply's output-stage score so far
    crossed: torch.Tensor  # [n_policies] bool: crossed its threshold at some token
    pending: int = -1  # sampled, not yet checked nor emitted
    previous: int = -1  # the token fed before ``pending`` (its logits chose ``pending``)
    position: int = 0  # position id of ``pending``
    completion_tokens: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    ablated_from: dict[str, int] = field(default_factory=dict)
    detected_at: dict[str, int] = field(default_factory=dict)

    @property
    def request(self) -> GenerationRequest:
        return self.handle.request


class Engine:
    def __init__(
        self,
        lm: LoadedModel,
        policies: Sequence[Policy],
        probes: Sequence[LinearProbe],
        *,
        max_batch: int = 8,
        max_waiting: int = 64,
        threads: int | None = None,
        fast_decode: bool = True,
    ) -> None:
        self.lm = lm
        self.decoder = lm.decoder if fast_decode else None  # None: decode through transformers' forward
        self.threads = threads or default_threads(lm)
        self.policies = tuple(policies)
        self.probes = ProbeSet.build(policies, probes)
        self.on_prompt = torch.tensor([p.on_prompt for p in policies], dtype=torch.bool)
        self.on_output = torch.tensor([p.on_output for p in policies], dtype=torch.bool)
        self.ablate_index = {p.name: i for i, p in enumerate(pl for pl in policies if pl.action is Action.ABLATE)}
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.eos_ids = _eos_ids(lm)
        self._waiting: deque[_Sequence] = deque()
        self._active: list[_Sequence] = []
        self._batch = BatchCache(lm.model.config)
        self._prefixes = PrefixCache(self.decoder, lm.model.config) if self.decoder is not None else None
        self._hidden: dict[int, torch.Tensor] = {}
        self._ablations: list[tuple[ProbeSet, torch.Tensor]] = []  # set before each forward pass
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # where the engine thread reports how long requests waited, prefills and decode steps took (the
        # metrics set it): what a first token's time is made of
        self.timing: Timing | None = None

    # -- the public side (any thread) ------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; returns when it can decode (a compiled step has been compiled by then)."""
        ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="guard-engine", daemon=True)
        self._thread.start()
        ready.result()  # raises what warming up raised

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> Handle:
        handle = Handle(request, loop)
        names = request.policies
        active = torch.tensor([names is None or p.name in names for p in self.policies], dtype=torch.bool)
        probes = self.probes
        ablating = torch.zeros(probes.ablation.count)
        for p in self.policies:
            if p.action is Action.ABLATE and p.ablate_always and (names is None or p.name in names):
                ablating[self.ablate_index[p.name]] = 1.0
        n = len(self.policies)
        seq = _Sequence(
            handle,
            probes,
            TextStream(self.lm.tokenizer, request.sampling.stop),
            request.sampling.generator(),
            active,
            ablating,
            sums=torch.zeros(n),
            score=torch.zeros(n),
            crossed=torch.zeros(n, dtype=torch.bool),
        )
        with self._wake:
            for gone in [s for s in self._waiting if s.handle.cancelled]:  # gave up waiting: no place held
                self._waiting.remove(gone)
                self._finish(gone, "cancelled")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(seq)
            self._wake.notify()
        return handle

    def load(self) -> dict[str, int]:
        return {"running": len(self._active), "waiting": len(self._waiting)}

    def versions(self) -> dict[str, str]:
        """The probe version each policy's new requests use."""
        return dict(zip(self.probes.bank.names, self.probes.bank.versions, strict=True))

    def replace_probe(self, policy: str, probe: LinearProbe) -> None:
        """Serve ``probe`` for ``policy`` from the next request on; requests in flight keep their version."""
        self.probes = self.probes.replace(self.policies, policy, probe)

    # -- the engine thread -----------------------------------------------------------------------------
    def _run(self, ready: Future[None]) -> None:
        torch.set_num_threads(self.threads)  # per thread: the engine thread does not inherit a caller's choice
        try:
            if self.decoder is not None and self.decoder.compiled:
                self.decoder.warm_up()  # here: compiled code is specialised to this thread's thread count
        except Exception as exc:
            ready.set_exception(exc)
            return
        ready.set_result(None)
        # every layer is hooked (a reloaded probe may read or ablate another layer than its predecessor),
        # none when there is no policy: then the model runs exactly as without guard
        layers = range(len(decoder_layers(self.lm.model, self.lm.layer_path))) if self.policies else ()
        with (
            torch.inference_mode(),
            hooks(self.lm.model, {layer: self._hook(layer) for layer in layers}, layer_path=self.lm.layer_path),
        ):
            while True:
                with self._wake:
                    while not self._stopping and not self._waiting and not self._active:
                        self._wake.wait()
                    if self._stopping:
                        break
                try:
                    self._admit()
                    if self._active:
                        started = time.perf_counter()
                        self._step()
                        self._report("decode_step", time.perf_counter() - started)
                except Exception as exc:  # a bug must not kill the server: fail the running requests, go on
                    log.exception("generation step failed")
                    for seq in self._active:
                        seq.handle.put(Failed(f"generation failed: {exc}"))
                    self._active, self._batch = [], BatchCache(self.lm.model.config)
        for seq in [*self._active, *self._waiting]:
            seq.handle.put(Failed("the server is shutting down"))

    def _report(self, phase: str, *seconds: float) -> None:
        if self.timing is not None:
            for value in seconds:
                self.timing(phase, value)

    def _hook(self, layer: int):
        def hook(module: torch.nn.Module, args: tuple, output: object) -> object:
            original = layer_output(output)
            hidden = self._on_layer(layer, original)
            return None if hidden is original else replace_output(output, hidden)

        return hook

    def _on_layer(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """A layer's output: ablate the rows' directions, keep it for the probes, pass it on."""
        for probes, mask in self._ablations:
            hidden = probes.ablation.apply(layer, hidden, mask)
        self._hidden[layer] = hidden
        return hidden

    def _admit(self) -> None:
        while len(self._active) < self.max_batch:
            seqs = self._take(self.max_batch - len(self._active))
            if not seqs:
                return
            started = time.perf_counter()
            self._report("queue_wait", *(started - seq.submitted for seq in seqs))
            try:
                if self.decoder is not None:
                    self._prefill_packed(seqs)
                else:
                    for seq in seqs:
                        self._prefill(seq)
                self._report("prefill", time.perf_counter() - started)
            except Exception:
                for seq in seqs:  # not in the batch: nobody else answers them (one already blocked ignores it)
                    if seq not in self._active:
                        seq.handle.put(Failed("prefill failed"))
                raise

    def _take(self, free: int) -> list[_Sequence]:
        """Up to ``free`` waiting requests, at most ``PREFILL_TOKENS`` prompt tokens in all (at least one request)."""
        seqs: list[_Sequence] = []
        tokens = 0
        with self._wake:
            while self._waiting and len(seqs) < free:
                seq = self._waiting[0]
                if seq.handle.cancelled:
                    self._finish(self._waiting.popleft(), "cancelled")
                    continue
                size = len(seq.request.prompt_ids) + len(seq.request.score_ids or ())
                if seqs and tokens + size > PREFILL_TOKENS:
                    break
                seqs.append(self._waiting.popleft())
                tokens += size
        return seqs

    def _prefill(self, seq: _Sequence) -> None:
        """One request through transformers' forward (models without the lean step)."""
        request = seq.request
        self._set_rows([seq])
        if request.score_ids is not None:
            self.lm.model.base_model(input_ids=torch.tensor([request.score_ids]))
            contributions = self._span_contributions(seq, *request.prompt_span)
        cache = DynamicCache(config=self.lm.model.config)
        out = self.lm.model(input_ids=torch.tensor([request.prompt_ids]), cache=cache, use_cache=True, logits_to_keep=1)
        if request.score_ids is None:
            contributions = self._span_contributions(seq, *request.prompt_span)
        self._check_prompt(seq, contributions, out.logits[0, -1], cache)

    def _prefill_packed(self, seqs: list[_Sequence]) -> None:
        """Several requests in one pass of the lean step, each after its cached prefix (``guard.prefill``)."""
        segments: list[Segment] = []
        plans = []  # (seq, index of its scored segment, index of its generating segment, split)
        for seq in seqs:
            request = seq.request
            split = 0 if bool(seq.ablating.any()) else request.prompt_span[0]  # an ablated prefix is its own
            scored = len(segments)
            segments.append(self._prefixes.segment(request.score_ids or request.prompt_ids, split))
            if request.score_ids is not None:  # a legacy completion generates from its raw text
                segments.append(self._prefixes.segment(request.prompt_ids, 0))
            plans.append((seq, scored, len(segments) - 1, split))
        sizes = [len(segment.ids) for segment in segments]
        starts = [0, *torch.tensor(sizes).cumsum(0).tolist()]
        self._set_rows(seqs, [starts[generating + 1] - starts[scored] for _, scored, generating, _ in plans])
        logits = self.decoder.prefill(segments, self._on_layer if self.policies else None)
        for seq, scored, generating, split in plans:
            start, end = (starts[scored] + index - split for index in seq.request.prompt_span)
            contributions = self._span_contributions(seq, start, end)
            self._check_prompt(seq, contributions, logits[generating], segments[generating].cache)

    def _check_prompt(
        self, seq: _Sequence, contributions: torch.Tensor, logits: torch.Tensor, cache: DynamicCache
    ) -> None:
        """Prompt-stage verdicts from the span's per-token contributions; then block, or sample and join the batch."""
        bank = seq.probes.bank
        scores = bank.scores(torch.where(seq.probes.mean_pooled, contributions.mean(0), contributions[-1]))
        checked = seq.active & self.on_prompt
        crossed = checked & (scores > bank.thresholds)
        verdicts = self._verdicts(seq, scores, checked, crossed)
        blocking = [p for i, p in enumerate(self.policies) if crossed[i] and p.action is Action.BLOCK]
        message = blocking[0].message if blocking else None
        seq.handle.put(PromptChecked(verdicts, bool(blocking), message))
        if blocking:
            self._finish(seq, "content_filter")
            return
        ids = seq.request.prompt_ids
        seq.previous, seq.position = ids[-1], len(ids)
        seq.pending = sample(logits, seq.request.sampling, seq.generator)
        self._batch.add(cache, len(ids))
        self._active.append(seq)

    def _step(self) -> None:
        self._retire_before_step()
        if not self._active:
            return
        rows = self._active
        ids = torch.tensor([[s.pending] for s in rows])
        positions = torch.tensor([[s.position] for s in rows])
        self._set_rows(rows)
        logits = self._forward_step(ids, positions)
        self._batch.advance()
        outcomes = self._check_tokens(rows)
        survivors, rework = [], []
        for i, (seq, outcome) in enumerate(zip(rows, outcomes, strict=True)):
            if outcome == "rework":
                rework.append((i, seq))
            elif outcome == "emit" and self._emit(seq, logits[i]):
                survivors.append((i, seq))
        self._batch.keep([i for i, _ in survivors] + [i for i, _ in rework])
        self._active = [s for _, s in survivors] + [s for _, s in rework]
        for _, seq in rework:
            self._recompute_under_ablation(seq)

    def _forward_step(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One decode step of the whole batch: next-token logits ``[rows, vocab]``; hidden states via the hooks."""
        mask = self._batch.step_mask()
        if self.decoder is not None:
            padded = mask if not bool(mask.all()) else None
            on_layer = self._on_layer if self.policies else None
            return self.decoder(ids, positions, self._batch.cache, padded, on_layer)
        out = self.lm.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=self._batch.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1]

    def _set_rows(self, rows: list[_Sequence], tokens: list[int] | None = None) -> None:
        """Before a forward pass: which rows ablate which directions, per probe set in the batch.

        ``tokens``: how many consecutive rows of the pass each sequence has (a packed prefill), else one each.
        """
        self._ablations = []
        for probes, index in _groups(rows):
            if probes.ablation.count:
                mask = torch.zeros((len(rows), probes.ablation.count))
                mask[index] = torch.stack([rows[i].ablating for i in index.tolist()])
                if tokens is not None:
                    mask = mask.repeat_interleave(torch.tensor(tokens), 0)
                if bool(mask.any()):
                    self._ablations.append((probes, mask))

    def _span_contributions(self, seq: _Sequence, start: int, end: int) -> torch.Tensor:
        """Per-token contributions ``[span, P]`` of tokens ``[start, end)`` of the last pass, its rows' in order."""
        bank = seq.probes.bank
        if not len(bank):
            return torch.zeros((end - start, 0))
        return bank.token_logits({layer: _tokens(self._hidden[layer])[start:end] for layer in bank.layers})

    def _retire_before_step(self) -> None:
        keep = []
        for i, seq in enumerate(self._active):
            if seq.handle.cancelled:
                self._finish(seq, "cancelled")
            elif seq.pending in self.eos_ids:
                self._finish(seq, "stop")
            else:
                keep.append(i)
        if len(keep) != len(self._active):
            self._batch.keep(keep)
            self._active = [self._active[i] for i in keep]

    def _check_tokens(self, rows: list[_Sequence]) -> list[str]:
        """Score every row's pending token: ``emit`` it, ``rework`` it under a newly fired ablation, or ``blocked``.

        The rows of a probe set (all of them, but across a hot reload) are scored together: one matrix
        product per probed layer, one set of operations for the scores. Only a row where a policy crossed
        its threshold (nearly never) is then handled on its own (``_act``).
        """
        outcomes = ["emit"] * len(rows)
        if not self.policies:
            return outcomes
        for probes, index in _groups(rows):
            picked = slice(None) if len(index) == len(rows) else index  # one set: no copy of the rows
            contributions = probes.bank.token_logits({k: self._hidden[k][picked, -1] for k in probes.bank.layers})
            members = index.tolist()
            group = [rows[i] for i in members]
            sums = torch.stack([seq.sums for seq in group]) + contributions
            tokens = torch.tensor([[seq.completion_tokens + 1.0] for seq in group])
            scores = probes.bank.scores(torch.where(probes.mean_pooled, sums / tokens, contributions))
            active = torch.stack([seq.active for seq in group]) & self.on_output
            crossed = active & (scores > probes.bank.thresholds)
            hits = crossed.any(1).tolist()
            for j, (seq, row_sums, row_scores) in enumerate(zip(group, sums.unbind(), scores.unbind(), strict=True)):
                if hits[j]:
                    outcomes[members[j]] = self._act(seq, row_sums, row_scores, crossed[j])
                else:
                    seq.sums, seq.score = row_sums, row_scores
        return outcomes

    def _act(self, seq: _Sequence, sums: torch.Tensor, scores: torch.Tensor, crossed: torch.Tensor) -> str:
        """A pending token crossed the ``crossed`` policies' thresholds: ``blocked``, ``rework`` (a newly fired
        ablation) or ``emit``."""
        seq.crossed = seq.crossed | crossed
        hits = [self.policies[i] for i in crossed.nonzero().flatten().tolist()]
        for policy in hits:
            seq.detected_at.setdefault(policy.name, seq.completion_tokens)
        blocking = [p for p in hits if p.action is Action.BLOCK]
        if blocking:
            seq.sums, seq.score = sums, scores
            self._finish(seq, "content_filter", message=blocking[0].message)
            return "blocked"
        fired = [p for p in hits if p.action is Action.ABLATE and p.name not in seq.ablated_from]
        if fired:  # the token is recomputed under ablation: its scores do not count
            for policy in fired:
                seq.ablated_from[policy.name] = seq.completion_tokens
                seq.ablating[self.ablate_index[policy.name]] = 1.0
            return "rework"
        seq.sums, seq.score = sums, scores
        return "emit"

    def _emit(self, seq: _Sequence, next_logits: torch.Tensor) -> bool:
        """Send the checked pending token; sample the next one. False when the sequence has finished."""
        seq.completion_tokens += 1
        piece = seq.stream.push(seq.pending)
        if piece:
            seq.handle.put(Emitted(piece, seq.completion_tokens))
        if seq.stream.stopped:
            self._finish(seq, "stop")
            return False
        if seq.completion_tokens >= seq.request.sampling.max_tokens:
            self._finish(seq, "length")
            return False
        seq.previous, seq.position = seq.pending, seq.position + 1
        seq.pending = sample(next_logits, seq.request.sampling, seq.generator)
        return True

    def _recompute_under_ablation(self, seq: _Sequence) -> None:
        """Redo the pass that chose the offending token, with this row's ablation on, and re-join the batch."""
        row = self._active.index(seq)
        single, length = self._batch.row(row, drop_last=2)
        self._set_rows([seq])
        out = self.lm.model(
            input_ids=torch.tensor([[seq.previous]]),
            position_ids=torch.tensor([[seq.position - 1]]),
            cache=single,
            use_cache=True,
            logits_to_keep=1,
        )
        seq.pending = sample(out.logits[0, -1], seq.request.sampling, seq.generator)
        others = [i for i in range(self._batch.rows) if i != row]
        self._batch.keep(others)
        self._active = [s for s in self._active if s is not seq]
        self._batch.add(single, length + 1)
        self._active.append(seq)

    def _finish(self, seq: _Sequence, reason: str, message: str | None = None) -> None:
        tail = seq.stream.flush() if reason != "cancelled" else ""
        if tail:
            seq.handle.put(Emitted(tail, seq.completion_tokens))
        verdicts = {}
        if seq.pending != -1:  # generation started: output-stage verdicts
            checked = seq.active & self.on_output
            verdicts = self._verdicts(seq, seq.score, checked, seq.crossed)
        seq.handle.put(Finished(reason, len(seq.request.prompt_ids), seq.completion_tokens, verdicts, message))

    def _verdicts(
        self, seq: _Sequence, scores: torch.Tensor, checked: torch.Tensor, crossed: torch.Tensor
    ) -> dict[str, Verdict]:
        out = {}
        for i, policy in enumerate(self.policies):
            if not checked[i]:
                continue
            acted = bool(crossed[i]) and policy.action is not Action.FLAG
            out[policy.name] = Verdict(
                filtered=acted or policy.name in seq.ablated_from,
                detected=bool(crossed[i]),
                score=round(float(scores[i]), 6),
                probe_version=seq.probes.bank.versions[i],
                action=policy.action.value,
                detected_at_token=seq.detected_at.get(policy.name),
                ablated_from_token=seq.ablated_from.get(policy.name),
            )
        return out


def default_threads(lm: LoadedModel) -> int:
    """Intra-op threads for decoding. On int8, one: over HTTP on 2 cores two threads added 3% at eight
    streams (169.6 against 165.0 tokens/s, same session), the other core serving HTTP, and cost batch
    invariance (12% of greedy replies at eight streams differed from the reply alone). Otherwise
    torch's default, the physical cores (float32, eight rows in-process: 80 ms a step with two, 100 ms
    with one).
    """
    return 1 if lm.numeric == "int8" else TORCH_THREADS


def _groups(rows: list[_Sequence]) -> list[tuple[ProbeSet, torch.Tensor]]:
    """Rows grouped by the probe set they started with (one group, except across a hot reload)."""
    groups: dict[int, tuple[ProbeSet, list[int]]] = {}
    for i, seq in enumerate(rows):
        groups.setdefault(id(seq.probes), (seq.probes, []))[1].append(i)
    return [(probes, torch.tensor(index)) for probes, index in groups.values()]


def _tokens(hidden: torch.Tensor) -> torch.Tensor:
    """``[tokens, d_model]`` from one sequence's pass ``[1, tokens, d]`` or a packed one ``[tokens, 1, d]``."""
    return hidden.reshape(-1, hidden.shape[-1])


def _eos_ids(lm: LoadedModel) -> frozenset[int]:
    ids = {lm.tokenizer.eos_token_id}
    configured = getattr(lm.model.generation_config, "eos_token_id", None) or lm.model.config.eos_token_id
    ids |= set(configured) if isinstance(configured, list) else {configured}
    return frozenset(i for i in ids if i is not None)
