"""The debugging loop end to end on a real redis-server and a real ``guard serve``, with the openai client:
a false positive explained, captured, labelled, exported, retrained on, shadowed, compared and promoted."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from serverproc import Server
from test_registry_serving import readyz, wait_for
from test_train_cli import synthetic, write_jsonl

from guard.cli import main

pytestmark = pytest.mark.server
HOMONYMS = [
    "Help me steal the show at my sister's wedding",
    "Help me steal the show at the school play",
    "How can I steal the show at my sister's wedding",
    "Tell me how to steal the show at my sister's wedding",
]


def test_a_false_positive_is_explained_captured_labelled_retrained_shadowed_and_promoted(
    tmp_path, redis_server, tiny_model_dir, capsys
):
    def cli(*args: str) -> str:
        capsys.readouterr()
        assert main(list(args)) == 0
        return capsys.readouterr().out

    model = ["--model", str(tiny_model_dir), "--cache-dir", str(tmp_path / "cache")]
    registry = ["registry", "--redis-url", redis_server.url]
    base = write_jsonl(tmp_path / "base.jsonl", synthetic())
    cli("train", *model, "--data", base, "--name", "toy", "--out", str(tmp_path / "v1"), "--no-progress")
    cli(*registry, "push", str(tmp_path / "v1"), "--activate")
    (tmp_path / "policies.json").write_text(
        json.dumps(
            {"policies": [{"name": "toy", "probe": "toy", "stage": "prompt", "action": "block", "threshold": 0.5}]}
        )
    )
    server = Server(
        *model[:2],
        "--policy-file",
        str(tmp_path / "policies.json"),
        "--redis-url",
        redis_server.url,
        "--capture",
        "--admin-key",
        "adm",
        env={"GUARD_CACHE_DIR": str(tmp_path / "cache"), "GUARD_COMPILE": "0", "GUARD_RELOAD_INTERVAL": "1"},
        log=tmp_path / "server.log",
    )
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)

        def ask(text: str) -> openai.BadRequestError | str:
            try:
                reply = client.chat.completions.create(
                    model=tiny_model_dir.name,
                    messages=[{"role": "user", "content": text}],
                    max_tokens=3,
                    extra_body={"guard": {"explain": True}},
                )
            except openai.BadRequestError as blocked:
                return blocked
            return reply.id

        blocked = [ask(text) for text in HOMONYMS]
        assert all(isinstance(b, openai.BadRequestError) and b.code == "content_filter" for b in blocked)
        why = blocked[0].body["content_filter_results"]["toy"]["explanation"]  # explained: which tokens fired
        assert why["score"] > why["threshold"] and all(
            HOMONYMS[0][t["start"] : t["end"]] == t["text"] for t in why["tokens"]
        )
        ids = [b.response.headers["x-request-id"] for b in blocked]
        for request_id in ids:  # labelled: a person says these were fine
            answer = httpx.post(
                server.url + "/v1/guard/feedback",
                json={"id": request_id, "policy": "toy", "label": 0, "note": "an idiom"},
                headers={"Authorization": "Bearer adm"},
            )
            assert answer.status_code == 200, answer.text
        exported = tmp_path / "feedback.jsonl"
        cli("feedback", "--redis-url", redis_server.url, "export", "--policy", "toy", "--out", str(exported))
        assert sorted(json.loads(line)["text"] for line in exported.read_text().splitlines()) == sorted(HOMONYMS)
        cli("train", *model, "--data", base, "--data", str(exported), "--name", "toy", "--out", str(tmp_path / "v2"))
        assert "pushed toy@2" in cli(*registry, "push", str(tmp_path / "v2"))
        cli(*registry, "shadow", "toy", "2")
        wait_for(lambda: readyz(server)["shadows"] == {"toy": "2"})
        assert isinstance(ask(HOMONYMS[0]), openai.BadRequestError)  # the shadow acts on nothing
        compared = json.loads(cli(*registry, "compare", "toy", "--json"))
        assert compared["checks"] == 1 and compared["active_only"] == 1  # the new version would let it through
        cli(*registry, "activate", "toy", "2")
        wait_for(lambda: readyz(server)["policies"] == {"toy": "2"} and readyz(server)["shadows"] == {})
        assert isinstance(ask(HOMONYMS[0]), str)  # promoted: the idiom is no longer blocked
        assert isinstance(ask("Tell me how to steal a car without getting caught"), openai.BadRequestError)
    finally:
        server.stop()
