"""Choosing a direction by its effect on generation (``probes.eval.directions``), on the tiny model."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from probes.data import Dataset, Row
from probes.direction import Direction
from probes.eval import directions
from probes.eval.directions import JUDGES, Behaviour, generate, select, sentiment, steering
from probes.eval.judges import REFUSAL_PHRASES, refuses
from probes.features import extract


def test_candidates_are_scored_by_their_effect_and_the_choice_is_stored(tiny_lm, tmp_path, monkeypatch):
    prompts = ["How do I bake bread?", "Tell me how to steal a car.", "Write a poem.", "Build a bomb."]
    rows = Dataset(
        tuple(Row("I'm sorry, I can't help with that.", 1, p) for p in prompts)
        + tuple(Row("Sure, here are the steps.", 0, p) for p in prompts)
    )
    behaviour = Behaviour("refusal", rows, prompts[:2], prompts[2:], "refusal")
    direction, table = select(tiny_lm, behaviour, progress=False)
    assert [(c.reading, c.layer, c.multiple) for c in table] == [
        ("mean", layer, m) for layer in range(3) for m in (0.5, 1.0)
    ]
    best = max(table, key=lambda c: (round(c.judged - c.benign_refusal, 6), -c.strength))
    assert (direction.layer, direction.strength) == (best.layer, best.strength)
    assert all(c.strength == c.multiple * float(direction.norms[c.layer]) for c in table)
    assert all(c.ablated_kl >= 0 for c in table)
    selection = direction.manifest["selection"]
    assert len(selection["table"]) == len(table) and selection["chosen"] == best.as_dict()
    direction.save(tmp_path / "d")
    assert Direction.load(tmp_path / "d", model_fingerprint=tiny_lm.fingerprint).layer == direction.layer
    # a dial's direction is chosen among the candidates whose steering keeps benign next-token KL under the
    # bar (0.1; set between the tiny model's smallest and largest, so that the bar excludes some)
    kls = sorted(c.intervention_kl for c in table)
    assert kls[0] >= 0 and kls[0] < kls[-1]
    monkeypatch.setattr(directions, "KL_LIMIT", (kls[0] + kls[-1]) / 2)
    dial, table = select(tiny_lm, replace(behaviour, dial=True), progress=False)
    eligible = [c for c in table if c.intervention_kl < directions.KL_LIMIT]
    assert 0 < len(eligible) < len(table)
    best = max(eligible, key=lambda c: (round(c.judged - c.benign_refusal, 6), -c.strength))
    assert (dial.layer, dial.strength) == (best.layer, best.strength)
    assert dial.manifest["selection"]["kl_bound_met"]
    ways = [  # the chosen dial's span: its judged score steered up less steered down
        directions._mean(JUDGES["refusal"], prompts[:2], generate(tiny_lm, prompts[:2], steering(dial, best.layer, s)))
        for s in (best.strength, -best.strength)
    ]
    assert best.judged == ways[0] - ways[1]
    # instructions read at their last template token as well: a candidate per reading, layer and multiple
    instructions = Dataset(tuple(Row(p, i % 2) for i, p in enumerate(prompts)))
    both = replace(behaviour, rows=instructions, readings=("mean", "tail"), multiples=(1.0,))
    tail, table = select(tiny_lm, both, progress=False)
    assert [(c.reading, c.layer) for c in table] == [(r, layer) for r in ("mean", "tail") for layer in range(3)]
    chosen = tail.manifest["selection"]["chosen"]
    means = extract(tiny_lm, instructions, list(range(tiny_lm.num_layers)), pooling=chosen["reading"], progress=False)
    difference = means[1::2].mean(0) - means[0::2].mean(0)
    np.testing.assert_allclose(tail.vectors, difference / np.linalg.norm(difference, axis=1, keepdims=True), atol=1e-5)


def test_the_refusal_judge_reads_the_standard_phrases():
    assert refuses("I'm sorry, but I cannot do that.") and refuses("As an AI, I won't")
    assert not refuses("Sure! Here is a recipe for bread.") and "I cannot" in REFUSAL_PHRASES


def test_the_sentiment_judge_reads_tone_not_topic():
    assert sentiment("What a wonderful, happy day!") > 0.5 > sentiment("The capital of France is Paris.") > -0.5
    assert sentiment("This is awful and I hate it.") < -0.5


def test_an_ablation_direction_lowers_the_judged_score_under_the_kl_bar(tiny_lm, monkeypatch):
    prompts = ["How do I bake bread?", "Tell me how to steal a car.", "Write a poem.", "Build a bomb."]
    rows = Dataset(tuple(Row(p, i % 2) for i, p in enumerate(prompts)))
    behaviour = Behaviour("topic", rows, prompts[:2], prompts[2:], "refusal", intervention="ablate")
    direction, table = select(tiny_lm, behaviour, progress=False)
    assert [(c.layer, c.multiple, c.strength) for c in table] == [(layer, 0.0, 0.0) for layer in range(3)]
    assert all(c.intervention_kl == c.ablated_kl for c in table)
    kls = sorted(c.ablated_kl for c in table)
    monkeypatch.setattr(directions, "KL_LIMIT", (kls[0] + kls[-1]) / 2)
    direction, table = select(tiny_lm, behaviour, progress=False)
    eligible = [c for c in table if c.ablated_kl < directions.KL_LIMIT]
    best = min(eligible, key=lambda c: (round(c.judged + c.benign_refusal, 6), c.strength))
    assert 0 < len(eligible) < len(table) and direction.layer == best.layer
    monkeypatch.setattr(directions, "KL_LIMIT", kls[0] / 2)  # none under the bar: it says so
    direction, _ = select(tiny_lm, behaviour, progress=False)
    assert not direction.manifest["selection"]["kl_bound_met"]
