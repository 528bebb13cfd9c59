"""Benchmark: the fast numeric paths (bfloat16, int8) against float32, on the shipped policies and on speed.

For each shipped policy, its probe scores the policy's dev rows under every path: AUROC (must not drop
by more than 0.01) and the false-positive rate on dev negatives at the probe's threshold (how far the
threshold's meaning shifts). bfloat16 serves the float32 probes; int8 serves probes trained on int8
features (``probes/shipped/int8``), and the float32 probes' AUROC on int8 features shows why. Then
each path's mean relative error of the hidden states against float32 over the benign prompts (every
fifth layer); how often each path's greedy replies to held-out benign prompts (dev negatives, none
of them int8's calibration prompts) match float32's: the same first token, the same whole reply, and
the same next token at each position of float32's reply; and decode tokens/s of the guarded engine,
all paths interleaved per prompt. Prints and writes JSON.

    .venv/bin/python tests/bench/bench_fastpath.py [--tokens 48] [--out tests/bench/results/fastpath.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from bench_overhead import configurations, request, run_engine, tokens_per_s
from prompts import BENIGN, SHIPPED
from sklearn.metrics import roc_auc_score

from probes.catalog import load_shipped
from probes.data import default_data_dir
from probes.eval.defaults import recipe_splits
from probes.eval.evaluate import probe_scores
from probes.lm import quantize
from probes.lm.model import NUMERIC_PATHS, LoadedModel, load_model
from probes.lm.render import render_messages

FAST = [path for path in NUMERIC_PATHS if path != "float32"]


def hidden_states(lm: LoadedModel, text: str) -> torch.Tensor:
    """``[layers + 1, tokens, d_model]`` for ``text`` as a user message in the chat template."""
    encoded = render_messages(lm.tokenizer, [{"role": "user", "content": text}], span_message=0)
    with torch.inference_mode():
        out = lm.model(input_ids=torch.tensor([encoded.ids]), output_hidden_states=True)
    return torch.stack(out.hidden_states)[:, 0].float()


def hidden_error(models: dict[str, LoadedModel]) -> dict[str, dict[int, float]]:
    """Per fast path and every fifth layer: mean over the benign prompts of |h - h_float32| / |h_float32|."""
    reference = [hidden_states(models["float32"], text) for text in BENIGN]
    out = {}
    for path in FAST:
        seen = [hidden_states(models[path], text) for text in BENIGN]
        layers = range(5, len(reference[0]), 5)
        errors = [
            [float((h[i] - r[i]).norm() / r[i].norm()) for i in layers] for h, r in zip(seen, reference, strict=True)
        ]
        out[path] = dict(zip(layers, np.mean(errors, axis=0).tolist(), strict=True))
    return out


def greedy(lm: LoadedModel, ids: list[int], tokens: int) -> list[int]:
    with torch.inference_mode():
        out = lm.model.generate(torch.tensor([ids]), max_new_tokens=tokens, do_sample=False)
    return out[0, len(ids) :].tolist()


def reply_agreement(models: dict[str, LoadedModel], prompts: list[str], tokens: int) -> dict[str, dict[str, float]]:
    """Per fast path: the share of prompts whose first token and whole greedy reply equal float32's, and
    the share of float32's reply tokens the path also ranks first given the same prefix."""
    reference = models["float32"]
    encoded = [
        render_messages(
            reference.tokenizer, [{"role": "user", "content": text}], span_message=0, add_generation_prompt=True
        ).ids
        for text in prompts
    ]
    replies = [greedy(reference, ids, tokens) for ids in encoded]
    out = {}
    for path in FAST:
        first = same = ranked = total = 0
        for ids, reply in zip(encoded, replies, strict=True):
            own = greedy(models[path], ids, tokens)
            first += own[:1] == reply[:1]
            same += own == reply
            with torch.inference_mode():
                logits = models[path].model(input_ids=torch.tensor([[*ids, *reply]])).logits[0, len(ids) - 1 : -1]
            ranked += int((logits.argmax(-1) == torch.tensor(reply)).sum())
            total += len(reply)
        out[path] = {
            "first_token": first / len(prompts),
            "whole_reply": same / len(prompts),
            "next_token": ranked / total,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--agreement-prompts", type=int, default=48, help="held-out benign prompts for reply agreement")
    parser.add_argument("--agreement-tokens", type=int, default=24)
    parser.add_argument("--agreement-only", action="store_true", help="measure reply agreement alone")
    parser.add_argument(
        "--int8-activation-bits",
        type=int,
        choices=(7, 8),
        help="run int8 as a CPU with these would (default: this CPU's)",
    )
    parser.add_argument("--out", type=Path, default=Path("tests/bench/results/fastpath.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.int8_activation_bits:  # a CPU without VNNI gets 7 (probes.lm.quantize.activation_bits)
        quantize.activation_bits = lambda: args.int8_activation_bits
    models = {path: load_model(dtype=path) for path in NUMERIC_PATHS}
    _, dev, _ = recipe_splits("harmful_request", default_data_dir())
    held_out = [row.text for row in dev.rows if row.label == 0][: args.agreement_prompts]
    agreement = reply_agreement(models, held_out, args.agreement_tokens)
    print(
        f"greedy replies against float32 (int8 on {quantize.activation_bits()}-bit activations)", json.dumps(agreement)
    )
    if args.agreement_only:
        write(args.out, {"reply_agreement": agreement, "int8_activation_bits": quantize.activation_bits()})
        return
    detection = {}
    for name in SHIPPED:
        _, dev, _ = recipe_splits(name, default_data_dir())
        labels = np.asarray(dev.labels)
        row = {}
        reference = load_shipped(name, model_fingerprint=models["float32"].fingerprint)
        for path, lm in models.items():
            probe = load_shipped(name, model_fingerprint=lm.fingerprint)  # int8: the probe trained on int8
            scores = probe_scores(lm, probe, dev, progress=False)
            row[path] = {
                "auroc": float(roc_auc_score(labels, scores)),
                "fpr_at_threshold": float((scores[labels == 0] > probe.threshold).mean()),
            }
            if probe.version != reference.version:  # why it has its own: the float32 probe on this path
                foreign = probe_scores(lm, reference, dev, progress=False)
                row[path]["float32_probe_auroc"] = float(roc_auc_score(labels, foreign))
        for path in FAST:
            row[path]["auroc_drop"] = row["float32"]["auroc"] - row[path]["auroc"]
            row[path]["fpr_shift"] = row[path]["fpr_at_threshold"] - row["float32"]["fpr_at_threshold"]
        detection[name] = row
        print(name, json.dumps(row))
    error = hidden_error(models)
    print("hidden-state error against float32", json.dumps(error))
    guarded = configurations()["guarded"]
    runs: dict[str, list[dict]] = {path: [] for path in models}
    for _ in range(args.rounds):
        for prompt in BENIGN:
            for path, lm in models.items():
                runs[path] += run_engine(lm, guarded, [request(lm, prompt, args.tokens)])
    speed = {path: tokens_per_s(r) for path, r in runs.items()}
    report = {
        "detection": detection,
        "hidden_state_error": error,
        "reply_agreement": agreement,
        "int8_activation_bits": quantize.activation_bits(),
        "guarded_decode_tokens_per_s": speed,
        **{
            path: {
                "speedup": speed[path] / speed["float32"],
                "max_auroc_drop": max(r[path]["auroc_drop"] for r in detection.values()),
                "max_abs_fpr_shift": max(abs(r[path]["fpr_shift"]) for r in detection.values()),
            }
            for path in FAST
        },
    }
    print(json.dumps(report, indent=2))
    write(args.out, report)


def write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
