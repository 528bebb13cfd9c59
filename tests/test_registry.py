"""Registry round trips on both backends (a real redis-server and a local directory), and refusals."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import redis
from test_probe_artifact import make_probe

from guard.cli import main
from probes.probe import ProbeError
from probes.registry import LocalRegistry, RedisRegistry, RegistryError


@pytest.fixture(params=["local", "redis"])
def registry(request, tmp_path):
    if request.param == "local":
        return LocalRegistry(tmp_path / "registry")
    server = request.getfixturevalue("redis_server")
    return RedisRegistry(redis.Redis.from_url(server.url))


def test_push_list_activate_rollback(registry):
    first, second = make_probe(seed=1), make_probe(seed=2)
    assert registry.push(first) == "1" and registry.push(second) == "2"
    assert registry.names() == ["unit"] and registry.versions("unit") == ["1", "2"]
    assert registry.active("unit") is None
    registry.activate("unit", "1")
    registry.activate("unit", "2")
    loaded = registry.get("unit").probe(model_fingerprint="sha256:abc")
    assert loaded.version == "2" and loaded == replace(second, manifest={**second.manifest, "version": "2"})
    assert registry.rollback("unit") == "1" and registry.active("unit") == "1"
    assert registry.get("unit", "2").probe().version == "2"  # versions stay readable after rollback
    with pytest.raises(RegistryError, match="no earlier active version"):
        registry.rollback("unit")
    with pytest.raises(RegistryError, match="has no version '9'"):
        registry.activate("unit", "9")


def test_shadow_versions(registry):
    for seed in (1, 2, 3):
        registry.push(make_probe(seed=seed))
    registry.activate("unit", "1")
    assert registry.shadowed("unit") is None
    registry.shadow("unit", "2")
    assert registry.shadowed("unit") == "2" and registry.active("unit") == "1"
    with pytest.raises(RegistryError, match="is the active version"):
        registry.shadow("unit", "1")
    with pytest.raises(RegistryError, match="has no version '9'"):
        registry.shadow("unit", "9")
    registry.activate("unit", "3")  # another version goes live: the shadow stays
    assert registry.shadowed("unit") == "2"
    registry.activate("unit", "2")  # promoted: no longer a shadow
    assert registry.shadowed("unit") is None and registry.rollback("unit") == "3"
    registry.shadow("unit", "1")
    registry.shadow("unit", None)
    assert registry.shadowed("unit") is None


def test_versions_are_immutable(registry):
    registry.push(make_probe(seed=1))
    before = registry.get("unit", "1")
    registry.push(make_probe(seed=1))  # the same content again: a new version, the old one untouched
    assert registry.versions("unit") == ["1", "2"] and registry.get("unit", "1") == before


def test_signatures(registry):
    key = b"shared-secret"
    registry.push(make_probe(seed=1))
    registry.push(make_probe(seed=2), key=key)
    with pytest.raises(RegistryError, match="missing or wrong signature"):
        registry.get("unit", "1").probe(key=key)
    assert registry.get("unit", "2").probe(key=key).version == "2"
    with pytest.raises(RegistryError, match="missing or wrong signature"):
        registry.get("unit", "2").probe(key=b"another key")


def make_direction(name: str = "unit-direction", seed: int = 1):
    import numpy as np

    from probes.direction import from_means

    rng = np.random.default_rng(seed)
    positive, negative = rng.normal(size=(2, 3, 8))
    return from_means(name, positive, negative, layer=1, strength=2.5, model_fingerprint="sha256:abc")


def test_directions_are_versioned_beside_probes_and_names_keep_their_kind(registry):
    registry.push(make_probe())
    first, second = make_direction(seed=1), make_direction(seed=2)
    assert registry.push(first) == "1" and registry.push(second) == "2"
    registry.activate("unit-direction", "1")
    registry.activate("unit-direction", "2")
    loaded = registry.get("unit-direction").direction(model_fingerprint="sha256:abc")
    assert loaded.version == "2" and (loaded.layer, loaded.strength) == (1, 2.5)
    assert (loaded.vectors == second.vectors).all() and registry.names() == ["unit", "unit-direction"]
    assert registry.rollback("unit-direction") == "1"
    assert (registry.get("unit-direction").direction().vectors == first.vectors).all()
    with pytest.raises(RegistryError, match="holds direction versions"):
        registry.push(replace(make_probe(), name="unit-direction"))
    with pytest.raises(RegistryError, match="holds probe versions"):
        registry.push(make_direction("unit"))
    with pytest.raises(RegistryError, match="is a direction, not a probe"):
        registry.get("unit-direction").probe()
    with pytest.raises(ProbeError, match="retrain it on this model"):
        registry.get("unit-direction").direction(model_fingerprint="sha256:other")


def test_fingerprint_mismatch_refused(registry):
    registry.push(make_probe())
    with pytest.raises(ProbeError, match="retrain it on this model"):
        registry.get("unit", "1").probe(model_fingerprint="sha256:other")


def test_corrupt_bytes_refused_in_redis(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    registry = RedisRegistry(client)
    registry.push(make_probe())
    arrays = bytearray(client.hget("guard:registry:unit:v:1", "arrays"))
    arrays[-1] ^= 0xFF
    client.hset("guard:registry:unit:v:1", "arrays", bytes(arrays))
    with pytest.raises(ProbeError, match="corrupt"):
        registry.get("unit", "1").probe()


def test_cli_round_trip(redis_server, tmp_path, capsys):
    probe_dir = make_probe().save(tmp_path / "unit")
    base = ["registry", "--redis-url", redis_server.url]
    assert main([*base, "push", str(probe_dir), "--activate"]) == 0
    assert main([*base, "push", str(probe_dir)]) == 0
    assert main([*base, "list"]) == 0
    assert main([*base, "activate", "unit", "2"]) == 0
    assert main([*base, "rollback", "unit"]) == 0
    out = capsys.readouterr().out
    assert "pushed unit@1 (active)" in out and "unit: 1*, 2" in out and "unit@1 is active" in out
    assert main([*base, "show", "unit@2"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == "2" and shown["active"] is False and shown["manifest"]["name"] == "unit"
    assert main([*base, "push", str(make_direction().save(tmp_path / "unit-direction")), "--activate"]) == 0
    assert "pushed unit-direction@1 (active)" in capsys.readouterr().out
    assert main([*base, "activate", "unit", "7"]) == 2
    assert "has no version '7'" in capsys.readouterr().err
    assert main(["registry", "--redis-url", "redis://127.0.0.1:1/0", "list"]) == 2
    assert "error" in capsys.readouterr().err


def test_a_registry_that_answers_it_has_no_version_means_the_shipped_probe_not_last_known_good(redis_server, tmp_path):
    """Last-known-good stands in for a registry that is down, never for one that answers."""
    from guard.policy import Policy
    from guard.reload import ProbeSource
    from probes.catalog import SHIPPED_DIR
    from probes.probe import LinearProbe
    from probes.registry import Stored

    shipped = LinearProbe.load(SHIPPED_DIR / "harmful_request")
    stale = shipped.with_threshold(0.5)
    lkg = LocalRegistry(tmp_path / "lkg")
    arrays, manifest = stale.to_bytes()
    lkg.put(Stored("harmful_request", "7", arrays, {k: v for k, v in manifest.items() if k != "version"}))
    lkg.activate("harmful_request", "7")
    policy = Policy("harmful_request", "harmful_request")
    registry = RedisRegistry(redis.Redis.from_url(redis_server.url))
    source = ProbeSource(registry, lkg, shipped.model_fingerprint, None, "redis")
    assert source.initial([policy])[0].threshold == shipped.threshold  # Redis up and empty
    redis_server.stop()
    down = ProbeSource(registry, lkg, shipped.model_fingerprint, None, "redis")
    assert down.initial([policy])[0].threshold == 0.5 and down.status.degraded  # Redis down
