"""Which direction, at which version and strength, each steering policy and dial steers along.

A ``SteeringPlan`` is immutable, like a probe set: a request keeps the plan it was submitted under, so a
direction replaced by the registry while it runs does not change its reply. Each plan's operator
(``guard.interventions.Steering``) has one slot per steered direction version; a replacement appends
slots and points new requests at them, so every earlier plan's slots stay valid in the engine's newest
operator, and one shared decode batch serves rows of every plan.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from guard.events import Verdict
from guard.interventions import Steering
from guard.policy import Dial, Policy
from probes.direction import Direction


@dataclass(frozen=True)
class SteeringPlan:
    slots: tuple[Direction, ...]  # the operator's directions, one a slot, in slot order
    policy_slot: Mapping[str, int]  # steering policy -> its slot
    dial_slot: Mapping[str, int]  # dial -> its slot
    strength: Mapping[str, float]  # steering policy -> its strength (the direction's, unless the policy sets one)
    operator: Steering

    @classmethod
    def build(cls, policies: Sequence[Policy], dials: Sequence[Dial], directions: Mapping[str, Direction]):
        steering = [p for p in policies if p.steers]
        missing = sorted(({p.along for p in steering} | {d.direction for d in dials}) - set(directions))
        if missing:
            raise ValueError(f"steering policies and dials steer along directions that were not loaded: {missing}")
        slots = tuple(directions[p.along] for p in steering) + tuple(directions[d.direction] for d in dials)
        return cls(
            slots,
            {p.name: i for i, p in enumerate(steering)},
            {d.name: len(steering) + i for i, d in enumerate(dials)},
            {p.name: p.strength if p.strength is not None else directions[p.along].strength for p in steering},
            Steering(slots),
        )

    @property
    def count(self) -> int:
        return len(self.slots)

    def versions(self) -> dict[str, str]:
        """The version of each direction this plan's policies and dials steer along, by name."""
        used = {*self.policy_slot.values(), *self.dial_slot.values()}
        return {self.slots[i].name: self.slots[i].version for i in sorted(used)}

    def steered_with(self, policies: Iterable[str]) -> dict[str, tuple[str, float]]:
        """Each of these steering policies' direction version and strength."""
        return {name: (self.slots[self.policy_slot[name]].version, self.strength[name]) for name in policies}

    def dial_verdicts(self, steer: Mapping[str, float]) -> dict[str, Verdict]:
        """What a request's dials did: each steered the whole sequence, from its first token, by its strength."""
        return {
            name: Verdict(
                filtered=False,
                detected=False,
                score=0.0,
                probe_version="",
                action="steer",
                steered_from_token=0,
                direction_version=self.slots[self.dial_slot[name]].version,
                strength=float(strength),
            )
            for name, strength in steer.items()
        }

    def replace(self, policies: Sequence[Policy], dials: Sequence[Dial], direction: Direction) -> SteeringPlan:
        """A plan whose policies and dials along ``direction.name`` use ``direction`` (new slots at the end);
        policies that take the direction's own strength take the new one's."""
        slots = list(self.slots)
        policy_slot, dial_slot, strength = dict(self.policy_slot), dict(self.dial_slot), dict(self.strength)
        for p in policies:
            if p.steers and p.along == direction.name:
                policy_slot[p.name] = len(slots)
                slots.append(direction)
                if p.strength is None:
                    strength[p.name] = direction.strength
        for d in dials:
            if d.direction == direction.name:
                dial_slot[d.name] = len(slots)
                slots.append(direction)
        return SteeringPlan(tuple(slots), policy_slot, dial_slot, strength, Steering(slots))
