"""Serving logic, free of routing: validate an OpenAI request, run it on the engine, shape the answer.

Streaming answers are pre-encoded ``data: {json}\\n\\n`` lines ending with ``data: [DONE]\\n\\n``.
The prompt-stage verdict is awaited before a stream starts, so a blocked prompt is a 400, not a
200 stream with an error in it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass, replace

import msgspec

from guard.capture import Capture, Seen
from guard.engine import Engine, QueueFull
from guard.events import Emitted, Failed, Finished, GenerationRequest, Handle, PromptChecked, Shadowed, Verdict
from guard.metrics import Metrics
from guard.policy import ALL, ANY, PolicySet
from guard.sampling import SamplingParams
from guard.server.errors import APIError
from guard.server.protocol import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    PromptFilterResult,
    ResponseMessage,
    Usage,
    encoder,
)
from guard.shadow import comparisons, record
from guard.writer import RedisWriter
from probes.lm.render import Encoded, render_messages

log = logging.getLogger(__name__)
DONE = b"data: [DONE]\n\n"
LEGACY_MAX_TOKENS = 16  # OpenAI's default for legacy completions


@dataclass(frozen=True)
class Limits:
    """From ``Settings`` (where the defaults are)."""

    context_window: int
    default_max_tokens: int
    queue_timeout: float  # seconds from arrival to the prompt verdict (queue + prefill); 0: none
    request_timeout: float  # seconds from arrival to the last token; 0: none
    max_prompt_tokens: int  # longer prompts are refused up front


@dataclass(frozen=True)
class Running:
    """A request past its prompt check: where its reply comes from, and what it is counted and captured as."""

    handle: Handle
    events: AsyncIterator
    checked: PromptChecked
    endpoint: str
    started: float  # ``time.perf_counter()`` at arrival
    id: str  # the response id
    policy_set: str  # the API key's policy set, a label of its metrics


class Serving:
    def __init__(
        self,
        engine: Engine,
        model_name: str,
        limits: Limits,
        metrics: Metrics,
        writer: RedisWriter | None = None,
        capture: Capture | None = None,
        sets: Mapping[str, PolicySet] | None = None,
    ) -> None:
        """``writer``: where shadow counts go (and ``capture``'s records), with Redis. ``sets``: the policy
        sets API keys name (``all``, every policy, when none are given)."""
        self.engine, self.model_name, self.limits, self.metrics = engine, model_name, limits, metrics
        self.writer, self.capture = writer, capture
        self.policy_names = {p.name for p in engine.policies}
        self.sets = dict(sets or {ALL: PolicySet(ALL, frozenset(self.policy_names))})
        self.probe_names = {p.name: p.probe for p in engine.policies}
        self.dials = {dial.name: dial for dial in engine.dials}

    # -- validation ------------------------------------------------------------------------------------
    def chat_request(self, body: ChatCompletionRequest, allowed: PolicySet) -> GenerationRequest:
        self._common(body)
        if not body.messages:
            raise APIError(400, "'messages' must contain at least one message", param="messages")
        messages = []
        for i, message in enumerate(body.messages):
            if message.role == "function":
                raise APIError(
                    400,
                    "role 'function' is not supported (function calling is not); send tool results as 'tool'",
                    code="unsupported_value",
                    param=f"messages[{i}].role",
                )
            content = message.content
            if isinstance(content, list):
                if any(part.type != "text" or part.text is None for part in content):
                    raise APIError(400, "only text content parts are supported", param=f"messages[{i}].content")
                content = "".join(part.text or "" for part in content)
            messages.append(
                {"role": "system" if message.role == "developer" else message.role, "content": content or ""}
            )
        users = [i for i, m in enumerate(messages) if m["role"] == "user" and m["content"].strip()]
        if not users:
            raise APIError(400, "'messages' must contain a non-empty user message", param="messages")
        encoded = render_messages(
            self.engine.lm.tokenizer, messages, span_message=users[-1], add_generation_prompt=True
        )
        if body.max_completion_tokens is not None:  # the newer name wins, as in OpenAI's API
            return self._generation(
                encoded, body, allowed, body.max_completion_tokens, "max_completion_tokens", "messages"
            )
        return self._generation(encoded, body, allowed, body.max_tokens, "max_tokens", "messages")

    def completion_request(self, body: CompletionRequest, allowed: PolicySet) -> GenerationRequest:
        self._common(body)
        prompt = body.prompt
        if prompt is None:
            raise APIError(
                400, "'prompt' is required: a null prompt is not supported", code="unsupported_value", param="prompt"
            )
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "exactly one prompt is supported", param="prompt")
            prompt = prompt[0]
        if not prompt.strip():
            raise APIError(400, "'prompt' must not be empty", param="prompt")
        ids = tuple(self.engine.lm.tokenizer(prompt, split_special_tokens=True)["input_ids"])  # text, not control
        # scored as a chat turn up to the assistant's, where ``tail`` probes read it
        scored = render_messages(
            self.engine.lm.tokenizer, [{"role": "user", "content": prompt}], span_message=0, add_generation_prompt=True
        )
        # a legacy completion's default is OpenAI's, whether max_tokens is omitted or null
        max_tokens = LEGACY_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        encoded = Encoded(ids, scored.start, scored.end)
        request = self._generation(encoded, body, allowed, max_tokens, "max_tokens", "prompt")
        return replace(request, score_ids=scored.ids)

    def _common(self, body: ChatCompletionRequest | CompletionRequest) -> None:
        model, n, temperature, top_p, seed = body.model, body.n, body.temperature, body.top_p, body.seed
        if model != self.model_name:
            raise APIError(
                404,
                f"The model '{model}' does not exist; this server serves '{self.model_name}'",
                code="model_not_found",
                param="model",
            )
        if n not in (None, 1):
            raise APIError(400, "only n=1 is supported", param="n", code="unsupported_value")
        if temperature is not None and not 0 <= temperature <= 2:
            raise APIError(400, "'temperature' must be between 0 and 2", param="temperature")
        if top_p is not None and not 0 < top_p <= 1:
            raise APIError(400, "'top_p' must be greater than 0 and at most 1", param="top_p")
        if seed is not None and not -(2**63) <= seed < 2**63:
            raise APIError(400, "'seed' must be a 64-bit signed integer", param="seed")

    def _chat_sampling(self, body: ChatCompletionRequest) -> dict[str, object]:
        """The chat-only sampling fields, checked as OpenAI checks them; ``logprobs`` are not served."""
        if body.logprobs:
            raise APIError(400, "logprobs are not supported", code="unsupported_value", param="logprobs")
        penalties = {}
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(body, name)
            if value is not None and not -2 <= value <= 2:
                raise APIError(400, f"'{name}' must be between -2 and 2", param=name)
            penalties[name] = value or 0.0
        bias: dict[int, float] = {}
        vocab = len(self.engine.lm.tokenizer)
        for key, value in (body.logit_bias or {}).items():
            token = int(key) if key.isascii() and key.isdigit() and len(key) <= 9 else -1
            if not 0 <= token < vocab:
                raise APIError(400, f"logit_bias key {key[:20]!r} is not a token id below {vocab}", param="logit_bias")
            if not -100 <= value <= 100:
                raise APIError(400, "logit_bias values must be between -100 and 100", param="logit_bias")
            bias[token] = value
        return {"logit_bias": tuple(bias.items()), **penalties}

    def _generation(
        self,
        encoded: Encoded,
        body: ChatCompletionRequest | CompletionRequest,
        allowed: PolicySet,
        max_tokens: int | None,
        param: str,
        prompt_param: str,
    ) -> GenerationRequest:
        """``allowed``: the policies the request may be checked with (``guard.policies`` narrows them);
        ``param``: the field ``max_tokens`` came from; ``prompt_param``: the field the prompt came from."""
        room = self.limits.context_window - len(encoded.ids)
        if room <= 0:
            raise APIError(
                400,
                f"This model's maximum context length is {self.limits.context_window} tokens; "
                f"the prompt has {len(encoded.ids)}",
                code="context_length_exceeded",
                param=prompt_param,
            )
        if len(encoded.ids) > self.limits.max_prompt_tokens:
            raise APIError(
                400,
                f"the prompt has {len(encoded.ids)} tokens; this server takes at most {self.limits.max_prompt_tokens},"
                " what it can prefill within its queue timeout",
                code="prompt_too_long",
                param=prompt_param,
            )
        if max_tokens is None:
            max_tokens = min(self.limits.default_max_tokens, room)
        if max_tokens <= 0 or max_tokens > room:
            raise APIError(400, f"'{param}' must be between 1 and {room} for this prompt", param=param)
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stop) > 4:
            raise APIError(400, "at most 4 stop sequences are allowed", param="stop")
        policies = None if allowed.name == ALL else allowed.policies
        if body.guard is not None and body.guard.policies is not None:
            outside = set(body.guard.policies) - allowed.policies
            if outside:
                where = "configured" if allowed.name == ALL else f"policy set {allowed.name!r} allows"
                raise APIError(
                    400,
                    f"unknown policies {sorted(outside)}; {where}: {sorted(allowed.policies)}",
                    param="guard.policies",
                )
            policies = frozenset(body.guard.policies)
        sampling = SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
            stop=stop,
            **(self._chat_sampling(body) if isinstance(body, ChatCompletionRequest) else {}),
        )
        explain = body.guard is not None and body.guard.explain
        steer = self._dials(body.guard.steer if body.guard is not None else None)
        return GenerationRequest(
            encoded.ids,
            (encoded.start, encoded.end),
            sampling,
            policies,
            explain=explain,
            steer=steer,
            policy_set=allowed.name,
        )

    def _dials(self, steer: dict[str, float] | None) -> dict[str, float]:
        """The request's dial strengths, each a dial the operator allowed and within its bounds."""
        for name, strength in (steer or {}).items():
            dial = self.dials.get(name)
            if dial is None:
                allowed = sorted(self.dials) or "none"
                raise APIError(400, f"unknown dial {name!r}; this server allows {allowed}", param="guard.steer")
            if not math.isfinite(strength) or not dial.low <= strength <= dial.high:
                raise APIError(
                    400, f"dial {name!r} goes from {dial.low:g} to {dial.high:g}", param=f"guard.steer.{name}"
                )
        return dict(steer or {})

    # -- running ---------------------------------------------------------------------------------------
    async def start(self, request: GenerationRequest, endpoint: str, started: float, request_id: str) -> Running:
        """Submit and wait for the prompt verdict; a blocked prompt raises the 400 content-filter error (its
        ``x-request-id`` header names the request, for feedback)."""
        try:
            handle = self.engine.submit(request, asyncio.get_running_loop())
        except QueueFull as exc:
            self.metrics.ended("rejected", request.policy_set)
            raise APIError(
                429, f"the server is busy ({exc}); retry shortly", code="queue_full", headers={"Retry-After": "1"}
            ) from None
        events = handle.events()
        try:
            first = await _next(events, _deadline(started, self.limits.queue_timeout))
        except TimeoutError:
            handle.cancel()  # leaves the queue, or the batch at its next token
            self.metrics.ended("timeout", request.policy_set)
            raise APIError(
                503,
                f"no batch slot within {self.limits.queue_timeout:g} s; retry shortly",
                code="queue_timeout",
                headers={"Retry-After": "1"},
            ) from None
        except asyncio.CancelledError:  # the client went away while waiting
            handle.cancel()
            self.metrics.ended("cancelled", request.policy_set)
            raise
        if isinstance(first, Failed):
            self.metrics.ended("failed", request.policy_set)
            raise APIError(500, first.error, code="generation_failed")
        self.metrics.prompt_checked(first.verdicts, request.policy_set)
        self._compare(request_id, first.verdicts, first.shadow)
        if first.blocked:
            async for event in events:
                if isinstance(event, Finished):
                    self.metrics.finished(event, endpoint, started, request.policy_set)
                    self._captured(request_id, endpoint, handle, first, event)
            raise APIError(
                400,
                first.message or "The prompt was filtered by policy.",
                code="content_filter",
                param="prompt",
                filters=first.verdicts,
                headers={"x-request-id": request_id},
            )
        return Running(handle, events, first, endpoint, started, request_id, request.policy_set)

    async def reply(self, running: Running) -> AsyncIterator[PromptChecked | Emitted | Finished | APIError]:
        """What every answer is made of, streamed or not: the prompt verdict, text pieces, then how it finished
        or the error that ended it (a timeout, a failed generation); metrics on the way. However the
        consumer stops (a client that went away closes it), generation stops and the end is counted."""
        handle, events, checked = running.handle, running.events, running.checked
        endpoint, started = running.endpoint, running.started
        first_token, ended = True, False
        pieces: list[str] | None = [] if self.capture is not None else None  # the reply, for capture
        deadline = _deadline(started, self.limits.request_timeout)
        try:
            yield checked
            while True:
                try:
                    event = await _next(events, deadline)
                except TimeoutError:
                    ended = True
                    self.metrics.ended("timeout", running.policy_set)
                    yield self._timed_out()
                    return
                if isinstance(event, Emitted):
                    if first_token:
                        self.metrics.first_token(started)
                        first_token = False
                    if pieces is not None:
                        pieces.append(event.text)
                    yield event
                elif isinstance(event, Failed):
                    ended = True
                    self.metrics.ended("failed", running.policy_set)
                    yield APIError(500, event.error, code="generation_failed")
                    return
                elif isinstance(event, Finished):
                    ended = True
                    self.metrics.finished(event, endpoint, started, running.policy_set)
                    self._compare(running.id, event.verdicts, event.shadow)
                    self._captured(running.id, endpoint, handle, checked, event, "".join(pieces or ()))
                    yield event
                    return
        finally:
            if not ended:  # the client went away: the stream was closed, or the request cancelled
                self.metrics.ended("cancelled", running.policy_set)
            handle.cancel()  # no-op once finished; stops generation if the client went away or timed out

    async def collect(self, running: Running) -> tuple[str, Finished]:
        """The whole reply: its text and how it finished; an error that ended it is raised."""
        pieces, done = [], None
        async with aclosing(self.reply(running)) as items:
            async for item in items:
                if isinstance(item, APIError):
                    raise item
                if isinstance(item, Emitted):
                    pieces.append(item.text)
                elif isinstance(item, Finished):
                    done = item
        return "".join(pieces), done

    def _compare(self, request_id: str, verdicts: dict[str, Verdict], shadowed: dict[str, Shadowed]) -> None:
        """Count where shadow versions decided otherwise than the active ones (and sum it in Redis)."""
        for comparison in comparisons(verdicts, shadowed, self.probe_names):
            self.metrics.shadow_checks.labels(comparison.policy).inc()
            if comparison.kind is not None:
                self.metrics.shadow_disagreements.labels(comparison.policy, comparison.kind).inc()
            if self.writer is not None:
                self.writer.submit("shadow", lambda pipe, c=comparison: record(pipe, c, request_id))

    def _captured(
        self, request_id: str, endpoint: str, handle: Handle, checked: PromptChecked, done: Finished, text: str = ""
    ) -> None:
        if self.capture is None:
            return
        request = handle.request
        start, end = request.prompt_span
        self.capture.offer(
            Seen(
                request_id,
                endpoint,
                {n: v.probe_version for n, v in {**checked.verdicts, **done.verdicts}.items() if n != ANY},  # probes
                checked.verdicts,
                done.verdicts,
                done.reason,
                (request.score_ids or request.prompt_ids)[start:end],
                text,
                request.policy_set,
            )
        )

    def system_fingerprint(self, checked: PromptChecked) -> str:
        """What a reply was computed with: the model's fingerprint and the request's probe-set version."""
        both = f"{self.engine.lm.fingerprint}:{checked.probe_set}".encode()
        return "fp_" + hashlib.sha256(both).hexdigest()[:12]

    def _timed_out(self) -> APIError:
        return APIError(
            504,
            f"generation did not finish within {self.limits.request_timeout:g} s; ask for fewer max_tokens",
            code="timeout",
        )

    async def chat(self, body: ChatCompletionRequest, allowed: PolicySet) -> ChatCompletion:
        started, request_id = time.perf_counter(), _id("chatcmpl")
        running = await self.start(self.chat_request(body, allowed), "chat", started, request_id)
        text, done = await self.collect(running)
        refusal = done.message if done.reason == "content_filter" else None
        choice = ChatChoice(
            0,
            ResponseMessage("assistant", text, refusal),
            done.reason,
            content_filter_results=done.verdicts,
        )
        return ChatCompletion(
            id=request_id,
            created=int(time.time()),
            model=self.model_name,
            choices=[choice],
            usage=_usage(done),
            system_fingerprint=self.system_fingerprint(running.checked),
            prompt_filter_results=_prompt_results(running.checked),
        )

    async def completion(self, body: CompletionRequest, allowed: PolicySet) -> Completion:
        started, request_id = time.perf_counter(), _id("cmpl")
        request = self.completion_request(body, allowed)
        running = await self.start(request, "completions", started, request_id)
        text, done = await self.collect(running)
        choice = CompletionChoice(0, text, done.reason, content_filter_results=done.verdicts)
        return Completion(
            id=request_id,
            created=int(time.time()),
            model=self.model_name,
            choices=[choice],
            usage=_usage(done),
            system_fingerprint=self.system_fingerprint(running.checked),
            prompt_filter_results=_prompt_results(running.checked),
        )

    async def chat_stream(self, body: ChatCompletionRequest, allowed: PolicySet) -> AsyncIterator[bytes]:
        meta = {"id": _id("chatcmpl"), "created": int(time.time()), "model": self.model_name}

        def chunk(choices: list[ChunkChoice], **extra: object) -> ChatCompletionChunk:
            return ChatCompletionChunk(**{**meta, **extra}, choices=choices)

        def closing(done: Finished) -> ChatCompletionChunk:
            delta = Delta(refusal=done.message) if done.reason == "content_filter" else Delta()
            return chunk([ChunkChoice(0, delta, done.reason, content_filter_results=done.verdicts)])

        shape = _Shape(
            opening=lambda prompt: chunk(
                [ChunkChoice(0, Delta(role="assistant", content=""))], prompt_filter_results=prompt
            ),
            piece=lambda text: chunk([ChunkChoice(0, Delta(content=text))]),
            closing=closing,
            usage=lambda usage: chunk([], usage=usage),
        )
        return await self._stream(self.chat_request(body, allowed), "chat", body, meta, shape)

    async def completion_stream(self, body: CompletionRequest, allowed: PolicySet) -> AsyncIterator[bytes]:
        meta = {"id": _id("cmpl"), "created": int(time.time()), "model": self.model_name}

        def chunk(choices: list[CompletionChoice], **extra: object) -> Completion:
            return Completion(**{**meta, **extra}, choices=choices)

        shape = _Shape(
            opening=lambda prompt: chunk([CompletionChoice(0, "", None)], prompt_filter_results=prompt),
            piece=lambda text: chunk([CompletionChoice(0, text, None)]),
            closing=lambda done: chunk([CompletionChoice(0, "", done.reason, content_filter_results=done.verdicts)]),
            usage=lambda usage: chunk([], usage=usage),
        )
        request = self.completion_request(body, allowed)
        return await self._stream(request, "completions", body, meta, shape)

    async def _stream(
        self,
        request: GenerationRequest,
        endpoint: str,
        body: ChatCompletionRequest | CompletionRequest,
        meta: dict,
        shape: _Shape,
    ) -> AsyncIterator[bytes]:
        """Start generation (a blocked prompt raises here, before any byte is sent), then the SSE lines."""
        started = time.perf_counter()
        running = await self.start(request, endpoint, started, meta["id"])
        meta["system_fingerprint"] = self.system_fingerprint(running.checked)
        if body.stream_options and body.stream_options.include_usage:
            meta["usage"] = None  # every chunk carries "usage": null; the last one the usage

        async def lines() -> AsyncIterator[bytes]:
            async with aclosing(self.reply(running)) as items:
                async for item in items:
                    if isinstance(item, PromptChecked):
                        yield _sse(shape.opening(_prompt_results(item)))
                    elif isinstance(item, Emitted):
                        yield _sse(shape.piece(item.text))
                    elif isinstance(item, APIError):
                        yield _sse(item.body())
                    else:
                        yield _sse(shape.closing(item))
                        if "usage" in meta:
                            yield _sse(shape.usage(_usage(item)))
            yield DONE

        return lines()


@dataclass(frozen=True)
class _Shape:
    """How one endpoint's stream chunks look: the opening chunk, a text piece, the finish, the usage."""

    opening: Callable[[list[PromptFilterResult]], msgspec.Struct]
    piece: Callable[[str], msgspec.Struct]
    closing: Callable[[Finished], msgspec.Struct]
    usage: Callable[[Usage], msgspec.Struct]


def _deadline(started: float, timeout: float) -> float | None:
    """``started`` is a ``time.perf_counter()`` reading; a timeout of 0 means none."""
    return started + timeout if timeout > 0 else None


async def _next(events: AsyncIterator, deadline: float | None):
    """The next event, or ``TimeoutError`` once ``deadline`` (``perf_counter`` time) has passed."""
    if deadline is None:
        return await anext(events)
    return await asyncio.wait_for(anext(events), max(0.0, deadline - time.perf_counter()))


def _sse(payload: msgspec.Struct) -> bytes:
    return b"data: " + encoder.encode(payload) + b"\n\n"


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _usage(done: Finished) -> Usage:
    return Usage(done.prompt_tokens, done.completion_tokens, done.prompt_tokens + done.completion_tokens)


def _prompt_results(checked: PromptChecked) -> list[PromptFilterResult]:
    return [PromptFilterResult(0, checked.verdicts)]
