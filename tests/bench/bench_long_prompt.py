"""Benchmark: what running streams see while a long prompt arrives, over HTTP.

``--streams`` clients stream replies (the benign prompts, greedy) from a guarded server (the default
policies). Once they all decode, one client sends a prompt of about ``--prompt-tokens`` tokens. The bench
reports, for the running streams: their tokens/s over ``BEFORE`` seconds before it arrives and while it
waits for its first token; their longest gap between two chunks before it, while it prefills (until
``JOINING`` seconds before its first token) and from its arrival until ``AFTER`` seconds past its first
token (its row joins the batch just before it); and the long prompt's time to its first token.
``--before DIR`` runs the same against a server on another checkout's code (e.g. a ``git worktree`` of
an earlier commit), in the same run, alternating.

    .venv/bin/python tests/bench/bench_long_prompt.py [--dtype int8] [--streams 4] [--prompt-tokens 3000]
        [--rounds 2] [--before DIR] [--out tests/bench/results/long_prompt.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import streamed_request
from prompts import BENIGN
from serverproc import Server

BEFORE = 3.0  # seconds the streams decode alone before the long prompt arrives
JOINING = 0.5  # the last seconds before the long prompt's first token: its row joins the batch in them
AFTER = 2.0  # seconds after the long prompt's first token in which the running streams' gaps still count
LONG_REPLIES = BENIGN[1:]  # requests for text (the first, a one-line answer, ends before the long prompt comes)
FILLER = "The quick brown fox jumps over the lazy dog while the farmer counts his sheep in the meadow. "


def stream(url: str, prompt: str, tokens: int, arrivals: list[float]) -> float:
    """Stream one reply, appending each content chunk's arrival time; returns the time to its first chunk."""
    body = streamed_request(prompt, tokens)
    started = time.perf_counter()
    first = None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                now = time.perf_counter()
                arrivals.append(now)
                first = first if first is not None else now - started
    return first if first is not None else float("nan")


def one_round(url: str, streams: int, prompt_tokens: int, tokens: int) -> dict:
    arrivals: list[list[float]] = [[] for _ in range(streams)]
    runners = [
        threading.Thread(target=stream, args=(url, LONG_REPLIES[i % len(LONG_REPLIES)], tokens, arrivals[i]))
        for i in range(streams)
    ]
    for runner in runners:
        runner.start()
    while min(len(a) for a in arrivals) < 8:  # every stream decodes
        ended = [i for i, runner in enumerate(runners) if not runner.is_alive() and len(arrivals[i]) < 8]
        if ended:
            raise SystemExit(f"stream {ended[0]} ended after {len(arrivals[ended[0]])} chunks, before the long prompt")
        time.sleep(0.01)
    decoding = time.perf_counter()
    time.sleep(BEFORE)
    long_prompt = FILLER * (prompt_tokens // 20) + "\nSummarise the text above in one sentence."
    sent = time.perf_counter()
    ttft = stream(url, long_prompt, 4, [])
    answered = sent + ttft
    for runner in runners:
        runner.join()

    def window(start: float, end: float) -> tuple[float, float]:
        inside = [[t for t in a if start <= t <= end] for a in arrivals]
        count = sum(len(a) for a in inside)
        gaps = [b - a for seq in inside for a, b in itertools.pairwise(seq)]
        return count / (end - start), max(gaps, default=end - start)

    during, _ = window(sent, answered)
    _, prefilling = window(sent, answered - JOINING)
    _, longest = window(sent, answered + AFTER)
    before, longest_before = window(decoding, sent)
    return {
        "long_prompt_ttft_s": ttft,
        "streams_tokens_per_s_before": before,
        "streams_tokens_per_s_during": during,
        "longest_gap_before_s": longest_before,
        "longest_gap_prefilling_s": prefilling,
        "longest_gap_during_s": longest,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="int8")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=3000)
    parser.add_argument("--tokens", type=int, default=400, help="max_tokens of the running streams")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--before", type=Path, help="also a server on this checkout's code")
    parser.add_argument("--out", type=Path, default=Path("tests/bench/results/long_prompt.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="guard-bench-long-"))
    flags = ("--dtype", args.dtype, "--queue-timeout", "600", "--max-prompt-tokens", "8000")
    kinds = [("after", None)] + ([("before", args.before.resolve())] if args.before else [])
    servers = {}
    try:
        for name, code in kinds:
            extra = flags if name == "after" else flags[:4]  # an older server may not know --max-prompt-tokens
            servers[name] = Server(*extra, log=work / f"{name}.log", code=code)
            servers[name].wait_compiled()
        runs: dict[str, list[dict]] = {name: [] for name in servers}
        for round_ in range(args.rounds):
            order = list(servers.items()) if round_ % 2 == 0 else list(reversed(servers.items()))
            for name, server in order:
                runs[name].append(one_round(server.url, args.streams, args.prompt_tokens, args.tokens))
    finally:
        for server in servers.values():
            server.stop()
    report = {
        "dtype": args.dtype,
        "streams": args.streams,
        "prompt_tokens": args.prompt_tokens,
        "rounds": args.rounds,
        "servers": {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()},
        "runs": runs,
    }
    print(json.dumps(report, indent=2))
    print(
        f"\n| server | long prompt TTFT | streams tok/s before / during "
        f"| longest gap before / prefilling / with the join |  ({args.dtype})"
    )
    print("|---|---|---|---|")
    for name, m in report["servers"].items():
        print(
            f"| {name} | {m['long_prompt_ttft_s']:.2f} s | {m['streams_tokens_per_s_before']:.1f} /"
            f" {m['streams_tokens_per_s_during']:.1f} | {m['longest_gap_before_s']:.3f} /"
            f" {m['longest_gap_prefilling_s']:.3f} / {m['longest_gap_during_s']:.3f} s |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
