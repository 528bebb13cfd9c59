"""Benchmark: the decode step's cache appended in place against concatenated at every step, by context length.

A decode step appends one column to every layer's keys and values. Concatenating copies the whole
cache each time; from ``probes.lm.step.IN_PLACE_FROM`` columns on, the step writes into buffers with
spare columns instead (``DecodeStep._append``). This script times the compiled lean step (what
``guard serve`` runs) both ways, side by side in each round, at several context lengths, for one row
and for eight rows of different lengths (left-padded, as in the server's batch), and checks that both
ways give bitwise the same logits. Prints the median step time per cell and the ratio, writes JSON.

    .venv/bin/python tests/bench/bench_kv_cache.py [--dtype int8] [--contexts 40,150,300,1000,2000]
        [--rounds 3] [--steps 16] [--out tests/bench/results/kv_cache.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from probes.lm import step as decoder
from probes.lm.batch import BatchCache
from probes.lm.model import LoadedModel, load_model
from probes.lm.step import Segment

CONCATENATE = 10**9  # IN_PLACE_FROM that no cache reaches


def steps(lm: LoadedModel, rows: int, context: int, count: int) -> tuple[float, torch.Tensor]:
    """Median ms of ``count`` decode steps after rows of ``context + 3 * row`` tokens, and the logits."""
    batch = BatchCache(lm.model.config)
    for row in range(rows):
        cache = DynamicCache(config=lm.model.config)
        lm.decoder.prefill([Segment(tuple(range(100 + row, 100 + row + context + 3 * row)), cache)])
        batch.add(cache, context + 3 * row)
    ids = torch.full((rows, 1), 5)
    positions = torch.tensor([[context + 3 * row] for row in range(rows)])
    times, logits = [], []
    for step in range(count):
        mask = batch.step_mask()
        started = time.perf_counter()
        logits.append(lm.decoder(ids, positions + step, batch.cache, None if bool(mask.all()) else mask))
        times.append(time.perf_counter() - started)
        batch.advance()
    return statistics.median(times) * 1000, torch.stack(logits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="int8")
    parser.add_argument("--contexts", default="40,150,300,1000,2000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("tests/bench/results/kv_cache.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    lm = load_model(dtype=args.dtype, threads=1, compiled=True)
    lm.decoder.warm_up()
    in_place_from = decoder.IN_PLACE_FROM
    cells = []
    with torch.inference_mode():
        for rows in (1, 8):
            for context in (int(c) for c in args.contexts.split(",")):
                times: dict[str, list[float]] = {"concatenated": [], "in_place": []}
                logits: dict[str, torch.Tensor] = {}
                for round_ in range(args.rounds):
                    order = [("concatenated", CONCATENATE), ("in_place", in_place_from)]
                    for name, threshold in order if round_ % 2 == 0 else reversed(order):
                        decoder.IN_PLACE_FROM = threshold
                        ms, logits[name] = steps(lm, rows, context, args.steps)
                        times[name].append(ms)
                decoder.IN_PLACE_FROM = in_place_from
                cell = {"rows": rows, "context": context} | {k: statistics.median(v) for k, v in times.items()}
                cell["concatenated_over_in_place"] = cell["concatenated"] / cell["in_place"]
                cell["bitwise_equal"] = torch.equal(logits["concatenated"], logits["in_place"])
                cells.append(cell)
                print(json.dumps(cell), flush=True)
    print(f"\n| rows | context | concatenated ms | in place ms | ratio | same logits |  ({args.dtype}, compiled)")
    print("|---|---|---|---|---|---|")
    for c in cells:
        print(
            f"| {c['rows']} | {c['context']} | {c['concatenated']:.1f} | {c['in_place']:.1f}"
            f" | {c['concatenated_over_in_place']:.2f} | {c['bitwise_equal']} |"
        )
    report = {"dtype": args.dtype, "in_place_from": in_place_from, "steps": args.steps, "cells": cells}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
