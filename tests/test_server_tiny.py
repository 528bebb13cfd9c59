"""Server behaviour that does not need the real model: authentication, readiness, a failed load."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import openai
import pytest
from conftest import make_tiny_model
from serverproc import Server
from test_engine import probe_for


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_lm, tiny_model_dir):
    directory = tmp_path_factory.mktemp("tiny-serve")
    probe_for(tiny_lm).save(directory / "probe")
    policy_file = directory / "policies.json"
    policy_file.write_text(
        json.dumps(
            {"policies": [{"name": "toy", "probe": str(directory / "probe"), "stage": "both", "action": "flag"}]}
        )
    )
    env = {"GUARD_CACHE_DIR": str(directory / "cache")}
    return directory, policy_file, env


@pytest.fixture(scope="module")
def keyed(setup, tiny_model_dir):
    directory, policy_file, env = setup
    server = Server(
        "--model",
        str(tiny_model_dir),
        "--policy-file",
        str(policy_file),
        "--api-key",
        "k1",
        "--api-key",
        "k2",
        env=env,
        log=directory / "keyed.log",
    )
    yield server
    server.stop()


def test_api_keys(keyed, tiny_model_dir):
    model = tiny_model_dir.name
    good = openai.OpenAI(base_url=keyed.url + "/v1", api_key="k2", max_retries=0)
    reply = good.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert reply.choices[0].finish_reason in {"stop", "length"}
    assert reply.choices[0].model_extra["content_filter_results"]["toy"]["probe_version"]
    bad = openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.models.list()
    assert caught.value.code == "invalid_api_key"
    assert httpx.get(keyed.url + "/v1/models").status_code == 401
    assert httpx.get(keyed.url + "/healthz").status_code == 200  # probes stay open for the kubelet


def test_failed_load_is_503_not_a_crash(setup, tmp_path):
    _directory, policy_file, env = setup
    other = make_tiny_model(tmp_path / "other", seed=3)  # the probe's fingerprint does not match this model
    server = Server(
        "--model", str(other), "--policy-file", str(policy_file), env=env, log=tmp_path / "failed.log", ready=False
    )
    try:
        deadline = time.monotonic() + 60
        while httpx.get(server.url + "/readyz").json()["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.2)
        ready = httpx.get(server.url + "/readyz")
        assert ready.status_code == 503 and "retrain it on this model" in ready.json()["error"]
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])
        assert caught.value.status_code == 503 and caught.value.code == "not_ready"
        assert caught.value.response.headers["retry-after"] == "5"
    finally:
        server.stop()


def test_bad_policy_file_fails_before_serving(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.yaml"
    bad.write_text("policies: [{name: a}]")
    result = subprocess.run(
        [sys.executable, "-m", "guard.cli", "serve", "--policy-file", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "'probe' must be a non-empty string" in result.stderr
