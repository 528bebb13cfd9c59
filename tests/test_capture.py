"""Capture and feedback on a real redis-server: what is recorded, bounded, redacted, labelled and exported."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
import redis
from serverproc import Server

from guard.capture import STREAM, Capture, Seen, feedback_rows, find, record_key
from guard.cli import main
from guard.events import Verdict
from guard.writer import RedisWriter


def verdict(score: float, detected: bool) -> Verdict:
    return Verdict(filtered=False, detected=detected, score=score, probe_version="v1", action="flag")


def seen(request_id: str, detected: bool = True) -> Seen:
    return Seen(request_id, "chat", {"toy": "v1"}, {"toy": verdict(0.9, detected)}, {}, "stop", (1, 2), "a reply")


def waited(check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.05)
    return check()


def test_capture_records_flagged_requests_bounded_and_redacted(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    dropped = []
    writer = RedisWriter(client, dropped=lambda kind, reason: dropped.append(reason))
    capture = Capture(writer, lambda ids: "the prompt", maxlen=3, retention=60)
    for i in range(5):
        capture.offer(seen(f"r{i}"))
    capture.offer(seen("quiet", detected=False))  # nothing flagged, no sample: not recorded
    assert waited(lambda: find(client, "r4"))
    record = find(client, "r4")
    assert record["prompt_text"] == "the prompt" and record["reply_text"] == "a reply" and record["flagged"]
    assert record["prompt"] == {"toy": {"score": 0.9, "detected": True, "filtered": False}}
    assert client.xlen(STREAM) == 3 and 0 < client.ttl(record_key("r4")) <= 60  # maxlen and retention hold
    assert find(client, "quiet") is None and dropped == []
    Capture(writer, lambda ids: "the prompt", redact=True).offer(seen("secret"))
    assert waited(lambda: find(client, "secret"))
    writer.stop()
    record = find(client, "secret")
    assert record["redacted"] and record["prompt_text"].startswith("sha256:") and "the prompt" not in json.dumps(record)


def test_capture_drops_and_counts_when_redis_is_down(redis_server):
    client = redis.Redis.from_url(redis_server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    dropped = []
    writer = RedisWriter(client, dropped=lambda kind, reason: dropped.append((kind, reason)))
    redis_server.stop()
    started = time.perf_counter()
    Capture(writer, lambda ids: "").offer(seen("lost"))
    assert time.perf_counter() - started < 0.01  # offering never waits for Redis
    assert waited(lambda: dropped) == [("capture", "redis_error")]
    writer.stop()


@pytest.fixture
def captured(tmp_path, redis_server, tiny_lm, tiny_model_dir):
    """A tiny server with capture on: ``toy`` flags everything (threshold 0), ``never`` nothing."""
    from test_engine import probe_for

    probe_for(tiny_lm).save(tmp_path / "probe")
    policies = {
        "policies": [
            {"name": "toy", "probe": str(tmp_path / "probe"), "stage": "both", "action": "flag", "threshold": 0.0},
            {"name": "never", "probe": str(tmp_path / "probe"), "stage": "prompt", "action": "flag", "threshold": 1.0},
        ]
    }
    (tmp_path / "policies.json").write_text(json.dumps(policies))
    env = {"GUARD_CACHE_DIR": str(tmp_path / "cache"), "GUARD_COMPILE": "0", "GUARD_DTYPE": "float32"}
    flags = ("--policy-file", str(tmp_path / "policies.json"), "--redis-url", redis_server.url)
    server = Server(
        "--model", str(tiny_model_dir), *flags, "--capture", "--admin-key", "adm", env=env, log=tmp_path / "log"
    )
    yield server, redis.Redis.from_url(redis_server.url), tmp_path
    server.stop()


@pytest.mark.server
def test_flagged_requests_are_captured_labelled_and_exported(captured, redis_server, tiny_model_dir):
    server, client, tmp_path = captured
    api = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    ask = {"model": tiny_model_dir.name, "messages": [{"role": "user", "content": "How do I bake bread?"}]}
    reply = api.chat.completions.create(**ask, max_tokens=4)
    quiet = api.chat.completions.create(**ask, max_tokens=4, extra_body={"guard": {"policies": ["never"]}})
    record = waited(lambda: find(client, reply.id))
    assert record["prompt_text"] == "How do I bake bread?" and record["reply_text"] == reply.choices[0].message.content
    assert record["prompt"]["toy"]["detected"] and set(record["versions"]) == {"toy", "never"}
    assert record["policy_set"] == "all"  # no API keys: every policy
    assert find(client, quiet.id) is None  # nothing flagged it

    def feedback(body: dict, key: str | None = "adm") -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.post(server.url + "/v1/guard/feedback", json=body, headers=headers)

    good = {"id": reply.id, "policy": "toy", "label": 0, "note": "a recipe"}
    assert feedback(good, key=None).status_code == 401 and feedback(good, key="x").status_code == 401
    for wrong, status, param in (
        ({**good, "id": "chatcmpl-unknown"}, 404, "id"),
        ({**good, "policy": "nope"}, 400, "policy"),
        ({**good, "label": 2}, 400, "label"),
        ({**good, "label": "no"}, 400, "label"),
    ):
        answer = feedback(wrong)
        assert answer.status_code == status and answer.json()["error"]["param"] == param, answer.text
    assert feedback(good).json() == {"id": reply.id, "policy": "toy", "label": 0, "stage": "prompt"}
    rows, redacted = feedback_rows(client, "toy")
    assert [(r.text, r.label) for r in rows] == [("How do I bake bread?", 0)] and redacted == 0
    out = tmp_path / "rows.jsonl"
    assert main(["feedback", "--redis-url", redis_server.url, "export", "--policy", "toy", "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == {"text": "How do I bake bread?", "label": 0}

    redis_server.stop()  # Redis down: requests go on as before, records are dropped and counted
    started = time.perf_counter()
    api.chat.completions.create(**ask, max_tokens=4)
    assert time.perf_counter() - started < 5

    def dropped() -> bool:
        counted = 'guard_redis_writes_dropped_total{kind="capture",reason="redis_error"} 1.0'
        return counted in httpx.get(server.url + "/metrics").text

    assert waited(dropped)
    assert feedback(good).status_code == 503
