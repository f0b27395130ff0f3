"""The chat endpoint as a plain ASGI callable, and the dispatcher in front of FastAPI.

``POST /v1/chat/completions`` is the gateway's hot path, so it skips the framework:
measured here, FastAPI's routing and middleware stack cost ~15% of the gateway's CPU per
request. Every other route (models, health, metrics) stays a FastAPI route.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from services.gateway.auth import Authenticator
from services.gateway.chat import ChatHandler, Reply
from services.gateway.errors import APIError, error_body
from services.gateway.metrics import GatewayMetrics
from services.gateway.request import (
    DEFAULT_LIMITS,
    RequestLimits,
    check_content_type,
    parse_json,
    read_chat_request,
    too_large,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CHAT_PATH = "/v1/chat/completions"
_JSON = (b"content-type", b"application/json")
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]


_NOT_ALLOWED = error_body(405, f"Method not allowed: {CHAT_PATH} takes POST.",
                          code="method_not_allowed")


class ClientGone(Exception):
    """The client disconnected before its request body was read."""


async def read_body(receive: Receive, headers: dict[str, str], limit: int) -> bytes:
    """The request body, or a 413 as soon as it is known to exceed ``limit`` bytes."""
    length = headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body"):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def send_whole(send: Send, status: int, body: bytes,
                     headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [_JSON, (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


class ChatEndpoint:
    """ASGI handler of ``POST /v1/chat/completions``."""

    def __init__(self, auth: Authenticator, chat: ChatHandler, metrics: GatewayMetrics,
                 max_body_bytes: int, model_map: dict[str, str],
                 limits: RequestLimits = DEFAULT_LIMITS) -> None:
        self._auth = auth
        self._limits = limits
        self._chat = chat
        self._metrics = metrics
        self._limit = max_body_bytes
        self._model_map = model_map

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            caller = self._auth(headers)
            check_content_type(headers)
            raw = await read_body(receive, headers, self._limit)
            body = parse_json(raw, self._limits.max_json_depth)
            chat = read_chat_request(body, headers, caller.tenant, caller.key_hash,
                                     self._model_map, self._limits)
            reply = await self._chat(chat, caller.tenant, started, raw)
        except APIError as err:
            self._metrics.requests.labels("unknown", str(err.status)).inc()
            extra = [(k.lower().encode(), v.encode()) for k, v in (err.headers or {}).items()]
            await send_whole(send, err.status,
                             error_body(err.status, err.message, err.code, err.param), extra)
            return
        except ClientGone:
            return
        session = [(b"x-reef-session-id", reply.session_id.encode())]
        if reply.events is None:
            await send_whole(send, 200, reply.body, session)
            return
        try:
            await self._stream(reply, receive, send, session)
        finally:
            self._chat.release(reply)

    @staticmethod
    async def _stream(reply: Reply, receive: Receive, send: Send,
                      headers: list[tuple[bytes, bytes]]) -> None:
        """Send events as they come; if the client goes away, stop (and so the upstream)."""
        events = reply.events
        assert events is not None

        async def pump() -> None:
            try:
                await send({"type": "http.response.start", "status": 200,
                            "headers": [*_SSE_HEADERS, *headers]})
                async for event in events:
                    await send({"type": "http.response.body", "body": event,
                                "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            except OSError:
                pass  # the client is gone; closing the events below stops the upstream
            finally:
                await events.aclose()  # type: ignore[attr-defined]

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        pumping = asyncio.ensure_future(pump())
        watching = asyncio.ensure_future(disconnected())
        await asyncio.wait((pumping, watching), return_when=asyncio.FIRST_COMPLETED)
        pumping.cancel()
        watching.cancel()
        await asyncio.gather(pumping, watching, return_exceptions=True)


def dispatch(chat: ChatEndpoint, api: ASGIApp) -> ASGIApp:
    """An ASGI app sending the chat route to ``chat`` and everything else to ``api``."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == CHAT_PATH:
            if scope["method"] == "POST":
                await chat(scope, receive, send)
            else:
                await send_whole(send, 405, _NOT_ALLOWED, [(b"allow", b"POST")])
        else:
            await api(scope, receive, send)

    return app
