"""Benchmark: a long prompt's chunk in a pass of its own against riding in a decode step's pass.

A batch of ``--rows`` rows (a few hundred tokens each) decodes while a prompt of ``--context`` tokens is
being prefilled. For each chunk size, measured side by side in each round:

- ``step``: a plain decode step of the batch;
- ``own``: the chunk in a prefill pass of its own (what the engine does between two steps);
- ``riding``: the decode step with the chunk packed after its rows (``DecodeStep.forward``'s ``segments``,
  what the engine does where passes cannot run beside the steps: ``mixing``).

Prints the median milliseconds and what the chunk costs the running rows, in plain steps: ``own / step``
and ``(riding - step) / step``; writes JSON. Every measured pass appends to the caches it runs on, so
the prompt's context grows by the chunks measured (the JSON records where it ends).

    .venv/bin/python tests/bench/bench_riding.py [--dtype float32] [--compiled] [--rows 4] [--context 2800]
        [--chunks 8,16,32,64] [--rounds 3] [--out tests/bench/results/riding.json]
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
from probes.lm.batch import BatchCache
from probes.lm.model import load_model
from probes.lm.step import Segment

FILLER = "The quick brown fox jumps over the lazy dog while the farmer counts his sheep in the meadow. "


def timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return (time.perf_counter() - started) * 1000


def filled(step, config, ids: list[int]) -> DynamicCache:
    """A cache holding ``ids``, prefilled 512 tokens a pass."""
    cache = DynamicCache(config=config)
    for start in range(0, len(ids), 512):
        step.prefill([Segment(tuple(ids[start : start + 512]), cache)])
    return cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--compiled", action="store_true")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--context", type=int, default=2800)
    parser.add_argument("--chunks", default="8,16,32,64")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("tests/bench/results/riding.json"))
    args = parser.parse_args()
    lm = load_model(dtype=args.dtype, compiled=args.compiled)
    torch.set_num_threads(default_threads(lm))
    step, config = lm.decoder, lm.model.config
    chunks = [int(c) for c in args.chunks.split(",")]
    tokens = lm.tokenizer(FILLER * (args.context // 15 + 1))["input_ids"]
    times: dict[int, dict[str, list[float]]] = {c: {"step": [], "own": [], "riding": []} for c in chunks}
    with torch.inference_mode():
        step.warm_up()
        batch = BatchCache(config)
        for row in range(args.rows):
            ids = lm.tokenizer(BENIGN[row % len(BENIGN)] + " " + FILLER * (10 + 2 * row))["input_ids"]
            batch.add(filled(step, config, ids), len(ids))
        long = filled(step, config, tokens[: args.context])
        positions = batch.mask.sum(1, keepdim=True)
        pending = torch.full((args.rows, 1), 42)

        def decode(segments: list[Segment] = ()) -> None:
            nonlocal positions
            mask = batch.step_mask()
            step(pending, positions, batch.cache, None if bool(mask.all()) else mask, None, segments)
            batch.advance()
            positions = positions + 1

        for _ in range(args.rounds):
            for chunk in chunks:
                piece = tuple(tokens[:chunk])
                times[chunk]["step"].append(timed(decode))
                times[chunk]["own"].append(timed(lambda piece=piece: step.prefill([Segment(piece, long)])))
                times[chunk]["riding"].append(timed(lambda piece=piece: decode([Segment(piece, long)])))
    report = {
        "dtype": args.dtype,
        "compiled": args.compiled,
        "rows": args.rows,
        "context": [args.context, long.get_seq_length()],
        "threads": torch.get_num_threads(),
        "chunks": {},
    }
    print("| chunk | step ms | own pass ms | riding ms | own, in steps | riding beyond the step, in steps |")
    print("|---|---|---|---|---|---|")
    for chunk, measured in times.items():
        m = {name: statistics.median(values) for name, values in measured.items()}
        own, riding = m["own"] / m["step"], (m["riding"] - m["step"]) / m["step"]
        report["chunks"][chunk] = {**m, "own_steps": own, "riding_steps": riding}
        print(f"| {chunk} | {m['step']:.1f} | {m['own']:.1f} | {m['riding']:.1f} | {own:.2f} | {riding:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
