"""Why a probe scored what it did: its logit split exactly into one term per token.

A linear probe on mean-pooled features is ``w·mean(h) + b = b + Σ_t (w·h_t)/T``, so a token's term
is its own hidden state's dot product with the probe's (folded) weight, over the number of tokens;
with ``last`` pooling the last token's term is the whole logit. A ``tail`` probe reads the state after
the prompt, where the model is about to answer: no token of the text holds it, so its explanation
lists no tokens and ``other`` is the whole sum. Terms are summed over the probe's layers; a probe on
several layers also reports each layer's part. Nothing is approximated:
``bias + Σ tokens + other == logit`` where ``other`` sums the tokens not listed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from msgspec import UNSET, UnsetType
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from probes.probe import LinearProbe, sigmoid

TOP_TOKENS = 10  # tokens an explanation lists unless asked for all
Spans = Callable[[Sequence[int]], list[tuple[str, int, int]]]  # token indices -> (text, start, end) each


@dataclass(frozen=True)
class TokenTerm:
    text: str
    start: int  # character offsets into the scored text
    end: int
    contribution: float  # to the logit
    layers: dict[int, float] | UnsetType = UNSET  # per layer, for a probe on several


@dataclass(frozen=True)
class Explanation:
    score: float
    logit: float
    bias: float
    threshold: float
    tokens: list[TokenTerm]  # the largest contributions first
    other: float = 0.0  # the summed contribution of the tokens not listed
    layers: dict[int, float] | UnsetType = UNSET  # each layer's summed contribution, for a probe on several


def explain(
    terms: np.ndarray,
    layers: Sequence[int],
    bias: float,
    threshold: float,
    pooling: str,
    spans: Spans,
    top: int | None = TOP_TOKENS,
) -> Explanation:
    """``terms[layer, token]``: the raw dot products ``w_layer·h_token`` (bias excluded) for ``layers``.

    ``top``: how many tokens to list (``None``: all, in text order, for a rendering).
    """
    terms = np.asarray(terms, dtype=np.float64)
    count = terms.shape[1]
    if pooling == "mean":
        weighted = terms / count
    else:  # last-token pooling, or ``tail`` (``terms[layer, 1]``: the state after the prompt): the last counts
        weighted = np.zeros_like(terms)
        weighted[:, -1] = terms[:, -1]
    per_token = weighted.sum(0)
    if pooling == "tail":  # no token of the text holds it: none is listed, ``other`` is the whole sum
        chosen = []
    elif top is None:
        chosen = list(range(count))
    else:
        chosen = sorted(np.argsort(-per_token, kind="stable")[:top].tolist(), key=lambda i: -per_token[i])
    several = len(layers) > 1
    tokens = [
        TokenTerm(
            text,
            start,
            end,
            float(per_token[i]),
            {layer: float(weighted[j, i]) for j, layer in enumerate(layers)} if several else UNSET,
        )
        for i, (text, start, end) in zip(chosen, spans(chosen) if chosen else [], strict=True)
    ]
    logit = float(bias + per_token.sum())
    return Explanation(
        score=float(sigmoid(np.asarray(logit))),
        logit=logit,
        bias=float(bias),
        threshold=float(threshold),
        tokens=tokens,
        other=float(per_token.sum() - per_token[chosen].sum()),
        layers={layer: float(weighted[j].sum()) for j, layer in enumerate(layers)} if several else UNSET,
    )


def token_spans(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> Spans:
    """``(text, start, end)`` of chosen tokens of ``ids``, offsets into the text ``ids`` decode to.

    A token spans from where the text decoded up to it stops agreeing with the whole text to where the
    text decoded through it does: a character split over several byte-level tokens belongs to the
    token that completes it (the others span nothing), whatever the tokenizer does at boundaries.
    """
    whole = tokenizer.decode(list(ids), skip_special_tokens=False)

    @functools.cache  # the policies of one verdict ask for many of the same tokens
    def agreed(n: int) -> int:
        prefix = tokenizer.decode(list(ids[:n]), skip_special_tokens=False) if n else ""
        pairs = enumerate(zip(prefix, whole, strict=False))
        return next((i for i, (a, b) in pairs if a != b), min(len(prefix), len(whole)))

    def spans(indices: Sequence[int]) -> list[tuple[str, int, int]]:
        out = []
        for i in indices:
            start, end = agreed(i), agreed(i + 1)
            end = max(start, end)
            out.append((whole[start:end], start, end))
        return out

    return spans


def probe_terms(probe: LinearProbe, states: np.ndarray) -> np.ndarray:
    """``terms[layer, token]`` of a probe for one text's states ``[tokens, n_layers, d_model]`` (its layers)."""
    weight = probe.folded()[0]
    return np.einsum("tld,ld->lt", states.astype(np.float64), weight)
