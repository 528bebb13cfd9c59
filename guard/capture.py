"""Capture: flagged and blocked requests (and a sample of the rest) recorded to a bounded Redis stream.

A record is written off the request's path (``guard.writer``): when Redis does not answer, it is
dropped and counted; a request is never slowed or failed by capture.

Keys (``guard:capture`` prefix): the stream ``guard:capture`` (trimmed to ``maxlen`` entries and to
``retention`` seconds) lists the records in order; ``guard:capture:id:<response id>`` holds each one
for ``retention`` seconds, which is where feedback finds the request it labels.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import redis

from guard.events import Verdict
from guard.policy import ALL
from guard.writer import RedisWriter
from probes.data import Row

STREAM = "guard:capture"


def record_key(request_id: str) -> str:
    return f"{STREAM}:id:{request_id}"


@dataclass(frozen=True)
class Seen:
    """What one request leaves behind: its verdicts on both stages and the texts they scored."""

    id: str
    endpoint: str
    versions: Mapping[str, str]  # policy -> probe version the request was checked with
    prompt: Mapping[str, Verdict]
    output: Mapping[str, Verdict]
    finish_reason: str
    prompt_ids: Sequence[int]  # the scored prompt tokens (the last user message)
    reply_text: str = ""
    policy_set: str = ALL  # the API key's policy set, the policies it was checked with
    time: float = field(default_factory=time.time)

    @property
    def flagged(self) -> bool:
        return any(v.detected or v.filtered for v in (*self.prompt.values(), *self.output.values()))


def document(seen: Seen, prompt_text: str, *, redact: bool) -> dict:
    """The stored record: scores and decisions per stage and policy; the texts, or their sha256 when redacted."""

    def verdicts(stage: Mapping[str, Verdict]) -> dict:
        return {name: {"score": v.score, "detected": v.detected, "filtered": v.filtered} for name, v in stage.items()}

    texts = {"prompt_text": prompt_text, "reply_text": seen.reply_text}
    if redact:
        texts = {k: "sha256:" + hashlib.sha256(v.encode()).hexdigest() for k, v in texts.items()}
    return {
        "id": seen.id,
        "time": seen.time,
        "endpoint": seen.endpoint,
        "policy_set": seen.policy_set,
        "versions": dict(seen.versions),
        "prompt": verdicts(seen.prompt),
        "output": verdicts(seen.output),
        "finish_reason": seen.finish_reason,
        "flagged": seen.flagged,
        "redacted": redact,
        **texts,
    }


class Capture:
    def __init__(
        self,
        writer: RedisWriter,
        decode: Callable[[Sequence[int]], str],
        *,
        redact: bool = False,
        sample: float = 0.0,
        maxlen: int = 100_000,
        retention: float = 7 * 86400.0,
    ) -> None:
        """``decode``: token ids to text; ``sample``: the fraction of unflagged requests recorded too."""
        self.writer, self.decode, self.redact, self.sample = writer, decode, redact, sample
        self.maxlen, self.retention = maxlen, retention

    @property
    def client(self) -> redis.Redis:
        return self.writer.client

    def offer(self, seen: Seen) -> None:
        """Record ``seen`` if it was flagged, or falls in the sample; never blocks."""
        if seen.flagged or random.random() < self.sample:
            self.writer.submit("capture", lambda pipe: self._write(pipe, seen))

    def _write(self, pipe: redis.client.Pipeline, seen: Seen) -> None:
        record = json.dumps(document(seen, self.decode(seen.prompt_ids), redact=self.redact))
        oldest = int((time.time() - self.retention) * 1000)
        pipe.xadd(STREAM, {"id": seen.id, "record": record}, maxlen=self.maxlen, approximate=False)
        pipe.xtrim(STREAM, minid=oldest, approximate=False)
        pipe.set(record_key(seen.id), record, ex=max(1, int(self.retention)))


def find(client: redis.Redis, request_id: str) -> dict | None:
    """The captured record of a request, while it is kept."""
    raw = client.get(record_key(request_id))
    return json.loads(raw) if raw is not None else None


# -- feedback: a person's label on a captured request ------------------------------------------------------
def feedback_key(policy: str) -> str:
    return f"guard:feedback:{policy}"


def stage_of(record: dict, policy: str) -> str:
    """The stage a label on ``policy`` is about: the output when only the reply was checked by it or only the
    reply crossed, else the prompt."""
    prompt, output = record["prompt"].get(policy), record["output"].get(policy)
    if prompt is None or (output is not None and output["detected"] and not prompt["detected"]):
        return "output"
    return "prompt"


def give_feedback(client: redis.Redis, record: dict, policy: str, label: int, note: str) -> dict:
    """Store a label (one per request and policy: a later one replaces it) with the texts it labels."""
    entry = {
        "id": record["id"],
        "label": label,
        "note": note,
        "time": time.time(),
        "stage": stage_of(record, policy),
        "redacted": record["redacted"],
        "prompt_text": record["prompt_text"],
        "reply_text": record["reply_text"],
        "versions": record["versions"],
    }
    client.hset(feedback_key(policy), record["id"], json.dumps(entry))
    return entry


def feedback_rows(client: redis.Redis, policy: str) -> tuple[list[Row], int]:
    """The labelled rows of ``policy`` in the training format, and how many labels were left out because their
    request was captured redacted (only a hash of its text is known)."""
    rows, redacted = [], 0
    for raw in client.hvals(feedback_key(policy)):
        entry = json.loads(raw)
        if entry["redacted"]:
            redacted += 1
        elif entry["stage"] == "output":
            rows.append(
                Row(entry["reply_text"], entry["label"], entry["prompt_text"], source=f"feedback:{entry['id']}")
            )
        else:
            rows.append(Row(entry["prompt_text"], entry["label"], source=f"feedback:{entry['id']}"))
    return sorted(rows, key=lambda r: r.source), redacted
