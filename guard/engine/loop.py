"""The generation loop: one thread owns the shared batch and decodes every running request in it.

The loop only schedules: it admits waiting requests, prefills them (where prompt-stage policies score
the last user message), steps the batch, and finishes replies at token boundaries. Prefill passes run
on this thread: alone when nothing decodes, else riding in a decode step's pass (``mixing``), or, where the
cores allow, on a thread of their own beside the steps (``overlap``). They touch only their own prompts'
caches, and their results are taken in here. Each decode step
feeds every row's pending token, which yields both that token's hidden states and the logits for the
next one: output-stage policies score the pending token *before* it is emitted, at the cost of a
one-token delay and no extra pass. What a crossing does is decided in ``guard.engine.decide``:

- ``block``: the token that crosses the threshold is never emitted; the reply ends with
  ``content_filter``.
- ``ablate``: the policy's direction is projected out for the rest of the generation, and the step
  that produced the offending token is recomputed under ablation, so the token sent comes from the
  ablated pass.
- ``refuse``: the row is steered along the refusal direction for the rest of the generation, so the
  model declines in its own words. On the prompt stage the prompt's last token is recomputed under
  steering, so the first token is steered too; on the output stage the offending token is recomputed,
  as for an ablation.
- ``steer``: the same, along the policy's own direction by its signed strength.
- ``flag``: recorded in the verdicts, the text is untouched.

Hidden states reach the loop by one route, the step's layer callback (``guard.engine.tap``), on every
pass: prefill, decode step and the ablation rework alike.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch.nn.functional import pad
from transformers import DynamicCache

from guard.engine.batch import Batch
from guard.engine.decide import Decider, Decision
from guard.engine.explain import explanations
from guard.engine.prompts import Chunk, Lane, PromptWork, plan
from guard.engine.reply import Reply
from guard.engine.steering import SteeringPlan
from guard.engine.tap import LayerTap, joined
from guard.events import Emitted, Failed, Finished, GenerationRequest, Handle, PromptChecked, Shadowed
from guard.policy import ANY, Action, Dial, Policy
from guard.sampling import sample
from guard.scoring import ProbeBank, ProbeSet, Shadow
from guard.textstream import TextStream
from probes.direction import Direction
from probes.lm.model import LoadedModel
from probes.lm.prefix import PrefixCache, split_at
from probes.lm.step import Segment
from probes.probe import LinearProbe

log = logging.getLogger(__name__)
T = TypeVar("T")
Timing = Callable[[str, float], None]  # (phase, seconds): "queue_wait", "prefill" or "decode_step"
# torch's default intra-op threads, read at import: a thread's own setting may differ (the server
# loads the model with one thread, guard.runtime)
TORCH_THREADS = torch.get_num_threads()
PREFILL_TOKENS = 1024  # prompt tokens in one prefill pass at most (a longer prompt takes several)
STALL_STEPS = 2.0  # while streams decode, a prefill pass takes about this many decode steps' time (a chunk at least)
RIDING_STEPS = 1.0  # riding in a decode step (``mixing``), a pass adds about this many decode steps' time to it
CALIBRATION_TOKENS = 256  # the prefill measured at start, for the prompt-token throughput
RIDER_FLOOR = 0.1  # a pass riding in a decode step counts as at least this share of a plain step's time


class QueueFull(RuntimeError):
    """More requests are waiting than the engine accepts; the caller should retry later."""


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
        directions: Mapping[str, Direction] | None = None,
        dials: Sequence[Dial] = (),
        compile_in_background: bool = False,
        overlap: bool | None = None,
    ) -> None:
        """``directions``: by name, the directions ``refuse`` and ``steer`` policies and ``dials`` steer along and
        ``ablate`` policies ablate along. ``compile_in_background``: a compiled step compiles on a thread of its
        own while the engine decodes eagerly, instead of before ``start`` returns. ``overlap``: prefill passes
        run on a thread of their own while the batch decodes (``None``: when the step can and the cores
        hold both threads' torch threads)."""
        self.lm = lm
        self.step = lm.step(fast_decode)
        self.threads = threads or default_threads(lm)
        self.policies = tuple(policies)
        self.probes = ProbeSet.build(policies, probes, directions=directions or {})
        self.decider = Decider(policies)
        self.ablate_index = {p.name: i for i, p in enumerate(pl for pl in policies if pl.action is Action.ABLATE)}
        self.dials = tuple(dials)
        self.plan = SteeringPlan.build(policies, self.dials, directions or {})
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.compile_in_background = compile_in_background
        auto = 2 * self.threads <= TORCH_THREADS
        self.overlap = self.step.concurrent_passes and (auto if overlap is None else overlap)
        # otherwise, while streams decode, a prefill pass rides in a decode step where the step can carry it
        self.mixing = not self.overlap and self.step.mixes
        self._prefiller: ThreadPoolExecutor | None = None  # the prefill thread, with ``overlap``
        self._pass: _Pass | None = None  # the prefill pass in flight on it
        self.compile_failed = False  # a background compile failed: the step stays eager
        self.eos_ids = _eos_ids(lm)
        self._waiting: deque[Reply] = deque()
        self._prefilling: list[PromptWork] = []  # admitted: prompts partly prefilled, in arrival order
        self._batch = Batch(lm.model.config, self.step.reads_padding)
        self._prefixes = PrefixCache(self.step, lm.model.config)
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # where the engine thread reports how long requests waited, prefills and decode steps took (the
        # metrics set it): what a first token's time is made of
        self.timing: Timing | None = None
        # measured as it runs (moving averages): what sizes a prefill pass while streams decode
        self.prefill_rate = 0.0  # prompt tokens a second
        self.step_seconds = 0.0  # a decode step of the batch

    # -- the public side (any thread) ------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; returns when it can decode (a compiled step has been compiled by then, unless
        it compiles in the background)."""
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
        n, shadowed = len(self.policies), len(probes.shadow.bank) if probes.shadow else 0
        steer = self.plan
        steering = torch.zeros(steer.count)
        for name, strength in request.steer.items():  # a dial steers the whole sequence
            steering[steer.dial_slot[name]] = strength
        reply = Reply(
            handle,
            probes,
            TextStream(self.lm.tokenizer, request.sampling.stop),
            request.sampling.generator(),
            active,
            ablating,
            sums=torch.zeros(n),
            score=torch.zeros(n),
            crossed=torch.zeros(n, dtype=torch.bool),
            steering=steering,
            plan=steer,
            shadow_sums=torch.zeros(shadowed),
            shadow_score=torch.zeros(shadowed),
            shadow_crossed=torch.zeros(shadowed, dtype=torch.bool),
        )
        with self._wake:
            self._sweep_waiting()  # a request that gave up waiting holds no place
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(reply)
            self._wake.notify()
        return handle

    def step_state(self) -> str:
        """How decode steps run: ``compiled``, ``compiling`` (eager until then), ``eager`` (after a failed
        compile) or ``not compiled``."""
        if not self.step.compiled:
            return "not compiled"
        if self.step.warm:
            return "compiled"
        return "eager" if self.compile_failed else "compiling"

    def load(self) -> dict[str, int]:
        """Requests holding a batch slot (decoding, or prefilling their prompt) and requests waiting for one."""
        return {"running": len(self._batch) + len(self._prefilling), "waiting": len(self._waiting)}

    def versions(self) -> dict[str, str]:
        """The probe version each policy's new requests use."""
        return dict(zip(self.probes.bank.names, self.probes.bank.versions, strict=True))

    def shadows(self) -> dict[str, str]:
        """The shadow version scored beside each shadowed policy for new requests."""
        return {name: probe.version for name, probe in self.probes.shadows.items()}

    def replace_shadow(self, policy: str, probe: LinearProbe | None) -> None:
        """Score ``probe`` beside ``policy``'s active version from the next request on (``None``: stop)."""
        self.probes = self.probes.with_shadow(self.policies, policy, probe)

    def replace_probe(self, policy: str, probe: LinearProbe) -> None:
        """Serve ``probe`` for ``policy`` from the next request on; requests in flight keep their version."""
        self.probes = self.probes.replace(self.policies, policy, probe)

    def directions(self) -> dict[str, str]:
        """The version of each direction new requests steer or ablate along, by name."""
        return {d.name: d.version for d in self.probes.along.values()} | self.plan.versions()

    def replace_direction(self, direction: Direction) -> None:
        """Steer or ablate along ``direction`` (by its name) from the next request on; requests in flight keep
        theirs."""
        self.probes = self.probes.with_direction(self.policies, direction)
        self.plan = self.plan.replace(self.policies, self.dials, direction)

    # -- the engine thread: scheduling -----------------------------------------------------------------
    def _run(self, ready: Future[None]) -> None:
        torch.set_num_threads(self.threads)  # per thread: the engine thread does not inherit a caller's choice
        background = self.step.compiled and self.compile_in_background
        try:
            if background:
                self.step.eager_until_warm = True  # from the first pass: the compile thread alone compiles
            elif self.step.compiled:
                self.step.warm_up()  # here: compiled code is specialised to this thread's thread count
            self._calibrate()
        except Exception as exc:
            ready.set_exception(exc)
            return
        if background:
            threading.Thread(target=self._compile, name="guard-compile", daemon=True).start()
        if self.overlap:  # the same torch threads as this one: compiled code and int8 roundings depend on them
            self._prefiller = ThreadPoolExecutor(1, "guard-prefill", torch.set_num_threads, (self.threads,))
        ready.set_result(None)
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._stopping and not self._waiting and not self._prefilling and not self._batch:
                        self._wake.wait()
                    if self._stopping:
                        break
                try:
                    self._admit()
                    if self._prefilling and not (self.mixing and self._batch):
                        self._prefill_pass()
                    if self._batch:
                        self._step(self._next_pass() if self.mixing and self._prefilling else None)
                except Exception as exc:  # shared state is in doubt: fail what runs, go on with new requests
                    for reply in [*self._batch.clear(), *(work.reply for work in self._prefilling)]:
                        self._fail(reply, exc, "generation")
                    self._prefilling.clear()
                    self._pass = None  # what it writes goes to caches nothing reads any more
        if self._prefiller is not None:
            self._prefiller.shutdown(wait=False)
        for reply in [*self._batch.clear(), *(work.reply for work in self._prefilling), *self._waiting]:
            reply.handle.put(Failed("the server is shutting down"))

    def _compile(self) -> None:
        """Warm the compiled step up beside the engine thread, which decodes eagerly until it is done."""
        torch.set_num_threads(self.threads)  # compiled code is specialised to the decoding thread's count
        started = time.perf_counter()
        try:
            self.step.warm_up()
        except Exception:
            self.compile_failed = True
            log.exception("compiling the decode step failed; decoding stays eager")
            return
        log.info("decode step compiled in %.1f s; decoding compiled from now on", time.perf_counter() - started)

    def _report(self, phase: str, *seconds: float) -> None:
        if self.timing is not None:
            for value in seconds:
                self.timing(phase, value)

    def _sweep_waiting(self) -> None:
        """Requests that gave up while waiting leave the queue (called with ``_wake`` held)."""
        for gone in [r for r in self._waiting if r.handle.cancelled]:
            self._waiting.remove(gone)
            self._finish(gone, "cancelled")

    def _admit(self) -> None:
        """Waiting requests take the free batch slots and start their prefill."""
        with self._wake:
            self._sweep_waiting()
            free = self.max_batch - len(self._batch) - len(self._prefilling)
            replies = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
        started = time.perf_counter()
        self._report("queue_wait", *(started - reply.submitted for reply in replies))
        for reply in replies:
            work = self._isolated(reply, "prefill", self._work, reply)
            if work:
                self._prefilling.append(work)

    def _work(self, reply: Reply) -> PromptWork:
        """A reply's prefill plan: its scored prompt after the cached template prefix, then (a legacy completion)
        the raw text it generates from."""
        request = reply.request
        split = split_at(request.prompt_span[0])
        scored = request.score_ids or request.prompt_ids
        segment = self._prefixes.segment(scored, split, _intervention(reply), lambda: self._tap([reply], [split]))
        lanes = [Lane(scored, segment.cache, split, split)]
        if request.score_ids is not None:
            lanes.append(Lane(request.prompt_ids, DynamicCache(config=self.lm.model.config), 0, 0))
        return PromptWork(reply, lanes, request.prompt_span)

    def _step(self, riders: _Pass | None = None) -> None:
        """A decode step of the batch; ``riders``, a prefill pass not yet run, rides in it (``mixing``)."""
        if riders is not None and riders.future.done():  # its tap failed: its prompts fail, the step goes on
            self._took_in(riders)
            riders = None
        self._batch.drop(self._leaves_before_step)
        if not self._batch:
            if riders is not None:
                self._run_pass(riders)
                self._took_in(riders)
            return
        started = time.perf_counter()
        rows = list(self._batch.replies)
        ids = torch.tensor([[r.pending] for r in rows])
        positions = torch.tensor([[r.position] for r in rows])
        mask = self._batch.step_mask()
        mask = None if bool(mask.all()) else mask
        tap = self._tap(rows)
        if riders is None:
            logits = self.step(ids, positions, self._batch.cache, mask, tap)
        else:
            on_layer = joined(len(rows), tap, riders.tap)
            segments = [chunk.segment for chunk in riders.chunks]
            logits = self.step(ids, positions, self._batch.cache, mask, on_layer, segments)
            logits, prompt_logits = logits[: len(rows)], logits[len(rows) :]
        self._batch.advance()
        outcomes = self._check_tokens(rows, tap)
        kept, rework = [], []
        for i, (reply, outcome) in enumerate(zip(rows, outcomes, strict=True)):
            if outcome == "rework":
                rework.append(i)
            elif outcome == "emit" and self._isolated(reply, "generation", self._emit, reply, logits[i]):
                kept.append(i)
        self._batch.keep(kept + rework)
        for reply in [rows[i] for i in rework]:
            self._isolated(reply, "generation", self._recompute, reply, 2)
        seconds = time.perf_counter() - started
        if riders is None:
            self._seen_step(seconds)
            return
        self._report("decode_step", seconds)
        # the pass's own time: what the step took beyond a plain one (a step's jitter is no free pass)
        riders.future.set_result((prompt_logits, max(seconds - self.step_seconds, RIDER_FLOOR * self.step_seconds)))
        self._took_in(riders)

    def _leaves_before_step(self, reply: Reply) -> bool:
        if reply.handle.cancelled:
            self._finish(reply, "cancelled")
        elif reply.pending in self.eos_ids:
            self._finish(reply, "stop")
        else:
            return False
        return True

    # -- the engine thread: passes ---------------------------------------------------------------------
    def _tap(self, rows: list[Reply], tokens: list[int] | None = None) -> LayerTap | None:
        """The layer callback of a pass over ``rows`` (``tokens``: each one's consecutive rows in a packed
        prefill, else one each); ``None`` without policies and steering, when the model runs exactly as
        without guard."""
        steered = None
        operator = self.plan.operator  # every row's plan's slots are among the newest plan's
        steering = operator.count and any(bool(row.steering.any()) for row in rows)
        if not self.policies and not steering:
            return None
        if steering:  # a row submitted before a direction was replaced has fewer slots: the newer ones are 0
            strengths = torch.stack([pad(row.steering, (0, operator.count - len(row.steering))) for row in rows])
            if tokens is not None:
                strengths = strengths.repeat_interleave(torch.tensor(tokens), 0)
            steered = (operator, strengths)
        ablations, keep = [], set()
        for probes, index in _groups(rows):
            keep.update(probes.layers)
            if probes.ablation.count:
                mask = torch.zeros((len(rows), probes.ablation.count))
                mask[index] = torch.stack([rows[i].ablating for i in index.tolist()])
                if tokens is not None:
                    mask = mask.repeat_interleave(torch.tensor(tokens), 0)
                if bool(mask.any()):
                    ablations.append((probes.ablation, mask))
        return LayerTap(ablations, keep, steered)

    def _prefill_pass(self) -> None:
        """The next pass over the prompts being prefilled: the chunks it completes are checked and join the batch.

        With ``overlap`` the pass runs on the prefill thread while this one goes on decoding: a call
        starts a pass, or takes in the one in flight once it is done (waiting for it when nothing decodes)."""
        if self._pass is not None:
            if self._batch and not self._pass.future.done():
                return
            running, self._pass = self._pass, None
            self._took_in(running)
        running = self._next_pass()
        if running is None:
            return
        if self._prefiller is not None and not running.future.done():
            self._pass = running
            self._prefiller.submit(self._run_pass, running)
            return
        if not running.future.done():
            self._run_pass(running)
        self._took_in(running)

    def _next_pass(self) -> _Pass | None:
        """The chunks the next pass takes, with its layer callback; not yet run (done already if its tap failed).
        A prompt whose request went away stops before its next chunk."""
        for work in [w for w in self._prefilling if w.reply.handle.cancelled]:
            self._prefilling.remove(work)
            self._finish(work.reply, "cancelled")
        chunks = plan(self._prefilling, self._budget())
        if not chunks:
            return None
        works = list(dict.fromkeys(chunk.work for chunk in chunks))
        tokens = [sum(c.stop - c.start for c in chunks if c.work is work) for work in works]
        running = _Pass(Future(), chunks, works, tokens, None)
        try:
            running.tap = self._tap([work.reply for work in works], tokens)
        except Exception as exc:
            running.future.set_exception(exc)
        return running

    def _run_pass(self, running: _Pass) -> None:
        """The pass itself, on whichever thread runs it: its logits and seconds, or what it raised."""
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                logits = self.step.prefill([chunk.segment for chunk in running.chunks], running.tap)
        except Exception as exc:
            running.future.set_exception(exc)
        else:
            running.future.set_result((logits, time.perf_counter() - started))

    def _took_in(self, running: _Pass) -> None:
        """What a finished pass gave each of its prompts; those now complete are checked and join the batch."""
        try:
            logits, seconds = running.future.result()
        except Exception as exc:  # the pass touched only its own prompts' caches: the running batch goes on
            for work in running.works:
                self._prefilling.remove(work)
                self._fail(work.reply, exc, "prefill")
            return
        self._report("prefill", seconds)
        self._seen_prefill(sum(running.tokens), seconds)
        for work in running.works:
            own = [(i, chunk) for i, chunk in enumerate(running.chunks) if chunk.work is work]
            if not self._isolated(work.reply, "prefill", self._absorb, work, own, running.tap, logits):
                self._prefilling.remove(work)
            elif work.finished:
                self._prefilling.remove(work)
                outcome = self._isolated(work.reply, "prefill", self._check_prompt, work)
                if outcome in ("sampled", "steered"):
                    ids = work.reply.request.prompt_ids
                    self._batch.join(work.reply, work.lanes[-1].cache, len(ids))
                if outcome == "steered":  # the first token comes from the last prompt token's pass, steered
                    self._isolated(work.reply, "prefill", self._recompute, work.reply, 1)

    def _absorb(self, work: PromptWork, chunks: list[tuple[int, Chunk]], tap: LayerTap | None, logits) -> bool:
        """What a pass gave one prompt: the scored tokens' contributions, how far each lane got, its logits."""
        probes = work.reply.probes
        for index, chunk in chunks:
            rows = chunk.span_rows()
            if rows is not None and (tap is None or not self.policies):  # without policies nothing is scored
                work.parts.append(torch.zeros((rows.stop - rows.start, 0)))
            elif rows is not None:
                work.parts.append(_contributions(probes.bank, tap, rows))
                if work.reply.request.explain:
                    work.terms.append(_layer_contributions(probes.bank, tap, rows).transpose(0, 1))
                if probes.shadow is not None:
                    work.shadow_parts.append(_contributions(probes.shadow.bank, tap, rows))
            tail = chunk.tail_row()
            if tail is not None and (tap is None or not self.policies):
                work.tail = torch.zeros((1, 0))
            elif tail is not None:
                work.tail = _contributions(probes.bank, tap, tail)
                if work.reply.request.explain:
                    work.tail_terms = _layer_contributions(probes.bank, tap, tail).transpose(0, 1)
                if probes.shadow is not None:
                    work.shadow_tail = _contributions(probes.shadow.bank, tap, tail)
            work.lanes[chunk.lane].done = chunk.stop
            if chunk.lane == len(work.lanes) - 1 and chunk.stop == len(work.lanes[-1].ids):
                work.logits = logits[index]
        return True

    def _budget(self) -> int:
        """Prompt tokens for the next pass: ``PREFILL_TOKENS`` when nothing decodes; else as many as take about
        ``STALL_STEPS`` decode steps' time, at the throughput measured so far (a pass takes one chunk however
        small this is), or ``RIDING_STEPS`` riding in a decode step (``mixing``): that bounds what a step
        costs the running streams beyond a plain one. Beside them (``overlap``), it bounds how long a prompt
        that arrives waits for the next pass."""
        if not self._batch:
            return PREFILL_TOKENS
        steps = RIDING_STEPS if self.mixing else STALL_STEPS
        return int(min(PREFILL_TOKENS, steps * self.step_seconds * self.prefill_rate))

    def _calibrate(self) -> None:
        """Measure the prompt-token throughput once at start, so the first passes are sized and the server can
        say up front which prompts it cannot prefill in time."""
        vocab = int(self.lm.model.config.vocab_size)
        ids = tuple(i % vocab for i in range(CALIBRATION_TOKENS))
        with torch.inference_mode():
            started = time.perf_counter()
            self.step.prefill([Segment(ids, DynamicCache(config=self.lm.model.config))])
            self.prefill_rate = len(ids) / (time.perf_counter() - started)

    def _seen_prefill(self, tokens: int, seconds: float) -> None:
        self.prefill_rate = _moving(self.prefill_rate, tokens / max(seconds, 1e-9))

    def _seen_step(self, seconds: float) -> None:
        self._report("decode_step", seconds)
        self.step_seconds = _moving(self.step_seconds, seconds)

    def _recompute(self, reply: Reply, drop: int) -> bool:
        """Redo the pass that chose the pending token (feeding ``previous``), with this row's interventions as
        they are now, and re-join the batch. ``drop``: cached tokens to forget, 2 after a decode step (the
        previous and the pending token), 1 after the prompt (its last token).

        Only this row's: it leaves the batch first, so a failure here is its own."""
        cache, length = self._batch.take_out(reply, drop_last=drop)
        ids, positions = torch.tensor([[reply.previous]]), torch.tensor([[reply.position - 1]])
        logits = self.step(ids, positions, cache, None, self._tap([reply]))
        reply.pending = sample(logits[0], reply.request.sampling, reply.generator, reply.generated)
        self._batch.join(reply, cache, length + 1)
        return True

    # -- the engine thread: checks and replies ---------------------------------------------------------
    def _check_prompt(self, work: PromptWork) -> str:
        """Prompt-stage verdicts from the span's per-token contributions; then block, steer or sample.

        ``blocked``, ``sampled`` (the first token), or ``steered``: a steering policy crossed, and the first
        token is to come from the prompt's last pass redone under steering."""
        reply, logits = work.reply, work.logits
        bank = reply.probes.bank
        scores = bank.scores(_pooled(bank, torch.cat(work.parts), work.tail, reply.probes.mean_pooled))
        checked = reply.active & self.decider.on_prompt
        decision = self.decider.decide(scores, bank.thresholds, checked)
        explained = None
        if reply.request.explain and work.terms:
            ids = (reply.request.score_ids or reply.request.prompt_ids)[work.span[0] : work.span[1]]
            explained = explanations(
                reply.probes, checked, torch.cat(work.terms), work.tail_terms, ids, self.lm.tokenizer
            )
        blocked = bool(decision.blocking.any())
        steered = [] if blocked else self._steer(reply, decision.steering, 0)
        verdicts = self.decider.verdicts(
            scores,
            checked,
            decision.crossed,
            bank.versions,
            explanations=explained,
            steered_from=reply.steered_from,
            along=reply.plan.steered_with(reply.steered_from),
        )
        overall = self.decider.overall(scores, bank.thresholds, bank.scales, checked, verdicts, reply.probes.version)
        verdicts |= {ANY: overall} if overall else {}
        message = self.decider.message(decision.blocking)
        reply.handle.put(PromptChecked(verdicts, blocked, message, reply.probes.version, _prompt_shadow(work, checked)))
        if blocked:
            self._finish(reply, "content_filter")
            return "blocked"
        ids = reply.request.prompt_ids
        reply.previous, reply.position = ids[-1], len(ids)
        if steered:
            return "steered"
        reply.pending = sample(logits, reply.request.sampling, reply.generator, reply.generated)
        return "sampled"

    def _steer(self, reply: Reply, steering: torch.Tensor, token: int) -> list[str]:
        """Steer the row along the direction of each newly crossed ``refuse`` or ``steer`` policy, from ``token``."""
        fired = [self.policies[i].name for i in steering.nonzero().flatten().tolist()]
        fired = [name for name in fired if name not in reply.steered_from]
        for name in fired:
            reply.steered_from[name] = token
            reply.steering[reply.plan.policy_slot[name]] = reply.plan.strength[name]
        return fired

    def _check_tokens(self, rows: list[Reply], tap: LayerTap | None) -> list[str]:
        """Score every row's pending token: ``emit`` it, ``rework`` it under a newly fired ablation, or ``blocked``.

        The rows of a probe set (all of them, but across a hot reload) are scored together: one matrix
        product per probed layer, one set of operations for the scores. Only a row where a policy crossed
        its threshold (nearly never) is then handled on its own (``_act``).
        """
        outcomes = ["emit"] * len(rows)
        if tap is None or not self.policies:
            return outcomes
        for probes, index in _groups(rows):
            members = index.tolist()
            picked = slice(None) if len(members) == len(rows) else index  # one set: no copy of the rows
            group = [rows[i] for i in members]
            tokens = torch.tensor([[reply.completion_tokens + 1.0] for reply in group])
            sums, scores = _running(probes.bank, probes.mean_pooled, tap, picked, [r.sums for r in group], tokens)
            active = torch.stack([reply.active for reply in group]) & self.decider.on_output
            decision = self.decider.decide(scores, probes.bank.thresholds, active)
            hits = decision.crossed.any(1).tolist()
            shadow = probes.shadow
            if shadow is not None:
                shadow_sums, shadow_scores = _running(
                    shadow.bank, shadow.mean_pooled, tap, picked, [r.shadow_sums for r in group], tokens
                )
                shadow_crossed = (shadow_scores > shadow.bank.thresholds) & active[:, shadow.policies]
            for j, reply in enumerate(group):
                scored = _Scored(
                    sums[j],
                    scores[j],
                    _layer_contributions(probes.bank, tap, members[j]) if reply.request.explain else None,
                    (shadow_sums[j], shadow_scores[j], shadow_crossed[j]) if shadow is not None else None,
                )
                if hits[j]:
                    outcomes[members[j]] = self._act(reply, scored, decision, j)
                else:
                    _accept(reply, scored)
        return outcomes

    def _act(self, reply: Reply, scored: _Scored, decision: Decision, row: int) -> str:
        """Row ``row`` of ``decision`` crossed: ``blocked``, ``rework`` (a newly fired ablation) or ``emit``."""
        crossed = decision.crossed[row]
        reply.crossed = reply.crossed | crossed
        for i in crossed.nonzero().flatten().tolist():
            reply.detected_at.setdefault(self.policies[i].name, reply.completion_tokens)
        if bool(decision.blocking[row].any()):
            _accept(reply, scored)
            self._finish(reply, "content_filter", message=self.decider.message(decision.blocking[row]))
            return "blocked"
        fired = [self.policies[i].name for i in decision.ablating[row].nonzero().flatten().tolist()]
        fired = [name for name in fired if name not in reply.ablated_from]
        for name in fired:
            reply.ablated_from[name] = reply.completion_tokens
            reply.ablating[self.ablate_index[name]] = 1.0
        if self._steer(reply, decision.steering[row], reply.completion_tokens) or fired:
            return "rework"  # the token is recomputed under the new intervention: its scores do not count
        _accept(reply, scored)
        return "emit"

    def _emit(self, reply: Reply, next_logits: torch.Tensor) -> bool:
        """Send the checked pending token; sample the next one. False when the reply has finished."""
        reply.completion_tokens += 1
        piece = reply.stream.push(reply.pending)
        if piece:
            reply.handle.put(Emitted(piece, reply.completion_tokens))
        if reply.stream.stopped:
            self._finish(reply, "stop")
            return False
        if reply.completion_tokens >= reply.request.sampling.max_tokens:
            self._finish(reply, "length")
            return False
        reply.generated[reply.pending] = reply.generated.get(reply.pending, 0) + 1
        reply.previous, reply.position = reply.pending, reply.position + 1
        reply.pending = sample(next_logits, reply.request.sampling, reply.generator, reply.generated)
        return True

    def _isolated(self, reply: Reply, stage: str, work: Callable[..., T], *args: object) -> T | None:
        """``work(*args)`` for one row: what it raises fails that row alone (``None``), never the batch."""
        try:
            return work(*args)
        except Exception as exc:
            self._fail(reply, exc, stage)
            return None

    def _fail(self, reply: Reply, exc: BaseException, stage: str) -> None:
        """The client gets a generic message and an error id; the log has the details under that id."""
        error_id = uuid.uuid4().hex[:12]
        log.error("%s failed for a request (error id %s)", stage, error_id, exc_info=exc)
        reply.handle.put(Failed(f"{stage} failed (error id {error_id}); the server log has the details"))

    def _finish(self, reply: Reply, reason: str, message: str | None = None) -> None:
        tail = reply.stream.flush() if reason != "cancelled" else ""
        if tail:
            reply.handle.put(Emitted(tail, reply.completion_tokens))
        verdicts, shadowed = {}, {}
        if reply.started:  # output-stage verdicts
            checked = reply.active & self.decider.on_output
            explained = None
            if reply.request.explain and reply.trace:
                ids, terms = zip(*reply.trace, strict=True)
                explained = explanations(reply.probes, checked, torch.stack(terms), None, ids, self.lm.tokenizer)
            verdicts = self.decider.verdicts(
                reply.score,
                checked,
                reply.crossed,
                reply.probes.bank.versions,
                reply.detected_at,
                reply.ablated_from,
                explained,
                reply.steered_from,
                reply.plan.steered_with(reply.steered_from) | self._ablated_along(reply),
            )
            bank = reply.probes.bank
            overall = self.decider.overall(
                reply.score, bank.thresholds, bank.scales, checked, verdicts, reply.probes.version
            )
            verdicts |= ({ANY: overall} if overall else {}) | reply.plan.dial_verdicts(reply.request.steer)
            if reply.probes.shadow is not None:
                shadowed = _shadowed(reply.probes.shadow, reply.shadow_score, reply.shadow_crossed, checked)
        prompt_tokens = len(reply.request.prompt_ids)
        reply.handle.put(Finished(reason, prompt_tokens, reply.completion_tokens, verdicts, message, shadowed))

    def _ablated_along(self, reply: Reply) -> dict[str, tuple[str, None]]:
        """The direction version each ``ablate`` policy that ablated this row along a direction artifact used."""
        return {
            name: (direction.version, None)
            for name, direction in reply.probes.along.items()
            if bool(reply.ablating[self.ablate_index[name]])
        }


