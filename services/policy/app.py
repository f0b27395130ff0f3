"""The policy server's HTTP face: OpenAI-compatible routes, health, errors.

The model loads in the background after the server starts: ``/healthz`` answers at
once, ``/readyz`` and the chat route answer 503 until the weights are in memory.

**Closed by default.** Every route but the health checks needs ``upstream_api_key`` (the
key the gateway sends its upstream) as a bearer token; outside ``REEF_PROFILE=dev`` the
server refuses to start without one. Adapter paths are confined to ``data_dir`` (or are
``tinker://`` paths): ``services/policy/paths.py``.

With ``policy_backend = "tinker"`` the same routes sample from Tinker sampling clients
(``services/policy/tinker_engine.py``).

LoRA adapters come from the ``weights`` stream, which every replica follows itself
(``replica.py``; ``policy_follow_weights``), or through vLLM's dynamic LoRA routes
(``POST /v1/load_lora_adapter``, ``POST /v1/unload_lora_adapter``, ``lora_routes.py``),
so a gateway can drive this server and a real vLLM the same way. A chat request whose
``model`` is a loaded adapter's name is answered with that adapter; the base model's name
(as served, or as configured) or no name gets the base model; any other name is a 404
(``model_not_found``), never the base model. The ``x-reef-policy-version`` header and the
answer's ``model`` say which weights answered; ``x-reef-sampling`` says how (what the
logprobs are of, and the effective temperature, top_p, top_k and seed).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.policy import BASE_VERSION, POLICY_VERSION_HEADER, chat, model, tinker_engine
from services.policy.engine import Engine, PolicyEngine
from services.policy.lora import Adapter
from services.policy.lora_routes import add_lora_routes
from services.policy.metrics import CountRequests, PolicyMetrics
from services.policy.middleware import BearerKey, VersionHeader
from services.policy.paths import confine
from services.policy.registry import AdapterNotFoundError, AdapterRegistry, Adapters
from services.policy.replica import Replica
from services.policy.schemas import ChatCompletionRequest, error_response, json_response
from services.policy.score import CompletionRequest, score
from services.policy.text import TokenTexts
from shared.messages import SAMPLING_HEADER
from shared.metrics import METRICS_KEY_REFUSED, MetricsAuth, require_metrics_key
from shared.redis_client import connect
from shared.settings import ConfigError, Settings

log = logging.getLogger(__name__)


TinkerLoader = Callable[[Settings, str], tinker_engine.TinkerServing]
"""Connects to Tinker for ``policy_backend = "tinker"`` (tests pass one built on fakes)."""


def require_upstream_key(settings: Settings) -> None:
    """Outside the dev profile the policy server needs its key (``ConfigError``)."""
    if settings.profile != "dev" and settings.upstream_api_key is None:
        raise ConfigError("upstream_api_key (REEF_UPSTREAM_API_KEY) is not set: the policy "
                          "server would let anyone who reaches it load adapters and chat "
                          "past the gateway; set the key the gateway sends it, or use "
                          "REEF_PROFILE=dev")


class PolicyState:
    """What the routes share: settings, the loaded model, engine, adapters, replica."""

    def __init__(self, settings: Settings, tinker_load: TinkerLoader | None = None) -> None:
        self.settings = settings
        self.metrics = PolicyMetrics.create()
        self.model_name = (settings.model_name if settings.policy_backend == "tinker"
                           else model.served_name(settings.model_name))
        self.engine: PolicyEngine | None = None
        self.texts: TokenTexts | None = None
        self.adapters: Adapters | None = None
        self.replica: Replica | None = None
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
        self.adapters = AdapterRegistry(loaded.model, engine.active, self.model_name,
                                        base_aliases=(s.model_name,))
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

    async def load_adapter(self, name: str, path: str, replace: bool = False) -> Adapter:
        """Load an adapter from a path the server may read (``paths.confine``)."""
        if self.adapters is None:
            raise RuntimeError("the model is not loaded")
        return await self.adapters.load(name, confine(path, self.settings.data_dir), replace)

    def readiness(self) -> tuple[int, dict[str, object]]:
        """``/readyz``'s status and body."""
        if self.engine is None or self.adapters is None:
            return 503, {"status": "failed" if self.load_error else "loading",
                         "error": self.load_error}
        body: dict[str, object] = {"status": "ready", "model": self.model_name,
                                   "adapters": [a.name for a in self.adapters]}
        if self.replica is not None:
            body["replica"] = self.replica.id
            if not self.replica.caught_up:
                return 503, {**body, "status": "catching_up"}
            failing = self.replica.failing()
            if failing:
                return 503, {**body, "status": "adapter_failed", "failed": failing}
        return 200, body


