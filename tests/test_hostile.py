"""What a careless or hostile client sends, through the real server on the tiny model: each case is answered
with the right status, code and ``param``, and the server keeps serving."""

from __future__ import annotations

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
    ],
)
def test_an_out_of_range_field_is_named_in_param(plain, tiny_model_dir, path, text, extra, param):
    response = post(plain, path, body_for(path, tiny_model_dir.name, text, **extra))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert post(plain, path, body_for(path, tiny_model_dir.name, max_tokens=2)).status_code == 200
