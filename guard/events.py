"""What the generation loop tells a request, in order: prompt verdicts, emitted text, then how it finished."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from msgspec import UNSET, UnsetType

from guard.policy import ALL
from guard.sampling import SamplingParams
from probes.explain import Explanation


@dataclass(frozen=True)
class Verdict:
    """One policy's decision on a prompt or on a reply (Azure OpenAI's content-filter shape, plus guard's fields)."""

    filtered: bool
    detected: bool
    score: float
    probe_version: str
    action: str
    detected_at_token: int | None = None  # output stage: index of the first generated token that crossed
    ablated_from_token: int | None = None
    steered_from_token: int | None = None  # refuse, steer: the first generated token steered (0: the whole reply)
    direction_version: str | None = None  # refuse, steer, a dial: the version of the direction steered along
    strength: float | None = None  # refuse, steer, a dial: the strength steered by
    explanation: Explanation | UnsetType = UNSET  # asked for with the request's ``explain``


@dataclass(frozen=True)
class Shadowed:
    """A shadow version's verdict on the same text: scored, never acted on."""

    version: str
    score: float
    detected: bool


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    prompt_span: tuple[int, int]  # tokens the prompt-stage policies read (the last user message)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    policies: frozenset[str] | None = None  # None: every configured policy
    # Legacy completions generate from raw text, which probes never saw: they score ``score_ids`` (the
    # prompt rendered as a user message), and ``prompt_span`` indexes those instead of ``prompt_ids``.
    score_ids: tuple[int, ...] | None = None
    explain: bool = False  # verdicts carry their top contributing tokens
    steer: dict[str, float] = field(default_factory=dict)  # dial name -> strength, the whole sequence
    policy_set: str = ALL  # the API key's policy set: what the request is counted under


@dataclass(frozen=True)
class PromptChecked:
    verdicts: dict[str, Verdict]
    blocked: bool
    message: str | None = None
    probe_set: str = ""  # the version of the probe set the request is checked with (``ProbeSet.version``)
    shadow: dict[str, Shadowed] = field(default_factory=dict)


@dataclass(frozen=True)
class Emitted:
    text: str
    completion_tokens: int


@dataclass(frozen=True)
class Finished:
    reason: str  # stop | length | content_filter | cancelled
    prompt_tokens: int
    completion_tokens: int
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    message: str | None = None
    shadow: dict[str, Shadowed] = field(default_factory=dict)


@dataclass(frozen=True)
class Failed:
    error: str


Event = PromptChecked | Emitted | Finished | Failed


class Handle:
    """A submitted request: the engine thread puts events, the HTTP side awaits them; ``cancel`` stops generation."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self._loop = loop
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._cancelled = threading.Event()

    def put(self, event: Event) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the receiving event loop has closed: nobody listens, so generation stops
            self._cancelled.set()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    async def events(self) -> AsyncIterator[Event]:
        while True:
            event = await self._queue.get()
            yield event
            if isinstance(event, Finished | Failed):
                return