def default_threads(lm: LoadedModel) -> int:
    """Intra-op threads for decoding: one on int8, where a second thread costs batch invariance and the
    other core serves HTTP (docs/benchmarks.md); otherwise torch's default, the physical cores."""
    return 1 if lm.numeric == "int8" else TORCH_THREADS


def _intervention(reply: Reply) -> tuple | None:
    """What a row's prompt prefix is computed under, as a prefix cache names it: the probe set version and
    mask of its ablations and each steered direction version's strength; ``None`` when nothing intervenes."""
    ablating, steering = reply.ablating.nonzero().flatten().tolist(), reply.steering.nonzero().flatten().tolist()
    if not ablating and not steering:
        return None
    slots = reply.plan.slots
    steered = sorted((slots[i].name, slots[i].version, float(reply.steering[i])) for i in steering)
    return (reply.probes.version if ablating else "", tuple(ablating), tuple(steered))


def _groups(rows: list[Reply]) -> list[tuple[ProbeSet, torch.Tensor]]:
    """Rows grouped by the probe set they started with (one group, except across a hot reload)."""
    groups: dict[int, tuple[ProbeSet, list[int]]] = {}
    for i, reply in enumerate(rows):
        groups.setdefault(id(reply.probes), (reply.probes, []))[1].append(i)
    return [(probes, torch.tensor(index)) for probes, index in groups.values()]


