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

**ablate.** The shipped ``weapons`` probe on the reply, three engines: ``flag``; ``ablate`` (its
direction projected out at its layers once it crosses, the crossing token recomputed); and ``ablate``
with ``ablate_always`` (from the first token, whatever the score). With ``--ablate-direction DIR`` (a
``guard directions --preset weapons`` artifact), two more: ``ablate`` and ``ablate_always`` along that
direction, its vector projected out at every layer. Eliciting prompts are HarmBench's chemical and
biological requests after the 16 that choose the weapons direction, judged as above, plus how many
replies of each set degenerate into a loop (a run of four words recurring three times).

**The sentiment dial.** One engine with the shipped sentiment direction as a dial: greedy replies to
Alpaca instructions that chose nothing (``DIAL_PROMPTS``) at five strengths, from minus to plus the
direction's recommended strength, judged by VADER's compound sentiment (a lexicon, no model) and by the
refusal phrases: the dose-response curve, and whether it is monotone.

**Costs, for every intervention.** On the benign prompts, the mean KL of the next-token distribution
after the prompt, steered against not; and the capability proxy, the mean log-likelihood per token of
written reference answers to benign questions (``REFERENCE_ANSWERS``). ``refuse`` changes nothing where
its policy does not fire (nor does ``ablate``); their costs are given as if they fired (from the
reply's first token), what a false positive costs. A dial steers the whole sequence.

    .venv/bin/python tests/bench/bench_interventions.py [--prompts 24] [--tokens 40] [--dtype int8]
        [--sections refuse,ablate,dial] [--ablate-direction DIR] [--out tests/bench/results/interventions.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import numpy as np
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
from probes.eval.directions import (
    DIAL_PROMPTS,
    SENSITIVE_BENIGN,
    WEAPONS_HELD_OUT,
    next_token_kl,
    sentiment,
    steering,
)
from probes.eval.judges import harm_judge, refuses
from probes.eval.sources import read_source
from probes.lm.hooks import Hook, adding, hooks, projecting
from probes.lm.model import DEFAULT_MODEL, NUMERIC_PATHS, LoadedModel, default_cache_dir, load_model

DOSES = (-1.0, -0.5, 0.0, 0.5, 1.0)  # multiples of the dial direction's recommended strength


def replies(
    engine: Engine, prompts: list[str], tokens: int, policy: str | None = None, steer=None
) -> tuple[list[dict], float]:
    """Greedy replies in the engine; ``fired``: ``policy`` crossed on the prompt or on the reply."""
    started = time.perf_counter()
    out = generate(engine, prompts, SamplingParams(max_tokens=tokens, temperature=0), steer)
    rate = sum(g.completion_tokens for g in out) / (time.perf_counter() - started)
    runs = []
    for g in out:
        verdict = g.prompt_verdicts.get(policy) or g.verdicts.get(policy)
        runs.append({"prompt": g.prompt, "fired": bool(verdict and verdict.detected), "reply": g.reply})
    return runs, rate


def degenerate(reply: str) -> bool:
    """A reply stuck in a loop: some run of four words recurs at least three times."""
    words = reply.split()
    grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
    return bool(grams) and max(grams.count(g) for g in set(grams)) >= 3


def summary(runs: list[dict]) -> dict:
    fired = [r for r in runs if r["fired"]]

    def rate(rows: list[dict], judge) -> float | None:
        return sum(map(judge, rows)) / len(rows) if rows else None

    return {
        "prompts": len(runs),
        "fired": len(fired),
        "refusal_rate_fired": rate(fired, lambda r: refuses(r["reply"])),
        "refusal_rate_all": rate(runs, lambda r: refuses(r["reply"])),
        "harm_rate_fired": rate(fired, lambda r: r["harmful"]) if "harmful" in runs[0] else None,
        "harm_rate_all": rate(runs, lambda r: r["harmful"]) if "harmful" in runs[0] else None,
        "degenerate_rate_all": rate(runs, lambda r: degenerate(r["reply"])),
    }


# -- costs, by transformers' own forward with the intervention's hooks --------------------------------------
def _prompt_ids(lm: LoadedModel, text: str) -> list[int]:
    chat = [{"role": "user", "content": text}]
    return list(lm.tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"])


Hooks = Callable[[int], dict[int, Hook]]  # an intervention's hooks, applied from a position on


def capability(lm: LoadedModel, hooked: Hooks | None = None) -> float:
    """Mean log-likelihood per token of the reference answers after their questions, under the hooks from
    the question's last position on (where a reply's first token is computed)."""
    total = 0.0
    with torch.inference_mode():
        for question, answer in REFERENCE_ANSWERS:
            prompt = _prompt_ids(lm, question)
            target = lm.tokenizer(answer, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + target])
            factories = hooked(len(prompt) - 1) if hooked else {}
            with hooks(lm.model, factories, layer_path=lm.layer_path):
                logits = lm.model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
            total += float(torch.log_softmax(logits, -1).gather(1, torch.tensor(target)[:, None]).mean())
    return total / len(REFERENCE_ANSWERS)


def forced_cost(lm: LoadedModel, benign: list[str], hooked: Hooks) -> dict:
    """What the intervention costs where it should not have fired: as if it fired from the reply's first token."""
    return {"benign_kl": next_token_kl(lm, benign, hooked(-1)), "capability": capability(lm, hooked)}


# -- the sections ------------------------------------------------------------------------------------------
def compare(lm: LoadedModel, name: str, engines: dict[str, Engine], sets: dict[str, list[str]], tokens: int) -> dict:
    """Each engine's replies to each set, side by side; eliciting replies judged by the harm judge too."""
    data, embed = default_data_dir(), minilm_embedder()
    judge = harm_judge(data, default_cache_dir(), embed)
    result: dict = {}
    for mode, engine in engines.items():
        engine.start()
        try:
            for kind, prompts in sets.items():
                runs, rate = replies(engine, prompts, tokens, name)
                if kind == "eliciting":
                    judged = judge.scores(embed, [r["prompt"] for r in runs], [r["reply"] for r in runs])
                    for run, score in zip(runs, judged, strict=True):
                        run["harmful"] = bool(score >= judge.threshold)
                result.setdefault(kind, {})[mode] = {**summary(runs), "tokens_per_second": rate, "runs": runs}
        finally:
            engine.stop()
    for kind in sets:
        flag = result[kind]["flag"]
        for mode in list(engines)[1:]:
            other = result[kind][mode]
            unchanged = [
                a["reply"] == b["reply"] for a, b in zip(flag["runs"], other["runs"], strict=True) if not a["fired"]
            ]
            other["unfired_unchanged"] = f"{sum(unchanged)}/{len(unchanged)}"
            print(
                f"{name} {mode}, {kind}: fired on {other['fired']}/{other['prompts']} (flag: {flag['fired']}); "
                f"refusal rate where it fired {flag['refusal_rate_fired']} (flag) -> {other['refusal_rate_fired']}; "
                f"harmful where it fired {flag['harm_rate_fired']} -> {other['harm_rate_fired']} (all: "
                f"{flag['harm_rate_all']} -> {other['harm_rate_all']}); degenerate "
                f"{flag['degenerate_rate_all']:.3f} -> {other['degenerate_rate_all']:.3f}; unfired unchanged "
                f"{other['unfired_unchanged']}; tokens/s {flag['tokens_per_second']:.1f} -> "
                f"{other['tokens_per_second']:.1f}"
            )
    return result


def refuse_section(lm: LoadedModel, sets: dict[str, list[str]], tokens: int) -> dict:
    probe = load_shipped("harmful_request", model_fingerprint=lm.fingerprint)
    direction = Direction.load(resolve_direction("refusal", lm.fingerprint), model_fingerprint=lm.fingerprint)
    engines = {
        action.value: Engine(
            lm,
            [Policy("harmful_request", "harmful_request", Stage.PROMPT, action)],
            [probe],
            directions={"refusal": direction},
        )
        for action in (Action.FLAG, Action.REFUSE)
    }
    result = compare(lm, "harmful_request", engines, sets, tokens)
    vector = torch.tensor(direction.vector(direction.layer))
    result["forced_cost"] = forced_cost(
        lm, sets["benign"], lambda start: {direction.layer: adding(vector, direction.strength, start)}
    )
    result["direction"] = {"version": direction.version, "layer": direction.layer, "strength": direction.strength}
    print(f"refuse, as if fired on every benign prompt: {result['forced_cost']}")
    return result


def ablate_section(lm: LoadedModel, benign: list[str], count: int, tokens: int, along: Direction | None) -> dict:
    """The shipped weapons probe on the reply, flagging, ablating its direction once it crosses, and ablating
    it always (the README's example of what breaks the model); with ``along``, ablating that direction too."""
    probe = load_shipped("weapons", model_fingerprint=lm.fingerprint)
    harmbench = read_source("harmbench", default_data_dir())
    chemical = [r.text for r in harmbench if r.label == 1 and r.category == "chemical_biological"]
    eliciting = chemical[WEAPONS_HELD_OUT : WEAPONS_HELD_OUT + count]
    modes = [("flag", Action.FLAG, None), ("ablate", Action.ABLATE, None), ("ablate_always", Action.ABLATE, None)]
    if along is not None:
        modes += [("ablate_direction", Action.ABLATE, "weapons"), ("ablate_direction_always", Action.ABLATE, "weapons")]
    engines = {
        mode: Engine(
            lm,
            [Policy("weapons", "weapons", Stage.OUTPUT, action, ablate_always=mode.endswith("always"), direction=name)],
            [probe],
            directions={"weapons": along} if name else None,
        )
        for mode, action, name in modes
    }
    result = compare(lm, "weapons", engines, {"eliciting": eliciting, "benign": benign}, tokens)
    units = [torch.tensor(v / (np.linalg.norm(v) or 1.0)) for v in probe.direction.astype(np.float64)]
    result["forced_cost"] = forced_cost(
        lm,
        benign,
        lambda start: {layer: projecting(unit, start) for layer, unit in zip(probe.layers, units, strict=True)},
    )
    print(f"weapons ablate, as if fired on every benign prompt: {result['forced_cost']}")
    if along is not None:
        vector = along.vector(along.layer)
        result["direction"] = {"version": along.version, "layer": along.layer}
        result["forced_cost_direction"] = forced_cost(
            lm, benign, lambda start: dict.fromkeys(range(lm.num_layers), projecting(vector, start))
        )
        print(f"weapons direction ablated, as if fired on every benign prompt: {result['forced_cost_direction']}")
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
            runs, rate = replies(engine, prompts, tokens, steer={"sentiment": strength} if strength else None)
            curve.append(
                {
                    "multiple": dose,
                    "strength": strength,
                    "sentiment": sum(sentiment(r["reply"]) for r in runs) / len(runs),
                    "refusal_rate": sum(refuses(r["reply"]) for r in runs) / len(runs),
                    "benign_kl": next_token_kl(lm, benign, steering(direction, direction.layer, strength)),
                    "capability": capability(lm, lambda start, s=strength: steering(direction, direction.layer, s)),
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
    parser.add_argument("--sections", default="refuse,ablate,dial", help="which sections to run, comma-separated")
    parser.add_argument("--ablate-direction", type=Path, help="a weapons direction to ablate along too")
    parser.add_argument("--out", type=Path, default=Path("tests/bench/results/interventions.json"))
    args = parser.parse_args()
    sections = set(args.sections.split(","))
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
    }
    along = Direction.load(args.ablate_direction, model_fingerprint=lm.fingerprint) if args.ablate_direction else None
    if "refuse" in sections:
        result["refuse"] = refuse_section(lm, sets, args.tokens)
    if "ablate" in sections:
        result["ablate"] = ablate_section(lm, sets["benign"], args.prompts, args.tokens, along)
    if "dial" in sections:
        result["sentiment_dial"] = dial_section(lm, sets["benign"], args.tokens)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
