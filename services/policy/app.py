"""The policy server's HTTP face: OpenAI-compatible routes, health, errors.

The model loads in the background after the server starts: ``/healthz`` answers at
once, ``/readyz`` and the chat route answer 503 until the weights are in memory.

With ``upstream_api_key`` set (the key the gateway sends its upstream), every route but
the health checks needs it as a bearer token.

With ``policy_backend = "tinker"`` the same routes sample from Tinker sampling clients
(``services/policy/tinker_engine.py``).

LoRA adapters are loaded and unloaded at run time through vLLM's dynamic LoRA routes
(``POST /v1/load_lora_adapter``, ``POST /v1/unload_lora_adapter``), so the gateway drives
this server and a real vLLM the same way. A chat request whose ``model`` is exactly a
loaded adapter's name is answered with that adapter; any other ``model`` (the base
model's name, an unknown or unloaded name: the gateway may map names) gets the base
model. The ``x-reef-policy-version`` header and the answer's ``model`` say which.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.policy import BASE_VERSION, POLICY_VERSION_HEADER, chat, model, tinker_engine
from services.policy.engine import Engine, PolicyEngine
from services.policy.lora import AdapterError, AdapterNotFoundError, AdapterRegistry, Adapters
from services.policy.metrics import CountRequests, PolicyMetrics
from services.policy.schemas import (
    ChatCompletionRequest,
    LoadLoraAdapterRequest,
    UnloadLoraAdapterRequest,
    error_body,
)
from services.policy.score import CompletionRequest, score
from services.policy.text import TokenTexts
from shared.metrics import METRICS_KEY_REFUSED, MetricsAuth, require_metrics_key
from shared.settings import Settings, hash_api_key

log = logging.getLogger(__name__)

_VERSION_HEADER = POLICY_VERSION_HEADER.encode()


TinkerLoader = Callable[[Settings, str], tinker_engine.TinkerServing]
"""Connects to Tinker for ``policy_backend = "tinker"`` (tests pass one built on fakes)."""


class PolicyState:
    """What the routes share: settings, the loaded model, engine and adapters."""

    def __init__(self, settings: Settings, tinker_load: TinkerLoader | None = None) -> None:
        self.settings = settings
        self.metrics = PolicyMetrics.create()
        self.model_name = (settings.model_name if settings.policy_backend == "tinker"
                           else model.served_name(settings.model_name))
        self.engine: PolicyEngine | None = None
        self.texts: TokenTexts | None = None
        self.adapters: Adapters | None = None
        self.load_error: str | None = None
        self._tinker_load = tinker_load or tinker_engine.load

    async def load(self) -> None:
        """Load the model (or connect to Tinker) on a worker thread; failures are kept
        for ``/readyz``."""
        s = self.settings
        if s.policy_backend == "tinker":
            await self._load_tinker()
            return
        try:
            loaded = await asyncio.to_thread(model.load, s.model_name, s.data_dir,
                                             s.policy_device)
        except (model.ModelNotFoundError, OSError, ValueError, RuntimeError) as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("policy.model_load_failed")
            return
        self.texts = TokenTexts(loaded.tokenizer)
        engine = Engine(loaded.model, loaded.tokenizer, threads=s.policy_threads)
        self.adapters = AdapterRegistry(loaded.model, engine.active, self.model_name)
        self.engine = engine
        self.metrics.ready.set(1)

    async def _load_tinker(self) -> None:
        try:
            serving = await asyncio.to_thread(self._tinker_load, self.settings,
                                              self.model_name)
        except Exception as exc:  # any SDK failure: kept for /readyz
            self.load_error = f"tinker: {type(exc).__name__}: {exc}"
            log.exception("policy.tinker_load_failed")
            return
        self.texts = TokenTexts(serving.engine.tokenizer)
        self.adapters = serving.adapters
        self.engine = serving.engine
        self.metrics.ready.set(1)


class VersionHeader:
    """Adds ``x-reef-policy-version: base`` to every response that did not set its own
    (plain ASGI: streams untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if all(name != _VERSION_HEADER for name, _ in headers):
                    headers.append((_VERSION_HEADER, BASE_VERSION.encode()))
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_header)


