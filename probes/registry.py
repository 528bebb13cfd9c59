"""Registries of probes and directions: immutable, numbered versions of artifacts, one active version per name.

Two backends with the same operations: a local directory (the embedded default) and Redis (shared by
every replica, with change notifications on a pub/sub channel). What is stored is the artifact's
arrays file and manifest, plain bytes and JSON, never a pickle; every load checks the arrays'
sha256, and with a signing key (``GUARD_REGISTRY_KEY``) an HMAC over both, refusing unsigned or
wrongly signed versions. A name holds one kind of artifact (its manifest's ``kind``): a probe
(``probes.probe``) or a direction (``probes.direction``).

Redis layout (prefix ``guard:registry``): ``:names`` (set), ``:{name}:seq`` (counter),
``:{name}:v:{version}`` (hash: arrays, manifest, signature, pushed_at), ``:{name}:active`` (version),
``:{name}:history`` (list of previously active versions, for rollback); changes are published on
``guard:registry:changes`` as ``{"name", "version"}``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from probes.artifact import MANIFEST_FILE
from probes.direction import ARRAYS_FILE as DIRECTION_ARRAYS
from probes.direction import Direction
from probes.probe import ARRAYS_FILE as PROBE_ARRAYS
from probes.probe import LinearProbe, ProbeError

Artifact = LinearProbe | Direction
ARRAYS_FILES = {"probe": PROBE_ARRAYS, "direction": DIRECTION_ARRAYS}

CHANNEL = "guard:registry:changes"
_PREFIX = "guard:registry"


class RegistryError(ValueError):
    """A registry operation that cannot be done (unknown name or version, refused signature...)."""


@dataclass(frozen=True)
class Stored:
    """One stored version: the artifact's bytes and manifest, as pushed."""

    name: str
    version: str
    arrays: bytes
    manifest: dict
    signature: str = ""
    pushed_at: float = 0.0

    @property
    def kind(self) -> str:
        return str(self.manifest.get("kind", "probe"))

    def load(
        self, *, key: bytes | None = None, model_fingerprint: str | None = None, kind: str | None = None
    ) -> Artifact:
        """Verify (the ``kind`` when given, checksum, signature when ``key`` is set, model fingerprint) and build
        the probe or direction."""
        if kind is not None and self.kind != kind:
            raise RegistryError(f"{self.name}@{self.version} is a {self.kind}, not a {kind}")
        if key is not None and not hmac.compare_digest(self.signature, sign(key, self.arrays, self.manifest)):
            raise RegistryError(f"{self.name}@{self.version}: missing or wrong signature; refusing to load it")
        manifest = {**self.manifest, "version": self.version}
        build = Direction.from_bytes if self.kind == "direction" else LinearProbe.from_bytes
        return build(self.arrays, manifest, model_fingerprint=model_fingerprint)

    def probe(self, *, key: bytes | None = None, model_fingerprint: str | None = None) -> LinearProbe:
        return self.load(key=key, model_fingerprint=model_fingerprint, kind="probe")

    def direction(self, *, key: bytes | None = None, model_fingerprint: str | None = None) -> Direction:
        return self.load(key=key, model_fingerprint=model_fingerprint, kind="direction")


def sign(key: bytes, arrays: bytes, manifest: dict) -> str:
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, hashlib.sha256(arrays).digest() + canonical, hashlib.sha256).hexdigest()


def signing_key() -> bytes | None:
    value = os.environ.get("GUARD_REGISTRY_KEY", "")
    return value.encode() if value else None


class Registry(Protocol):
    def push(self, artifact: Artifact, *, key: bytes | None = None) -> str: ...
    def names(self) -> list[str]: ...
    def versions(self, name: str) -> list[str]: ...
    def get(self, name: str, version: str | None = None) -> Stored: ...
    def active(self, name: str) -> str | None: ...
    def activate(self, name: str, version: str) -> None: ...
    def rollback(self, name: str) -> str: ...
    def shadowed(self, name: str) -> str | None: ...
    def shadow(self, name: str, version: str | None) -> None: ...


def open_registry(redis_url: str | None, directory: Path) -> Registry:
    if redis_url:
        import redis

        return RedisRegistry(redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2))
    return LocalRegistry(directory)


