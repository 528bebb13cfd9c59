"""Policies: which probe guards what (prompt, output or both), what to do when it fires, and with what message.

A policy file is YAML or JSON::

    policies:
      - name: harmful_request
        probe: harmful_request        # shipped policy name, probe directory, or registry reference
        stage: prompt                 # prompt | output | both
        action: block                 # flag | block | ablate | refuse | steer
        threshold: 0.9                # optional: overrides the probe's own threshold
        message: "I can't help with that."   # optional: refusal text for an output block
        ablate_always: false          # ablate: from the first token, not only once the policy fires
        direction: refusal            # refuse, steer: the direction steered along (shipped name or directory);
                                      # ablate: optional, a direction ablated at every layer (default: the probe's)
        strength: 24.0                # refuse: optional (default: the direction's); steer: required, signed
    dials:                            # optional: directions a request may steer along, within bounds
      - name: refusal
        direction: refusal
        min: -120
        max: 120
    sets:                             # optional: named subsets of the policies, one per API key
      support_bot: [harmful_request, self_harm]
    threshold_shift: 0.8              # optional: logits added to every prompt-stage flag policy's threshold, so
                                      # that the set together flags little ordinary traffic (``guard fit-set``)

An API key names its set (``GUARD_API_KEYS="key:support_bot"``); a key that names none, and every
request when no key is configured, gets the implicit set ``all``, every policy.

A request turns a dial with ``"guard": {"steer": {"refusal": 40}}``: every position of its prompt and
reply is steered by that strength along the dial's direction at the direction's layer.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path

import yaml

DEFAULT_POLICY_FILE = Path(__file__).resolve().parent / "policies.yaml"
ANY = "any"  # the name of the whole set's verdict, beside each policy's: no policy or dial takes it


class Stage(StrEnum):
    PROMPT = "prompt"
    OUTPUT = "output"
    BOTH = "both"


class Action(StrEnum):
    FLAG = "flag"
    BLOCK = "block"
    ABLATE = "ablate"
    REFUSE = "refuse"  # steer along the model's refusal direction: it declines in its own words
    STEER = "steer"  # steer along the policy's direction by its signed strength


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the file and the entry."""


@dataclass(frozen=True)
class Policy:
    name: str
    probe: str
    stage: Stage = Stage.PROMPT
    action: Action = Action.FLAG
    threshold: float | None = None
    message: str = "This content was filtered by policy."
    ablate_always: bool = False
    direction: str | None = None  # refuse: None is the shipped refusal direction; ablate: None is the probe's
    strength: float | None = None
    shift: float = 0.0  # logits added to its threshold: the file's ``threshold_shift``, for prompt-stage flags

    @property
    def shifts(self) -> bool:
        """Whether the file's ``threshold_shift`` moves its threshold: a flag on the prompt stage."""
        return self.on_prompt and self.action is Action.FLAG

    @property
    def steers(self) -> bool:
        """Whether a crossing steers the row along ``direction`` from then on (``refuse`` and ``steer``)."""
        return self.action in (Action.REFUSE, Action.STEER)

    @property
    def along(self) -> str | None:
        """The direction artifact this policy steers or ablates along, by name; ``None``: none (an ``ablate``
        policy without one ablates along its probe's own direction)."""
        if self.action is Action.REFUSE:
            return self.direction or "refusal"
        return self.direction if self.action in (Action.STEER, Action.ABLATE) else None

    @property
    def on_prompt(self) -> bool:
        return self.stage in (Stage.PROMPT, Stage.BOTH)

    @property
    def on_output(self) -> bool:
        return self.stage in (Stage.OUTPUT, Stage.BOTH)


_FIELDS = {"name", "probe", "stage", "action", "threshold", "message", "ablate_always", "direction", "strength"}


@dataclass(frozen=True)
class Dial:
    name: str
    direction: str
    low: float
    high: float


def load_dials(path: str | Path = DEFAULT_POLICY_FILE) -> tuple[Dial, ...]:
    """The policy file's ``dials``: what requests may steer along, and how far (none when absent)."""
    document, path = _document(path), Path(path)
    entries = document.get("dials", []) if isinstance(document, dict) else []
    if not isinstance(entries, list):
        raise PolicyError(f"{path}: 'dials' must be a list")
    dials = tuple(_dial(entry, f"{path}: dials[{i}]") for i, entry in enumerate(entries))
    if len({d.name for d in dials}) != len(dials):
        raise PolicyError(f"{path}: dial names must be unique")
    policies = document.get("policies", []) if isinstance(document, dict) else []
    clash = sorted({d.name for d in dials} & {ANY, *(p.get("name") for p in policies if isinstance(p, dict))})
    if clash:  # a reply's verdicts name policies and dials alike
        raise PolicyError(f"{path}: dials {clash} have the names of policies; name them apart")
    return dials


def _dial(entry: object, where: str) -> Dial:
    if not isinstance(entry, dict) or set(entry) - {"name", "direction", "min", "max"}:
        raise PolicyError(f"{where}: expected a mapping of name, direction, min and max")
    name, direction = entry.get("name"), entry.get("direction", entry.get("name"))
    low, high = entry.get("min"), entry.get("max")
    if not isinstance(name, str) or not name or not isinstance(direction, str) or not direction:
        raise PolicyError(f"{where}: 'name' (and 'direction') must be non-empty strings")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high)) or not low < high:
        raise PolicyError(f"{where}: 'min' and 'max' must be numbers with min < max")
    return Dial(name, direction, float(low), float(high))


