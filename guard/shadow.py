"""Shadow versions compared with the active ones on live traffic: counted per replica, summed in Redis.

Every check of a shadowed policy (a prompt, or a reply) compares the two versions' decisions.
``guard registry compare`` reads the sums: agreement, each version's flag rate, and the ids of the
requests they disagreed on (the latest ``KEPT_IDS``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import redis

from guard.events import Shadowed, Verdict

KEPT_IDS = 1000


@dataclass(frozen=True)
class Comparison:
    """One check of one policy: what each version decided."""

    policy: str
    probe: str  # the registry name
    active_version: str
    shadow_version: str
    active: bool  # detected by the active version
    shadow: bool  # detected by the shadow version

    @property
    def kind(self) -> str | None:
        """``shadow_only`` or ``active_only`` when they disagree, else ``None``."""
        if self.active == self.shadow:
            return None
        return "shadow_only" if self.shadow else "active_only"


def comparisons(
    verdicts: Mapping[str, Verdict], shadowed: Mapping[str, Shadowed], probes: Mapping[str, str]
) -> list[Comparison]:
    """A stage's comparisons; ``probes``: each policy's registry name."""
    return [
        Comparison(name, probes[name], verdicts[name].probe_version, s.version, verdicts[name].detected, s.detected)
        for name, s in shadowed.items()
        if name in verdicts
    ]


def _key(probe: str, active: str, shadow: str) -> str:
    return f"guard:shadow:{probe}:{active}:{shadow}"


def record(pipe: redis.client.Pipeline, comparison: Comparison, request_id: str) -> None:
    key = _key(comparison.probe, comparison.active_version, comparison.shadow_version)
    pipe.hincrby(key, "checks", 1)
    pipe.hincrby(key, "active_flags", int(comparison.active))
    pipe.hincrby(key, "shadow_flags", int(comparison.shadow))
    if comparison.kind is not None:
        pipe.hincrby(key, comparison.kind, 1)
        pipe.lpush(f"{key}:ids", f"{request_id} {comparison.kind}")
        pipe.ltrim(f"{key}:ids", 0, KEPT_IDS - 1)


def compare(client: redis.Redis, probe: str, active: str, shadow: str) -> dict:
    """What replicas counted for ``probe``'s shadow version ``shadow`` next to the active ``active``."""
    key = _key(probe, active, shadow)
    counts = {k.decode(): int(v) for k, v in client.hgetall(key).items()}
    checks = counts.get("checks", 0)
    disagreeing = [entry.decode().split(" ") for entry in client.lrange(f"{key}:ids", 0, -1)]
    disagreements = counts.get("shadow_only", 0) + counts.get("active_only", 0)
    return {
        "probe": probe,
        "active": active,
        "shadow": shadow,
        "checks": checks,
        "agreement": 1 - disagreements / checks if checks else None,
        "active_flag_rate": counts.get("active_flags", 0) / checks if checks else None,
        "shadow_flag_rate": counts.get("shadow_flags", 0) / checks if checks else None,
        "shadow_only": counts.get("shadow_only", 0),
        "active_only": counts.get("active_only", 0),
        "disagreeing": [{"id": request_id, "kind": kind} for request_id, kind in disagreeing],
    }
