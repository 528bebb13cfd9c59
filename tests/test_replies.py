"""Replies generated in-process through the engine (``guard.replies``): what ``guard data replies`` collects."""

from __future__ import annotations

from guard.engine import Engine
from guard.policy import Action, Policy, Stage
from guard.replies import generate
from guard.sampling import SamplingParams
from tests.test_engine import PROMPTS, probe_for


def test_replies_come_back_in_order_and_equal_each_reply_alone(tiny_lm):
    policy = Policy("toy", "toy", Stage.PROMPT, Action.FLAG)
    greedy = SamplingParams(max_tokens=10, temperature=0)
    # more prompts than the batch and the waiting queue together hold
    prompts = PROMPTS * 3
    engine = Engine(tiny_lm, [policy], [probe_for(tiny_lm)], max_batch=2, max_waiting=1, fast_decode=False)
    engine.start()
    try:
        together = generate(engine, prompts, greedy)
        alone = [generate(engine, [p], greedy)[0] for p in PROMPTS]
    finally:
        engine.stop()
    assert [g.prompt for g in together] == prompts
    assert all(g.finish_reason in {"stop", "length"} and g.completion_tokens > 0 for g in together)
    assert [g.reply for g in together] == [a.reply for a in alone] * 3
    assert all("toy" in g.prompt_verdicts for g in together)
