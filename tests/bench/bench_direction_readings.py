"""Benchmark: the refusal direction read as Arditi et al. (2024) read it, harmful against harmless instructions.

Arditi et al. take the difference of means between harmful and harmless *instructions* at the chat
template's last tokens, where the model has read the request and is about to answer. This bench builds
that candidate for every layer of the default model (AdvBench's first 96 requests against 96 Alpaca
instructions, read at the last template token, ``probes.features`` pooling ``tail``; or the mean over
the text with ``--reading mean``), steers along it at 1x, 2x and 4x the difference's norm, and scores
it by the rule of ``guard directions``: the refusal-phrase rate of greedy replies to 16 HarmBench
requests, the refusal rate on the benign prompts, and the next-token KL on them with the direction
ablated at every layer (their bar: under 0.1). The shipped refusal direction reads the model's own
declining and complying replies instead (``probes.eval.directions``, docs/interventions.md).

    .venv/bin/python tests/bench/bench_direction_readings.py [--reading tail] [--dtype int8]
        [--out tests/bench/results/direction_readings.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from probes.data import Dataset, Row, default_data_dir
from probes.eval.directions import KL_LIMIT, Behaviour, benign_prompts, select
from probes.eval.sources import read_source
from probes.lm.model import DEFAULT_MODEL, NUMERIC_PATHS, load_model

HARMLESS = slice(1000, 1096)  # Alpaca instructions the benign prompts (its first ones) do not use


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reading", choices=("tail", "mean"), default="tail")
    parser.add_argument("--dtype", choices=NUMERIC_PATHS, default="int8")
    parser.add_argument("--out", type=Path, default=Path("tests/bench/results/direction_readings.json"))
    args = parser.parse_args()
    lm = load_model(DEFAULT_MODEL, dtype=args.dtype)
    data = default_data_dir()
    harmful = [r.text for r in read_source("advbench", data)][:96]
    harmless = [r.text for r in read_source("alpaca", data)][HARMLESS]
    behaviour = Behaviour(
        "refusal",
        Dataset(tuple(Row(t, 1) for t in harmful) + tuple(Row(t, 0) for t in harmless)),
        [r.text for r in read_source("harmbench", data) if r.label == 1][:16],
        benign_prompts(data, 16),
        "refusal",
        readings=(args.reading,),
        multiples=(1.0, 2.0, 4.0),
    )
    direction, table = select(lm, behaviour, progress=False)
    selection = direction.manifest["selection"]
    summary = {
        "reading": args.reading,
        "numeric": lm.numeric,
        "unsteered": selection["unsteered"],
        "best_steered_refusal": max(c.judged for c in table),
        "chosen": selection["chosen"],
        "lowest_ablated_kl": min(c.ablated_kl for c in table),
        "lowest_steered_kl": min(c.intervention_kl for c in table),
        "candidates_under_ablated_kl_bar": sum(c.ablated_kl < KL_LIMIT for c in table),
    }
    print(json.dumps(summary, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**summary, "table": [c.as_dict() for c in table]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
