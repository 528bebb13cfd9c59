"""Hot reload: keep every policy's probe and every steered direction at the registry's active version, on
every replica.

A change notification (Redis pub/sub) triggers a reconcile at once; a periodic reconcile heals
missed messages and restarted Redis servers. Each version served from Redis is also written to a
local last-known-good registry, so a replica can start and serve while Redis is down. A version that
fails its checksum, its signature or the model-fingerprint check is refused, logged and counted, and
the version already served stays. Redis errors never reach a request: they are logged, counted and
retried with backoff.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial

from guard.policy import Policy
from probes.catalog import resolve_direction, resolve_probe
from probes.direction import Direction
from probes.probe import LinearProbe, ProbeError
from probes.registry import CHANNEL, Artifact, LocalRegistry, Registry, RegistryError

log = logging.getLogger(__name__)


@dataclass
class RegistryStatus:
    backend: str
    up: bool = True
    errors: int = 0
    degraded: str = ""
    refused: dict[str, str] = field(default_factory=dict)  # "name@version" -> reason

    def as_dict(self) -> dict:
        return {
            "backend": self.backend,
            "up": self.up,
            "errors": self.errors,
            "degraded": self.degraded,
            "refused": dict(self.refused),
        }


class ProbeSource:
    """Where each policy's probe and each steered direction comes from: the registry's active version, else
    last-known-good, else shipped."""

    def __init__(
        self, registry: Registry, lkg: LocalRegistry, fingerprint: str, key: bytes | None, backend: str, on_refused=None
    ) -> None:
        self.registry, self.lkg, self.fingerprint, self.key = registry, lkg, fingerprint, key
        self.status = RegistryStatus(backend)
        self.on_refused = on_refused or (lambda name, reason: None)

    def initial(self, policies: Sequence[Policy]) -> list[LinearProbe]:
        return [self._initial(policy.probe, "probe", partial(self._shipped_probe, policy.probe)) for policy in policies]

    def initial_directions(self, names: Iterable[str]) -> dict[str, Direction]:
        return {name: self._initial(name, "direction", partial(self._shipped_direction, name)) for name in names}

    def _initial(self, name: str, kind: str, shipped: Callable[[], Artifact]) -> Artifact:
        """The registry's active version; else, when the registry is down or refused it, last-known-good;
        else the shipped artifact or directory (also when the registry answers that it has no version)."""
        try:
            version = self.registry.active(name)
            if version is not None:
                return self.fetch(name, version, kind=kind)
        except (RegistryError, ProbeError) as exc:
            log.error("%s %s: registry version refused (%s); trying last-known-good", kind, name, exc)
        except Exception as exc:  # the registry backend is down
            self.down(exc)
        else:  # the registry answered: it has no version of this name
            return shipped()
        if self.lkg is not self.registry and self.lkg.active(name) is not None:
            self.status.degraded = "serving last-known-good probes and directions from the local cache"
            return self.lkg.get(name).load(key=self.key, model_fingerprint=self.fingerprint, kind=kind)
        return shipped()

    def _shipped_probe(self, name: str) -> LinearProbe:
        return LinearProbe.load(resolve_probe(name, self.fingerprint), model_fingerprint=self.fingerprint)

    def _shipped_direction(self, name: str) -> Direction:
        return Direction.load(resolve_direction(name, self.fingerprint), model_fingerprint=self.fingerprint)

    def fetch(self, name: str, version: str, *, active: bool = True, kind: str = "probe") -> Artifact:
        """Load and verify one version of a ``kind``; keep a last-known-good copy of an ``active`` one. Raises
        on a refused version."""
        tag = f"{name}@{version}"
        if tag in self.status.refused:
            raise RegistryError(self.status.refused[tag])
        stored = self.registry.get(name, version)
        try:
            artifact = stored.load(key=self.key, model_fingerprint=self.fingerprint, kind=kind)
        except (RegistryError, ProbeError) as exc:
            self.refuse(
                name, version, exc, "signature" if isinstance(exc, RegistryError) else "checksum_or_fingerprint"
            )
            raise
        if self.lkg is not self.registry and active:
            self.lkg.put(stored)
            if self.lkg.active(name) != version:
                self.lkg.activate(name, version)
        return artifact

    def refuse(self, name: str, version: str, exc: Exception, reason: str) -> None:
        """Never serve this version: it failed a check (``reason``, a metric label) that ``exc`` describes."""
        tag = f"{name}@{version}"
        self.status.refused[tag] = str(exc)
        log.error("refusing %s: %s; the version already served stays", tag, exc)
        self.on_refused(name, reason)

    def down(self, exc: Exception) -> None:
        self.status.errors += 1
        if self.status.up:
            log.error("probe registry unavailable (%s); serving the probes already loaded", exc)
        self.status.up = False


class Watcher:
    def __init__(self, engine: object, source: ProbeSource, *, interval: float = 5.0, on_change=None) -> None:
        self.engine, self.source, self.interval = engine, source, interval
        self.on_change = on_change or (lambda policy, version: None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="guard-registry", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def reconcile(self) -> None:
        """Serve each policy's active registry version if it is new and passes the checks."""
        served = self.engine.versions()
        for policy in self.engine.policies:
            version = self.source.registry.active(policy.probe)
            if version is None or version == served.get(policy.name):
                continue
            try:
                probe = self.source.fetch(policy.probe, version)
                self.engine.replace_probe(policy.name, probe)
            except (RegistryError, ProbeError):
                continue  # logged and counted once by fetch
            except ValueError as exc:  # sound, but not for this policy (a ``tail`` probe on the output stage)
                self.source.refuse(policy.probe, version, exc, "unservable")
                continue
            self.on_change(policy.name, version)
            log.info("policy %s: now serving %s@%s", policy.name, policy.probe, version)
        self._reconcile_shadows()
        self._reconcile_directions()

    def _reconcile_directions(self) -> None:
        """Steer along each direction's active registry version if it is new and passes the checks."""
        for name, served in self.engine.directions().items():
            version = self.source.registry.active(name)
            if version is None or version == served:
                continue
            try:
                direction = self.source.fetch(name, version, kind="direction")
            except (RegistryError, ProbeError):
                continue  # logged and counted once by fetch
            self.engine.replace_direction(direction)
            log.info("direction %s: now steering along %s@%s", name, name, version)

    def _reconcile_shadows(self) -> None:
        """Score each policy's shadow version, if the registry names one that passes the checks, beside it."""
        scored = self.engine.shadows()
        for policy in self.engine.policies:
            version = self.source.registry.shadowed(policy.probe)
            if version == scored.get(policy.name):
                continue
            if version is None:
                self.engine.replace_shadow(policy.name, None)
                log.info("policy %s: no shadow version", policy.name)
                continue
            try:
                probe = self.source.fetch(policy.probe, version, active=False)
                self.engine.replace_shadow(policy.name, probe)
            except (RegistryError, ProbeError):
                continue  # logged and counted once by fetch
            except ValueError as exc:
                self.source.refuse(policy.probe, version, exc, "unservable")
                continue
            log.info("policy %s: scoring %s@%s in shadow", policy.name, policy.probe, version)

    def _run(self) -> None:
        backoff = 0.5
        subscription = None
        while not self._stop.is_set():
            try:
                if subscription is None:
                    subscription = self._subscribe()
                self.reconcile()
                if not self.source.status.up:
                    log.info("probe registry is reachable again")
                self.source.status.up, self.source.status.degraded, backoff = True, "", 0.5
                self._wait(subscription)
            except Exception as exc:  # Redis down or flaky: never fatal, retried with backoff
                self.source.down(exc)
                subscription = None
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def _subscribe(self):
        client = getattr(self.source.registry, "client", None)
        if client is None:
            return None
        subscription = client.pubsub(ignore_subscribe_messages=True)
        subscription.subscribe(CHANNEL)
        return subscription

    def _wait(self, subscription) -> None:
        """Until the next reconcile: the interval, cut short by a change notification."""
        deadline = time.monotonic() + self.interval
        while not self._stop.is_set() and (left := deadline - time.monotonic()) > 0:
            if subscription is None:
                self._stop.wait(min(left, 0.2))
                continue
            message = subscription.get_message(timeout=min(left, 0.5))
            if message and message.get("type") == "message":
                log.debug("registry change: %s", json.loads(message["data"]))
                return
