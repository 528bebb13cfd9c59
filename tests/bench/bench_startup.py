"""Benchmark: how long ``guard serve`` takes to become ready from a warm cache, per numeric path.

Each path is started once first, untimed, so the converted model, the int8 calibration ranges and the
compiled kernels are in the cache (``GUARD_CACHE_DIR``, the user's by default). Then every round starts
each path in turn and measures the seconds from the process's start to the first 200 on ``/readyz``,
with the server's own split (model, policies and probes loaded; engine started) read from its log, and
to the step compiled (``/readyz`` no longer says ``compiling``: the server decodes eagerly until then; a
server that compiles before it is ready is compiled when ready). ``--reply-tokens N`` also times a greedy
reply of N tokens as soon as the server is ready (while its step compiles) and again once it is compiled:
what the first requests get. ``--before DIR`` adds the same servers on another checkout's code, in the
same rounds.

    .venv/bin/python tests/bench/bench_startup.py [--dtypes int8,float32] [--rounds 3] [--no-compile]
        [--reply-tokens 32] [--before DIR] [--out tests/bench/results/startup.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serverproc import Server

SPLIT = re.compile(r"loaded in ([0-9.]+) s, engine started in ([0-9.]+) s")  # the server's "ready:" line


def reply_rate(server: Server, tokens: int) -> float:
    """Tokens a second of one greedy reply of ``tokens`` tokens (its time to first token included)."""
    model = httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me a long story."}], "temperature": 0}
    started = time.perf_counter()
    reply = httpx.post(server.url + "/v1/chat/completions", json={**body, "max_tokens": tokens}, timeout=300).json()
    return round(reply["usage"]["completion_tokens"] / (time.perf_counter() - started), 1)


def start_once(flags: list[str], log: Path, code: Path | None, reply_tokens: int = 0) -> dict:
    started = time.perf_counter()
    server = Server(*flags, log=log, code=code)
    ready = time.perf_counter() - started
    rates = {"at_ready_tokens_per_s": reply_rate(server, reply_tokens)} if reply_tokens else {}
    server.wait_compiled()
    compiled = time.perf_counter() - started
    if reply_tokens:
        rates["compiled_tokens_per_s"] = reply_rate(server, reply_tokens)
    server.stop()
    split = SPLIT.search(log.read_text())
    return {
        "ready_s": round(ready, 2),
        "compiled_s": round(compiled, 2),
        "loaded_s": float(split.group(1)) if split else None,
        "engine_s": float(split.group(2)) if split else None,
        **rates,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="int8,float32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--reply-tokens", type=int, default=0, help="also time a reply of this many tokens")
    parser.add_argument("--before", type=Path, help="another checkout, measured in the same rounds")
    parser.add_argument("--out", type=Path, default=Path("tests/bench/results/startup.json"))
    args = parser.parse_args()
    codes = {"after": None, **({"before": args.before.resolve()} if args.before else {})}
    servers = {
        f"{dtype}/{name}": (["--dtype", dtype, *(["--no-compile"] if args.no_compile else [])], code)
        for dtype in args.dtypes.split(",")
        for name, code in codes.items()
    }
    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    for flags, code in servers.values():  # warms every cache the timed starts read
        start_once(flags, work / "warm.log", code)
    runs: dict[str, list[dict]] = {name: [] for name in servers}
    for round_ in range(args.rounds):
        for name, (flags, code) in servers.items():
            log = work / f"{name.replace('/', '-')}-{round_}.log"
            runs[name].append(start_once(flags, log, code, args.reply_tokens))
            print(name, runs[name][-1], flush=True)
    report = {
        "cpus": os.cpu_count(),
        "rounds": args.rounds,
        "compiled": not args.no_compile,
        "median_ready_s": {name: statistics.median(r["ready_s"] for r in rows) for name, rows in runs.items()},
        "median_compiled_s": {name: statistics.median(r["compiled_s"] for r in rows) for name, rows in runs.items()},
        "runs": runs,
    }
    if args.before:
        report["after_over_before"] = {
            dtype: round(report["median_ready_s"][f"{dtype}/after"] / report["median_ready_s"][f"{dtype}/before"], 3)
            for dtype in args.dtypes.split(",")
        }
    print(json.dumps(report, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
