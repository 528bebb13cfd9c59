"""The Litestar app: thin routes over ``serving``, OpenAI-shaped errors, health, readiness and metrics."""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import msgspec
import redis
from litestar import Controller, Litestar, Request, Response, get, post
from litestar.connection import ASGIConnection
from litestar.exceptions import HTTPException
from litestar.handlers import BaseRouteHandler
from litestar.response import Stream
from litestar.types import ASGIApp, Receive, Scope, Send
from redis.exceptions import RedisError

from guard.capture import Capture, find, give_feedback
from guard.metrics import Metrics
from guard.policy import ALL, PolicySet
from guard.runtime import Runtime, build_runtime, context_window, prompt_limit
from guard.server.errors import APIError, error_body
from guard.server.protocol import ChatCompletionRequest, CompletionRequest, Feedback, Model, ModelList, encoder
from guard.server.serving import Limits, Serving
from guard.settings import Settings
from guard.writer import RedisWriter

log = logging.getLogger(__name__)
_ENDPOINTS = {
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/v1/guard/feedback",
    "/healthz",
    "/readyz",
    "/metrics",
}


def create_app(settings: Settings, runtime_factory: Callable[..., Runtime] = build_runtime) -> Litestar:
    """The app; the model loads in the background after start-up, so /healthz answers while /readyz says 503."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        app.state.serving = None
        app.state.load_error = None
        app.state.runtime = None
        app.state.watcher = None
        task = asyncio.create_task(_load(app, settings, runtime_factory, metrics))
        try:
            yield
        finally:
            task.cancel()
            if app.state.watcher is not None:
                await asyncio.to_thread(app.state.watcher.stop)
            if app.state.serving is not None:
                await asyncio.to_thread(app.state.serving.engine.stop)
                if app.state.serving.writer is not None:
                    await asyncio.to_thread(app.state.serving.writer.stop)

    app = Litestar(
        route_handlers=[OpenAIController, GuardController, HealthController],
        lifespan=[lifespan],
        exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _unexpected},
        request_max_body_size=settings.max_body_bytes,
        middleware=[lambda app: _count_requests(app, metrics)],
        openapi_config=None,
    )
    app.state.settings, app.state.metrics = settings, metrics
    return app


async def _load(app: Litestar, settings: Settings, factory: Callable[..., Runtime], metrics: Metrics) -> None:
    def refused(probe: str, reason: str) -> None:
        metrics.refused.labels(probe, reason).inc()

    try:
        started = time.perf_counter()
        runtime = await asyncio.to_thread(factory, settings, refused)
        loaded = time.perf_counter()
        await asyncio.to_thread(runtime.engine.start)  # compiling the decode step takes a while
        _serve(app, settings, runtime, metrics)
    except Exception as exc:  # reported by /readyz; the process stays up for its logs and probes
        log.exception("loading the model or the probes failed")
        app.state.load_error = str(exc)
        return
    engine = runtime.engine
    log.info(
        "ready: %s (%s, %s) with %d policies; model, policies and probes loaded in %.1f s, engine started in %.1f s",
        engine.lm.name,
        engine.lm.numeric,
        engine.step_state(),
        len(engine.policies),
        loaded - started,
        time.perf_counter() - loaded,
    )


def _serve(app: Litestar, settings: Settings, runtime: Runtime, metrics: Metrics) -> None:
    """What serves once the engine runs: the registry watcher, the serving side, the metrics that read them."""
    engine = runtime.engine

    def changed(policy: str, version: str) -> None:
        metrics.reloads.labels(policy).inc()
        metrics.probe_versions(engine.policies, engine.versions())

    app.state.runtime = runtime
    app.state.watcher = runtime.watcher(settings, on_change=changed)
    app.state.watcher.start()
    metrics.watch_registry(runtime.source.status)
    limits = Limits(
        context_window(settings, engine),
        settings.default_max_tokens,
        settings.queue_timeout,
        settings.request_timeout,
        prompt_limit(settings, engine),
    )
    writer = _writer(settings, metrics)
    capture = _capture(settings, engine, writer)
    serving = Serving(engine, engine.lm.name, limits, metrics, writer, capture, runtime.sets)
    metrics.watch_engine(engine)
    metrics.model_info.labels(engine.lm.name, engine.lm.fingerprint).set(1)
    metrics.probe_versions(engine.policies, engine.versions())
    metrics.ready.set(1)
    app.state.serving = serving  # last: a server with serving set is ready


def _writer(settings: Settings, metrics: Metrics) -> RedisWriter | None:
    """With Redis: where capture records and shadow counts go (short timeouts: a Redis that hangs costs a
    record, never a request)."""
    if not settings.redis_url:
        return None
    return RedisWriter(
        redis.Redis.from_url(settings.redis_url, socket_timeout=1, socket_connect_timeout=1),
        dropped=lambda kind, reason: metrics.dropped.labels(kind, reason).inc(),
        written=lambda kind: metrics.written.labels(kind).inc(),
    )


def _capture(settings: Settings, engine, writer: RedisWriter | None) -> Capture | None:
    if not settings.capture:
        return None
    settings.check_capture()
    tokenizer = engine.lm.tokenizer
    return Capture(
        writer,
        lambda ids: tokenizer.decode(list(ids)),
        redact=settings.capture_redact,
        sample=settings.capture_sample,
        maxlen=settings.capture_maxlen,
        retention=settings.capture_retention,
    )


# -- routes -----------------------------------------------------------------------------------------------
def _bearer(connection: ASGIConnection) -> str:
    header = connection.headers.get("authorization", "")
    return header[7:].strip() if header.lower().startswith("bearer ") else ""


def _authorised(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    keys = connection.app.state.settings.api_key_sets
    if keys and _bearer(connection) not in keys:
        raise APIError(401, "Incorrect or missing API key; send 'Authorization: Bearer <key>'", code="invalid_api_key")


def _policy_set(request: Request, serving: Serving) -> PolicySet:
    """The policy set of the request's API key (``all`` without keys); ``_authorised`` has checked the key."""
    keys = request.app.state.settings.api_key_sets
    return serving.sets[keys[_bearer(request)] if keys else ALL]


