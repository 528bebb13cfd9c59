"""Benchmark: the compiled decode step checking only its inputs' guards against checking every guard.

torch.compile checks its guards at every call of a compiled function. For the lean step
(``probes.lm.step``) Dynamo guards some 4,000 facts about the model besides the step's inputs;
``probes.lm.step._input_guards`` keeps the inputs' and the global state's only. This script loads the
model twice, compiled both ways, and times their decode steps interleaved (one step of each in turn,
so the machine's drift hits both alike) for one row and for eight rows of different lengths
(left-padded, as in the server's batch), and checks that both give bitwise the same logits. Prints
the median step time per cell and the ratio, writes JSON.

    .venv/bin/python tests/bench/bench_guards.py [--dtype int8] [--steps 80] [--rounds 2]
        [--out tests/bench/results/guards.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from prompts import BENIGN
from transformers import DynamicCache

from probes.lm import step as decoder
from probes.lm.batch import BatchCache
from probes.lm.model import LoadedModel, load_model
from probes.lm.render import render_messages
from probes.lm.step import Segment


def batch_of(lm: LoadedModel, texts: list[str]) -> tuple[BatchCache, torch.Tensor, torch.Tensor]:
    """The texts prefilled (packed) into a left-padded batch: the cache, the next ids and positions."""
    encoded = [render_messages(lm.tokenizer, [{"role": "user", "content": t}], span_message=0).ids for t in texts]
    caches = [DynamicCache(config=lm.model.config) for _ in texts]
    logits = lm.decoder.prefill([Segment(tuple(ids), cache) for ids, cache in zip(encoded, caches, strict=True)])
    batch = BatchCache(lm.model.config)
    for ids, cache in zip(encoded, caches, strict=True):
        batch.add(cache, len(ids))
    return batch, logits.argmax(-1)[:, None], torch.tensor([[len(ids)] for ids in encoded])


def interleaved(models: dict[str, LoadedModel], texts: list[str], steps: int) -> dict:
    """Median ms a step per model, stepping them in turn; whether every step's logits were bitwise equal."""
    state = {name: list(batch_of(lm, texts)) for name, lm in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    equal = True
    for _ in range(steps):
        logits = {}
        for name, lm in models.items():
            batch, ids, positions = state[name]
            mask = batch.step_mask()
            started = time.perf_counter()
            logits[name] = lm.decoder(ids, positions, batch.cache, None if bool(mask.all()) else mask)
            times[name].append(time.perf_counter() - started)
            batch.advance()
            state[name][1:] = logits[name].argmax(-1)[:, None], positions + 1
        first, *others = logits.values()
        equal = equal and all(torch.equal(first, other) for other in others)
    return {**{name: statistics.median(t[5:]) * 1000 for name, t in times.items()}, "bitwise_equal": equal}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="int8")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("tests/bench/results/guards.json"))
    args = parser.parse_args()
    models = {"input_guards": load_model(dtype=args.dtype, compiled=True, threads=1)}
    kept = decoder._input_guards
    decoder._input_guards = lambda entries: [True] * len(entries)  # the second model compiles with every guard
    try:
        models["every_guard"] = load_model(dtype=args.dtype, compiled=True, threads=1)
        for lm in models.values():
            lm.decoder.warm_up()
    finally:
        decoder._input_guards = kept
    cells = []
    with torch.inference_mode():
        for round_ in range(args.rounds):
            for rows in (1, 8):
                cell = {"round": round_, "rows": rows, **interleaved(models, list(BENIGN[:rows]), args.steps)}
                cell["ratio"] = cell["every_guard"] / cell["input_guards"]
                cells.append(cell)
                print(json.dumps(cell), flush=True)
    report = {"dtype": args.dtype, "steps": args.steps, "cells": cells}
    for rows in (1, 8):
        mine = [c for c in cells if c["rows"] == rows]
        summary = {k: statistics.median(c[k] for c in mine) for k in ("input_guards", "every_guard", "ratio")}
        report[f"{rows}_rows"] = summary
        ms = f"input guards {summary['input_guards']:.2f} ms, every guard {summary['every_guard']:.2f} ms"
        print(f"{rows} row(s): {ms}, {summary['ratio']:.3f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
