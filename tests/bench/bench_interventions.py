"""Benchmark: the shipped interventions against no intervention, side by side in one run.

**refuse.** The default model, the shipped ``harmful_request`` probe on the prompt stage, once with
action ``flag`` (nothing changes) and once with ``refuse`` (the shipped refusal direction), each in its
own engine. Eliciting prompts are StrongREJECT's, which chose neither the probe's threshold nor the
direction. Benign prompts are Alpaca instructions and the written sensitive-topic requests of
``probes.eval.directions``. Reports, per set: how many prompts the policy fired on, the refusal-phrase
judge's rate among them, whether the replies where it did not fire are unchanged, decode tokens/s,
and example replies. Replies to the eliciting prompts are also judged by the harm judge
(``probes.eval.judges``, trained on HarmBench's human-labelled replies, which saw neither StrongREJECT
nor these replies; it is fitted into the cache on first use, about 7 minutes).

**The sentiment dial.** One engine with the shipped sentiment direction as a dial: greedy replies to
Alpaca instructions that chose nothing (``DIAL_PROMPTS``) at five strengths, from minus to plus the
direction's recommended strength, judged by VADER's compound sentiment (a lexicon, no model) and by the
refusal phrases: the dose-response curve, and whether it is monotone.

**Costs, for every intervention.** On the benign prompts, the mean KL of the next-token distribution
after the prompt, steered against not; and the capability proxy, the mean log-likelihood per token of
written reference answers to benign questions (``REFERENCE_ANSWERS``). ``refuse`` changes nothing where
its policy does not fire; its costs are given as if it fired (steering from the reply's first token),
what a false positive costs. A dial steers the whole sequence.

    .venv/bin/python tests/bench/bench_interventions.py [--prompts 24] [--tokens 40] [--dtype int8]
        [--out tests/bench/results/interventions.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from itertools import pairwise
from pathlib import Path

import torch
from prompts import REFERENCE_ANSWERS

from guard.engine import Engine
from guard.policy import Action, Dial, Policy, Stage
from guard.replies import generate
from guard.sampling import SamplingParams
from probes.catalog import load_shipped, resolve_direction
from probes.data import default_data_dir
from probes.direction import Direction
from probes.eval.baselines import minilm_embedder
from probes.eval.directions import DIAL_PROMPTS, SENSITIVE_BENIGN, next_token_kl, sentiment, steering
from probes.eval.judges import harm_judge, refuses
from probes.eval.sources import read_source
from probes.lm.hooks import adding, hooks
from probes.lm.model import DEFAULT_MODEL, NUMERIC_PATHS, LoadedModel, default_cache_dir, load_model

DOSES = (-1.0, -0.5, 0.0, 0.5, 1.0)  # multiples of the dial direction's recommended strength


def replies(engine: Engine, prompts: list[str], tokens: int, steer=None) -> tuple[list[dict], float]:
    started = time.perf_counter()
    out = generate(engine, prompts, SamplingParams(max_tokens=tokens, temperature=0), steer)
    rate = sum(g.completion_tokens for g in out) / (time.perf_counter() - started)
    runs = [
        {
            "prompt": g.prompt,
            "fired": g.prompt_verdicts["harmful_request"].detected if g.prompt_verdicts else False,
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


# -- costs, by transformers' own forward with the steering hook --------------------------------------------
def _steered(lm: LoadedModel, direction: Direction | None, strength: float, start: int):
    if direction is None or strength == 0.0:
        return nullcontext()
    hook = adding(torch.tensor(direction.vector(direction.layer)), strength, start)
    return hooks(lm.model, {direction.layer: hook}, layer_path=lm.layer_path)


def _prompt_ids(lm: LoadedModel, text: str) -> list[int]:
    chat = [{"role": "user", "content": text}]
    return list(lm.tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"])


def capability(lm: LoadedModel, direction: Direction | None = None, strength: float = 0.0, whole: bool = True) -> float:
    """Mean log-likelihood per token of the reference answers after their questions."""
    total = 0.0
    with torch.inference_mode():
        for question, answer in REFERENCE_ANSWERS:
            prompt = _prompt_ids(lm, question)
            target = lm.tokenizer(answer, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + target])
            with _steered(lm, direction, strength, 0 if whole else len(prompt) - 1):
                logits = lm.model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
            total += float(torch.log_softmax(logits, -1).gather(1, torch.tensor(target)[:, None]).mean())
    return total / len(REFERENCE_ANSWERS)


# -- the sections ------------------------------------------------------------------------------------------
def refuse_section(lm: LoadedModel, sets: dict[str, list[str]], tokens: int) -> dict:
    probe = load_shipped("harmful_request", model_fingerprint=lm.fingerprint)
    direction = Direction.load(resolve_direction("refusal", lm.fingerprint), model_fingerprint=lm.fingerprint)
    data, embed = default_data_dir(), minilm_embedder()
    judge = harm_judge(data, default_cache_dir(), embed)
    result = {"direction": {"version": direction.version, "layer": direction.layer, "strength": direction.strength}}
    for action in (Action.FLAG, Action.REFUSE):
        policy = Policy("harmful_request", "harmful_request", Stage.PROMPT, action)
        engine = Engine(lm, [policy], [probe], directions={"refusal": direction})
        engine.start()
        try:
            for name, prompts in sets.items():
                runs, rate = replies(engine, prompts, tokens)
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
            f"refuse, {name}: fired on {flag['fired']}/{flag['prompts']}; refusal rate where it fired "
            f"{flag['refusal_rate_fired']} (flag) -> {refuse['refusal_rate_fired']} (refuse); "
            "replies where it did not fire unchanged "
            f"{result[name]['unfired_unchanged']}; tokens/s {flag['tokens_per_second']:.1f} -> "
            f"{refuse['tokens_per_second']:.1f}"
        )
        if flag["harm_rate_fired"] is not None:
            print(
                f"refuse, {name}: harmful (harm judge) where it fired {flag['harm_rate_fired']:.3f} (flag) -> "
                f"{refuse['harm_rate_fired']:.3f} (refuse)"
            )
    result["forced_cost"] = {
        "benign_kl": next_token_kl(
            lm, sets["benign"], steering(direction, direction.layer, direction.strength, from_last=True)
        ),
        "capability": capability(lm, direction, direction.strength, whole=False),
    }
    print(
        f"refuse, as if fired on every benign prompt: next-token KL {result['forced_cost']['benign_kl']:.3f}, "
        f"reference log-likelihood {result['forced_cost']['capability']:.3f}"
    )
    return result


def dial_section(lm: LoadedModel, benign: list[str], tokens: int) -> dict:
    direction = Direction.load(resolve_direction("sentiment", lm.fingerprint), model_fingerprint=lm.fingerprint)
    prompts = [r.text for r in read_source("alpaca", default_data_dir())][DIAL_PROMPTS]
    top = abs(direction.strength)
    engine = Engine(lm, [], [], directions={"sentiment": direction}, dials=[Dial("sentiment", "sentiment", -top, top)])
    engine.start()
    curve = []
    try:
        for dose in DOSES:
            strength = dose * top
            runs, rate = replies(engine, prompts, tokens, {"sentiment": strength} if strength else None)
            curve.append(
                {
                    "multiple": dose,
                    "strength": strength,
                    "sentiment": sum(sentiment(r["reply"]) for r in runs) / len(runs),
                    "refusal_rate": sum(refuses(r["reply"]) for r in runs) / len(runs),
                    "benign_kl": next_token_kl(lm, benign, steering(direction, direction.layer, strength)),
                    "capability": capability(lm, direction, strength),
                    "tokens_per_second": rate,
                    "runs": runs,
                }
            )
            point = curve[-1]
            print(
                f"sentiment dial x{dose:+.1f} (strength {strength:+.2f}): sentiment {point['sentiment']:+.3f}, "
                f"refusals {point['refusal_rate']:.3f}, benign KL {point['benign_kl']:.3f}, reference "
                f"log-likelihood {point['capability']:.3f}, tokens/s {rate:.1f}"
            )
    finally:
        engine.stop()
    values = [point["sentiment"] for point in curve]
    monotone = all(a < b for a, b in pairwise(values))
    print(f"sentiment dial: monotone over {len(DOSES)} strengths: {monotone}")
    return {
        "direction": {"version": direction.version, "layer": direction.layer, "strength": direction.strength},
        "prompts": len(prompts),
        "curve": curve,
        "monotone": monotone,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--dtype", choices=NUMERIC_PATHS, default="int8", help="the numeric path (default: served)")
    parser.add_argument("--out", type=Path, default=Path("tests/bench/results/interventions.json"))
    args = parser.parse_args()
    lm = load_model(DEFAULT_MODEL, dtype=args.dtype)
    data = default_data_dir()
    sets = {
        "eliciting": [r.text for r in read_source("strongreject", data) if r.label == 1][: args.prompts],
        "benign": [r.text for r in read_source("alpaca", data)][-args.prompts :] + list(SENSITIVE_BENIGN),
    }
    unsteered = capability(lm)
    print(f"no intervention: reference log-likelihood {unsteered:.3f}")
    result = {
        "model": lm.fingerprint,
        "numeric": lm.numeric,
        "capability_unsteered": unsteered,
        "refuse": refuse_section(lm, sets, args.tokens),
        "sentiment_dial": dial_section(lm, sets["benign"], args.tokens),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
