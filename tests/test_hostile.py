"""What a careless or hostile client sends, through the real server on the tiny model: each case is answered
with the right status, code and ``param``, and the server keeps serving."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import serve

pytestmark = pytest.mark.server
LONG = "word " * 5000  # past the tiny model's 4,096 positions


@pytest.fixture(scope="module")
def plain(setup, tiny_model_dir):
    server = serve(setup, tiny_model_dir, "hostile")
    yield server
    server.stop()


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


def body_for(path: str, model: str, text: str = "hi", **extra) -> dict:
    if path == "/v1/completions":
        return {"model": model, "prompt": text, **extra}
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


@pytest.mark.parametrize(
    ("path", "text", "extra", "param"),
    [
        ("/v1/chat/completions", "hi", {"max_completion_tokens": 0}, "max_completion_tokens"),
        ("/v1/chat/completions", "hi", {"max_tokens": 0}, "max_tokens"),
        ("/v1/completions", "hi", {"max_tokens": 0}, "max_tokens"),
        ("/v1/chat/completions", LONG, {}, "messages"),
        ("/v1/completions", LONG, {}, "prompt"),
        ("/v1/chat/completions", "hi", {"logit_bias": {"abc": 1}}, "logit_bias"),
        ("/v1/chat/completions", "hi", {"logit_bias": {"²": 1}}, "logit_bias"),
        ("/v1/chat/completions", "hi", {"logit_bias": {"9" * 5000: 1}}, "logit_bias"),
        ("/v1/chat/completions", "hi", {"logit_bias": {"299999": 1}}, "logit_bias"),
        ("/v1/chat/completions", "hi", {"logit_bias": {"5": 101}}, "logit_bias"),
        ("/v1/chat/completions", "hi", {"presence_penalty": 2.5}, "presence_penalty"),
        ("/v1/chat/completions", "hi", {"frequency_penalty": -3}, "frequency_penalty"),
        ("/v1/chat/completions", "hi", {"logprobs": True}, "logprobs"),
    ],
)
def test_an_out_of_range_field_is_named_in_param(plain, tiny_model_dir, path, text, extra, param):
    response = post(plain, path, body_for(path, tiny_model_dir.name, text, **extra))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert post(plain, path, body_for(path, tiny_model_dir.name, max_tokens=2)).status_code == 200


def test_a_vanishing_temperature_is_greedy_and_harms_no_other_stream(plain, tiny_model_dir):
    """temperature 1e-300 once made sampling's probabilities NaN and failed every request in flight."""
    model = tiny_model_dir.name

    def stream(body: dict) -> tuple[int, str]:
        with httpx.stream("POST", plain.url + "/v1/chat/completions", json=body, timeout=60) as response:
            lines = [line for line in response.iter_lines() if line]
        return response.status_code, "\n".join(lines)

    bodies = [body_for("/v1/chat/completions", model, f"story {i}", max_tokens=24, stream=True) for i in range(3)]
    tiny = body_for("/v1/chat/completions", model, "story 0", max_tokens=24, temperature=1e-300)
    with ThreadPoolExecutor(4) as pool:
        streams = [pool.submit(stream, body) for body in bodies]
        answer = pool.submit(post, plain, "/v1/chat/completions", tiny)
        results = [s.result() for s in streams]
        vanishing = answer.result()
    assert all(status == 200 and '"error"' not in text and text.endswith("data: [DONE]") for status, text in results)
    assert vanishing.status_code == 200, vanishing.text
    greedy = post(plain, "/v1/chat/completions", {**tiny, "temperature": 0}).json()
    assert vanishing.json()["choices"][0]["message"] == greedy["choices"][0]["message"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (b'"seed": 18446744073709551616', "seed"),
        (b'"seed": -9223372036854775809', "seed"),
        (b'"temperature": 2.5', "temperature"),
        (b'"top_p": 0', "top_p"),
        (b'"top_p": 1e999', None),  # past a float: JSON cannot say infinity, so it is invalid JSON
    ],
)
def test_numbers_out_of_range_are_400s_naming_the_field(plain, tiny_model_dir, extra, param):
    head = b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], ' % tiny_model_dir.name.encode()
    response = raw(plain, head + extra + b"}")
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    assert response.json()["error"]["code"] == ("invalid_json" if param is None else "invalid_request_error")


def test_logit_bias_and_penalties_steer_sampling_as_openais_do(plain, tiny_lm, tiny_model_dir):
    """Served, not ignored: a token biased far above the rest is sampled at every temperature, and penalties
    count what the reply generated so far (two biased tokens alternate once each is penalised)."""
    a, b = (tiny_lm.tokenizer.convert_tokens_to_ids(t) for t in ("Ġthe", "Ġand"))

    def reply(**extra) -> dict:
        response = post(plain, "/v1/chat/completions", body_for("/v1/chat/completions", tiny_model_dir.name, **extra))
        assert response.status_code == 200, response.text
        return response.json()

    forced = reply(max_tokens=6, temperature=1.0, logit_bias={str(a): 100})
    assert forced["choices"][0]["message"]["content"] == tiny_lm.tokenizer.decode([a] * 6)
    penalised = reply(
        max_tokens=4, temperature=0, logit_bias={str(a): 50, str(b): 48}, presence_penalty=2, frequency_penalty=1
    )  # a 50; then a 47 < b 48; then b 45 < a 47; then a 46 > b 45
    assert penalised["choices"][0]["message"]["content"] == tiny_lm.tokenizer.decode([a, b, a, a])


