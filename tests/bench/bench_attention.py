"""Benchmark: the compiled decode step with its attention in the C kernel against torch's attention.

A decode step's rows have different histories (left-padded in the server's batch). With torch's
attention a row is bitwise what it is alone only when each run of rows with the same first column
gets a call of its own (``probes.lm.step._attention``). The kernel (``probes.lm.attention``) takes the
whole batch and each row's first column in one call, and a row is bitwise what it is alone too. This
script times the compiled lean step (what ``guard serve`` runs) both ways, side by side in each
round, for one row and for eight rows of different lengths, at several context lengths; prints the
median step time per cell, the ratio, and how far apart the two ways' logits are (both are
torch's attention up to float rounding, in another order); writes JSON.

    .venv/bin/python tests/bench/bench_attention.py [--dtype int8] [--contexts 40,150,300,1000]
        [--rounds 3] [--steps 16] [--out tests/bench/results/attention.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from bench_kv_cache import steps  # this directory: the script's own

from probes.lm.model import LoadedModel, load_model

VARIANTS = {"torch": False, "kernel": True}  # DecodeStep.native


def cell(lm: LoadedModel, rows: int, context: int, rounds: int, count: int) -> dict:
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    logits: dict[str, torch.Tensor] = {}
    for round_ in range(rounds):
        order = list(VARIANTS.items())
        for name, native in order if round_ % 2 == 0 else reversed(order):
            lm.decoder.native = native
            ms, logits[name] = steps(lm, rows, context, count)
            times[name].append(ms)
    out = {"rows": rows, "context": context} | {name: statistics.median(t) for name, t in times.items()}
    out["torch_over_kernel"] = out["torch"] / out["kernel"]
    scale = float(logits["torch"].abs().max())
    out["kernel_vs_torch_max_logit_diff"] = float((logits["kernel"] - logits["torch"]).abs().max()) / scale
    out["same_argmax"] = float((logits["kernel"].argmax(-1) == logits["torch"].argmax(-1)).float().mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="int8")
    parser.add_argument("--contexts", default="40,150,300,1000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("tests/bench/results/attention.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    lm = load_model(dtype=args.dtype, threads=1, compiled=True)
    lm.decoder.warm_up()
    cells = []
    with torch.inference_mode():
        for rows in (1, 8):
            for context in (int(c) for c in args.contexts.split(",")):
                cells.append(cell(lm, rows, context, args.rounds, args.steps))
                print(json.dumps(cells[-1]), flush=True)
    print(f"\n({args.dtype}, compiled; step ms, medians)")
    print("| rows | context | torch | kernel | torch / kernel | max logit difference | same argmax |")
    print("|---|---|---|---|---|---|---|")
    for c in cells:
        print(
            f"| {c['rows']} | {c['context']} | {c['torch']:.1f} | {c['kernel']:.1f} | {c['torch_over_kernel']:.2f}"
            f" | {c['kernel_vs_torch_max_logit_diff']:.1e} | {c['same_argmax']:.2f} |"
        )
    report = {"dtype": args.dtype, "steps": args.steps, "rounds": args.rounds, "cells": cells}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
