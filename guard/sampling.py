"""Choosing the next token: greedy at temperature 0, else temperature and nucleus (top-p) sampling.

Temperatures below ``GREEDY_BELOW`` are greedy: dividing logits by a far smaller one overflows to
infinities, whose softmax is not a distribution. Before either, as in OpenAI's API, ``logit_bias`` is
added to its tokens' logits, and each token already generated loses ``presence_penalty`` once and
``frequency_penalty`` per time it was generated.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def generator(self) -> torch.Generator | None:
        if self.seed is None:
            return None
        generator = torch.Generator()
        generator.manual_seed(self.seed)
        return generator


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    generated: Mapping[int, int] | None = None,
) -> int:
    """One token id from next-token ``logits[vocab]``; ``generated``: how often each token was generated so far."""
    logits = _adjusted(logits, params, generated or {})
    if params.temperature < GREEDY_BELOW:  # numpy's argmax: the same first maximum as torch's, cheaper on one row
        return int(logits.float().numpy().argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > params.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def _adjusted(logits: torch.Tensor, params: SamplingParams, generated: Mapping[int, int]) -> torch.Tensor:
    """``logits`` with the request's biases and penalties applied (a copy; ``logits`` itself when none apply)."""
    penalised = generated and (params.presence_penalty or params.frequency_penalty)
    if not params.logit_bias and not penalised:
        return logits
    logits = logits.float().clone()
    if params.logit_bias:
        tokens, biases = zip(*params.logit_bias, strict=True)
        logits[list(tokens)] += torch.tensor(biases)
    if penalised:
        counts = torch.tensor(list(generated.values()), dtype=torch.float32)
        logits[list(generated)] -= params.frequency_penalty * counts + params.presence_penalty
    return logits