def test_deep_nesting_is_invalid_json(plain):
    response = raw(plain, b'{"model": "x", "messages": ' + b"[" * 10_000 + b"]" * 10_000 + b"}")
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json", response.text


def until(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def raw(server, body: bytes) -> httpx.Response:
    headers = {"content-type": "application/json"}
    return httpx.post(server.url + "/v1/chat/completions", content=body, headers=headers, timeout=60)


def test_contract_details(plain, tiny_model_dir):
    model, chat, legacy = tiny_model_dir.name, "/v1/chat/completions", "/v1/completions"
    # whole-number floats are the integers they are
    assert post(plain, chat, body_for(chat, model, n=1.0, seed=3.0, max_tokens=2.0)).status_code == 200
    # a field of the wrong type is a 400, as OpenAI answers it
    wrong = post(plain, chat, body_for(chat, model, temperature="hot"))
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "temperature"
    # what the spec allows but guard does not support: a clear 400 naming it
    function = post(plain, chat, {"model": model, "messages": [{"role": "function", "content": "x", "name": "f"}]})
    assert function.status_code == 400 and function.json()["error"]["param"] == "messages[0].role"
    null_prompt = post(plain, legacy, {"model": model, "prompt": None})
    assert null_prompt.status_code == 400 and null_prompt.json()["error"]["param"] == "prompt"
    # a legacy completion's max_tokens: null is the default, as omitting it is
    omitted = post(plain, legacy, body_for(legacy, model, "count", temperature=0)).json()
    null = post(plain, legacy, body_for(legacy, model, "count", temperature=0, max_tokens=None)).json()
    assert null["usage"] == omitted["usage"] and omitted["usage"]["completion_tokens"] <= 16
    # system_fingerprint: the model and the probe set, the same for every request on them
    first, second = (post(plain, chat, body_for(chat, model, max_tokens=2)).json() for _ in range(2))
    assert first["system_fingerprint"].startswith("fp_")
    assert first["system_fingerprint"] == second["system_fingerprint"] == omitted["system_fingerprint"]


def test_every_way_a_request_ends_is_counted(setup, tiny_model_dir):
    """A client that goes away, a queue timeout and a full queue each appear in guard_finish_reason_total."""
    flags = ("--max-batch", "1", "--max-waiting", "1", "--queue-timeout", "1")
    server = serve(setup, tiny_model_dir, "ends", *flags)
    long = body_for("/v1/chat/completions", tiny_model_dir.name, "count forever", max_tokens=4000, temperature=0)
    url = server.url + "/v1/chat/completions"
    try:
        with httpx.stream("POST", url, json={**long, "stream": True}, timeout=30) as running:
            lines = running.iter_lines()  # kept: a dropped iterator closes the stream
            next(lines)  # it holds the one slot
            with ThreadPoolExecutor(1) as pool:
                waiting = pool.submit(httpx.post, url, json=long, timeout=30)
                until(lambda: httpx.get(server.url + "/readyz").json()["waiting"] == 1)  # it waits for the slot
                assert httpx.post(url, json=long, timeout=30).status_code == 429
                assert waiting.result().status_code == 503
        cancelled = 'guard_finish_reason_total{policy_set="all",reason="cancelled"}'
        until(lambda: cancelled in httpx.get(server.url + "/metrics").text)
        text = httpx.get(server.url + "/metrics").text
        for reason in ("cancelled", "timeout", "rejected"):  # the stream's client went away; the queue
            assert f'guard_finish_reason_total{{policy_set="all",reason="{reason}"}} 1.0' in text, reason
    finally:
        server.stop()


def test_a_metrics_key_guards_metrics_and_readiness_details(setup, tiny_model_dir):
    directory, policy_file, env = setup
    server = serve((directory, policy_file, {**env, "GUARD_METRICS_KEY": "ops"}), tiny_model_dir, "keyed-metrics")
    try:
        assert httpx.get(server.url + "/metrics").status_code == 401
        assert httpx.get(server.url + "/readyz").json() == {"status": "ready"}
        operator = {"Authorization": "Bearer ops"}
        assert "guard_ready 1.0" in httpx.get(server.url + "/metrics", headers=operator).text
        detail = httpx.get(server.url + "/readyz", headers=operator).json()
        assert detail["status"] == "ready" and detail["fingerprint"] and detail["policies"]
        assert httpx.get(server.url + "/healthz").status_code == 200
    finally:
        server.stop()


def test_a_prompt_longer_than_the_server_prefills_in_time_is_refused_up_front(setup, tiny_model_dir):
    server = serve(setup, tiny_model_dir, "prompt-limit", "--max-prompt-tokens", "64")
    try:
        model = tiny_model_dir.name
        for path, param in (("/v1/chat/completions", "messages"), ("/v1/completions", "prompt")):
            response = post(server, path, body_for(path, model, "word " * 80))
            error = response.json()["error"]
            assert response.status_code == 400 and error["code"] == "prompt_too_long" and error["param"] == param
            assert "at most 64" in error["message"]
        assert (
            post(server, "/v1/chat/completions", body_for("/v1/chat/completions", model, max_tokens=2)).status_code
            == 200
        )
    finally:
        server.stop()
