"""Hot reload across replicas: two real servers (tiny model) on one real redis-server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis
from conftest import make_tiny_model
from serverproc import Server
from test_engine import probe_for

from probes.lm.model import load_model
from probes.registry import RedisRegistry

pytestmark = pytest.mark.server

POLICY = {"policies": [{"name": "toy", "probe": "toy", "stage": "both", "action": "flag"}]}


def versions(server: Server) -> str | None:
    try:
        return httpx.get(server.url + "/readyz", timeout=2).json()["policies"]["toy"]
    except (httpx.HTTPError, KeyError):
        return None


def readyz(server: Server) -> dict:
    return httpx.get(server.url + "/readyz", timeout=5).json()


def wait_for(condition, timeout: float = 15.0) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise TimeoutError("condition not met")
        time.sleep(0.02)
    return time.monotonic() - started


def chat(server: Server, model: str, **extra) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4, **extra}
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)


def corrupt(url: str, name: str, version: str) -> None:
    """Flip a byte of a stored version's arrays: corrupted at rest."""
    client = redis.Redis.from_url(url)
    arrays = bytearray(client.hget(f"guard:registry:{name}:v:{version}", "arrays"))
    arrays[-1] ^= 0xFF
    client.hset(f"guard:registry:{name}:v:{version}", "arrays", bytes(arrays))


@pytest.fixture
def cluster(tmp_path, tiny_lm, tiny_model_dir, redis_server):
    registry = RedisRegistry(redis.Redis.from_url(redis_server.url))
    registry.activate("toy", registry.push(probe_for(tiny_lm, seed=1).with_threshold(0.5)))
    policy_file = tmp_path / "policies.json"
    policy_file.write_text(json.dumps(POLICY))
    servers = []

    def start(
        name: str, redis_up: bool = True, extra_env: dict | None = None, model_dir: Path = tiny_model_dir
    ) -> Server:
        env = {
            "GUARD_CACHE_DIR": str(tmp_path / f"cache-{name}"),
            "GUARD_RELOAD_INTERVAL": "1",
            "GUARD_COMPILE": "0",
            "GUARD_DTYPE": "float32",
            **(extra_env or {}),
        }
        server = Server(
            "--model",
            str(model_dir),
            "--policy-file",
            str(policy_file),
            "--redis-url",
            redis_server.url,
            env=env,
            log=tmp_path / f"{name}.log",
        )
        servers.append(server)
        return server

    yield registry, start
    for server in servers:
        server.stop()


