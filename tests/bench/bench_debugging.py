"""Benchmark: what explanations and capture cost, each side by side with itself off, in one run.

- **Explain** (in-process, the engine alone, compiled as served): ``--streams`` greedy replies decoded
  together with the default policies, their verdicts explained or not, alternating for ``--rounds``
  rounds. Reports decode seconds per generated token, and the ratio explained / plain.
- **Capture** (over HTTP): two servers on the default model, one with capture on and one without, both
  with a policy that flags every reply (so every request is recorded). Requests alternate between
  them, one at a time; then Redis is stopped and it runs again. Reports the mean request latency and
  the ratio capture / none, Redis up and Redis down, and the records written and dropped.

    .venv/bin/python tests/bench/bench_debugging.py [--rounds 3] [--streams 4] [--requests 20]
        [--out tests/bench/results/debugging.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import RedisServer
from prompts import BENIGN
from serverproc import Server

from guard.engine import Engine
from guard.events import Failed, Finished, GenerationRequest
from guard.policy import DEFAULT_POLICY_FILE, load_policies
from guard.sampling import SamplingParams
from probes.catalog import load_shipped
from probes.lm.model import DEFAULT_MODEL, load_model
from probes.lm.render import render_messages


def explain_round(engine: Engine, prompts: list[str], tokens: int, explain: bool) -> tuple[float, int]:
    tokenizer = engine.lm.tokenizer

    def request(text: str) -> GenerationRequest:
        enc = render_messages(
            tokenizer, [{"role": "user", "content": text}], span_message=0, add_generation_prompt=True
        )
        return GenerationRequest(
            enc.ids, (enc.start, enc.end), SamplingParams(max_tokens=tokens, temperature=0), explain=explain
        )

    async def one(text: str) -> int:
        handle = engine.submit(request(text), asyncio.get_running_loop())
        async for event in handle.events():
            if isinstance(event, Failed):
                raise RuntimeError(event.error)
            if isinstance(event, Finished):
                return event.completion_tokens
        return 0

    async def all_of() -> int:
        return sum(await asyncio.gather(*(one(text) for text in prompts)))

    started = time.perf_counter()
    generated = asyncio.run(all_of())
    return time.perf_counter() - started, generated


def bench_explain(rounds: int, streams: int, tokens: int) -> dict:
    lm = load_model(DEFAULT_MODEL, threads=1, compiled=True)  # as the server loads it
    policies = load_policies(DEFAULT_POLICY_FILE)
    probes = [load_shipped(p.probe, model_fingerprint=lm.fingerprint) for p in policies]
    engine = Engine(lm, policies, probes, max_batch=streams, fast_decode=True)
    engine.start()
    prompts = [BENIGN[i % len(BENIGN)] for i in range(streams)]
    seconds = {False: [], True: []}
    try:
        explain_round(engine, prompts, tokens, False)  # warm
        for _ in range(rounds):
            for explain in (False, True):
                took, generated = explain_round(engine, prompts, tokens, explain)
                seconds[explain].append(took / generated)
    finally:
        engine.stop()
    plain, explained = statistics.median(seconds[False]), statistics.median(seconds[True])
    return {
        "streams": streams,
        "tokens": tokens,
        "seconds_per_token": {"plain": plain, "explained": explained},
        "ratio": explained / plain,
        "per_round": {"plain": seconds[False], "explained": seconds[True]},
    }


def latencies(servers: dict[str, Server], requests: int) -> dict[str, float]:
    taken = {name: [] for name in servers}
    for i in range(requests):
        for name, server in servers.items():
            body = {
                "model": DEFAULT_MODEL,
                "messages": [{"role": "user", "content": BENIGN[i % len(BENIGN)]}],
                "max_tokens": 16,
                "temperature": 0,
            }
            started = time.perf_counter()
            httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120).raise_for_status()
            taken[name].append(time.perf_counter() - started)
    return {name: statistics.mean(values) for name, values in taken.items()}


def counted(server: Server, name: str) -> float:
    lines = httpx.get(server.url + "/metrics").text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith(name) and 'kind="capture"' in line)


def bench_capture(requests: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="guard-bench-capture-"))
    policies = yaml.safe_load(DEFAULT_POLICY_FILE.read_text())
    for entry in policies["policies"]:
        if entry["name"] == "harmful_reply":
            entry["threshold"] = 0.0  # every reply is flagged, so every request is recorded
    (work / "policies.yaml").write_text(yaml.safe_dump(policies))
    redis_server = RedisServer(work)
    # float32, as the in-process explanation rounds above (docs/debugging.md's figures are on float32)
    common = ("--policy-file", str(work / "policies.yaml"), "--redis-url", redis_server.url, "--dtype", "float32")
    servers = {
        "none": Server(*common, log=work / "none.log"),
        "capture": Server(*common, "--capture", log=work / "capture.log"),
    }
    try:
        for server in servers.values():
            server.wait_compiled()
        latencies(servers, 2)  # warm
        up = latencies(servers, requests)
        written = counted(servers["capture"], "guard_redis_writes_total")
        redis_server.stop()
        down = latencies(servers, requests)
        dropped = counted(servers["capture"], "guard_redis_writes_dropped_total")
    finally:
        for server in servers.values():
            server.stop()
    return {
        "requests": requests,
        "redis_up": {**up, "ratio": up["capture"] / up["none"], "records_written": written},
        "redis_down": {**down, "ratio": down["capture"] / down["none"], "records_dropped": dropped},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("tests/bench/results/debugging.json"))
    args = parser.parse_args()
    result = {
        "explain": bench_explain(args.rounds, args.streams, args.tokens),
        "capture": bench_capture(args.requests),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    explain, capture = result["explain"], result["capture"]
    print(f"explain: {explain['ratio']:.3f}x decode seconds per token ({args.streams} streams, explained / plain)")
    print(
        f"capture: {capture['redis_up']['ratio']:.3f}x request latency with Redis up "
        f"({capture['redis_up']['records_written']:.0f} records), {capture['redis_down']['ratio']:.3f}x with it "
        f"down ({capture['redis_down']['records_dropped']:.0f} dropped)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
