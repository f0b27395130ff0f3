"""A fake OpenAI-compatible upstream, served over real HTTP on 127.0.0.1.

The model name picks the behaviour, so one server covers every case:
``fake-text`` (default), ``fake-tools`` (a tool call, streamed in pieces),
``fake-reasoning``, ``fake-slow`` (chunks 0.3 s apart), ``fake-400``, ``fake-500``,
``fake-hang`` (never answers), ``fake-garbage`` (invalid JSON); a loaded LoRA adapter
whose path holds ``slow`` streams like ``fake-slow``. Every request body
received is kept in ``requests``; cancelled streams are counted in ``disconnects``.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import orjson
from fastapi import FastAPI, Request
from starlette.responses import Response, StreamingResponse

from tests.threaded_server import ThreadedServer

_IDS = itertools.count()
"""Completion ids are unique (``chatcmpl-fake-<n>``), as a real upstream's are: feedback
names answers by them."""
TEXT_PIECES = ["Hello", ", this", " is", " Reef's", " fake", " upstream."]
TOOL_CALL = {"id": "call_abc123", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}


def _chunk(rid: str, model: str, delta: dict[str, Any], finish: str | None = None,
           extra: dict[str, Any] | None = None) -> bytes:
    choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
    choice.update(extra or {})
    return b"data: " + orjson.dumps({"id": rid, "object": "chat.completion.chunk",
                                     "created": 1, "model": model,
                                     "choices": [choice]}) + b"\n\n"

class FakeUpstream:
    """The server and what it saw."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.requests: list[dict[str, Any]] = []
        self.disconnects = 0
        self.adapters: dict[str, str] = {}
        """Loaded LoRA adapters, name -> path (vLLM's dynamic LoRA endpoints)."""
        self.adapter_calls: list[tuple[str, str]] = []
        self.refuse_loads = 0
        """The next this many loads fail with a 503 (a server that is busy, or restarting)."""
        self.app = self._build()
        self._http = ThreadedServer(self.app, port, "fake upstream",
                                    timeout_graceful_shutdown=None)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        self._http.start()

    def stop(self) -> None:
        self._http.stop()

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v1/models")
        async def models() -> Response:
            loaded = [{"id": name, "object": "model", "created": 0, "owned_by": "fake",
                       "parent": "fake-text"} for name in self.adapters]  # as vLLM lists LoRAs
            return Response(orjson.dumps({"object": "list", "data": [
                {"id": "fake-text", "object": "model", "created": 0, "owned_by": "fake"},
                *loaded]}), media_type="application/json")

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            body = orjson.loads(await request.body())
            self.requests.append(body)
            response = await self._answer(body)
            if body.get("model") in self.adapters:
                response.headers["x-reef-policy-version"] = body["model"]
            return response

        @app.post("/v1/load_lora_adapter")
        async def load(request: Request) -> Response:
            body = orjson.loads(await request.body())
            self.adapter_calls.append(("load", body["lora_name"]))
            if self.refuse_loads > 0:
                self.refuse_loads -= 1
                return Response(b"Service Unavailable", status_code=503)
            if body["lora_name"] in self.adapters:
                return Response(b"The lora adapter is already loaded.", status_code=400)
            if "missing" in body["lora_path"]:
                return Response(b"No adapter found.", status_code=400)
            self.adapters[body["lora_name"]] = body["lora_path"]
            return Response(b"Success: LoRA adapter added successfully.")

        @app.post("/v1/unload_lora_adapter")
        async def unload(request: Request) -> Response:
            body = orjson.loads(await request.body())
            self.adapter_calls.append(("unload", body["lora_name"]))
            self.adapters.pop(body["lora_name"], None)
            return Response(b"Success: LoRA adapter removed successfully.")

        return app

    async def _answer(self, body: dict[str, Any]) -> Response:
        model = body.get("model", "fake-text")
        if model == "fake-400":
            return Response(orjson.dumps({"error": {"message": "bad temperature",
                                                    "type": "invalid_request_error",
                                                    "param": "temperature", "code": None}}),
                            status_code=400, media_type="application/json")
        if model == "fake-500":
            return Response(b"Internal Server Error", status_code=500)
        if model == "fake-hang":
            await asyncio.sleep(3600)
        if model == "fake-garbage":
            return Response(b"{not json", media_type="application/json")
        if body.get("stream"):
            return StreamingResponse(self._stream(body), media_type="text/event-stream")
        return Response(orjson.dumps(self._whole(body)), media_type="application/json")

    @staticmethod
    def _whole(body: dict[str, Any]) -> dict[str, Any]:
        model = body["model"]
        message: dict[str, Any] = {"role": "assistant", "content": "".join(TEXT_PIECES)}
        finish = "stop"
        if model == "fake-tools":
            message = {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]}
            finish = "tool_calls"
        if model == "fake-reasoning":
            message["reasoning_content"] = "Think first."
        choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish}
        data: dict[str, Any] = {"id": f"chatcmpl-fake-{next(_IDS)}",
                                "object": "chat.completion", "created": 1,
                                "model": model, "choices": [choice],
                                "usage": {"prompt_tokens": 7, "completion_tokens": 6,
                                          "total_tokens": 13}}
        if body.get("logprobs"):
            choice["logprobs"] = {"content": [{"token": t, "logprob": -0.5, "bytes": None,
                                               "top_logprobs": []} for t in TEXT_PIECES]}
        if body.get("return_token_ids"):
            choice["token_ids"] = list(range(100, 100 + len(TEXT_PIECES)))
            data["prompt_token_ids"] = [1, 2, 3]
        return data

    async def _stream(self, body: dict[str, Any]):  # type: ignore[no-untyped-def]
        model, rid = body["model"], f"chatcmpl-fake-{next(_IDS)}"
        slow = model == "fake-slow" or "slow" in self.adapters.get(model, "")
        delay = 0.3 if slow else 0.0
        try:
            yield _chunk(rid, model, {"role": "assistant", "content": ""})
            if model == "fake-tools":
                async for piece in self._tool_pieces(rid, model):
                    yield piece
                finish = "tool_calls"
            else:
                for i, text in enumerate(TEXT_PIECES):
                    await asyncio.sleep(delay)
                    extra: dict[str, Any] = {}
                    if body.get("logprobs"):
                        extra["logprobs"] = {"content": [{"token": text, "logprob": -0.5,
                                                          "bytes": None, "top_logprobs": []}]}
                    if body.get("return_token_ids"):
                        extra["token_ids"] = [100 + i]
                    delta = {"content": text}
                    if model == "fake-reasoning" and i == 0:
                        delta = {"reasoning_content": "Think first.", "content": text}
                    yield _chunk(rid, model, delta, extra=extra)
                finish = "stop"
            yield _chunk(rid, model, {}, finish)
            if (body.get("stream_options") or {}).get("include_usage"):
                yield b"data: " + orjson.dumps({
                    "id": rid, "object": "chat.completion.chunk", "created": 1, "model": model,
                    "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 6,
                                             "total_tokens": 13}}) + b"\n\n"
            yield b"data: [DONE]\n\n"
        except asyncio.CancelledError:
            self.disconnects += 1
            raise

    @staticmethod
    async def _tool_pieces(rid: str, model: str):  # type: ignore[no-untyped-def]
        fn = TOOL_CALL["function"]
        yield _chunk(rid, model, {"tool_calls": [{"index": 0, "id": TOOL_CALL["id"],
                                                  "type": "function",
                                                  "function": {"name": fn["name"],
                                                               "arguments": ""}}]})
        args = fn["arguments"]
        for part in (args[:10], args[10:20], args[20:]):
            yield _chunk(rid, model, {"tool_calls": [{"index": 0,
                                                      "function": {"arguments": part}}]})
