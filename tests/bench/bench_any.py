"""Benchmark: does the whole set's ``any`` score rank "is anything wrong here?" as well as the best single policy?

On leave-one-dataset-out folds over every source that feeds a prompt policy: for held-out source S, each
policy is trained as shipped on its rows without S (and without the reserved half of ordinary traffic,
which joins every test set, as in ``guard benchmark-policies``); a policy S does not feed is trained on
all its rows but that traffic. The test set is S's rows with S's own labels (1: harmful in S's terms)
plus the held-out traffic. Each policy's AUROC on it, and the ``any`` score's: the largest margin, in
logits, of a policy's score over its threshold (what the server reports as ``any``; a set's
``threshold_shift`` moves every margin alike, so it does not change the ranking).

Beside it, the other ways to combine the set that were measured (``COMBINATIONS``):

- ``max_probability``: the highest raw probability, thresholds ignored;
- ``logsumexp``: a soft maximum of the margins (a noisy-OR of the policies' odds);
- ``stacked``: a logistic regression over the policies' logits, fitted on the fold's dev rows (which no
  policy trained on; split by key hash, so the same rows for every policy), labelled 1 where any
  policy's label is;
- ``union_probe``: one more probe, trained as ``harmful_request`` is on every policy's rows with that
  union label.

The mean-pooled prompt policies take part; ``jailbreak`` reads a prompt's last template token, whose
features exist only for its own rows. Prints a markdown table and writes JSON.

    .venv/bin/python tests/bench/bench_any.py [--dtype int8] [--out tests/bench/results/any.json]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from guard.settings import Settings
from probes.data import Dataset, split
from probes.eval.defaults import PRESET_CONFIG, recipe_config, recipe_features
from probes.eval.lodo import TRAFFIC, reserved
from probes.eval.presets import PRESETS, RECIPES
from probes.eval.sources import read_source
from probes.lm.model import DEFAULT_MODEL, NUMERIC_PATHS, load_model
from probes.probe import LinearProbe, logit
from probes.train import train_probe

COMBINATIONS = ("any", "max_probability", "logsumexp", "stacked", "union_probe")


def combined(margins: np.ndarray, logits: np.ndarray, stacker: LogisticRegression, union: np.ndarray) -> dict:
    """Each combination's score per row, from ``[rows, policies]`` margins and logits and the union probe's margin."""
    return {
        "any": margins.max(axis=1),
        "max_probability": logits.max(axis=1),
        "logsumexp": np.logaddexp.reduce(margins, axis=1),
        "stacked": stacker.decision_function(logits),
        "union_probe": union,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=NUMERIC_PATHS, default="int8")
    parser.add_argument("--out", type=Path, default=Path("tests/bench/results/any.json"))
    args = parser.parse_args()
    settings = Settings()
    lm = load_model(DEFAULT_MODEL, dtype=args.dtype, cache_dir=settings.cache_dir)
    names = [n for n in PRESETS["default"] if RECIPES[n].stage == "prompt" and RECIPES[n].pooling is None]
    splits, rows_of = recipe_features(lm, names, settings.data_dir, PRESET_CONFIG, cache_dir=settings.cache_dir)
    data = {name: Dataset(train.rows + dev.rows) for name, (train, dev, _) in splits.items()}
    pooled = {row.key: row for rows in data.values() for row in rows.rows}  # every row some policy reads
    traffic = [r for r in pooled.values() if reserved(r)]
    trained: dict[tuple[str, str | None], LinearProbe] = {}

    def without(name: str, source: str) -> LinearProbe:
        """``name`` trained as shipped on its rows but ``source``'s and the reserved traffic."""
        held = source if any(r.source == source for r in data[name].rows) else None
        if (name, held) not in trained:
            rest = Dataset(tuple(r for r in data[name].rows if r.source != held and not reserved(r)))
            train, dev = split(rest, seed=0)
            config = recipe_config(name, PRESET_CONFIG)
            features = (rows_of(name, train), rows_of(name, dev))
            trained[name, held] = train_probe(lm, train, dev, name, config, features=features, progress=False).probe
        return trained[name, held]

    unions: dict[str, int] = {}  # a row is harmful where any policy that reads it labels it so
    for rows in data.values():
        for r in rows.rows:
            unions[r.key] = max(unions.get(r.key, 0), r.label)

    def union_split(source: str) -> tuple[Dataset, Dataset]:
        rest = tuple(replace(r, label=unions[r.key]) for r in pooled.values() if r.source != source and not reserved(r))
        return split(Dataset(rest), seed=0)

    report = []
    for source in sorted({r.source for r in pooled.values()} - {TRAFFIC}):
        own = {r.key: r.label for r in read_source(source, settings.data_dir)}
        test = Dataset(tuple(r for r in pooled.values() if r.source == source) + tuple(traffic))
        labels = np.array([own[r.key] if r.source == source else 0 for r in test.rows])
        if labels.min() == labels.max():
            continue  # one class: no AUROC
        x = rows_of(names[0], test)  # the mean-pooled policies share one extraction
        union_train, union_dev = split_rows = union_split(source)
        x_train, x_dev = (rows_of(names[0], part) for part in split_rows)
        probes = {name: without(name, source) for name in names}
        logits = np.stack([logit(probes[n].predict_proba(x)) for n in names], axis=1)
        margins = logits - np.array([logit(probes[n].threshold) for n in names])
        dev_logits = np.stack([logit(probes[n].predict_proba(x_dev)) for n in names], axis=1)
        stacker = LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000).fit(dev_logits, union_dev.labels)
        config = recipe_config("harmful_request", PRESET_CONFIG)
        union = train_probe(lm, union_train, union_dev, "any", config, features=(x_train, x_dev), progress=False).probe
        scores = combined(margins, logits, stacker, logit(union.predict_proba(x)) - logit(union.threshold))
        aurocs = {name: float(roc_auc_score(labels, margins[:, j])) for j, name in enumerate(names)}
        ways = {way: float(roc_auc_score(labels, score)) for way, score in scores.items()}
        best = max(aurocs, key=aurocs.get)
        row = {"heldout": source, "n": len(labels), "positives": int(labels.sum()), **ways}
        report.append(row | {"best_policy": best, "best": aurocs[best], "policies": aurocs})
        print(f"{source}: " + ", ".join(f"{w} {a:.3f}" for w, a in ways.items()) + f"; best {best} {aurocs[best]:.3f}")
    print("\n| held-out source | n (pos) | `any` AUROC | best single policy | its AUROC | `any` at least as high |")
    print("|---|---|---|---|---|---|")
    for r in report:
        print(
            f"| {r['heldout']} | {r['n']} ({r['positives']}) | {r['any']:.3f} | `{r['best_policy']}` | {r['best']:.3f} "
            f"| {'yes' if r['any'] >= r['best'] else 'no'} |"
        )
    fixed = max(names, key=lambda n: np.mean([r["policies"][n] for r in report]))
    print(f"\n| combination | mean AUROC | folds at least as high as the best policy | as high as `{fixed}` |")
    print("|---|---|---|---|")
    for way in (*COMBINATIONS, "best"):
        mean = np.mean([r[way] for r in report])
        wins = sum(r[way] >= r["best"] for r in report)
        over = sum(r[way] >= r["policies"][fixed] for r in report)
        print(f"| {way} | {mean:.3f} | {wins} of {len(report)} | {over} of {len(report)} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"dtype": args.dtype, "policies": names, "folds": report}, indent=2) + "\n")


if __name__ == "__main__":
    main()
