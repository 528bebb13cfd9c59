"""Explanations for a row's verdicts, from the per-layer contributions its passes kept (``probes.explain``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from guard.scoring import ProbeSet
from probes.explain import Explanation, explain, token_spans


def explanations(
    probes: ProbeSet,
    checked: torch.Tensor,
    terms: torch.Tensor,
    tail: torch.Tensor | None,
    ids: Sequence[int],
    tokenizer: PreTrainedTokenizerBase,
) -> dict[str, Explanation]:
    """Every checked policy's explanation; ``terms[token, bank layer, policy]`` for the scored ``ids``, ``tail``
    the same for the prompt's last token (what ``tail`` probes read)."""
    bank, spans = probes.bank, token_spans(tokenizer, ids)
    out = {}
    for j, name in enumerate(bank.names):
        if not checked[j] or not len(ids):
            continue
        probe = probes.probes[j]
        rows = [bank.layers.index(layer) for layer in probe.layers]
        read = tail if probe.pooling == "tail" else terms
        per_layer = read[:, rows, j].T.double().numpy()
        out[name] = explain(
            per_layer, probe.layers, float(bank.bias[j]), float(bank.thresholds[j]), probe.pooling, spans
        )
    return out
