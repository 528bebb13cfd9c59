"""Benchmark: the output-stage policy on unseen sources, by its training rows and by how a stream is scored.

``harmful_reply`` is trained on mean-pooled reply features (the shipped layers 9, 15 and 21) and
scored leave-one-dataset-out (``probes.eval.lodo``) on three sets of rows, side by side:

- ``pool``: the shipped recipe without HarmBench's replies (Do-Not-Answer's labelled replies, HH-RLHF
  pairs, Safety-Tuned-LLaMAs refusals);
- ``+harmbench``: plus HarmBench's human-labelled replies (``harmbench_replies``): the shipped recipe;
- ``+own``: plus the served model's own judged replies (``guard data replies``, from the cache).

On the last, each way of scoring a reply while it streams gets its own threshold on the fold's dev
split by the shipped rule (at most 1% of dev negatives flagged) and is scored on the held-out source:

- ``final_mean``: the mean over the whole reply (offline mean pooling; a stream cannot wait for it);
- ``running_mean``: the served rule, the mean of the token logits so far, firing at its first crossing;
- ``running_prob``: the mean of the tokens' probabilities so far;
- ``ema``: an exponential moving average of the token logits (``--alpha``), and ``ema@A`` for each
  further smoothing ``A`` of ``--sweep-alpha`` (a larger one reacts sooner and averages fewer tokens);
- ``window``: the mean of the last ``--window`` token logits (the running mean before that);
- ``token_max``: the highest single token logit so far (a sliding-window maximum of any width fires at the
  same token, since a stream fires at its first crossing);
- ``prompt_reply_mean`` and ``prompt_reply_ema``: a probe on prompt-plus-reply features, the state where
  the model is about to answer (the prompt's last template token, which the server has from the prefill)
  beside the reply's mean-pooled states, C picked on dev AUROC; scored on the whole reply, and streamed
  as the moving average of its reply-token logits plus the prompt's fixed term.

A streamed score is its highest value over the reply. Detection latency is, for the held-out
positives a scorer catches, the share of the reply's tokens seen when it first crosses: the median per
held-out source, and over every caught positive of every fold together (``pooled_latency``). Where
the held-out source's labels are relative (HH-RLHF's pairs of replies to one prompt), the share of
pairs a scorer orders as the labels do is reported beside its AUROC (``pair_accuracy``).

    PYTHONPATH=tests/bench .venv/bin/python tests/bench/bench_reply_scoring.py [--own FILE] [--dtype int8]
        [--window 16] [--alpha 0.1] [--sweep-alpha 0.2 0.3 0.5]
        [--out tests/bench/results/reply_scoring.json]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from lodo_report import finish, print_fold
from sklearn.metrics import roc_auc_score

from probes.data import Dataset, Row, deduplicate, default_data_dir
from probes.eval.defaults import PRESET_CONFIG
from probes.eval.lodo import Fold, folds, scored_fold
from probes.eval.presets import RECIPES
from probes.eval.replies import newest
from probes.eval.sources import read_source
from probes.features import extract, token_states
from probes.lm.model import default_cache_dir, load_model
from probes.probe import sigmoid
from probes.stream import ema
from probes.train import dev_threshold, fit_linear, train_probe

# the reply probe's scorers (``streamed``)
REPLY_SCORERS = ("final_mean", "running_mean", "running_prob", "ema", "window", "token_max")
SCORERS = (*REPLY_SCORERS, "prompt_reply_mean", "prompt_reply_ema")
WHOLE = ("final_mean", "prompt_reply_mean")  # a whole reply's score is known only at its end: it has no latency


def own_replies(path: Path) -> list[Row]:
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [Row(r["text"], r["label"], r["prompt"], r["category"], "own_replies") for r in records]


def streamed(logits: np.ndarray, window: int, alpha: float, sweep: Sequence[float] = ()) -> dict[str, np.ndarray]:
    """Per scorer, the score after each token (``final_mean`` is the whole reply's at every token)."""
    steps = np.arange(1, len(logits) + 1)
    running = np.cumsum(logits) / steps
    cumulative = np.concatenate([[0.0], np.cumsum(logits)])
    windowed = running.copy()
    if len(logits) > window:
        windowed[window - 1 :] = (cumulative[window:] - cumulative[:-window]) / window
    return {
        "final_mean": np.full(len(logits), running[-1]),
        "running_mean": running,
        "running_prob": np.cumsum(sigmoid(logits)) / steps,
        "ema": ema(logits, alpha),
        "window": windowed,
        "token_max": np.maximum.accumulate(logits),
    } | {f"ema@{a}": ema(logits, a) for a in sweep}


def score_rows(
    per_row: list[np.ndarray], bias: float, window: int, alpha: float, sweep: Sequence[float] = ()
) -> dict[str, list[np.ndarray]]:
    """Per scorer and row, the probability after each token."""
    out: dict[str, list[np.ndarray]] = {}
    for z in per_row:
        for name, values in streamed(z, window, alpha, sweep).items():
            out.setdefault(name, []).append(values if name == "running_prob" else sigmoid(values + bias))
    return out


def latencies(test: Dataset, traces: list[np.ndarray], threshold: float) -> list[float]:
    """Per caught positive, the share of its tokens seen when its score first crosses ``threshold``."""
    shares = []
    for row, values in zip(test.rows, traces, strict=True):
        crossed = np.flatnonzero(values > threshold)
        if row.label == 1 and crossed.size:
            shares.append(float((crossed[0] + 1) / len(values)))
    return shares


def pair_accuracy(test: Dataset, scores: np.ndarray) -> float | None:
    """Where a held-out source labels replies to one prompt relative to each other (HH-RLHF: the rejected reply
    is the more harmful), the share of such pairs its scores order so (ties half); ``None`` without pairs."""
    by_prompt: dict[str | None, list[int]] = {}
    for i, row in enumerate(test.rows):
        by_prompt.setdefault(row.prompt, []).append(i)
    wins = []
    for rows in by_prompt.values():
        worse = [scores[i] for i in rows if test.rows[i].label == 1]
        better = [scores[i] for i in rows if test.rows[i].label == 0]
        wins += [float(w > b) + 0.5 * float(w == b) for w in worse for b in better]
    return float(np.mean(wins)) if wins else None


def prompt_reply_traces(fold: Fold, states, pooled, prompts, at, alpha: float) -> dict[str, dict[str, list]]:
    """``prompt_reply_*`` per split (dev, test) and row: a probe on the prompt's answer-position state beside the
    reply's mean, C picked on dev AUROC; per token, the whole reply's logit and the moving average's."""
    x = {
        part: np.concatenate([prompts[at(d)], pooled[at(d)]], axis=1)
        for part, d in (("train", fold.train), ("dev", fold.dev))
    }
    y_dev = np.asarray(fold.dev.labels)
    fits = [fit_linear(x["train"], np.asarray(fold.train.labels), c) for c in PRESET_CONFIG.cs]
    fit = max(fits, key=lambda f: roc_auc_score(y_dev, f.logits(x["dev"])))
    weight = (fit.weight / fit.scale).astype(np.float32)
    bias = float(fit.bias - (weight * fit.mean).sum())
    layers = prompts.shape[1]
    out = {}
    for part, data in (("dev", fold.dev), ("test", fold.test)):
        rows = at(data)
        fixed = np.einsum("nld,ld->n", prompts[rows], weight[:layers]) + bias
        tokens = [states[i].astype(np.float32) @ weight[layers:].reshape(-1) for i in rows]
        out[part] = {
            "prompt_reply_mean": [sigmoid(np.full(len(z), z.mean() + c)) for z, c in zip(tokens, fixed, strict=True)],
            "prompt_reply_ema": [sigmoid(ema(z, alpha) + c) for z, c in zip(tokens, fixed, strict=True)],
        }
    return out


def evaluate(lm, fold: Fold, states, pooled, prompts, index, scorers, args, caught: dict[str, list]) -> dict:
    """A fold's row: each scorer thresholded on dev and summarised on the held-out source, with its latency;
    each caught positive's latency is added to ``caught``."""
    config = PRESET_CONFIG

    def at(data: Dataset) -> list[int]:
        return [index[r.key] for r in data.rows]

    features = (pooled[at(fold.train)], pooled[at(fold.dev)])
    probe = train_probe(lm, fold.train, fold.dev, "harmful_reply", config, features=features, progress=False).probe
    weight, bias = probe.folded()
    w = weight.reshape(-1).astype(np.float32)

    def traces(data: Dataset) -> dict[str, list[np.ndarray]]:
        per_row = [states[i].astype(np.float32) @ w for i in at(data)]
        return score_rows(per_row, bias, args.window, args.alpha, args.sweep_alpha)

    dev, test = traces(fold.dev), traces(fold.test)
    if "prompt_reply_ema" in scorers:
        both = prompt_reply_traces(fold, states, pooled, prompts, at, args.alpha)
        dev, test = dev | both["dev"], test | both["test"]
    peaks = {s: (np.array([t.max() for t in dev[s]]), np.array([t.max() for t in test[s]])) for s in scorers}
    row = scored_fold(fold, peaks, config)
    for s in scorers:
        row[s]["pair_accuracy"] = pair_accuracy(fold.test, peaks[s][1])
    for s in scorers:
        if s in WHOLE:
            continue
        threshold = dev_threshold(fold.dev, peaks[s][0], config.target_fpr, config.traffic_fpr, config.traffic_source)
        shares = latencies(fold.test, test[s], threshold)
        row[s]["median_latency"] = float(np.median(shares)) if shares else None
        caught.setdefault(s, []).extend(shares)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--own", type=Path, help="own replies (JSONL); default: the newest in the cache")
    parser.add_argument("--dtype", default="int8", help="the numeric path (the served default: int8)")
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--sweep-alpha", type=float, nargs="*", default=[], help="further EMA smoothings, as ema@A")
    parser.add_argument("--out", type=Path, default=Path("tests/bench/results/reply_scoring.json"))
    args = parser.parse_args()
    lm = load_model(dtype=args.dtype)
    data_dir, config = default_data_dir(), PRESET_CONFIG
    own_path = args.own or newest(default_cache_dir(), lm.fingerprint, lm.numeric)
    harmbench = tuple(read_source("harmbench_replies", data_dir))
    pool = tuple(r for r in RECIPES["harmful_reply"].rows(data_dir)[0].rows if r.source != "harmbench_replies")
    variants = {
        "pool": deduplicate(pool),
        "+harmbench": deduplicate(pool + harmbench),
        "+own": deduplicate(pool + harmbench + tuple(own_replies(own_path))),
    }
    union = variants["+own"]
    index = {row.key: i for i, row in enumerate(union.rows)}
    states: list[np.ndarray] = [np.zeros(0)] * len(union.rows)
    pooled = np.zeros((len(union.rows), len(config.layers), lm.hidden_size), np.float32)
    for i, tokens in token_states(lm, union, config.layers, max_text_tokens=config.max_text_tokens):
        pooled[i] = tokens.mean(0)  # the mean-pooled feature the shipped probe trains on
        states[i] = tokens.reshape(len(tokens), -1).astype(np.float16)  # [tokens, layers * d_model], kept small
    asked = Dataset(tuple(Row(r.prompt or "", r.label) for r in union.rows))  # the prompt alone, as prefilled
    prompts = extract(
        lm, asked, config.layers, pooling="tail", max_text_tokens=config.max_text_tokens, cache_dir=default_cache_dir()
    )
    report: dict = {"own_replies": str(own_path), "layers": list(config.layers), "variants": {}}
    sweep = [f"ema@{a}" for a in args.sweep_alpha]
    for name, dataset in variants.items():
        scorers = (*SCORERS, *sweep) if name == "+own" else ("final_mean", "running_mean")
        results, caught = [], {}
        for fold in folds(dataset):
            results.append(evaluate(lm, fold, states, pooled, prompts, index, scorers, args, caught))
            print(name, end=" ")
            print_fold(results[-1], scorers)
        report["variants"][name] = results
        medians = {s: {"caught": len(v), "median": float(np.median(v))} for s, v in caught.items() if v}
        report.setdefault("pooled_latency", {})[name] = medians
        print(f"\n{name}; median latency over every caught held-out positive:", json.dumps(medians))
        finish(results, scorers, "scorer", report, args.out)


if __name__ == "__main__":
    main()
