"""A scripted fake LLM (chat completions) over real HTTP on 127.0.0.1, OpenAI-style and Azure.

Each call takes the next item of ``script`` (or ``default`` when the script is used up):

- a dict: answered as the message content, JSON-encoded (a model's JSON answer);
- a str: answered as the message content as it is (prose, broken JSON ...);
- an int: answered with that HTTP status and an OpenAI-style error body;
- ``"hang"``: no answer for ``hang_seconds``.

Every answer waits ``latency`` seconds first. ``mode = "http500"`` answers 500 to
everything (the script is not consumed).
``reject_response_format`` answers 400 to requests that carry ``response_format``, like an
endpoint without JSON mode. Every request body is kept in ``requests``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.threaded_server import ThreadedServer


class FakeLLM:
    """The server, its script and what it saw."""

    def __init__(self, port: int, *, azure_key: str = "azure-test-key") -> None:
        self.port = port
        self.azure_key = azure_key
        self.hang_seconds = 30.0
        self.reset()
        app = Starlette(routes=[
            Route("/v1/chat/completions", self._openai, methods=["POST"]),
            Route("/openai/deployments/{deployment}/chat/completions", self._azure,
                  methods=["POST"]),
        ])
        self._http = ThreadedServer(app, port, "fake LLM")

    def reset(self) -> None:
        """No script, default behaviour, nothing seen."""
        self.script: list[Any] = []
        self.default: Any = {"diagnosis": "Nothing reusable went wrong.", "skills": []}
        self.mode = "script"
        self.latency = 0.0
        self.reject_response_format = False
        self.requests: list[dict[str, Any]] = []
        self.deployments: list[str] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def azure_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def calls(self) -> int:
        return len(self.requests)

    def start(self) -> None:
        self._http.start()

    def stop(self) -> None:
        self._http.stop()

    async def _openai(self, request: Request) -> Response:
        return await self._answer(request)

    async def _azure(self, request: Request) -> Response:
        if request.headers.get("api-key") != self.azure_key:
            return _error(401, "Access denied due to invalid subscription key.")
        self.deployments.append(request.path_params["deployment"])
        return await self._answer(request)

    async def _answer(self, request: Request) -> Response:
        body = orjson.loads(await request.body())
        self.requests.append(body)
        if self.mode == "http500":
            return _error(500, "internal error")
        if self.reject_response_format and "response_format" in body:
            return _error(400, "response_format is not supported by this model")
        item = self.script.pop(0) if self.script else self.default
        if self.latency:
            await asyncio.sleep(self.latency)
        if item == "hang":
            await asyncio.sleep(self.hang_seconds)
            return _error(504, "too late")
        if isinstance(item, int):
            return _error(item, "scripted error")
        content = item if isinstance(item, str) else orjson.dumps(item).decode()
        return Response(orjson.dumps({
            "id": f"chatcmpl-fake-{self.calls}", "object": "chat.completion",
            "created": int(time.time()), "model": body.get("model", "fake"),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 200, "completion_tokens": 50, "total_tokens": 250}}),
            media_type="application/json")


def _error(status: int, message: str) -> Response:
    return Response(orjson.dumps({"error": {"message": message, "type": "invalid_request_error",
                                            "param": None, "code": str(status)}}),
                    status_code=status, media_type="application/json")
