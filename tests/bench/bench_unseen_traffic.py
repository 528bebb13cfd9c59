"""Benchmark: the shipped prompt policies on ordinary traffic none of them saw, probe vs text baselines.

ToxicChat's non-toxic prompts stand for ordinary user traffic. The recipes (``probes/eval/presets.py``) take
some of them, in a fixed hash order; of the rest, half is what ``guard fit-set`` fits a set's threshold
shift on, and the other half (``probes.eval.sets.held_out_traffic``) is scored here, so nothing measured
here chose a threshold. Each prompt policy's probe scores those prompts, as do TF-IDF and MiniLM
baselines fitted on the policy's own train/dev rows with the probe's threshold rule: the false-positive
rate at each one's threshold is what the policy would flag of such traffic. The rate on the dev traffic
rows the threshold was chosen on is printed next to it. The last rows are sets': the share of that
traffic any of the policies flags, any of those the policy file blocks with, and any but one; each at
the probes' own thresholds and with the file's ``threshold_shift`` on its flag policies (issue target:
at most 2%).
The policies are the prompt-stage ones of a policy file (default: the one ``guard serve`` loads).
Prints a markdown table and writes JSON.

    .venv/bin/python tests/bench/bench_unseen_traffic.py [--dtype float32] [--no-baselines]
        [--policy-file FILE] [--out tests/bench/results/unseen_traffic.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from guard.policy import DEFAULT_POLICY_FILE, Action, Stage, load_policies
from probes.catalog import load_shipped
from probes.data import Dataset, default_data_dir
from probes.eval.baselines import BASELINES, cached, fit_baseline, minilm_embedder, texts_of
from probes.eval.defaults import recipe_splits
from probes.eval.evaluate import probe_scores
from probes.eval.lodo import TRAFFIC
from probes.eval.sets import held_out_traffic
from probes.lm.model import default_cache_dir, load_model
from probes.probe import shifted


def traffic_of(dev: Dataset) -> Dataset:
    return Dataset(tuple(r for r in dev.rows if r.source == TRAFFIC and r.label == 0))


def fpr(scores: np.ndarray, threshold: float) -> float:
    return float(np.mean(scores > threshold)) if len(scores) else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", help="numeric path (int8 uses the int8 shipped probes)")
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--policy-file", type=Path, default=DEFAULT_POLICY_FILE)
    parser.add_argument("--out", type=Path, default=Path("tests/bench/results/unseen_traffic.json"))
    args = parser.parse_args()
    policies = [p for p in load_policies(args.policy_file) if p.stage is not Stage.OUTPUT]
    data_dir, cache_dir = default_data_dir(), default_cache_dir()
    lm = load_model(dtype=args.dtype, cache_dir=cache_dir)
    splits = {p.name: recipe_splits(p.probe, data_dir)[:2] for p in policies}
    unseen = held_out_traffic(data_dir, sorted({p.probe for p in policies}))[1]
    everything = [*texts_of(unseen), *(t for train, dev in splits.values() for t in texts_of(train) + texts_of(dev))]
    embed = None if args.no_baselines else cached(minilm_embedder(), list(dict.fromkeys(everything)))
    report: dict[str, dict] = {}
    flags = {}  # each policy's flags on the unseen traffic: at its own threshold, and moved by the file's shift
    shifted_flags = {}
    for policy in policies:
        name, (train, dev) = policy.name, splits[policy.name]
        probe = load_shipped(policy.probe, model_fingerprint=lm.fingerprint)
        seen = traffic_of(dev)
        target, traffic = probe.manifest["target_fpr"], probe.manifest["traffic_fpr"]  # its threshold rule
        scores = probe_scores(lm, probe, unseen, cache_dir=cache_dir)
        own = probe.threshold if policy.threshold is None else policy.threshold
        flags[name], shifted_flags[name] = scores > own, scores > shifted(own, policy.shift * probe.calibration_slope)
        row = {
            "probe": {
                "unseen_traffic_fpr": fpr(scores, probe.threshold),
                "dev_traffic_fpr": fpr(probe_scores(lm, probe, seen, progress=False), probe.threshold),
            }
        }
        for baseline in () if args.no_baselines else BASELINES:
            fitted = fit_baseline(baseline, train, dev, target, traffic_fpr=traffic, embed=embed)
            row[baseline] = {
                "unseen_traffic_fpr": fpr(fitted.scores(unseen), fitted.threshold),
                "dev_traffic_fpr": fpr(fitted.scores(seen), fitted.threshold),
            }
        report[name] = {"unseen_traffic_rows": len(unseen.rows), "dev_traffic_rows": len(seen.rows), **row}
    print(json.dumps(report, indent=2))
    models = [m for m in ("probe", *BASELINES) if m in report[policies[0].name]]
    print(f"\n| policy | unseen traffic rows | FPR {' / '.join(models)} | dev traffic rows | dev FPR |  ({args.dtype})")
    print("|---|---|---|---|---|")
    for name, row in report.items():
        unseen_fpr = " / ".join(f"{row[m]['unseen_traffic_fpr']:.3f}" for m in models)
        dev_fpr = " / ".join(f"{row[m]['dev_traffic_fpr']:.3f}" for m in models)
        print(f"| `{name}` | {row['unseen_traffic_rows']} | {unseen_fpr} | {row['dev_traffic_rows']} | {dev_fpr} |")
    blocking = [p.name for p in policies if p.action is Action.BLOCK]
    sets = {"any of them": list(flags), "those the policy file blocks with": blocking}
    sets |= {f"any but `{name}`": [other for other in flags if other != name] for name in flags}
    together = {
        label: {
            "own_thresholds": float(np.any([flags[n] for n in names], axis=0).mean()),
            "shifted": float(np.any([shifted_flags[n] for n in names], axis=0).mean()),
        }
        for label, names in sets.items()
    }
    shift = max(p.shift for p in policies)  # the file's threshold_shift, which moves its flag policies
    for label, rate in together.items():
        print(
            f"| {label} (probes; flags shifted by {shift}) | {len(unseen.rows)} | {rate['own_thresholds']:.3f}; "
            f"{rate['shifted']:.3f} | | |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "dtype": args.dtype,
        "policy_file": args.policy_file.name,
        "policies": report,
        "sets_unseen_traffic_fpr": together,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
