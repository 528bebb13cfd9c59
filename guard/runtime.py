"""Building what the server runs: the model, the policy set, their probes, the engine."""

from __future__ import annotations

import logging

from guard.engine import Engine
from guard.policy import load_policies
from guard.settings import Settings
from probes.defaults import resolve_probe
from probes.model import load_model
from probes.probe import LinearProbe

log = logging.getLogger(__name__)


def build_engine(settings: Settings) -> Engine:
    policies = load_policies(settings.policy_file)
    lm = load_model(
        settings.model,
        cache_dir=settings.cache_dir,
        threads=settings.threads or None,
        layer_path=settings.layer_path or None,
    )
    probes = [LinearProbe.load(resolve_probe(p.probe), model_fingerprint=lm.fingerprint) for p in policies]
    for policy, probe in zip(policies, probes, strict=True):
        log.info(
            "policy %s: probe %s@%s, %s on %s", policy.name, probe.name, probe.version, policy.action, policy.stage
        )
    return Engine(lm, policies, probes, max_batch=settings.max_batch, max_waiting=settings.max_waiting)


def context_window(settings: Settings, engine: Engine) -> int:
    return settings.context_window or int(getattr(engine.lm.model.config, "max_position_embeddings", 2048))
