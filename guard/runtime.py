"""Building what the server runs: the model, the policy set, their probes (registry first), the engine."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from guard.engine import Engine
from guard.policy import PolicyError, PolicySet, load_dials, load_policies, load_sets
from guard.reload import ProbeSource, Watcher
from guard.settings import Settings
from probes.lm.model import LoadedModel, load_model
from probes.registry import LocalRegistry, open_registry, signing_key

log = logging.getLogger(__name__)
PREFILL_SHARE = 0.5


@dataclass(frozen=True)
class Runtime:
    engine: Engine
    source: ProbeSource
    sets: dict[str, PolicySet]  # the policy file's sets by name, ``all`` among them

    def watcher(self, settings: Settings, on_change=None) -> Watcher:
        return Watcher(self.engine, self.source, interval=settings.reload_interval, on_change=on_change)


def serving_model(settings: Settings) -> LoadedModel:
    """The model as ``guard serve`` runs it: the settings' numeric path, compiled unless they say not to."""
    # One thread here, whatever the engine's: a thread that has run torch with two OpenMP threads keeps
    # its OpenMP worker, and with more such workers than cores every later parallel region wakes its
    # workers slowly, the engine thread's decode steps included (docs/benchmarks.md).
    compiled = settings.compile and settings.fast_decode
    if compiled:  # the compiled kernels persist with the converted model, not in /tmp
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(settings.cache_dir / "inductor"))
    return load_model(
        settings.model,
        cache_dir=settings.cache_dir,
        threads=1,
        layer_path=settings.layer_path or None,
        dtype=settings.dtype,
        compiled=compiled,
    )


def build_runtime(settings: Settings, on_refused=None) -> Runtime:
    policies = load_policies(settings.policy_file)
    sets = load_sets(settings.policy_file, policies)
    missing = sorted(set(settings.api_key_sets.values()) - set(sets))
    if missing:  # named by set, never by key: a key is a secret
        raise PolicyError(f"API keys name policy sets {missing}, which {settings.policy_file} does not define")
    lm = serving_model(settings)
    registry = open_registry(settings.redis_url or None, settings.registry_dir())
    # with Redis, a local last-known-good copy; without, the local registry is its own last-known-good
    lkg = LocalRegistry(settings.cache_dir / "registry-last-known-good") if settings.redis_url else registry
    source = ProbeSource(
        registry, lkg, lm.fingerprint, signing_key(), "redis" if settings.redis_url else "local", on_refused=on_refused
    )
    probes = source.initial(policies)
    for policy, probe in zip(policies, probes, strict=True):
        log.info(
            "policy %s: probe %s@%s, %s on %s", policy.name, probe.name, probe.version, policy.action, policy.stage
        )
    dials = load_dials(settings.policy_file)
    names = {p.along for p in policies if p.along} | {d.direction for d in dials}
    directions = source.initial_directions(sorted(names))
    for name, direction in directions.items():
        log.info("direction %s@%s at layer %d", name, direction.version, direction.layer)
    engine = Engine(
        lm,
        policies,
        probes,
        directions=directions,
        dials=dials,
        max_batch=settings.max_batch,
        max_waiting=settings.max_waiting,
        threads=settings.threads or None,
        fast_decode=settings.fast_decode,
        compile_in_background=settings.compile_in_background,
    )
    return Runtime(engine, source, sets)


def context_window(settings: Settings, engine: Engine) -> int:
    return settings.context_window or int(getattr(engine.lm.model.config, "max_position_embeddings", 2048))


def prompt_limit(settings: Settings, engine: Engine) -> int:
    """The longest prompt served: ``max_prompt_tokens``, else what the engine prefills (at the throughput it
    measured at start) within ``PREFILL_SHARE`` of the queue timeout, the rest left for the decode steps
    between its chunks and for queueing; never past the context window."""
    window = context_window(settings, engine)
    if settings.max_prompt_tokens:
        return min(settings.max_prompt_tokens, window)
    if settings.queue_timeout <= 0:
        return window
    return max(1, min(window, int(engine.prefill_rate * settings.queue_timeout * PREFILL_SHARE)))