async def _serve(state: PolicyState) -> None:
    """Load the model, then (with ``policy_follow_weights``) follow ``weights``."""
    await state.load()
    if state.adapters is None or not state.settings.policy_follow_weights:
        return
    redis = connect(state.settings)
    state.replica = Replica(state.settings, redis, state.adapters, state.load_adapter,
                            state.metrics)
    try:
        await state.replica.run()
    finally:
        await asyncio.shield(_leave(state.replica, redis))


async def _leave(replica: Replica, redis: aioredis.Redis) -> None:
    await replica.close()
    await redis.aclose()


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        return error_response(400, f"{param or 'request'}: {first.get('msg')}",
                              "invalid_request_error", param)

    @app.exception_handler(chat.BadRequestError)
    async def bad(_: Request, exc: chat.BadRequestError) -> Response:
        return error_response(400, str(exc), "invalid_request_error", exc.param, exc.code)

    @app.exception_handler(AdapterNotFoundError)
    async def unknown_model(_: Request, exc: AdapterNotFoundError) -> Response:
        return error_response(404, f"The model '{exc.args[0]}' does not exist on this "
                                   "server (no adapter of that name is loaded).",
                              "invalid_request_error", "model", "model_not_found")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), type_)


def create_app(settings: Settings, tinker_load: TinkerLoader | None = None) -> FastAPI:
    """The policy server's ASGI app; the model starts loading when the app starts.
    Raises ``ConfigError`` for a configuration it must refuse (no key outside dev)."""
    require_metrics_key(settings, "the policy server")
    require_upstream_key(settings)
    state = PolicyState(settings, tinker_load)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        serving = asyncio.create_task(_serve(state))
        yield
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        if state.engine is not None:
            state.engine.close()

    app = FastAPI(title="Reef policy server", lifespan=lifespan)
    app.state.policy = state
    _install_error_handlers(app)
    _add_routes(app, state)
    add_lora_routes(app, state)
    app.add_middleware(CountRequests, metrics=state.metrics)
    if settings.upstream_api_key is not None:  # the gateway's key for its upstream
        app.add_middleware(BearerKey, key=settings.upstream_api_key.get_secret_value())
    app.add_middleware(VersionHeader)
    return app


def _add_routes(app: FastAPI, state: PolicyState) -> None:
    @app.get("/healthz")
    async def healthz() -> Response:
        return json_response({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        status, body = state.readiness()
        return json_response(body, status)

    @app.get("/v1/models")
    async def models() -> Response:
        cards = [{"id": state.model_name, "object": "model", "created": 0, "owned_by": "reef",
                  "root": state.model_name, "parent": None}]
        for adapter in state.adapters or ():
            cards.append({"id": adapter.name, "object": "model", "created": adapter.created,
                          "owned_by": "reef", "root": adapter.path,
                          "parent": state.model_name})
        return json_response({"object": "list", "data": cards})

    metrics_auth = MetricsAuth(state.settings)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        if not metrics_auth.allows(request.headers.get("authorization")):
            return error_response(401, METRICS_KEY_REFUSED, "invalid_request_error",
                                  code="invalid_api_key")
        state.metrics.adapters_loaded.set(len(state.adapters or ()))
        return Response(generate_latest(state.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)

    _add_model_routes(app, state)


def _add_model_routes(app: FastAPI, state: PolicyState) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        engine, texts, adapters = state.engine, state.texts, state.adapters
        if engine is None or texts is None or adapters is None:
            return not_ready(state)
        adapter = adapters.select(req.model)
        job = chat.prepare(req, engine, state.model_name, state.settings.policy_max_new_tokens,
                           adapter, state.settings.policy_logprobs_mode)
        headers = {POLICY_VERSION_HEADER: adapter.name if adapter else BASE_VERSION,
                   SAMPLING_HEADER: chat.sampling_header(job, engine)}
        if req.stream:
            return StreamingResponse(chat.stream(job, engine, texts),
                                     media_type="text/event-stream",
                                     headers={"cache-control": "no-cache", **headers})
        return json_response(await chat.complete(job, engine, texts, request), headers=headers)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Response:
        engine, adapters = state.engine, state.adapters
        if engine is None or adapters is None:
            return not_ready(state)
        adapter = adapters.select(req.model)
        body = await score(req, engine, state.model_name, adapter)
        return json_response(body, headers={POLICY_VERSION_HEADER: adapter.name if adapter
                                            else BASE_VERSION})


def not_ready(state: PolicyState) -> Response:
    """503: the model is not loaded (yet, or it failed)."""
    return error_response(503, state.load_error or "the model is still loading",
                          "service_unavailable", code="model_not_ready")