class BearerKey:
    """Every route but ``/healthz`` and ``/readyz`` needs ``Authorization: Bearer <key>``
    (``upstream_api_key``, which the gateway sends); a 401 in OpenAI's shape otherwise.
    Compared as SHA-256 digests in constant time."""

    OPEN = frozenset({"/healthz", "/readyz", "/metrics"})
    """``/metrics`` has its own key (``metrics_key``), what Prometheus sends."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self._digest = hash_api_key(key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.OPEN or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        body = orjson.dumps(error_body("Missing or incorrect API key.",
                                       "invalid_request_error", None, "invalid_api_key"))
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
            (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def _allowed(self, scope: Scope) -> bool:
        header = next((v.decode("latin-1") for k, v in scope["headers"]
                       if k == b"authorization"), "")
        if header[:7].lower() != "bearer ":
            return False
        return hmac.compare_digest(hash_api_key(header[7:].strip()), self._digest)


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json",
                    headers=headers)


def _error(status: int, message: str, type_: str, param: str | None = None,
           code: str | None = None) -> Response:
    return _json(error_body(message, type_, param, code), status)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        return _error(400, f"{param or 'request'}: {first.get('msg')}",
                      "invalid_request_error", param)

    @app.exception_handler(chat.BadRequestError)
    async def bad(_: Request, exc: chat.BadRequestError) -> Response:
        return _error(400, str(exc), "invalid_request_error", exc.param, exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), type_)


def create_app(settings: Settings, tinker_load: TinkerLoader | None = None) -> FastAPI:
    """The policy server's ASGI app; the model starts loading when the app starts."""
    require_metrics_key(settings, "the policy server")
    state = PolicyState(settings, tinker_load)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(state.load())
        yield
        loading.cancel()
        if state.engine is not None:
            state.engine.close()

    app = FastAPI(title="Reef policy server", lifespan=lifespan)
    app.state.policy = state
    _install_error_handlers(app)
    _add_routes(app, state)
    app.add_middleware(VersionHeader)
    app.add_middleware(CountRequests, metrics=state.metrics)
    if settings.upstream_api_key is not None:  # the gateway's key for its upstream
        app.add_middleware(BearerKey, key=settings.upstream_api_key.get_secret_value())
    return app


def _add_routes(app: FastAPI, state: PolicyState) -> None:
    @app.get("/healthz")
    async def healthz() -> Response:
        return _json({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        if state.engine is None or state.adapters is None:
            return _json({"status": "failed" if state.load_error else "loading",
                          "error": state.load_error}, 503)
        return _json({"status": "ready", "model": state.model_name,
                      "adapters": [a.name for a in state.adapters]})

    @app.get("/v1/models")
    async def models() -> Response:
        cards = [{"id": state.model_name, "object": "model", "created": 0, "owned_by": "reef",
                  "root": state.model_name, "parent": None}]
        for adapter in state.adapters or ():
            cards.append({"id": adapter.name, "object": "model", "created": adapter.created,
                          "owned_by": "reef", "root": adapter.path,
                          "parent": state.model_name})
        return _json({"object": "list", "data": cards})

    metrics_auth = MetricsAuth(state.settings)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        if not metrics_auth.allows(request.headers.get("authorization")):
            return _error(401, METRICS_KEY_REFUSED, "invalid_request_error",
                          code="invalid_api_key")
        state.metrics.adapters_loaded.set(len(state.adapters or ()))
        return Response(generate_latest(state.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        engine, texts, adapters = state.engine, state.texts, state.adapters
        if engine is None or texts is None or adapters is None:
            return _not_ready(state)
        adapter = adapters.select(req.model)
        job = chat.prepare(req, engine, state.model_name, state.settings.policy_max_new_tokens,
                           adapter)
        headers = {POLICY_VERSION_HEADER: adapter.name if adapter else BASE_VERSION}
        if req.stream:
            return StreamingResponse(chat.stream(job, engine, texts),
                                     media_type="text/event-stream",
                                     headers={"cache-control": "no-cache", **headers})
        return _json(await chat.complete(job, engine, texts, request), headers=headers)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Response:
        engine, adapters = state.engine, state.adapters
        if engine is None or adapters is None:
            return _not_ready(state)
        adapter = adapters.select(req.model)
        body = await score(req, engine, state.model_name, adapter)
        return _json(body, headers={POLICY_VERSION_HEADER: adapter.name if adapter
                                    else BASE_VERSION})

    _add_lora_routes(app, state)


def _not_ready(state: PolicyState) -> Response:
    return _error(503, state.load_error or "the model is still loading",
                  "service_unavailable", code="model_not_ready")


def _add_lora_routes(app: FastAPI, state: PolicyState) -> None:
    """vLLM's dynamic LoRA routes; success is a plain-text sentence, as vLLM answers."""

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(req: LoadLoraAdapterRequest) -> Response:
        if state.adapters is None:
            return _not_ready(state)
        if not req.lora_name or not req.lora_path:
            return _error(400, "Both 'lora_name' and 'lora_path' must be provided.",
                          "invalid_request_error", code="lora_invalid")
        try:
            await state.adapters.load(req.lora_name, req.lora_path, replace=req.load_inplace)
        except AdapterError as exc:
            log.info("policy.lora_load_refused name=%s code=%s", req.lora_name, exc.code)
            state.metrics.adapter_changes.labels("load", "refused").inc()
            return _error(400, str(exc), "invalid_request_error", exc.param, exc.code)
        state.metrics.adapter_changes.labels("load", "ok").inc()
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(req: UnloadLoraAdapterRequest) -> Response:
        if state.adapters is None:
            return _not_ready(state)
        if not req.lora_name:
            return _error(400, "'lora_name' must be provided.", "invalid_request_error",
                          "lora_name", "lora_invalid")
        try:
            state.adapters.unload(req.lora_name)
        except AdapterNotFoundError:
            state.metrics.adapter_changes.labels("unload", "not_found").inc()
            return _error(404, f"The lora adapter '{req.lora_name}' cannot be found.",
                          "not_found_error", "lora_name", "lora_not_found")
        state.metrics.adapter_changes.labels("unload", "ok").inc()
        return PlainTextResponse(
            f"Success: LoRA adapter '{req.lora_name}' removed successfully.")