def _stored_from(artifact: Artifact, version: str, key: bytes | None) -> Stored:
    arrays, manifest = artifact.to_bytes()
    manifest = {k: v for k, v in manifest.items() if k != "version"}
    return Stored(artifact.name, version, arrays, manifest, sign(key, arrays, manifest) if key else "", time.time())


def _pushable(registry: Registry, artifact: Artifact) -> None:
    """A name keeps its kind: a direction never becomes a version of a probe, nor the other way."""
    kind = "direction" if isinstance(artifact, Direction) else "probe"
    versions = registry.versions(artifact.name)
    if versions and (held := registry.get(artifact.name, versions[-1]).kind) != kind:
        raise RegistryError(f"{artifact.name!r} holds {held} versions; push the {kind} under another name")


class LocalRegistry:
    """``<directory>/<name>/<version>/`` artifact directories plus ``state.json`` (active and history)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def push(self, artifact: Artifact, *, key: bytes | None = None) -> str:
        _pushable(self, artifact)
        versions = self.versions(artifact.name)
        version = str(int(versions[-1]) + 1 if versions else 1)
        self.put(_stored_from(artifact, version, key))
        return version

    def put(self, stored: Stored) -> None:
        """Write a version as stored elsewhere (the replica's last-known-good copy); never overwrite one."""
        target = self.directory / stored.name / stored.version
        if target.exists():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".push-"))
        (staging / ARRAYS_FILES[stored.kind]).write_bytes(stored.arrays)
        meta = {"manifest": stored.manifest, "signature": stored.signature, "pushed_at": stored.pushed_at}
        (staging / MANIFEST_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        try:
            staging.rename(target)
        except OSError:  # a concurrent writer won: versions are immutable, keep theirs
            shutil.rmtree(staging, ignore_errors=True)

    def names(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted(p.name for p in self.directory.iterdir() if p.is_dir() and not p.name.startswith("."))

    def versions(self, name: str) -> list[str]:
        folder = self.directory / name
        if not folder.is_dir():
            return []
        return sorted((p.name for p in folder.iterdir() if p.name.isdigit()), key=int)

    def get(self, name: str, version: str | None = None) -> Stored:
        version = version or self.active(name)
        folder = self.directory / name / str(version)
        if version is None or not folder.is_dir():
            raise RegistryError(f"no version {version!r} of {name!r} in {self.directory}")
        meta = json.loads((folder / MANIFEST_FILE).read_text())
        return Stored(
            name,
            str(version),
            (folder / ARRAYS_FILES[meta["manifest"].get("kind", "probe")]).read_bytes(),
            meta["manifest"],
            meta["signature"],
            meta["pushed_at"],
        )

    def active(self, name: str) -> str | None:
        return self._state(name).get("active")

    def activate(self, name: str, version: str) -> None:
        if version not in self.versions(name):
            raise RegistryError(f"{name!r} has no version {version!r} (have {self.versions(name)})")
        state = self._state(name)
        if state.get("active") not in (None, version):
            state.setdefault("history", []).append(state["active"])
        state["active"] = version
        if state.get("shadow") == version:  # promoted
            del state["shadow"]
        self._write_state(name, state)

    def shadowed(self, name: str) -> str | None:
        return self._state(name).get("shadow")

    def shadow(self, name: str, version: str | None) -> None:
        """Have replicas score ``version`` beside the active one without acting on it (``None``: stop)."""
        state = self._state(name)
        if version is None:
            state.pop("shadow", None)
        else:
            _shadowable(self, name, version, state.get("active"))
            state["shadow"] = version
        self._write_state(name, state)

    def rollback(self, name: str) -> str:
        state = self._state(name)
        if not state.get("history"):
            raise RegistryError(f"{name!r} has no earlier active version to roll back to")
        state["active"] = state["history"].pop()
        self._write_state(name, state)
        return state["active"]

    def _state(self, name: str) -> dict:
        path = self.directory / name / "state.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def _write_state(self, name: str, state: dict) -> None:
        path = self.directory / name / "state.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(path)


class RedisRegistry:
    def __init__(self, client: object) -> None:
        self.client = client

    def push(self, artifact: Artifact, *, key: bytes | None = None) -> str:
        _pushable(self, artifact)
        version = str(self.client.incr(f"{_PREFIX}:{artifact.name}:seq"))
        stored = _stored_from(artifact, version, key)
        fields = {
            "arrays": stored.arrays,
            "manifest": json.dumps(stored.manifest),
            "signature": stored.signature,
            "pushed_at": str(stored.pushed_at),
        }
        pipe = self.client.pipeline()
        pipe.hset(f"{_PREFIX}:{artifact.name}:v:{version}", mapping=fields)
        pipe.sadd(f"{_PREFIX}:names", artifact.name)
        pipe.execute()
        return version

    def names(self) -> list[str]:
        return sorted(n.decode() for n in self.client.smembers(f"{_PREFIX}:names"))

    def versions(self, name: str) -> list[str]:
        latest = int(self.client.get(f"{_PREFIX}:{name}:seq") or 0)
        return [str(v) for v in range(1, latest + 1) if self.client.exists(f"{_PREFIX}:{name}:v:{v}")]

    def get(self, name: str, version: str | None = None) -> Stored:
        version = version or self.active(name)
        fields = self.client.hgetall(f"{_PREFIX}:{name}:v:{version}") if version else {}
        if not fields:
            raise RegistryError(f"no version {version!r} of {name!r} in Redis")
        try:
            manifest = json.loads(fields[b"manifest"])
        except (KeyError, json.JSONDecodeError):
            raise ProbeError(f"{name}@{version}: stored manifest is missing or not JSON") from None
        return Stored(
            name,
            str(version),
            fields.get(b"arrays", b""),
            manifest,
            fields.get(b"signature", b"").decode(),
            float(fields.get(b"pushed_at", b"0")),
        )

    def active(self, name: str) -> str | None:
        value = self.client.get(f"{_PREFIX}:{name}:active")
        return value.decode() if value else None

    def activate(self, name: str, version: str) -> None:
        if not self.client.exists(f"{_PREFIX}:{name}:v:{version}"):
            raise RegistryError(f"{name!r} has no version {version!r} (have {self.versions(name)})")
        previous = self.active(name)
        pipe = self.client.pipeline()
        if previous not in (None, version):
            pipe.rpush(f"{_PREFIX}:{name}:history", previous)
        pipe.set(f"{_PREFIX}:{name}:active", version)
        if self.shadowed(name) == version:  # promoted
            pipe.delete(f"{_PREFIX}:{name}:shadow")
        pipe.publish(CHANNEL, json.dumps({"name": name, "version": version}))
        pipe.execute()

    def rollback(self, name: str) -> str:
        previous = self.client.rpop(f"{_PREFIX}:{name}:history")
        if previous is None:
            raise RegistryError(f"{name!r} has no earlier active version to roll back to")
        version = previous.decode()
        pipe = self.client.pipeline()
        pipe.set(f"{_PREFIX}:{name}:active", version)
        pipe.publish(CHANNEL, json.dumps({"name": name, "version": version}))
        pipe.execute()
        return version

    def shadowed(self, name: str) -> str | None:
        value = self.client.get(f"{_PREFIX}:{name}:shadow")
        return value.decode() if value else None

    def shadow(self, name: str, version: str | None) -> None:
        """Have replicas score ``version`` beside the active one without acting on it (``None``: stop)."""
        pipe = self.client.pipeline()
        if version is None:
            pipe.delete(f"{_PREFIX}:{name}:shadow")
        else:
            _shadowable(self, name, version, self.active(name))
            pipe.set(f"{_PREFIX}:{name}:shadow", version)
        pipe.publish(CHANNEL, json.dumps({"name": name, "shadow": version}))
        pipe.execute()


def _shadowable(registry: Registry, name: str, version: str, active: str | None) -> None:
    """A shadow is another stored version, for the model the active one is for."""
    versions = registry.versions(name)
    if version not in versions:
        raise RegistryError(f"{name!r} has no version {version!r} (have {versions})")
    if version == active:
        raise RegistryError(f"{name}@{version} is the active version; shadow another one")
    if active is not None:
        theirs = registry.get(name, version).manifest.get("model_fingerprint")
        served = registry.get(name, active).manifest.get("model_fingerprint")
        if theirs != served:
            raise RegistryError(
                f"{name}@{version} was trained on model {str(theirs)[:19]}…, the active version on "
                f"{str(served)[:19]}…: replicas could not score it"
            )