def _moving(average: float, value: float) -> float:
    """An exponential moving average that starts at its first value."""
    return value if average == 0.0 else 0.8 * average + 0.2 * value


def _contributions(bank: ProbeBank, tap: LayerTap, rows: slice | torch.Tensor) -> torch.Tensor:
    """Per-token logit contributions ``[rows, n_policies]`` of the pass's ``rows`` under ``bank``."""
    return bank.token_logits({layer: tap.hidden(layer)[rows] for layer in bank.layers})


def _pooled(
    bank: ProbeBank, contributions: torch.Tensor, tail: torch.Tensor | None, mean_pooled: torch.Tensor
) -> torch.Tensor:
    """A prompt's pooled contributions ``[n_policies]`` from its text's tokens' ``[tokens, n_policies]`` and
    its last token's ``[1, n_policies]`` (read by ``tail`` probes)."""
    pooled = torch.where(mean_pooled, contributions.mean(0), contributions[-1])
    return pooled if tail is None else torch.where(bank.tail, tail[0], pooled)


@dataclass(eq=False)
class _Pass:
    """A prefill pass: its chunks, the prompts they belong to and each one's tokens, its layer callback, and
    its outcome (the logits and the seconds it took)."""

    future: Future[tuple[torch.Tensor, float]]
    chunks: list[Chunk]
    works: list[PromptWork]
    tokens: list[int]
    tap: LayerTap | None


