"""Benchmark: wall time to train a probe from 1,000 labelled examples on the default model.

Extraction is included (no feature cache), model load is excluded. Prints the figures and writes JSON.

    .venv/bin/python tests/bench/bench_train.py [--n 1000] [--out tests/bench/results/train.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from probes.data import deduplicate, default_data_dir, split
from probes.eval.sources import read_source
from probes.lm.model import load_model
from probes.train import TrainConfig, train_probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--out", type=Path, default=Path("tests/bench/results/train.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    lm = load_model()
    load_s = time.perf_counter() - started
    harmful = [r for s in ("advbench", "harmbench", "strongreject") for r in read_source(s, args.data_dir)]
    benign = read_source("alpaca", args.data_dir)
    dataset = deduplicate(harmful[: args.n // 2] + benign[: args.n - args.n // 2])
    train, dev = split(dataset, seed=0)
    result = train_probe(lm, train, dev, "bench", TrainConfig(), progress=False)
    n = len(dataset.rows)
    figures = {
        "rows": n,
        "threads": torch.get_num_threads(),
        "model_load_s": round(load_s, 2),
        "extract_s": round(result.seconds["extract"], 2),
        "fit_s": round(result.seconds["fit"], 2),
        "train_total_s": round(result.seconds["total"], 2),
        "extraction_texts_per_s": round(n / result.seconds["extract"], 1),
        "layers_swept": len(result.layer_auroc),
        "chosen_layers": list(result.probe.layers),
        "dev_auroc": result.probe.manifest["metrics"]["dev"]["auroc"],
        "target_train_total_s": 60,
    }
    for key, value in figures.items():
        print(f"{key:>24}: {value}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
