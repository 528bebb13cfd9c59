"""Explanations offline: rows explained as training read them, rendered in a terminal and as an HTML report."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path

from probes.data import Dataset
from probes.explain import Explanation, explain, probe_terms, token_spans
from probes.features import extract, token_states
from probes.lm.model import LoadedModel
from probes.lm.render import encode_row
from probes.probe import LinearProbe


def explain_rows(
    lm: LoadedModel, probe: LinearProbe, dataset: Dataset, *, max_text_tokens: int = 256, top: int | None = None
) -> list[Explanation]:
    """Each row's explanation, read as training read it (the row's text inside the chat template)."""
    bias = probe.folded()[1]
    if probe.pooling == "tail":  # the state after each prompt: no token of the text holds it
        states = extract(lm, dataset, probe.layers, pooling="tail", max_text_tokens=max_text_tokens, progress=False)
        return [explain(probe_terms(probe, s[None]), probe.layers, bias, probe.threshold, "tail", None) for s in states]
    out: list[Explanation | None] = [None] * len(dataset.rows)
    for i, states in token_states(lm, dataset, probe.layers, max_text_tokens=max_text_tokens):
        row = dataset.rows[i]
        encoded = encode_row(lm.tokenizer, row.text, row.prompt, max_text_tokens=max_text_tokens)
        spans = token_spans(lm.tokenizer, encoded.ids[encoded.start : encoded.end])
        out[i] = explain(probe_terms(probe, states), probe.layers, bias, probe.threshold, probe.pooling, spans, top)
    return out


def _shade(contribution: float, scale: float) -> tuple[int, int, int]:
    """Red for terms toward the violation, blue against, white for none."""
    strength = min(1.0, abs(contribution) / scale) if scale > 0 else 0.0
    fade = int(255 * (1 - strength))
    return (255, fade, fade) if contribution > 0 else (fade, fade, 255)


def _scale(explanation: Explanation) -> float:
    return max((abs(t.contribution) for t in explanation.tokens), default=0.0)


def terminal(explanation: Explanation, *, color: bool) -> str:
    """The text heat-mapped token by token (24-bit ANSI colours), then the verdict line and the top tokens."""
    scale = _scale(explanation)
    if color:
        text = "".join(
            "\x1b[48;2;{};{};{}m\x1b[30m{}\x1b[0m".format(*_shade(t.contribution, scale), t.text)
            for t in explanation.tokens
        )
    else:
        text = "".join(t.text for t in explanation.tokens)
    verdict = "FLAGGED" if explanation.score > explanation.threshold else "not flagged"
    lines = [
        text,
        f"score {explanation.score:.4f} (threshold {explanation.threshold:.4f}, {verdict}); "
        f"logit {explanation.logit:+.4f} = bias {explanation.bias:+.4f} + tokens",
    ]
    if explanation.layers:
        lines.append("per layer: " + ", ".join(f"{k}: {v:+.4f}" for k, v in explanation.layers.items()))
    top = sorted(explanation.tokens, key=lambda t: -t.contribution)[:10]
    lines += [f"  {t.contribution:+.4f}  {t.text!r} [{t.start}:{t.end}]" for t in top]
    return "\n".join(lines)


def write_report(
    directory: Path, probe: LinearProbe, texts: Sequence[str], explanations: Sequence[Explanation]
) -> Path:
    """``explain.html`` (tokens coloured by contribution, the per-layer scores, the score against the
    threshold) and ``explain.json`` (the same numbers) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    sections = [_section(text, e) for text, e in zip(texts, explanations, strict=True)]
    title = f"{html.escape(probe.name)}@{html.escape(probe.version)}"
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>guard explain: {title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 60em; }}
.text {{ font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.8; }}
.text span {{ border-radius: 2px; }}
.bar {{ position: relative; height: 1em; background: #eee; margin: 0.5em 0; }}
.bar .score {{ position: absolute; height: 100%; background: #c33; }}
.bar .threshold {{ position: absolute; height: 140%; top: -20%; width: 2px; background: #000; }}
table {{ border-collapse: collapse; }} td, th {{ padding: 0 1em 0 0; text-align: left; }}
</style></head><body>
<h1>{title}</h1>
<p>Each token is coloured by its contribution to the logit: red toward the policy, blue against.
The logit is the bias plus the sum of the tokens' contributions; the score is its sigmoid.</p>
{"".join(sections)}
</body></html>
"""
    path = directory / "explain.html"
    path.write_text(page, encoding="utf-8")
    records = [{"text": text, **record(e)} for text, e in zip(texts, explanations, strict=True)]
    (directory / "explain.json").write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")
    return path


def _section(text: str, explanation: Explanation) -> str:
    scale = _scale(explanation)
    tokens = "".join(
        '<span style="background: rgb({},{},{})" title="{:+.4f}">{}</span>'.format(
            *_shade(t.contribution, scale), t.contribution, html.escape(t.text)
        )
        for t in explanation.tokens
    )
    layers = "".join(
        f"<tr><td>layer {layer}</td><td>{value:+.4f}</td></tr>" for layer, value in (explanation.layers or {}).items()
    )
    flagged = "flagged" if explanation.score > explanation.threshold else "not flagged"
    return f"""<section>
<h2>{html.escape(text[:80])}</h2>
<div class="text">{tokens}</div>
<div class="bar"><div class="score" style="width: {100 * explanation.score:.2f}%"></div>
<div class="threshold" style="left: {100 * explanation.threshold:.2f}%"></div></div>
<p>score {explanation.score:.4f}, threshold {explanation.threshold:.4f}: {flagged};
logit {explanation.logit:+.4f}, bias {explanation.bias:+.4f}</p>
<table>{layers}</table>
</section>
"""


def record(explanation: Explanation) -> dict:
    """The JSON of ``guard explain --json``: ``score``, ``logit``, ``bias``, ``threshold``, ``tokens``."""
    record = {
        "score": explanation.score,
        "logit": explanation.logit,
        "bias": explanation.bias,
        "threshold": explanation.threshold,
        "tokens": [
            {"text": t.text, "start": t.start, "end": t.end, "contribution": t.contribution} for t in explanation.tokens
        ],
    }
    if explanation.layers:
        record["layers"] = {str(k): v for k, v in explanation.layers.items()}
    return record
