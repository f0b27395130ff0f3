"""The gateway's HTTP app: OpenAI-compatible endpoints, health, metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

import orjson
import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from services.gateway.adapters import AdapterRouter
from services.gateway.admin import AdminAuth, add_admin_routes
from services.gateway.auth import Authenticator, check_metrics
from services.gateway.chat import ChatHandler
from services.gateway.dashboard import add_dashboard_routes
from services.gateway.endpoint import ASGIApp, ChatEndpoint, dispatch
from services.gateway.errors import APIError, error_response, upstream_error
from services.gateway.feedback import FEEDBACK_PATH, FeedbackHandler
from services.gateway.metrics import GatewayMetrics
from services.gateway.openapi import install_openapi
from services.gateway.recorder import Recorder
from services.gateway.request import RequestLimits
from services.gateway.skills import SkillInjector
from services.gateway.upstream import Upstream
from shared.keys import Keys
from shared.metrics import MetricsAuth, require_metrics_key
from shared.redis_client import connect
from shared.settings import Settings


@dataclass
class Gateway:
    """Everything one gateway process holds; built in the app's lifespan."""

    settings: Settings
    metrics: GatewayMetrics
    auth: Authenticator
    redis: aioredis.Redis
    upstream: Upstream
    recorder: Recorder
    router: AdapterRouter
    chat: ChatHandler
    skills: SkillInjector | None = None
    """Present when ``use_skills`` is on."""


def build_gateway(settings: Settings, metrics: GatewayMetrics | None = None) -> Gateway:
    """Wire the gateway's parts (nothing started yet)."""
    metrics = metrics or GatewayMetrics.create()
    redis = connect(settings)
    upstream = Upstream(settings, metrics)
    recorder = Recorder(redis, Keys(settings.namespace), settings.resolved_spool_path(),
                        metrics, settings.resolved_stream_hard_maxlen(),
                        settings.dedupe_ttl_seconds,
                        settings.recorder_batch_size,
                        session_ttl=settings.feedback_window_seconds)
    router = AdapterRouter(settings, redis, upstream, metrics)
    skills = SkillInjector(settings, redis, metrics) if settings.use_skills else None
    return Gateway(settings, metrics, Authenticator(settings), redis, upstream, recorder,
                   router, ChatHandler(settings, upstream, recorder, metrics, router, skills),
                   skills)


def create_app(settings: Settings, metrics: GatewayMetrics | None = None) -> ASGIApp:
    """The gateway as an ASGI app: the chat endpoint in front of a FastAPI app."""
    require_metrics_key(settings, "the gateway")
    gw = build_gateway(settings, metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await gw.upstream.start()
        gw.recorder.start()
        gw.router.start()
        if gw.skills is not None:
            gw.skills.start()
        try:
            yield
        finally:
            if gw.skills is not None:
                await gw.skills.close()
            await gw.router.close()
            await gw.recorder.close()
            await gw.upstream.close()
            await gw.redis.aclose()

    app = FastAPI(title="Reef gateway", version="0.1.0", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gw
    _add_error_handlers(app)
    _add_routes(app, gw)
    add_admin_routes(app, settings, gw.redis, gw.metrics.registry)
    install_openapi(app, RequestLimits.of(settings), _client_or_admin(gw.auth, settings))
    add_dashboard_routes(app, settings, gw.redis, gw.router)
    chat = ChatEndpoint(gw.auth, gw.chat, gw.metrics, settings.max_body_bytes,
                        settings.model_map, RequestLimits.of(settings))
    return dispatch(chat, app)


def _add_routes(app: FastAPI, gw: Gateway) -> None:
    feedback = FeedbackHandler(gw.auth, gw.redis, Keys(gw.settings.namespace), gw.recorder,
                               gw.settings)

    @app.post(FEEDBACK_PATH)
    async def post_feedback(request: Request) -> Response:
        return await feedback(request)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        caller = gw.auth(request.headers)
        names = gw.settings.served_model_names or list(gw.settings.model_map)
        if names:
            data = [{"id": n, "object": "model", "created": 0, "owned_by": "reef"}
                    for n in names]
            return Response(orjson.dumps({"object": "list", "data": data}),
                            media_type="application/json")
        resp = await gw.upstream.request("GET", "/models")
        try:
            raw = await resp.read()
        finally:
            resp.release()
        if resp.status >= 400:
            raise upstream_error(resp.status, raw)
        return Response(gw.router.visible_models(raw, caller.tenant),
                        media_type="application/json")

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    @app.get("/readyz")
    async def readyz() -> Response:
        redis_ok = await _redis_ok(gw.redis)
        body = {"status": "ok", "redis": redis_ok, "spooling": gw.recorder.spooling}
        # Redis down does not make the gateway unready: turns go to the spool.
        return Response(orjson.dumps(body), media_type="application/json")

    metrics_auth = MetricsAuth(gw.settings)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        check_metrics(metrics_auth, request.headers)
        return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _client_or_admin(auth: Authenticator, settings: Settings
                     ) -> Callable[[Mapping[str, str]], None]:
    """A check passing an inference key or an admin key (the API's description is for
    both), raising the inference check's 401 otherwise."""
    admin = AdminAuth(settings)

    def check(headers: Mapping[str, str]) -> None:
        try:
            auth(headers)
        except APIError:
            try:
                admin(headers)
            except APIError:
                pass
            else:
                return
            raise

    return check


async def _redis_ok(redis: aioredis.Redis) -> bool:
    try:
        return bool(await asyncio.wait_for(redis.ping(), 0.5))
    except (RedisError, OSError, TimeoutError):
        return False


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> Response:
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> Response:
        return error_response(APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return error_response(APIError(400, str(first.get("msg", "invalid request")),
                                       code="invalid_value", param=param))
