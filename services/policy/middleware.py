"""The policy server's ASGI middleware: the version header every answer carries, and the
bearer key every route but the health checks needs."""

from __future__ import annotations

import hmac

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.policy import BASE_VERSION, POLICY_VERSION_HEADER
from services.policy.schemas import error_body
from shared.settings import hash_api_key

_VERSION_HEADER = POLICY_VERSION_HEADER.encode()


class VersionHeader:
    """Adds ``x-reef-policy-version: base`` to every response that did not set its own
    (plain ASGI: streams untouched). It is the outermost layer, so a 401 carries it too:
    the header is also how a gateway (``upstream_kind = "auto"``) recognises a Reef policy
    server."""

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
