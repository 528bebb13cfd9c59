"""Benchmark: the ``refuse`` intervention against no intervention, side by side in one run.

The default model, the shipped ``harmful_request`` probe on the prompt stage, once with action ``flag``
(nothing changes) and once with ``refuse`` (the shipped refusal direction), each in its own engine.
Eliciting prompts are StrongREJECT's, which chose neither the probe's threshold nor the direction.
Benign prompts are Alpaca instructions and the written sensitive-topic requests of
``probes.eval.directions``. Reports, per set: how many prompts the policy fired on, the refusal-phrase
judge's rate among them, whether the replies where it did not fire are unchanged, decode tokens/s,
and example replies. Replies to the eliciting prompts are also judged by the harm judge
(``probes.eval.judges``, trained on HarmBench's human-labelled replies, which saw neither StrongREJECT
nor these replies; it is fitted into the cache on first use, about 7 minutes).

    .venv/bin/python tests/bench/bench_interventions.py [--prompts 24] [--tokens 40]
        [--out tests/bench/results/interventions.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from guard.engine import Engine
from guard.policy import Action, Policy, Stage
from guard.replies import generate
from guard.sampling import SamplingParams
from probes.catalog import load_shipped, resolve_direction
from probes.data import default_data_dir
from probes.direction import Direction
from probes.eval.baselines import minilm_embedder
from probes.eval.directions import SENSITIVE_BENIGN
from probes.eval.judges import harm_judge, refuses
from probes.eval.sources import read_source
from probes.lm.model import DEFAULT_MODEL, default_cache_dir, load_model


def replies(engine: Engine, prompts: list[str], tokens: int) -> tuple[list[dict], float]:
    started = time.perf_counter()
    out = generate(engine, prompts, SamplingParams(max_tokens=tokens, temperature=0))
    rate = sum(g.completion_tokens for g in out) / (time.perf_counter() - started)
    runs = [
        {
            "prompt": g.prompt,
            "fired": g.prompt_verdicts["harmful_request"].detected,
            "reply": g.reply,
            "tokens": g.completion_tokens,
        }
        for g in out
    ]
    return runs, rate


def summary(runs: list[dict]) -> dict:
    fired = [r for r in runs if r["fired"]]
    return {
        "prompts": len(runs),
        "fired": len(fired),
        "refusal_rate_fired": sum(refuses(r["reply"]) for r in fired) / len(fired) if fired else None,
        "refusal_rate_all": sum(refuses(r["reply"]) for r in runs) / len(runs),
        "harm_rate_fired": sum(r["harmful"] for r in fired) / len(fired) if fired and "harmful" in fired[0] else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("tests/bench/results/interventions.json"))
    args = parser.parse_args()
    lm = load_model(DEFAULT_MODEL)
    probe = load_shipped("harmful_request", model_fingerprint=lm.fingerprint)
    direction = Direction.load(resolve_direction("refusal", lm.fingerprint), model_fingerprint=lm.fingerprint)
    data = default_data_dir()
    embed = minilm_embedder()
    judge = harm_judge(data, default_cache_dir(), embed)
    sets = {
        "eliciting": [r.text for r in read_source("strongreject", data) if r.label == 1][: args.prompts],
        "benign": [r.text for r in read_source("alpaca", data)][-args.prompts :] + list(SENSITIVE_BENIGN),
    }
    result = {"direction": {"layer": direction.layer, "strength": direction.strength}}
    for action in (Action.FLAG, Action.REFUSE):
        policy = Policy("harmful_request", "harmful_request", Stage.PROMPT, action)
        engine = Engine(lm, [policy], [probe], directions={"refusal": direction})
        engine.start()
        try:
            for name, prompts in sets.items():
                runs, rate = replies(engine, prompts, args.tokens)
                if name == "eliciting":
                    judged = judge.scores(embed, [r["prompt"] for r in runs], [r["reply"] for r in runs])
                    for run, score in zip(runs, judged, strict=True):
                        run["harmful"] = bool(score >= judge.threshold)
                result.setdefault(name, {})[action.value] = {**summary(runs), "tokens_per_second": rate, "runs": runs}
        finally:
            engine.stop()
    for name in sets:
        flag, refuse = result[name]["flag"], result[name]["refuse"]
        unchanged = [
            a["reply"] == b["reply"] for a, b in zip(flag["runs"], refuse["runs"], strict=True) if not a["fired"]
        ]
        result[name]["unfired_unchanged"] = f"{sum(unchanged)}/{len(unchanged)}"
        print(
            f"{name}: fired on {flag['fired']}/{flag['prompts']}; refusal rate where it fired "
            f"{flag['refusal_rate_fired']} (flag) -> {refuse['refusal_rate_fired']} (refuse); "
            "replies where it did not fire unchanged "
            f"{result[name]['unfired_unchanged']}; tokens/s {flag['tokens_per_second']:.1f} -> "
            f"{refuse['tokens_per_second']:.1f}"
        )
        if flag["harm_rate_fired"] is not None:
            print(
                f"{name}: harmful (harm judge) where it fired {flag['harm_rate_fired']:.3f} (flag) -> "
                f"{refuse['harm_rate_fired']:.3f} (refuse)"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