def test_replicas_switch_within_two_seconds_and_in_flight_streams_keep_their_version(cluster, tmp_path):
    registry, start = cluster
    # a long window and greedy decoding (a random model's greedy loop never samples the end token): the stream
    # runs for seconds, in flight however long the switch takes under load
    model_dir = make_tiny_model(tmp_path / "long-window", window=8192)
    lm = load_model(str(model_dir), cache_dir=tmp_path / "cache")
    registry.activate("toy", registry.push(probe_for(lm, seed=1).with_threshold(0.5)))
    a, b = start("a", model_dir=model_dir), start("b", model_dir=model_dir)
    assert versions(a) == versions(b) == "2"
    body = {
        "model": model_dir.name,
        "messages": [{"role": "user", "content": "tell me a story"}],
        "max_tokens": 8000,
        "stream": True,
        "temperature": 0.0,
    }
    with httpx.stream("POST", a.url + "/v1/chat/completions", json=body, timeout=120) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")
        registry.activate("toy", registry.push(probe_for(lm, seed=2).with_threshold(0.5)))
        switched = wait_for(lambda: versions(a) == versions(b) == "3")
        assert readyz(a)["running"] == 1  # the stream is still in flight
        chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    final = next(c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
    assert final["choices"][0]["finish_reason"] == "length"
    assert final["choices"][0]["content_filter_results"]["toy"]["probe_version"] == "2"
    assert switched < 2.0
    after = chat(b, model_dir.name).json()
    assert after["prompt_filter_results"][0]["content_filter_results"]["toy"]["probe_version"] == "3"
    metrics = httpx.get(a.url + "/metrics").text
    assert 'guard_probe_info{action="flag",policy="toy",version="3"} 1.0' in metrics
    assert 'guard_probe_reloads_total{policy="toy"} 1.0' in metrics


def test_redis_outage_and_restart(cluster, redis_server, tiny_lm, tiny_model_dir, tmp_path):
    registry, start = cluster
    a, b = start("a"), start("b")
    redis_server.stop()
    for server in (a, b):
        assert chat(server, tiny_model_dir.name).status_code == 200  # last-known-good probes keep serving
        wait_for(lambda s=server: readyz(s)["registry"]["up"] is False)
        assert readyz(server)["policies"]["toy"] == "1"
    exposed = httpx.get(a.url + "/metrics").text
    assert "guard_registry_up 0.0" in exposed and "# TYPE guard_registry_errors_total counter" in exposed
    errors = [
        float(line.split()[-1]) for line in exposed.splitlines() if line.startswith("guard_registry_errors_total")
    ]
    assert errors and errors[0] >= 1  # the outage, counted
    # a new replica starts while Redis is down, from a's last-known-good copy
    c = Server(
        "--model",
        str(tiny_model_dir),
        "--policy-file",
        str(tmp_path / "policies.json"),
        "--redis-url",
        redis_server.url,
        env={
            "GUARD_CACHE_DIR": str(tmp_path / "cache-a"),
            "GUARD_RELOAD_INTERVAL": "1",
            "GUARD_COMPILE": "0",
            "GUARD_DTYPE": "float32",
        },
        log=tmp_path / "c.log",
    )
    try:
        detail = readyz(c)
        assert detail["policies"]["toy"] == "1" and "last-known-good" in detail["registry"]["degraded"]
        assert chat(c, tiny_model_dir.name).status_code == 200
    finally:
        c.stop()
    redis_server.start()  # an empty Redis: the replicas resubscribe and reconcile with what is active now
    registry = RedisRegistry(redis.Redis.from_url(redis_server.url))
    registry.activate("toy", registry.push(probe_for(tiny_lm, seed=3).with_threshold(0.5)))
    registry.activate("toy", registry.push(probe_for(tiny_lm, seed=4).with_threshold(0.5)))
    wait_for(lambda: versions(a) == versions(b) == "2")
    assert readyz(a)["registry"]["up"] is True


def test_bad_versions_are_refused_and_the_old_one_stays(cluster, tiny_lm, tmp_path, redis_server):
    registry, start = cluster
    a = start("a")
    other = make_tiny_model(tmp_path / "other", seed=5)
    foreign = probe_for(load_model(str(other), cache_dir=tmp_path / "c"), seed=1).with_threshold(0.5)
    registry.activate("toy", registry.push(foreign))  # trained on another model
    wait_for(lambda: "toy@2" in readyz(a)["registry"]["refused"])
    assert "retrain it on this model" in readyz(a)["registry"]["refused"]["toy@2"]
    version = registry.push(probe_for(tiny_lm, seed=6).with_threshold(0.5))
    corrupt(redis_server.url, "toy", version)
    registry.activate("toy", version)
    wait_for(lambda: "toy@3" in readyz(a)["registry"]["refused"])
    assert "corrupt" in readyz(a)["registry"]["refused"]["toy@3"] and versions(a) == "1"
    assert (
        'guard_probe_versions_refused_total{probe="toy",reason="checksum_or_fingerprint"} 2.0'
        in httpx.get(a.url + "/metrics").text
    )


def test_signed_mode_refuses_unsigned_pushes(cluster, tiny_lm, tmp_path, redis_server):
    _registry, start = cluster
    key = {"GUARD_REGISTRY_KEY": "s3cret"}
    # v1 (unsigned) would be refused in signed mode: push a signed v2 and activate it before the replica starts
    probe_dir = probe_for(tiny_lm, seed=7).with_threshold(0.5).save(tmp_path / "toy")
    push = [
        sys.executable,
        "-m",
        "guard.cli",
        "registry",
        "--redis-url",
        redis_server.url,
        "push",
        str(probe_dir),
        "--activate",
    ]
    subprocess.run(push, env={**os.environ, **key}, check=True, capture_output=True)
    a = start("a", extra_env=key)
    assert versions(a) == "2"
    subprocess.run(push, check=True, capture_output=True)  # unsigned
    wait_for(lambda: "toy@3" in readyz(a)["registry"]["refused"])
    assert "signature" in readyz(a)["registry"]["refused"]["toy@3"] and versions(a) == "2"


def test_local_directory_registry_without_redis(tmp_path, tiny_lm, tiny_model_dir):
    env = {
        "GUARD_CACHE_DIR": str(tmp_path / "cache"),
        "GUARD_RELOAD_INTERVAL": "0.5",
        "GUARD_COMPILE": "0",
        "GUARD_DTYPE": "float32",
    }
    push = [sys.executable, "-m", "guard.cli", "registry", "push"]
    for seed in (1, 2):
        probe_dir = probe_for(tiny_lm, seed=seed).with_threshold(0.5).save(tmp_path / f"toy{seed}")
        subprocess.run(
            [*push, str(probe_dir), *(["--activate"] if seed == 1 else [])],
            env={**os.environ, **env},
            check=True,
            capture_output=True,
        )
    (tmp_path / "policies.json").write_text(json.dumps(POLICY))
    server = Server(
        "--model",
        str(tiny_model_dir),
        "--policy-file",
        str(tmp_path / "policies.json"),
        env=env,
        log=tmp_path / "local.log",
    )
    try:
        assert versions(server) == "1" and readyz(server)["registry"]["backend"] == "local"
        subprocess.run(
            [sys.executable, "-m", "guard.cli", "registry", "activate", "toy", "2"],
            env={**os.environ, **env},
            check=True,
            capture_output=True,
        )
        wait_for(lambda: versions(server) == "2", timeout=10)
    finally:
        server.stop()


def test_a_shadow_version_is_scored_on_every_replica_compared_and_promoted(
    cluster, redis_server, tiny_lm, tiny_model_dir, capsys
):
    from dataclasses import replace

    from guard.cli import main

    registry, start = cluster
    registry.push(probe_for(tiny_lm, seed=2).with_threshold(0.0))  # version 2 flags everything
    a, b = start("a"), start("b")
    cli = ["registry", "--redis-url", redis_server.url]
    assert main([*cli, "shadow", "toy", "2"]) == 0
    wait_for(lambda: all(readyz(s)["shadows"] == {"toy": "2"} for s in (a, b)))
    ids = [chat(server, tiny_model_dir.name).json()["id"] for server in (a, a, b, b)]
    assert all(readyz(s)["policies"] == {"toy": "1"} for s in (a, b))  # the shadow acted on nothing

    def compared() -> dict:
        capsys.readouterr()
        assert main([*cli, "compare", "toy", "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    wait_for(lambda: compared()["checks"] == 8)  # 4 requests, prompt and reply, summed over both replicas
    result = compared()
    assert result["shadow_flag_rate"] == 1.0 and result["active_only"] == 0
    assert result["shadow_only"] == 8 - round(8 * result["active_flag_rate"])
    assert {entry["id"] for entry in result["disagreeing"]} <= set(ids)
    assert result["agreement"] == pytest.approx(1 - result["shadow_only"] / 8)
    exposed = httpx.get(a.url + "/metrics").text
    assert 'guard_shadow_checks_total{policy="toy"} 4.0' in exposed
    # a version trained on another model cannot shadow: no replica could score it
    foreign = probe_for(tiny_lm, seed=3)
    foreign = replace(foreign, manifest={**foreign.manifest, "model_fingerprint": "sha256:" + "0" * 64})
    registry.push(foreign)
    assert main([*cli, "shadow", "toy", "3"]) == 2
    assert "replicas could not score it" in capsys.readouterr().err
    assert main([*cli, "activate", "toy", "2"]) == 0  # promoted: it serves, and shadows nothing any more
    wait_for(lambda: all(readyz(s)["policies"] == {"toy": "2"} and readyz(s)["shadows"] == {} for s in (a, b)))
    assert registry.shadowed("toy") is None
    assert main([*cli, "rollback", "toy"]) == 0
    wait_for(lambda: all(readyz(s)["policies"] == {"toy": "1"} for s in (a, b)))


def test_a_dials_direction_is_served_at_the_registrys_active_version_and_a_corrupt_one_is_refused(
    cluster, tiny_lm, tiny_model_dir, tmp_path, redis_server
):
    from dataclasses import replace

    from test_engine import direction_for

    registry, start = cluster
    tilt = [replace(direction_for(tiny_lm, seed=seed), name="tilt") for seed in (1, 2, 3)]
    registry.activate("tilt", registry.push(tilt[0]))
    dials = {**POLICY, "dials": [{"name": "tilt", "direction": "tilt", "min": -9, "max": 9}]}
    (tmp_path / "policies.json").write_text(json.dumps(dials))
    a = start("a")

    def turned() -> dict:
        verdicts = chat(a, tiny_model_dir.name, guard={"steer": {"tilt": 3}}).json()["choices"][0]
        return verdicts["content_filter_results"]["tilt"]

    assert readyz(a)["directions"] == {"tilt": "1"}
    verdict = turned()
    assert (verdict["action"], verdict["direction_version"], verdict["strength"]) == ("steer", "1", 3.0)
    registry.activate("tilt", registry.push(tilt[1]))
    wait_for(lambda: readyz(a)["directions"] == {"tilt": "2"})
    assert turned()["direction_version"] == "2"
    version = registry.push(tilt[2])
    corrupt(redis_server.url, "tilt", version)
    registry.activate("tilt", version)
    wait_for(lambda: "tilt@3" in readyz(a)["registry"]["refused"])
    assert "corrupt" in readyz(a)["registry"]["refused"]["tilt@3"]
    assert readyz(a)["directions"] == {"tilt": "2"} and turned()["direction_version"] == "2"


def test_a_version_the_policy_cannot_serve_is_refused_and_the_old_one_stays(tmp_path, tiny_lm, engine_for):
    """A ``tail`` probe reads the prompt's end: pushed for an output-stage policy, active or in shadow, it is
    refused like a corrupt version (logged, counted, never retried) and the served version stays."""
    from dataclasses import replace

    from guard.policy import Action, Policy, Stage
    from guard.reload import ProbeSource, Watcher
    from probes.registry import LocalRegistry

    registry = LocalRegistry(tmp_path / "registry")
    served = probe_for(tiny_lm, seed=1)
    engine = engine_for([Policy("toy", "toy", Stage.BOTH, Action.FLAG)], [served])
    refused = []
    source = ProbeSource(
        registry, registry, tiny_lm.fingerprint, None, "local", on_refused=lambda *a: refused.append(a)
    )
    watcher = Watcher(engine, source)
    tail = replace(probe_for(tiny_lm, seed=2), pooling="tail")
    registry.activate("toy", registry.push(tail))
    watcher.reconcile()
    registry.shadow("toy", registry.push(replace(tail, threshold=0.4)))
    watcher.reconcile()
    watcher.reconcile()  # refused once, not retried
    assert engine.versions() == {"toy": served.version} and engine.shadows() == {}
    assert refused == [("toy", "unservable")] * 2 and set(source.status.refused) == {"toy@1", "toy@2"}
    assert "prompt stage only" in source.status.refused["toy@1"]