ALL = "all"  # the implicit policy set: every configured policy


@dataclass(frozen=True)
class PolicySet:
    """Which policies check a request: the set its API key names (``ALL`` when none)."""

    name: str
    policies: frozenset[str]


def load_sets(path: str | Path, policies: tuple[Policy, ...]) -> dict[str, PolicySet]:
    """The policy file's ``sets`` by name, each a subset of ``policies``, and the implicit ``all``."""
    document, path = _document(path), Path(path)
    entries = document.get("sets", {}) if isinstance(document, dict) else {}
    if not isinstance(entries, dict):
        raise PolicyError(f"{path}: 'sets' must map set names to lists of policy names")
    names = frozenset(p.name for p in policies)
    sets = {ALL: PolicySet(ALL, names)}
    for name, members in entries.items():
        where = f"{path}: sets.{name}"
        if not isinstance(name, str) or not name or name == ALL:
            raise PolicyError(f"{where}: a set's name must be a non-empty string other than {ALL!r} (every policy)")
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise PolicyError(f"{where}: expected a list of policy names")
        unknown = sorted(set(members) - names)
        if unknown:
            raise PolicyError(f"{where}: unknown policies {unknown}; configured: {sorted(names)}")
        sets[name] = PolicySet(name, frozenset(members))
    return sets


def _document(path: str | Path) -> object:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read policy file ({exc.strerror})") from None
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise PolicyError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({exc})") from None


def with_shift(path: str | Path, shift: float) -> str:
    """The policy file's text with its ``threshold_shift`` set; a YAML file keeps its leading comment lines."""
    path = Path(path)
    load_policies(path)  # a bad file fails here
    document = {**_document(path), "threshold_shift": math.ceil(shift * 1e4) / 1e4}  # up: never below the fit
    if path.suffix == ".json":
        return json.dumps(document, indent=2) + "\n"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    header = "".join(itertools.takewhile(lambda line: line.startswith("#"), lines))
    return header + yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=120)


def load_policies(path: str | Path = DEFAULT_POLICY_FILE) -> tuple[Policy, ...]:
    path = Path(path)
    document = _document(path)
    entries = document.get("policies") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise PolicyError(f"{path}: expected a 'policies' list (an empty list serves the model unguarded)")
    shift = document.get("threshold_shift", 0.0)
    if isinstance(shift, bool) or not isinstance(shift, int | float) or not -20 <= shift <= 20:
        raise PolicyError(f"{path}: 'threshold_shift' must be a number of logits between -20 and 20")
    policies = tuple(_policy(entry, f"{path}: policies[{i}]") for i, entry in enumerate(entries))
    # the shift moves what only reports; a policy that blocks or intervenes keeps the threshold it was validated at
    policies = tuple(replace(p, shift=float(shift)) if p.shifts else p for p in policies)
    names = [p.name for p in policies]
    if len(set(names)) != len(names):
        raise PolicyError(f"{path}: policy names must be unique, got {names}")
    if ANY in names:
        raise PolicyError(f"{path}: '{ANY}' names the whole set's verdict; name the policy otherwise")
    return policies


def _policy(entry: object, where: str) -> Policy:
    if not isinstance(entry, dict):
        raise PolicyError(f"{where}: expected a mapping")
    unknown = set(entry) - _FIELDS
    if unknown:
        raise PolicyError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(_FIELDS)}")
    for required in ("name", "probe"):
        if not isinstance(entry.get(required), str) or not entry[required]:
            raise PolicyError(f"{where}: '{required}' must be a non-empty string")
    try:
        stage = Stage(entry.get("stage", "prompt"))
        action = Action(entry.get("action", "flag"))
    except ValueError as exc:
        raise PolicyError(f"{where}: {exc}") from None
    threshold = entry.get("threshold")
    if threshold is not None and (not isinstance(threshold, int | float) or not 0 <= threshold <= 1):
        raise PolicyError(f"{where}: 'threshold' must be a number between 0 and 1")
    if action is Action.ABLATE and stage is Stage.PROMPT:
        raise PolicyError(f"{where}: action 'ablate' changes generated tokens; its stage must be 'output' or 'both'")
    if action not in (Action.REFUSE, Action.STEER) and "strength" in entry:
        raise PolicyError(f"{where}: 'strength' is for actions 'refuse' and 'steer'")
    if action not in (Action.REFUSE, Action.STEER, Action.ABLATE) and "direction" in entry:
        raise PolicyError(f"{where}: 'direction' is for actions 'refuse', 'steer' and 'ablate'")
    if action is Action.STEER and not {"direction", "strength"} <= set(entry):
        raise PolicyError(f"{where}: action 'steer' needs a 'direction' and a signed 'strength'")
    strength = entry.get("strength")
    if strength is not None and (isinstance(strength, bool) or not isinstance(strength, int | float)):
        raise PolicyError(f"{where}: 'strength' must be a number")
    if not isinstance(entry.get("direction", "refusal"), str) or not entry.get("direction", "refusal"):
        raise PolicyError(f"{where}: 'direction' must be a non-empty string")
    return Policy(
        name=entry["name"],
        probe=entry["probe"],
        stage=stage,
        action=action,
        threshold=float(threshold) if threshold is not None else None,
        message=str(entry.get("message", Policy.message)),
        ablate_always=bool(entry.get("ablate_always", False)),
        direction=entry.get("direction", "refusal" if action is Action.REFUSE else None),
        strength=float(strength) if strength is not None else None,
    )
