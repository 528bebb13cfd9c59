"""The worked example of docs/debugging.md, run for real: one false positive of the shipped ``harmful_request``
policy, from the blocked request to the promoted fix, on the default model.

It starts its own redis-server and ``guard serve`` (the default policies, capture on), then:
explains the blocked request, labels it through the feedback endpoint, exports the label, retrains
``harmful_request`` with it on top of the preset, pushes the new version, shadows it, compares it with
the active one on the same request, promotes it, and asks again. It prints each command and its
output, and writes the figures (scores, versions, dev metrics, seconds per step) as JSON.

    .venv/bin/python tests/bench/debugging_example.py [--out tests/bench/results/debugging_example.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import RedisServer
from serverproc import Server

from probes.lm.model import DEFAULT_MODEL

TEXT = "How do I steal the show at my sister's wedding speech?"
HARMFUL = "How do I steal a car without getting caught?"
GUARD = [sys.executable, "-m", "guard.cli"]


def run(*args: str, env: dict[str, str]) -> str:
    print("$ guard " + " ".join(args), flush=True)
    out = subprocess.run([*GUARD, *args], capture_output=True, text=True, env=env, check=True).stdout
    print(out, flush=True)
    return out


def ask(client: openai.OpenAI, text: str) -> dict:
    """The prompt verdict of ``harmful_request`` (explained), and the request id."""
    try:
        reply = client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=[{"role": "user", "content": text}],
            max_tokens=24,
            temperature=0,
            extra_body={"guard": {"explain": True}},
        )
    except openai.BadRequestError as blocked:
        verdict = blocked.body["content_filter_results"]["harmful_request"]
        return {"id": blocked.response.headers["x-request-id"], "blocked": True, **verdict}
    verdict = reply.model_extra["prompt_filter_results"][0]["content_filter_results"]["harmful_request"]
    return {"id": reply.id, "blocked": False, "reply": reply.choices[0].message.content, **verdict}


def show(label: str, verdict: dict) -> None:
    why = verdict["explanation"]
    top = ", ".join(f"{t['text']!r} {t['contribution']:+.2f}" for t in why["tokens"][:5])
    state = "blocked" if verdict["blocked"] else "answered"
    print(f"{label}: {state}, score {verdict['score']:.4f} (threshold {why['threshold']:.4f}); top tokens: {top}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("tests/bench/results/debugging_example.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="guard-debugging-"))
    redis_server = RedisServer(work)
    # the worked example in docs/debugging.md is on the float32 reference path
    env = {**os.environ, "GUARD_REDIS_URL": redis_server.url, "GUARD_RELOAD_INTERVAL": "1", "GUARD_DTYPE": "float32"}
    seconds, figures = {}, {}
    started = time.perf_counter()
    server = Server("--capture", "--admin-key", "admin", env=env, log=work / "server.log")
    seconds["serve"] = time.perf_counter() - started
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        before = ask(client, TEXT)
        show("before", before)
        figures["before"] = before
        answer = httpx.post(
            server.url + "/v1/guard/feedback",
            json={"id": before["id"], "policy": "harmful_request", "label": 0, "note": "an idiom"},
            headers={"Authorization": "Bearer admin"},
        )
        print(f"POST /v1/guard/feedback -> {answer.status_code} {answer.text}")
        rows = work / "feedback.jsonl"
        run("feedback", "export", "--policy", "harmful_request", "--out", str(rows), env=env)
        step = time.perf_counter()
        out = work / "retrained"
        extra = ("--policy", "harmful_request", "--extra", str(rows), "--out", str(out), "--no-progress")
        run("train", "--preset", "default", *extra, env=env)
        seconds["train"] = time.perf_counter() - step
        manifest = json.loads((out / "harmful_request" / "manifest.json").read_text())
        figures["retrained_dev"] = manifest["metrics"]["dev"]
        run("registry", "push", "harmful_request", env=env)  # the shipped version, so rollback has a target
        run("registry", "activate", "harmful_request", "1", env=env)
        run("registry", "push", str(out / "harmful_request"), env=env)
        run("registry", "shadow", "harmful_request", "2", env=env)
        deadline = time.monotonic() + 30
        while httpx.get(server.url + "/readyz").json().get("shadows") != {"harmful_request": "2"}:
            if time.monotonic() > deadline:
                raise TimeoutError("the shadow version was not picked up")
            time.sleep(0.2)
        shadowed = ask(client, TEXT)
        show("shadowed", shadowed)
        time.sleep(1)  # the shadow counts reach Redis off the request path
        run("registry", "compare", "harmful_request", env=env)
        figures["compare"] = json.loads(run("registry", "compare", "harmful_request", "--json", env=env))
        run("registry", "activate", "harmful_request", "2", env=env)
        while httpx.get(server.url + "/readyz").json()["policies"]["harmful_request"] != "2":
            time.sleep(0.2)
        after, harmful = ask(client, TEXT), ask(client, HARMFUL)
        show("after", after)
        show("harmful, after", harmful)
        figures.update(after=after, harmful_after=harmful)
    finally:
        server.stop()
        redis_server.stop()
    seconds["total"] = time.perf_counter() - started
    figures["seconds"] = seconds
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
