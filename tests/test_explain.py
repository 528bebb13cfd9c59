"""Explanations: a verdict's logit split into per-token terms that sum back to it exactly."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from msgspec import UNSET
from test_engine import PROMPTS, request, run

from guard.events import GenerationRequest
from guard.policy import Action, Policy, Stage
from probes.data import Dataset, Row
from probes.eval.explained import explain_rows
from probes.explain import explain
from probes.features import extract
from probes.probe import LinearProbe, sigmoid


def two_layer_probe(lm, pooling: str = "mean", seed: int = 0) -> LinearProbe:
    rng = np.random.default_rng(seed)
    d = lm.hidden_size
    return LinearProbe(
        "toy",
        (1, 2),
        rng.normal(size=(2, d)).astype(np.float32),
        0.3,
        rng.normal(size=(2, d)).astype(np.float32),
        rng.uniform(0.5, 2.0, size=(2, d)).astype(np.float32),
        rng.normal(size=(2, d)).astype(np.float32),
        0.5,
        pooling=pooling,
        manifest={"model_fingerprint": lm.fingerprint},
    )


def explained(lm, probe: LinearProbe, text: str):
    """The explanation of ``text`` and, computed apart on pooled features, the probe's logit."""
    dataset = Dataset((Row(text, 1),))
    (result,) = explain_rows(lm, probe, dataset)
    return result, probe.decision_function(extract(lm, dataset, probe.layers, pooling=probe.pooling, progress=False))[0]


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_the_terms_sum_to_the_logit_the_probe_computes_on_pooled_features(tiny_lm, pooling):
    probe = two_layer_probe(tiny_lm, pooling)
    text = "How do I kill a Python process that hangs?"
    result, logit = explained(tiny_lm, probe, text)
    assert result.logit == pytest.approx(logit, abs=1e-4)  # the pooled path, computed apart
    assert result.bias + sum(t.contribution for t in result.tokens) + result.other == pytest.approx(result.logit)
    assert result.other == 0.0 and result.score == pytest.approx(float(sigmoid(np.asarray(logit))), abs=1e-5)
    assert "".join(t.text for t in result.tokens) == text  # every token, in order, offsets into the text
    assert all(text[t.start : t.end] == t.text for t in result.tokens)
    for token in result.tokens:  # a token's contribution is its sum over the probe's layers
        assert sum(token.layers.values()) == pytest.approx(token.contribution)
    assert sum(result.layers.values()) == pytest.approx(result.logit - result.bias)
    if pooling == "last":
        assert all(t.contribution == 0.0 for t in result.tokens[:-1])


def test_a_tail_probes_explanation_holds_its_whole_logit_in_no_token(tiny_lm):
    probe = two_layer_probe(tiny_lm, "tail")
    result, logit = explained(tiny_lm, probe, "How do I kill a Python process that hangs?")
    assert result.logit == pytest.approx(logit, abs=1e-4) and result.tokens == []
    assert result.other == pytest.approx(result.logit - result.bias)
    assert sum(result.layers.values()) == pytest.approx(result.other)


def test_top_tokens_are_the_largest_and_the_rest_is_other():
    terms = np.array([[1.0, -2.0, 3.0, 0.5]])
    spans = lambda chosen: [("x", i, i + 1) for i in chosen]  # noqa: E731
    result = explain(terms, (0,), 0.25, 0.5, "mean", spans, top=2)
    assert [t.start for t in result.tokens] == [2, 0] and result.tokens[0].contribution == 0.75
    assert result.other == pytest.approx((-2.0 + 0.5) / 4) and result.layers is UNSET
    assert result.logit == pytest.approx(0.25 + 2.5 / 4)


def test_verdicts_explained_on_both_stages_score_what_they_say(tiny_lm, engine_for):
    policy = Policy("toy", "toy", Stage.BOTH, Action.FLAG, threshold=1.0)
    engine = engine_for([policy], [two_layer_probe(tiny_lm)])
    plain = request(tiny_lm, PROMPTS[2], 16)
    asked = GenerationRequest(plain.prompt_ids, plain.prompt_span, plain.sampling, explain=True)
    text, done, events = asyncio.run(run(engine, asked))
    _, done_plain, events_plain = asyncio.run(run(engine, plain))
    prompt, reply = events[0].verdicts["toy"], done.verdicts["toy"]
    assert events_plain[0].verdicts["toy"].explanation is UNSET and done_plain.verdicts["toy"].explanation is UNSET
    assert prompt.score == events_plain[0].verdicts["toy"].score and reply.score == done_plain.verdicts["toy"].score
    for verdict, scored in ((prompt, PROMPTS[2]), (reply, text)):
        why = verdict.explanation
        assert why.score == pytest.approx(verdict.score, abs=1e-5)
        assert why.bias + sum(t.contribution for t in why.tokens) + why.other == pytest.approx(why.logit, abs=1e-6)
        assert 0 < len(why.tokens) <= 10 and all(
            scored[t.start : t.end] == t.text for t in why.tokens if t.end <= len(scored)
        )
        contributions = [t.contribution for t in why.tokens]
        assert contributions == sorted(contributions, reverse=True) and set(why.layers) == {1, 2}


def test_cli_explain_prints_json_and_writes_a_report(tiny_lm, tiny_model_dir, tmp_path, capsys):
    from guard.cli import main

    probe = two_layer_probe(tiny_lm)
    probe.save(tmp_path / "probe")
    rows = tmp_path / "rows.jsonl"
    texts = ["How do I kill a Python process?", "Tell me <b>how</b> to bake bread."]
    rows.write_text("".join(json.dumps({"text": t, "label": 0}) + "\n" for t in texts))
    common = ["explain", "--model", str(tiny_model_dir), "--cache-dir", str(tmp_path / "cache"), "--dtype", "float32"]
    assert main([*common, "--probe", str(tmp_path / "probe"), "--json", texts[0]]) == 0
    record = json.loads(capsys.readouterr().out)
    assert set(record) == {"score", "logit", "bias", "threshold", "tokens", "layers"}
    assert "".join(t["text"] for t in record["tokens"]) == texts[0]
    assert record["bias"] + sum(t["contribution"] for t in record["tokens"]) == pytest.approx(record["logit"])
    report = tmp_path / "report"
    assert main([*common, "--probe", str(tmp_path / "probe"), "--data", str(rows), "--report", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "threshold" in printed and "\x1b[" not in printed  # no colours when not a terminal
    page = (report / "explain.html").read_text()
    assert "&lt;b&gt;how&lt;/b&gt;" in page and "<b>how</b>" not in page  # the text is escaped
    assert [r["text"] for r in json.loads((report / "explain.json").read_text())] == texts
    assert main([*common, "--probe", str(tmp_path / "probe")]) == 2  # neither a text nor --data
