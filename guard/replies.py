"""Replies generated in-process by the serving engine: what the server would send, without HTTP.

Offline tools (``guard data replies``, the intervention bench) use it to collect the model's own
replies in the same shared batch, with the same sampling, as ``guard serve``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from guard.engine import Engine, QueueFull
from guard.events import Emitted, Failed, Finished, GenerationRequest, PromptChecked, Verdict
from guard.sampling import SamplingParams
from probes.lm.render import render_messages

RETRY_SECONDS = 0.01


@dataclass(frozen=True)
class Generated:
    prompt: str
    reply: str
    completion_tokens: int
    finish_reason: str  # stop | length | content_filter | cancelled | failed
    prompt_verdicts: dict[str, Verdict] = field(default_factory=dict)
    verdicts: dict[str, Verdict] = field(default_factory=dict)  # every stage's, as the reply ended


def generate(
    engine: Engine, prompts: Sequence[str], sampling: SamplingParams, steer: Mapping[str, float] | None = None
) -> list[Generated]:
    """One reply per prompt (a user turn), in order, each turning the dials ``steer``. At most the batch and
    the waiting queue are in flight at once; a request the queue turns away (rows not yet admitted) waits
    a moment and retries."""

    async def one(text: str, room: asyncio.Semaphore) -> Generated:
        async with room:
            return await _reply(text)

    async def _reply(text: str) -> Generated:
        enc = render_messages(
            engine.lm.tokenizer, [{"role": "user", "content": text}], span_message=0, add_generation_prompt=True
        )
        request = GenerationRequest(enc.ids, (enc.start, enc.end), sampling, steer=dict(steer or {}))
        while True:
            try:
                handle = engine.submit(request, asyncio.get_running_loop())
                break
            except QueueFull:
                await asyncio.sleep(RETRY_SECONDS)
        pieces: list[str] = []
        prompt_verdicts: dict[str, Verdict] = {}
        async for event in handle.events():
            if isinstance(event, PromptChecked):
                prompt_verdicts = event.verdicts
            elif isinstance(event, Emitted):
                pieces.append(event.text)
            elif isinstance(event, Finished):
                return Generated(
                    text, "".join(pieces), event.completion_tokens, event.reason, prompt_verdicts, event.verdicts
                )
            elif isinstance(event, Failed):
                return Generated(text, "".join(pieces), 0, "failed", prompt_verdicts)
        return Generated(text, "".join(pieces), 0, "cancelled", prompt_verdicts)

    async def every() -> list[Generated]:
        room = asyncio.Semaphore(engine.max_batch + engine.max_waiting)
        return list(await asyncio.gather(*(one(text, room) for text in prompts)))

    return asyncio.run(every())
