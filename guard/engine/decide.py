"""From probe scores to what happens: one decision for the prompt stage and the output stage alike.

A policy *crosses* when it is checked (the request's and the stage's) and its score exceeds its
threshold. What a crossing does is the policy's action: ``block`` ends the reply with
``content_filter``, ``ablate`` projects the policy's direction out from then on, ``refuse`` steers
along the refusal direction from then on (so the model declines in its own words), ``steer`` along
the policy's own direction by its signed strength, ``flag`` only reports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from guard.events import Verdict
from guard.policy import ANY, Action, Policy
from probes.explain import Explanation


@dataclass(frozen=True)
class Decision:
    """Per row and policy (``[..., n_policies]`` bool): what crossed, and which of those block, ablate or steer."""

    crossed: torch.Tensor
    blocking: torch.Tensor
    ablating: torch.Tensor
    steering: torch.Tensor  # refuse and steer


class Decider:
    """The policies' actions as masks, built once; ``decide`` is then a few tensor operations for a whole batch."""

    def __init__(self, policies: Sequence[Policy]) -> None:
        self.policies = tuple(policies)
        self.blocks = torch.tensor([p.action is Action.BLOCK for p in policies], dtype=torch.bool)
        self.ablates = torch.tensor([p.action is Action.ABLATE for p in policies], dtype=torch.bool)
        self.steers = torch.tensor([p.steers for p in policies], dtype=torch.bool)
        self.on_prompt = torch.tensor([p.on_prompt for p in policies], dtype=torch.bool)
        self.on_output = torch.tensor([p.on_output for p in policies], dtype=torch.bool)

    def decide(self, scores: torch.Tensor, thresholds: torch.Tensor, checked: torch.Tensor) -> Decision:
        """``scores`` and ``checked`` ``[..., n_policies]``: the policies that cross, and what their actions are."""
        crossed = checked & (scores > thresholds)
        return Decision(crossed, crossed & self.blocks, crossed & self.ablates, crossed & self.steers)

    def message(self, blocking: torch.Tensor) -> str | None:
        """The refusal text of the first blocking policy of one row, if any blocks."""
        index = blocking.nonzero().flatten().tolist()
        return self.policies[index[0]].message if index else None

    def overall(
        self,
        scores: torch.Tensor,
        thresholds: torch.Tensor,
        scales: torch.Tensor,
        checked: torch.Tensor,
        verdicts: Mapping[str, Verdict],
        version: str,
    ) -> Verdict | None:
        """One row's verdict for the whole set (``None`` when no policy was checked): detected or filtered if any
        checked policy's verdict is, and a score that is above 0.5 where some checked policy's score is above its
        threshold: the sigmoid of the largest margin of a score over its threshold, in the probes' uncalibrated
        logits (a calibrated probe's margin divided by its ``scales``, as a set's shift reads them)."""
        if not checked.any():
            return None
        margins = (_logit(scores) - _logit(thresholds)) / scales
        members = [verdicts[p.name] for i, p in enumerate(self.policies) if checked[i]]
        return Verdict(
            filtered=any(v.filtered for v in members),
            detected=any(v.detected for v in members),
            score=round(float(torch.sigmoid(margins[checked].max())), 6),
            probe_version=version,
            action=ANY,
        )

    def verdicts(
        self,
        scores: torch.Tensor,
        checked: torch.Tensor,
        crossed: torch.Tensor,
        versions: Sequence[str],
        detected_at: Mapping[str, int] | None = None,
        ablated_from: Mapping[str, int] | None = None,
        explanations: Mapping[str, Explanation] | None = None,
        steered_from: Mapping[str, int] | None = None,
        along: Mapping[str, tuple[str, float | None]] | None = None,
    ) -> dict[str, Verdict]:
        """One row's verdict for every checked policy; ``detected_at``, ``ablated_from``, ``steered_from``: token
        indices; ``along``: the direction version and strength (``None`` for an ablation) of each policy that
        steered or ablated the row along a direction artifact."""
        detected_at, ablated_from, explanations = detected_at or {}, ablated_from or {}, explanations or {}
        steered_from, along = steered_from or {}, along or {}
        out = {}
        for i, policy in enumerate(self.policies):
            if not checked[i]:
                continue
            acted = bool(crossed[i]) and policy.action is not Action.FLAG
            out[policy.name] = Verdict(
                filtered=acted or policy.name in ablated_from,
                detected=bool(crossed[i]),
                score=round(float(scores[i]), 6),
                probe_version=versions[i],
                action=policy.action.value,
                detected_at_token=detected_at.get(policy.name),
                ablated_from_token=ablated_from.get(policy.name),
                steered_from_token=steered_from.get(policy.name),
                direction_version=along.get(policy.name, (None, None))[0],
                strength=along.get(policy.name, (None, None))[1],
                **({"explanation": explanations[policy.name]} if policy.name in explanations else {}),
            )
        return out


def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.logit(p.double(), eps=1e-7)
