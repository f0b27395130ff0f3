"""A fake LLM judge, served over real HTTP on 127.0.0.1 (OpenAI-compatible and Azure).

Behaviour is set at runtime on the object (``judge.mode = "garbage"``), so one server can
serve a whole test module or a benchmark:

- ``follow_up_aware`` (default): reads the prompt's follow-up section (after
  ``prompts.FOLLOW_UP_HEADING``): a correction ("wrong", "incorrect", "not what") gives
  ``Score: -1``, a thank-you ``Score: 1``, anything else ``Score: 0``.
- ``fixed``: always ``Score: <score>``.
- ``garbage``: text without any score. ``http500``: status 500. ``hang``: sleeps past any
  timeout. ``flaky``: every other call (the 1st, 3rd ...) answers 500, the others as
  ``follow_up_aware``.

Every answer waits ``latency`` seconds first (``asyncio.sleep``: hundreds of requests in
flight cost no threads). Hint requests (``prompts.HINT_SYSTEM``) get ``hint_text``.
Counts: ``calls``, ``hint_calls``, ``azure_calls``, ``in_flight``, ``max_in_flight``; the
judged prompts (the user message) are kept in ``prompts``.

Routes: ``POST /v1/chat/completions`` (``Authorization: Bearer <bearer>`` checked when
``bearer`` is set) and ``POST /openai/deployments/<name>/chat/completions?api-version=...``
(``api-key: <azure_key>`` required).
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

from services.scorer import prompts
from tests.threaded_server import ThreadedServer

CORRECTION_WORDS = ("wrong", "incorrect", "not what", "doesn't work")
THANKS_WORDS = ("thank",)

class FakeJudge:
    """The server, its knobs and what it saw."""

    def __init__(self, port: int, *, azure_key: str = "azure-test-key",
                 bearer: str | None = None) -> None:
        self.port = port
        self.azure_key = azure_key
        self.bearer = bearer
        self.hang_seconds = 60.0
        self.reset()
        app = Starlette(routes=[
            Route("/v1/chat/completions", self._openai, methods=["POST"]),
            Route("/openai/deployments/{deployment}/chat/completions", self._azure,
                  methods=["POST"]),
        ])
        self._http = ThreadedServer(app, port, "fake judge", backlog=4096,
                                    timeout_keep_alive=30)

    def reset(self) -> None:
        """Back to the default behaviour, counters at zero."""
        self.mode = "follow_up_aware"
        self.score = 1
        self.latency = 0.0
        self.prompt_tokens = 100
        self.completion_tokens = 20
        self.hint_text = "Check what the user asked for before answering."
        self.calls = 0
        self.hint_calls = 0
        self.azure_calls = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.prompts: list[str] = []
        self.deployments: list[str] = []

    @property
    def base_url(self) -> str:
        """For ``prm_base_url``."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def azure_endpoint(self) -> str:
        """For ``azure_openai_endpoint``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._http.start()

    def stop(self) -> None:
        self._http.stop()

    async def _openai(self, request: Request) -> Response:
        if self.bearer is not None and (request.headers.get("authorization")
                                        != f"Bearer {self.bearer}"):
            return _error(401, "invalid api key")
        return await self._answer(request)

    async def _azure(self, request: Request) -> Response:
        if request.headers.get("api-key") != self.azure_key:
            return _error(401, "Access denied due to invalid subscription key.")
        if not request.query_params.get("api-version"):
            return _error(404, "Resource not found (no api-version)")
        self.azure_calls += 1
        self.deployments.append(request.path_params["deployment"])
        return await self._answer(request)

    async def _answer(self, request: Request) -> Response:
        body = orjson.loads(await request.body())
        self.calls += 1
        call = self.calls
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.mode == "hang":
                await asyncio.sleep(self.hang_seconds)
            if self.latency:
                await asyncio.sleep(self.latency)
            if self.mode == "http500" or (self.mode == "flaky" and call % 2 == 1):
                return Response(b"Internal Server Error", status_code=500)
            return Response(orjson.dumps(self._completion(body)),
                            media_type="application/json")
        finally:
            self.in_flight -= 1

    def _completion(self, body: dict[str, Any]) -> dict[str, Any]:
        messages = body.get("messages") or []
        system = messages[0].get("content", "") if messages else ""
        user = messages[-1].get("content", "") if messages else ""
        if system == prompts.HINT_SYSTEM:
            self.hint_calls += 1
            text = self.hint_text
        else:
            self.prompts.append(user)
            text = self._verdict_text(user)
        return {"id": f"chatcmpl-judge-{self.calls}", "object": "chat.completion",
                "created": int(time.time()), "model": body.get("model", "fake-judge"),
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": self.prompt_tokens,
                          "completion_tokens": self.completion_tokens,
                          "total_tokens": self.prompt_tokens + self.completion_tokens}}

    def _verdict_text(self, prompt: str) -> str:
        if self.mode == "garbage":
            return "I would rather talk about the weather. Nine out of ten."
        if self.mode == "fixed":
            return f"Fixed verdict.\nScore: {self.score}"
        _, _, follow_up = prompt.partition(prompts.FOLLOW_UP_HEADING)
        follow_up = follow_up.lower()
        if any(w in follow_up for w in CORRECTION_WORDS):
            return "The user corrected the assistant: the answer missed.\nScore: -1"
        if any(w in follow_up for w in THANKS_WORDS):
            return "The user thanked the assistant: the answer helped.\nScore: 1"
        return "Nothing shows whether the answer helped.\nScore: 0"


def _error(status: int, message: str) -> Response:
    return Response(orjson.dumps({"error": {"message": message, "type": "invalid_request_error",
                                            "param": None, "code": str(status)}}),
                    status_code=status, media_type="application/json")
