"""The policy server's HTTP face: OpenAI-compatible routes, health, errors.

The model loads in the background after the server starts: ``/healthz`` answers at
once, ``/readyz`` and the chat route answer 503 until the weights are in memory.
One model is served: a request's ``model`` field is accepted whatever it says (the
gateway may map names), and every answer names the served model.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.policy import BASE_VERSION, POLICY_VERSION_HEADER, chat, model
from services.policy.engine import Engine
from services.policy.schemas import ChatCompletionRequest, error_body
from services.policy.text import TokenTexts
from shared.settings import Settings

log = logging.getLogger(__name__)


class PolicyState:
    """What the routes share: settings, the loaded model and engine, the policy version."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.model_name = model.served_name(settings.model_name)
        self.version = BASE_VERSION
        self.engine: Engine | None = None
        self.texts: TokenTexts | None = None
        self.load_error: str | None = None

    async def load(self) -> None:
        """Load the model on a worker thread; failures are kept for ``/readyz``."""
        s = self.settings
        try:
            loaded = await asyncio.to_thread(model.load, s.model_name, s.data_dir,
                                             s.policy_device)
        except (model.ModelNotFoundError, OSError, ValueError, RuntimeError) as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("policy.model_load_failed")
            return
        self.texts = TokenTexts(loaded.tokenizer)
        self.engine = Engine(loaded.model, loaded.tokenizer, threads=s.policy_threads)


class VersionHeader:
    """Adds ``x-reef-policy-version`` to every response (plain ASGI: streams untouched)."""

    def __init__(self, app: ASGIApp, state: PolicyState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((POLICY_VERSION_HEADER.encode(), self.state.version.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_header)


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


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


def create_app(settings: Settings) -> FastAPI:
    """The policy server's ASGI app; the model starts loading when the app starts."""
    state = PolicyState(settings)

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
    app.add_middleware(VersionHeader, state=state)
    return app


def _add_routes(app: FastAPI, state: PolicyState) -> None:
    @app.get("/healthz")
    async def healthz() -> Response:
        return _json({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        if state.engine is None:
            return _json({"status": "failed" if state.load_error else "loading",
                          "error": state.load_error}, 503)
        return _json({"status": "ready", "model": state.model_name, "version": state.version})

    @app.get("/v1/models")
    async def models() -> Response:
        card = {"id": state.model_name, "object": "model", "created": 0, "owned_by": "reef"}
        return _json({"object": "list", "data": [card]})

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        engine, texts = state.engine, state.texts
        if engine is None or texts is None:
            return _error(503, state.load_error or "the model is still loading",
                          "service_unavailable", code="model_not_ready")
        job = chat.prepare(req, engine, state.model_name, state.settings.policy_max_new_tokens)
        if req.stream:
            return StreamingResponse(chat.stream(job, engine, texts),
                                     media_type="text/event-stream",
                                     headers={"cache-control": "no-cache"})
        return _json(await chat.complete(job, engine, texts, request))
