"""Benchmark: prefill, in one piece through transformers against the lean step's packed prefill.

The benign prompts as chat requests (system prompt and role marker included), on one numeric path and
thread count, the four ways measured side by side in each round:

- ``transformers_each``: each prompt in one piece through transformers' forward, one after another (the
  prefill before the lean one);
- ``lean_each``: each prompt after its cached template prefix, one pass each;
- ``lean_packed``: all prompts after their cached prefix in one packed pass (what the server does when
  they arrive together);
- ``prefix``: the prefix alone (paid once per distinct prefix).

Prints the median milliseconds over ``--rounds`` and the ratios, and writes JSON.

``--compiled`` runs the lean step through ``torch.compile``, compiled as the server compiles it (on the
engine's decode threads), whatever ``--threads`` the prefill then runs on.

    .venv/bin/python tests/bench/bench_prefill.py [--dtype int8] [--threads 1] [--compiled] [--rounds 5]
        [--out tests/bench/results/prefill.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from prompts import BENIGN
from transformers import DynamicCache

from guard.engine import default_threads
from probes.lm.model import load_model
from probes.lm.prefix import PrefixCache
from probes.lm.render import render_messages


def timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="int8")
    parser.add_argument("--threads", type=int, help="torch threads (default: the engine's for the path)")
    parser.add_argument("--compiled", action="store_true", help="the lean step through torch.compile")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("tests/bench/results/prefill.json"))
    args = parser.parse_args()
    lm = load_model(dtype=args.dtype, compiled=args.compiled)
    torch.set_num_threads(default_threads(lm))
    if args.compiled:
        lm.decoder.warm_up()
    torch.set_num_threads(args.threads or default_threads(lm))
    assert lm.decoder is not None, "the lean step covers Llama-family models"
    config = lm.model.config
    encoded = [
        render_messages(lm.tokenizer, [{"role": "user", "content": p}], span_message=0, add_generation_prompt=True)
        for p in BENIGN
    ]

    def transformers_each() -> None:
        for e in encoded:
            lm.model(input_ids=torch.tensor([e.ids]), cache=DynamicCache(config=config), logits_to_keep=1)

    def lean(packed: bool) -> Callable[[], None]:
        prefixes = PrefixCache(lm.decoder, config)
        for e in encoded:
            prefixes.segment(e.ids, e.start)  # cached before timing: paid once per distinct prefix

        def run() -> None:
            segments = [prefixes.segment(e.ids, e.start) for e in encoded]
            for group in [segments] if packed else [[s] for s in segments]:
                lm.decoder.prefill(group)

        return run

    def prefix() -> None:
        PrefixCache(lm.decoder, config).segment(encoded[0].ids, encoded[0].start)

    ways = {"transformers_each": transformers_each, "lean_each": lean(False), "lean_packed": lean(True)}
    ways["prefix"] = prefix
    times: dict[str, list[float]] = {name: [] for name in ways}
    with torch.inference_mode():
        for work in ways.values():
            work()  # warm-up
        for _ in range(args.rounds):
            for name, work in ways.items():
                times[name].append(timed(work))
    ms = {name: statistics.median(values) for name, values in times.items()}
    report = {
        "dtype": args.dtype,
        "compiled": args.compiled,
        "threads": torch.get_num_threads(),
        "prompts": len(encoded),
        "prompt_tokens": [len(e.ids) for e in encoded],
        "prefix_tokens": encoded[0].start,
        "median_ms": ms,
        "lean_each_over_transformers_each": ms["lean_each"] / ms["transformers_each"],
        "lean_packed_over_transformers_each": ms["lean_packed"] / ms["transformers_each"],
        "lean_packed_over_lean_each": ms["lean_packed"] / ms["lean_each"],
    }
    print(json.dumps(report, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