def _operator(connection: ASGIConnection) -> bool:
    """Whether the caller may see what the server runs (model fingerprint, policies, versions, metrics)."""
    key = connection.app.state.settings.metrics_key
    return not key or hmac.compare_digest(_bearer(connection), key)


def _serving(request: Request) -> Serving:
    serving = request.app.state.serving
    if serving is None:
        reason = "loading failed; /readyz and the server log say why" if request.app.state.load_error else "loading"
        raise APIError(503, f"not ready: {reason}", code="not_ready", headers={"Retry-After": "5"})
    return serving


class OpenAIController(Controller):
    path = "/v1"
    guards = (_authorised,)

    @post("/chat/completions", status_code=200)
    async def chat_completions(self, request: Request) -> Response:
        serving = _serving(request)
        body = await _decode(request, ChatCompletionRequest)
        return await _answer(body, _policy_set(request, serving), serving.chat_stream, serving.chat)

    @post("/completions", status_code=200)
    async def completions(self, request: Request) -> Response:
        serving = _serving(request)
        body = await _decode(request, CompletionRequest)
        return await _answer(body, _policy_set(request, serving), serving.completion_stream, serving.completion)

    @get("/models")
    async def models(self, request: Request) -> Response:
        serving = _serving(request)
        return _json(ModelList([Model(serving.model_name, created=0)]))


