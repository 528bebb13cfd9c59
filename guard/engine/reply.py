"""One request's generation state while it waits, prefills and decodes in the shared batch."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from guard.engine.steering import SteeringPlan
from guard.events import GenerationRequest, Handle
from guard.scoring import ProbeSet
from guard.textstream import TextStream


@dataclass(eq=False)  # identity: a reply is one request
class Reply:
    handle: Handle
    probes: ProbeSet  # the probe versions this request started with
    stream: TextStream
    generator: torch.Generator | None
    active: torch.Tensor  # [n_policies] bool: this request's policies
    ablating: torch.Tensor  # [n_ablations] float: directions ablated for this row
    sums: (
        torch.Tensor
    )  # [n_policies] running sum of per-token logit contributions (a streaming probe: their moving average)
    score: torch.Tensor  # [n_policies] the reply's output-stage score so far
    crossed: torch.Tensor  # [n_policies] bool: crossed its threshold at some token
    steering: torch.Tensor  # [plan.count]: this row's strength in each slot of its steering plan
    plan: SteeringPlan  # the direction versions this request started with
    shadow_sums: torch.Tensor  # [n_shadowed]: the same three for the probe set's shadow versions
    shadow_score: torch.Tensor
    shadow_crossed: torch.Tensor
    pending: int = -1  # sampled, not yet checked nor emitted
    previous: int = -1  # the token fed before ``pending`` (its logits chose ``pending``)
    position: int = 0  # position id of ``pending``
    completion_tokens: int = 0
    generated: dict[int, int] = field(default_factory=dict)  # how often each token before ``pending`` was generated
    submitted: float = field(default_factory=time.perf_counter)
    ablated_from: dict[str, int] = field(default_factory=dict)
    detected_at: dict[str, int] = field(default_factory=dict)
    steered_from: dict[str, int] = field(default_factory=dict)
    # explained: each scored token that counted and its contributions per layer ``[layers, n_policies]``
    trace: list[tuple[int, torch.Tensor]] = field(default_factory=list)

    @property
    def request(self) -> GenerationRequest:
        return self.handle.request

    @property
    def started(self) -> bool:
        """Whether generation began (the prompt passed its checks and a first token was sampled)."""
        return self.pending != -1
