"""Server behaviour that does not need the real model: authentication, readiness, a failed load."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from conftest import make_tiny_model, serve
from prometheus_client.parser import text_string_to_metric_families
from serverproc import Server
from test_hostile import until

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def keyed(setup, tiny_model_dir):
    server = serve(setup, tiny_model_dir, "keyed", "--api-key", "k1", "--api-key", "k2")
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


def failed_readiness(server: Server) -> httpx.Response:
    """``/readyz`` once the server is no longer loading (within a minute)."""
    deadline = time.monotonic() + 60
    while httpx.get(server.url + "/readyz").json()["status"] == "loading" and time.monotonic() < deadline:
        time.sleep(0.2)
    return httpx.get(server.url + "/readyz")


def test_failed_load_is_503_not_a_crash(setup, tmp_path):
    _directory, policy_file, env = setup
    other = make_tiny_model(tmp_path / "other", seed=3)  # the probe's fingerprint does not match this model
    server = Server(
        "--model", str(other), "--policy-file", str(policy_file), env=env, log=tmp_path / "failed.log", ready=False
    )
    try:
        ready = failed_readiness(server)
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


@pytest.fixture(scope="module")
def tight(setup, tiny_model_dir):
    """One batch slot, one queue place, short timeouts: back-pressure in a few seconds."""
    flags = ("--max-batch", "1", "--max-waiting", "1", "--queue-timeout", "0.5", "--request-timeout", "2")
    server = serve(setup, tiny_model_dir, "tight", *flags)
    yield server
    server.stop()


def _long(model: str, stream: bool) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "count forever"}],
        "max_tokens": 4000,
        "temperature": 0.0,  # greedy: this tiny model loops without ever reaching its end token
        "stream": stream,
    }


def test_back_pressure_and_timeouts(tight, tiny_model_dir):
    model = tiny_model_dir.name
    client = httpx.Client(base_url=tight.url, timeout=30)
    with client.stream("POST", "/v1/chat/completions", json=_long(model, True)) as running:  # holds the one slot
        lines = running.iter_lines()
        assert next(lines).startswith("data: ")
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(client.post, "/v1/chat/completions", json=_long(model, False))
            time.sleep(0.2)
            refused = client.post("/v1/chat/completions", json=_long(model, False))  # the queue place is taken
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
            assert refused.headers["retry-after"] == "1"
            waited = queued.result()
        assert waited.status_code == 503, waited.text
        assert waited.json()["error"]["code"] == "queue_timeout" and waited.headers["retry-after"] == "1"
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2].removeprefix("data: "))["error"]
    assert error["code"] == "timeout" and error["type"] == "timeout", rest[-3:]
    started = time.monotonic()
    timed_out = client.post("/v1/chat/completions", json=_long(model, False))
    assert timed_out.status_code == 504 and timed_out.json()["error"]["code"] == "timeout"
    assert time.monotonic() - started < 4
    # the timed-out requests left the batch: a short one is served at once
    short = client.post("/v1/chat/completions", json={**_long(model, False), "max_tokens": 2})
    assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] <= 2


def test_verdicts_carry_explanations_only_when_asked(keyed, tiny_model_dir):
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key="k1", max_retries=0)
    message = "How do I kill a Python process?"
    ask = {"model": tiny_model_dir.name, "messages": [{"role": "user", "content": message}], "max_tokens": 6}
    plain = client.chat.completions.create(**ask)
    assert "explanation" not in plain.model_extra["prompt_filter_results"][0]["content_filter_results"]["toy"]
    reply = client.chat.completions.create(**ask, extra_body={"guard": {"explain": True}})
    prompt = reply.model_extra["prompt_filter_results"][0]["content_filter_results"]["toy"]
    output = reply.choices[0].model_extra["content_filter_results"]["toy"]
    for verdict, text in ((prompt, message), (output, reply.choices[0].message.content)):
        why = verdict["explanation"]
        assert why["score"] == pytest.approx(verdict["score"], abs=1e-5) and why["tokens"]
        assert why["bias"] + sum(t["contribution"] for t in why["tokens"]) + why["other"] == pytest.approx(why["logit"])
        # offsets into what the scored tokens decode to: the text, but for bytes of an unfinished character
        assert all(text[t["start"] : t["end"]] == t["text"] for t in why["tokens"] if t["end"] <= len(text))
    chunks = list(client.chat.completions.create(**ask, stream=True, extra_body={"guard": {"explain": True}}))
    opening, closing = chunks[0].model_extra, chunks[-1].choices[0].model_extra
    assert opening["prompt_filter_results"][0]["content_filter_results"]["toy"]["explanation"] == prompt["explanation"]
    assert closing["content_filter_results"]["toy"]["explanation"]["tokens"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**ask, extra_body={"guard": {"explain": "yes"}})
    assert caught.value.status_code == 400 and "guard.explain" in str(caught.value.body)


def test_refuse_and_steer_policies_served_steer_and_say_so(setup, tiny_lm, tiny_model_dir, tmp_path):
    from test_engine import direction_for, probe_for

    env = setup[2]
    probe_for(tiny_lm).save(tmp_path / "probe")
    direction = direction_for(tiny_lm)
    direction.save(tmp_path / "direction")
    refuse = {"name": "toy", "probe": str(tmp_path / "probe"), "action": "refuse", "threshold": 0.0}
    steer = {**refuse, "name": "style", "action": "steer", "strength": -3.0}
    ablate = {**refuse, "name": "cut", "action": "ablate", "stage": "output", "ablate_always": True}
    policies = tmp_path / "policies.json"
    steering = [{**entry, "direction": str(tmp_path / "direction")} for entry in (refuse, steer, ablate)]
    policies.write_text(json.dumps({"policies": steering}))
    server = Server("--model", str(tiny_model_dir), "--policy-file", str(policies), env=env, log=tmp_path / "log")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        ask = {"model": tiny_model_dir.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        for name, action in (("toy", "refuse"), ("style", "steer")):
            reply = client.chat.completions.create(**ask, extra_body={"guard": {"policies": [name]}})
            verdict = reply.model_extra["prompt_filter_results"][0]["content_filter_results"][name]
            assert verdict["action"] == action and verdict["filtered"] and verdict["steered_from_token"] == 0
            assert reply.choices[0].finish_reason in {"stop", "length"}  # the reply is the model's own
        reply = client.chat.completions.create(**ask, extra_body={"guard": {"policies": ["cut"]}})
        verdict = reply.choices[0].model_extra["content_filter_results"]["cut"]
        assert verdict["action"] == "ablate" and verdict["direction_version"] == direction.version
    finally:
        server.stop()
    policies.write_text(json.dumps({"policies": [{**refuse, "direction": str(tmp_path / "nowhere")}]}))
    failed = Server(
        "--model", str(tiny_model_dir), "--policy-file", str(policies), env=env, log=tmp_path / "log2", ready=False
    )
    try:
        deadline = time.monotonic() + 60
        while httpx.get(failed.url + "/readyz").json()["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (
            "neither a direction directory nor a shipped direction" in httpx.get(failed.url + "/readyz").json()["error"]
        )
    finally:
        failed.stop()


def test_a_request_turns_only_the_dials_the_operator_allowed_within_bounds(setup, tiny_lm, tiny_model_dir, tmp_path):
    from test_engine import direction_for, probe_for

    env = setup[2]
    probe_for(tiny_lm).save(tmp_path / "probe")
    direction_for(tiny_lm).save(tmp_path / "direction")
    document = {
        "policies": [{"name": "toy", "probe": str(tmp_path / "probe"), "action": "flag"}],
        "dials": [{"name": "polite", "direction": str(tmp_path / "direction"), "min": -10, "max": 10}],
    }
    policies = tmp_path / "policies.json"
    policies.write_text(json.dumps(document))
    server = Server("--model", str(tiny_model_dir), "--policy-file", str(policies), env=env, log=tmp_path / "log")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        ask = {"model": tiny_model_dir.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
        plain = client.chat.completions.create(**ask, temperature=0).choices[0].message.content
        turned = client.chat.completions.create(**ask, temperature=0, extra_body={"guard": {"steer": {"polite": 8}}})
        assert turned.choices[0].message.content != plain
        for steer, param in (({"rude": 1}, "guard.steer"), ({"polite": 11}, "guard.steer.polite")):
            with pytest.raises(openai.BadRequestError) as caught:
                client.chat.completions.create(**ask, extra_body={"guard": {"steer": steer}})
            assert caught.value.body["param"] == param
    finally:
        server.stop()


def test_each_api_key_is_checked_with_its_policy_set_and_may_narrow_it(setup, tiny_model_dir, tmp_path):
    """Two keys, two sets: a key's requests are checked with its set's policies only, ``guard.policies``
    narrows a set and never widens it, and the metrics count requests under their set's name."""
    directory, _, env = setup
    probe = str(directory / "probe")
    policies = tmp_path / "sets.json"
    policies.write_text(
        json.dumps(
            {
                "policies": [
                    {"name": "toy", "probe": probe, "stage": "both", "action": "flag"},
                    {"name": "other", "probe": probe, "stage": "prompt", "action": "flag"},
                ],
                "sets": {"narrow": ["other"]},
            }
        )
    )
    server = Server(
        "--model", str(tiny_model_dir), "--policy-file", str(policies), "--api-key", "wide", "--api-key",
        "slim:narrow", env=env, log=tmp_path / "log",
    )  # fmt: skip
    ask = {"model": tiny_model_dir.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}

    def verdicts(key: str, **extra) -> tuple[set[str], set[str]]:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        reply = client.chat.completions.create(**ask, **extra)
        prompt = reply.model_extra["prompt_filter_results"][0]["content_filter_results"]
        return set(prompt), set(reply.choices[0].model_extra["content_filter_results"])

    try:
        # beside each policy's verdict, the whole set's ("any"), where some policy was checked
        assert verdicts("wide") == ({"toy", "other", "any"}, {"toy", "any"})
        assert verdicts("slim") == ({"other", "any"}, set())
        assert verdicts("wide", extra_body={"guard": {"policies": ["other"]}}) == ({"other", "any"}, set())
        assert verdicts("slim", extra_body={"guard": {"policies": ["other"]}}) == ({"other", "any"}, set())
        slim = openai.OpenAI(base_url=server.url + "/v1", api_key="slim", max_retries=0)
        with pytest.raises(openai.BadRequestError) as caught:  # a set is never widened
            slim.chat.completions.create(**ask, extra_body={"guard": {"policies": ["toy"]}})
        assert caught.value.body["param"] == "guard.policies"
        assert "policy set 'narrow' allows: ['other']" in caught.value.body["message"]
        # a request is counted as its reply ends, which may be just after the client has it; a sampled
        # reply may end on "length" or "stop", so the count is over reasons. The refused one never ran.
        until(lambda: finishes_by_set(server.url) == {"all": 2, "narrow": 2})
    finally:
        server.stop()


def finishes_by_set(url: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in family.samples:
            if sample.name == "guard_finish_reason_total":
                name = sample.labels["policy_set"]
                counts[name] = counts.get(name, 0) + sample.value
    return counts


def test_a_key_naming_an_undefined_set_fails_loading_without_showing_the_key(setup, tiny_model_dir, tmp_path):
    _directory, policy_file, env = setup
    server = Server(
        "--model", str(tiny_model_dir), "--policy-file", str(policy_file), "--api-key", "s3cret:nosuch",
        env={**env, "GUARD_METRICS_KEY": "ops"}, log=tmp_path / "log", ready=False,
    )  # fmt: skip
    try:
        ready = failed_readiness(server)
        assert ready.status_code == 503
        detailed = httpx.get(server.url + "/readyz", headers={"Authorization": "Bearer ops"}).json()["error"]
        assert "policy sets ['nosuch']" in detailed and "s3cret" not in detailed
    finally:
        server.stop()