def _admin(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    key = connection.app.state.settings.admin_key
    if not key or not hmac.compare_digest(_bearer(connection), key):
        detail = "send 'Authorization: Bearer <admin key>'" if key else "none is configured (GUARD_ADMIN_KEY)"
        raise APIError(401, f"feedback needs the admin key: {detail}", code="invalid_api_key")


class GuardController(Controller):
    """guard's own endpoints, beside the OpenAI ones."""

    path = "/v1/guard"
    guards = (_admin,)

    @post("/feedback", status_code=200)
    async def feedback(self, request: Request) -> Response:
        """A person's label on a captured request: ``{"id", "policy", "label": 0 | 1, "note"}``."""
        serving = _serving(request)
        body = await _decode(request, Feedback)
        if body.policy not in serving.policy_names:
            raise APIError(
                400, f"unknown policy {body.policy!r}; configured: {sorted(serving.policy_names)}", param="policy"
            )
        if body.label not in (0, 1):
            raise APIError(400, "'label' must be 0 (acceptable) or 1 (violating)", param="label")
        if serving.capture is None:
            raise APIError(
                400, "feedback labels captured requests, and capture is off (--capture)", code="capture_disabled"
            )
        client = serving.capture.client
        try:
            record = await asyncio.to_thread(find, client, body.id)
            if record is None:
                raise APIError(
                    404,
                    f"no captured request {body.id!r} (not captured, or past retention)",
                    param="id",
                    code="not_found",
                )
            entry = await asyncio.to_thread(give_feedback, client, record, body.policy, body.label, body.note)
        except RedisError:
            raise APIError(
                503, "the capture store (Redis) is unavailable", code="unavailable", headers={"Retry-After": "5"}
            ) from None
        return Response({"id": body.id, "policy": body.policy, "label": body.label, "stage": entry["stage"]})


class HealthController(Controller):
    @get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @get("/readyz")
    async def readyz(self, request: Request) -> Response:
        """Ready or not; with the metrics key (when one is set), also what is served and why loading failed."""
        serving = request.app.state.serving
        if not _operator(request):
            status = "ready" if serving else "failed" if request.app.state.load_error else "loading"
            return Response({"status": status}, status_code=200 if serving else 503)
        if serving is None:
            detail = {
                "status": "failed" if request.app.state.load_error else "loading",
                "error": request.app.state.load_error,
            }
            return Response(detail, status_code=503)
        engine = serving.engine
        return Response(
            {
                "status": "ready",
                "model": engine.lm.name,
                "fingerprint": engine.lm.fingerprint,
                "policies": engine.versions(),
                "shadows": engine.shadows(),
                "directions": engine.directions(),
                "registry": request.app.state.runtime.source.status.as_dict(),
                "decode": engine.step_state(),
                **engine.load(),
            }
        )

    @get("/metrics")
    async def metrics(self, request: Request) -> Response:
        if not _operator(request):
            raise APIError(401, "/metrics needs the metrics key: 'Authorization: Bearer <key>'", code="invalid_api_key")
        return Response(request.app.state.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")


# -- request decoding and responses ------------------------------------------------------------------------
_PATH = re.compile(r"at `\$\.?([^`]*)`")
_INTEGERS = ("n", "seed", "max_tokens", "max_completion_tokens")
T = TypeVar("T")


async def _decode(request: Request, kind: type[T]) -> T:
    raw = await request.body()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not valid UTF-8", code="invalid_encoding") from None
    try:
        document = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
    if not isinstance(document, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    unknown = set(document) - set(kind.__struct_fields__)
    if unknown:
        log.info("ignoring unknown request fields %s", sorted(unknown))
    for name in _INTEGERS:  # 1.0 is the integer 1, as JSON does not tell them apart
        value = document.get(name)
        if isinstance(value, float) and value.is_integer():
            document[name] = int(value)
    try:
        return msgspec.convert(document, kind)
    except msgspec.ValidationError as exc:  # 400, as OpenAI answers a field of the wrong type
        match = _PATH.search(str(exc))
        raise APIError(400, str(exc), code="invalid_value", param=match.group(1) if match else None) from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None


async def _answer(
    body: ChatCompletionRequest | CompletionRequest, allowed: PolicySet, stream: Callable, whole: Callable
) -> Response:
    if body.stream:
        return Stream(
            await stream(body, allowed),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
            status_code=200,
        )
    return _json(await whole(body, allowed))


def _json(payload: msgspec.Struct) -> Response:
    return Response(encoder.encode(payload), media_type="application/json", status_code=200)


def _error_response(status: int, body: msgspec.Struct, headers: dict[str, str] | None = None) -> Response:
    return Response(encoder.encode(body), media_type="application/json", status_code=status, headers=headers)


def _api_error(_: Request, exc: APIError) -> Response:
    return _error_response(exc.status, exc.body(), exc.headers)


def _http_error(_: Request, exc: HTTPException) -> Response:
    status = exc.status_code
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(status, "http_error")
    message = "the request body is too large" if status == 413 else str(exc.detail)
    return _error_response(status, error_body(status, message, code=code))


def _unexpected(_: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return _error_response(500, error_body(500, "internal server error", code="internal_error"))


def _count_requests(app: ASGIApp, metrics: Metrics) -> ASGIApp:
    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in _ENDPOINTS else "other"

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await app(scope, receive, counting_send)

    return middleware
