"""Prometheus metrics, one registry per app. Labels are low-cardinality: policy, stage, action, endpoint, status.

Never a prompt, a user or a request id as a label.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from guard.events import Finished, Verdict
from guard.policy import Policy

if TYPE_CHECKING:
    from guard.engine import Engine

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_PHASE = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 10)
_SCORE = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "guard_requests", "HTTP requests by endpoint and status code.", ["endpoint", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "guard_request_duration_seconds",
            "Time from request to last token.",
            ["endpoint"],
            buckets=_LATENCY,
            registry=r,
        )
        self.ttft = Histogram(
            "guard_time_to_first_token_seconds",
            "Time from request to the first emitted token.",
            buckets=_LATENCY,
            registry=r,
        )
        self.engine_phases = Histogram(
            "guard_engine_phase_duration_seconds",
            "Generation loop: a request's wait for a batch slot (queue_wait), a packed prefill (prefill), "
            "a decode step of the whole batch (decode_step).",
            ["phase"],
            buckets=_PHASE,
            registry=r,
        )
        self.tokens = Counter("guard_generated_tokens", "Completion tokens emitted.", registry=r)
        self.prompt_tokens = Counter("guard_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.finishes = Counter(
            "guard_finish_reason",
            "Requests by how they ended: stop, length, content_filter; cancelled (the client went away), "
            "timeout (queue or request), rejected (queue full), failed; by the API key's policy set.",
            ["reason", "policy_set"],
            registry=r,
        )
        self.flags = Counter(
            "guard_flags",
            "Policy detections by policy, stage, configured action and the API key's policy set.",
            ["policy", "stage", "action", "policy_set"],
            registry=r,
        )
        self.scores = Histogram(
            "guard_probe_score", "Probe scores (0-1) per check.", ["policy", "stage"], buckets=_SCORE, registry=r
        )
        self.probe_info = Gauge(
            "guard_probe_info", "Probe version served per policy.", ["policy", "version", "action"], registry=r
        )
        self.model_info = Gauge("guard_model_info", "The served model.", ["model", "fingerprint"], registry=r)
        self.ready = Gauge("guard_ready", "1 when the model and probes are loaded.", registry=r)
        self.written = Counter(
            "guard_redis_writes", "Records written to Redis: capture, shadow counts.", ["kind"], registry=r
        )
        self.dropped = Counter(
            "guard_redis_writes_dropped",
            "Records dropped instead of written: the write queue was full, or Redis did not answer.",
            ["kind", "reason"],
            registry=r,
        )
        self.shadow_checks = Counter(
            "guard_shadow_checks", "Checks scored by a shadow version beside the active one.", ["policy"], registry=r
        )
        self.shadow_disagreements = Counter(
            "guard_shadow_disagreements",
            "Checks where the shadow version decided otherwise: shadow_only (it alone flagged), active_only.",
            ["policy", "kind"],
            registry=r,
        )
        self.reloads = Counter("guard_probe_reloads", "Probe versions switched to at run time.", ["policy"], registry=r)
        self.refused = Counter(
            "guard_probe_versions_refused", "Registry versions refused.", ["probe", "reason"], registry=r
        )

    def watch_engine(self, engine: Engine) -> None:
        """Batch occupancy gauges read from the engine at scrape time; its phases' durations as it reports them."""
        self.registry.register(_EngineCollector(engine))
        engine.timing = self.engine_phase

    def engine_phase(self, phase: str, seconds: float) -> None:
        self.engine_phases.labels(phase).observe(seconds)

    def probe_versions(self, policies: Sequence[Policy], versions: dict[str, str]) -> None:
        self.probe_info.clear()
        for policy in policies:
            self.probe_info.labels(policy.name, versions[policy.name], policy.action.value).set(1)

    def watch_registry(self, status: object) -> None:
        """Registry health read from the watcher's status at scrape time: up, and errors since start (a count)."""
        self.registry.register(_RegistryCollector(status))

    def prompt_checked(self, verdicts: dict[str, Verdict], policy_set: str) -> None:
        self._verdicts(verdicts, "prompt", policy_set)

    def first_token(self, started: float) -> None:
        self.ttft.observe(time.perf_counter() - started)

    def finished(self, done: Finished, endpoint: str, started: float, policy_set: str) -> None:
        self.request_seconds.labels(endpoint).observe(time.perf_counter() - started)
        self.tokens.inc(done.completion_tokens)
        self.prompt_tokens.inc(done.prompt_tokens)
        self.finishes.labels(done.reason, policy_set).inc()
        self._verdicts(done.verdicts, "output", policy_set)

    def ended(self, reason: str, policy_set: str) -> None:
        """A request that ended before its generation finished: cancelled, timeout, rejected or failed."""
        self.finishes.labels(reason, policy_set).inc()

    def _verdicts(self, verdicts: dict[str, Verdict], stage: str, policy_set: str) -> None:
        for name, verdict in verdicts.items():
            self.scores.labels(name, stage).observe(verdict.score)
            if verdict.detected:
                self.flags.labels(name, stage, verdict.action, policy_set).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self):
        load = self.engine.load()
        yield GaugeMetricFamily(
            "guard_prefill_tokens_per_second",
            "Prompt tokens the engine prefills a second (a moving average over its passes).",
            value=self.engine.prefill_rate,
        )
        yield GaugeMetricFamily(
            "guard_batch_running_sequences", "Sequences in the shared decode batch.", value=load["running"]
        )
        yield GaugeMetricFamily(
            "guard_queue_waiting_requests", "Requests waiting to join the batch.", value=load["waiting"]
        )
        yield GaugeMetricFamily(
            "guard_decode_compiled",
            "1 once decode steps run compiled; 0 while they run eagerly (compiling, not compiled, or compile failed).",
            value=float(self.engine.step_state() == "compiled"),
        )


class _RegistryCollector:
    def __init__(self, status: object) -> None:
        self.status = status

    def collect(self):
        yield GaugeMetricFamily("guard_registry_up", "1 while the probe registry answers.", value=float(self.status.up))
        yield CounterMetricFamily(
            "guard_registry_errors", "Registry errors since start (each retried).", value=float(self.status.errors)
        )