def _running(
    bank: ProbeBank,
    mean_pooled: torch.Tensor,
    tap: LayerTap,
    rows: slice | torch.Tensor,
    sums: list[torch.Tensor],
    tokens: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' running sums (moving averages, for a streaming probe) with their pending token's
    contributions taken in, and the scores they give. ``tokens``: ``[rows, 1]``, the pending token's count."""
    contributions = _contributions(bank, tap, rows)
    previous = torch.stack(sums)
    alpha, streaming = bank.alpha, bank.alpha > 0
    moving = torch.where(tokens == 1, contributions, (1 - alpha) * previous + alpha * contributions)
    total = torch.where(streaming, moving, previous + contributions)
    pooled = torch.where(streaming, total, total / tokens)
    return total, bank.scores(torch.where(mean_pooled, pooled, contributions))


def _prompt_shadow(work: PromptWork, checked: torch.Tensor) -> dict[str, Shadowed]:
    """The shadow versions' prompt-stage verdicts, from the contributions the prefill kept for them."""
    shadow = work.reply.probes.shadow
    if shadow is None or not work.shadow_parts:
        return {}
    scores = shadow.bank.scores(
        _pooled(shadow.bank, torch.cat(work.shadow_parts), work.shadow_tail, shadow.mean_pooled)
    )
    return _shadowed(shadow, scores, scores > shadow.bank.thresholds, checked)


def _shadowed(
    shadow: Shadow, scores: torch.Tensor, crossed: torch.Tensor, checked: torch.Tensor
) -> dict[str, Shadowed]:
    """The shadow verdicts of one row for the shadowed policies ``checked`` (``[n_policies]``) covers."""
    return {
        name: Shadowed(shadow.bank.versions[k], round(float(scores[k]), 6), bool(crossed[k]))
        for k, (name, policy) in enumerate(zip(shadow.bank.names, shadow.policies.tolist(), strict=True))
        if checked[policy]
    }


def _layer_contributions(bank: ProbeBank, tap: LayerTap, rows: slice | int) -> torch.Tensor:
    """``_contributions`` per probed layer, ``[layers, ..., n_policies]``: what an explanation splits."""
    return bank.layer_logits({layer: tap.hidden(layer)[rows] for layer in bank.layers})


@dataclass(frozen=True)
class _Scored:
    """One row's pending token, scored: running sums and scores; per-layer terms (explained); the shadows'."""

    sums: torch.Tensor
    scores: torch.Tensor
    terms: torch.Tensor | None
    shadow: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # sums, scores, crossed


def _accept(reply: Reply, scored: _Scored) -> None:
    """The pending token's contributions count toward the reply's output-stage scores (and its explanation)."""
    reply.sums, reply.score = scored.sums, scored.scores
    if scored.terms is not None:
        reply.trace.append((reply.pending, scored.terms))
    if scored.shadow is not None:
        reply.shadow_sums, reply.shadow_score, crossed = scored.shadow
        reply.shadow_crossed = reply.shadow_crossed | crossed


def _eos_ids(lm: LoadedModel) -> frozenset[int]:
    ids = {lm.tokenizer.eos_token_id}
    configured = getattr(lm.model.generation_config, "eos_token_id", None) or lm.model.config.eos_token_id
    ids |= set(configured) if isinstance(configured, list) else {configured}
    return frozenset(i for i in ids if i is not None)
