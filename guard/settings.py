"""One settings object for every command: ``GUARD_*`` environment variables, overridden by CLI flags."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path

from guard.policy import ALL, DEFAULT_POLICY_FILE
from probes.data import default_data_dir
from probes.lm.model import DEFAULT_MODEL, default_cache_dir


@dataclass(frozen=True)
class Settings:
    model: str = DEFAULT_MODEL
    cache_dir: Path = field(default_factory=default_cache_dir)
    data_dir: Path = field(default_factory=default_data_dir)
    threads: int = 0  # torch intra-op threads; 0: torch's default (decoding on int8: 1, see engine.default_threads)
    layer_path: str = ""  # dotted path to the decoder layers; empty: guessed
    dtype: str = "int8"  # numeric path: int8 (the fast path), bfloat16 or float32 (the reference)
    fast_decode: bool = True  # decode Llama-family models with the lean step (probes.lm.step), else transformers
    compile: bool = True  # run the lean step through torch.compile (serving; compiled once at start-up)
    compile_in_background: bool = True  # serve eagerly while the step compiles; false: ready once it has compiled
    # -- serving --
    host: str = "127.0.0.1"
    port: int = 8000
    policy_file: Path = field(default_factory=lambda: DEFAULT_POLICY_FILE)
    api_keys: str = ""  # comma-separated KEY or KEY:SET (a policy set of the policy file); empty: no authentication
    metrics_key: str = ""  # guards /metrics and the details of /readyz; empty: both open
    admin_key: str = ""  # needed for POST /v1/guard/feedback; empty: feedback is refused
    max_batch: int = 8  # sequences decoded together
    max_waiting: int = 64  # requests queued beyond the batch before 429
    queue_timeout: float = 30.0  # seconds to wait for a batch slot before 503; 0: none
    request_timeout: float = 600.0  # seconds for a whole generation before 504; 0: none
    max_body_bytes: int = 1_000_000
    default_max_tokens: int = 256  # when a request sets no max_tokens
    context_window: int = 0  # 0: the model's max_position_embeddings
    max_prompt_tokens: int = 0  # longer prompts are refused; 0: what the engine prefills in half the queue timeout
    # -- probe registry --
    redis_url: str = ""  # empty: the local directory registry under cache_dir/registry
    reload_interval: float = 5.0  # seconds between reconciles (changes are also pushed over pub/sub)
    # -- capture (needs redis_url) --
    capture: bool = False  # record flagged and blocked requests to the Redis stream guard:capture
    capture_redact: bool = False  # record a sha256 of the texts instead of the texts
    capture_sample: float = 0.0  # also record this fraction of requests nothing flagged
    capture_maxlen: int = 100_000  # records the stream keeps at most
    capture_retention: float = 7 * 86400.0  # seconds a record is kept
    # each accepted key and the policy set it names (``all`` when none), parsed from api_keys once
    api_key_sets: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "api_key_sets", _key_sets(self.api_keys))

    def registry_dir(self) -> Path:
        return self.cache_dir / "registry"

    def check_capture(self) -> None:
        if self.capture and not self.redis_url:
            raise ValueError("capture records to Redis: --capture needs --redis-url (GUARD_REDIS_URL)")
        if not 0 <= self.capture_sample <= 1:
            raise ValueError(f"--capture-sample must be between 0 and 1, got {self.capture_sample}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        """Defaults overridden by ``GUARD_<FIELD>`` variables (``GUARD_MODEL``, ``GUARD_CACHE_DIR``, ...)."""
        values = {}
        for f in (f for f in fields(cls) if f.init):
            raw = env.get(f"GUARD_{f.name.upper()}")
            if raw is None:
                continue
            kind = type(f.default_factory() if f.default is MISSING else f.default)
            try:
                values[f.name] = _boolean(raw) if kind is bool else kind(raw)
            except ValueError:
                raise ValueError(f"GUARD_{f.name.upper()}={raw!r} is not a valid {kind.__name__}") from None
        return cls(**values)

    def override(self, **flags: object) -> Settings:
        """A copy with the CLI flags that were given (``None`` means 'not given')."""
        return replace(self, **{k: v for k, v in flags.items() if v is not None})

    def override_from(self, args: object) -> Settings:
        """A copy with every parsed flag named like a field (``--max-batch`` is ``max_batch``) that was given."""
        return self.override(**{f.name: getattr(args, f.name, None) for f in fields(self) if f.init})


def _key_sets(api_keys: str) -> dict[str, str]:
    """``KEY`` or ``KEY:SET`` entries, comma-separated: a bad one fails the settings, never a request."""
    keys = {}
    for entry in filter(None, (e.strip() for e in api_keys.split(","))):
        key, _, policy_set = entry.partition(":")
        if not key.strip():
            raise ValueError("an API key entry is empty before its ':' (GUARD_API_KEYS takes KEY or KEY:SET)")
        keys[key.strip()] = policy_set.strip() or ALL
    return keys


def _boolean(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)
