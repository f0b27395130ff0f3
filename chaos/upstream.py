"""A fake OpenAI-compatible upstream that fails on purpose, over real HTTP (aiohttp).

Every answer has a completion id of its own (``chatcmpl-<n>-<random>``), so the chaos run
can follow each answered turn through the pipeline by the id the client saw. When the
request asks for them (Reef asks, for training), the answer carries sampled token ids
below ``VOCAB`` and their logprobs, which the trainer's tiny model can train on.

Faults, drawn per request: ``--error-rate`` answers 500; ``--timeout-rate`` holds the
answer ``--hang-seconds`` (longer than the gateway's upstream timeout), so the gateway
gives up; ``--poison-rate`` samples the token :data:`POISON` first. ``GET /stats``
reports the requests and the faults injected so far.

Run: ``python -m chaos.upstream --port 8101 --error-rate 0.03 --timeout-rate 0.02``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import secrets
from collections import Counter
from typing import Any

from aiohttp import web

VOCAB = 64
"""Token ids stay below this: the trainer's tiny model has this vocabulary."""
PIECES = ("Sure", ",", " here", " is", " the", " answer", ".")
"""The answer's text, one stream chunk per piece."""
POISON = 2
"""A token id sampled only in a ``--poison-rate`` share of answers (their first token):
the chaos trainer's backend refuses to train a batch holding it (a poisonous datum).
Prompt ids are 1 and 3 or more, other sampled ids 3 or more."""


class FaultyUpstream:
    """The handlers, the fault draws and their counts."""

    def __init__(self, error_rate: float, timeout_rate: float, hang_seconds: float,
                 seed: int | None = None, poison_rate: float = 0.0) -> None:
        self.error_rate = error_rate
        self.poison_rate = poison_rate
        self.timeout_rate = timeout_rate
        self.hang_seconds = hang_seconds
        self.stats: Counter[str] = Counter()
        self._random = random.Random(seed)
        self._ids = itertools.count()
        self._tag = secrets.token_hex(4)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/stats", self.report)
        return app

    async def models(self, _request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": "chaos-model", "object": "model", "created": 0, "owned_by": "chaos"}]})

    async def report(self, _request: web.Request) -> web.Response:
        return web.json_response(dict(self.stats))

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body: dict[str, Any] = await request.json()
        self.stats["requests"] += 1
        draw = self._random.random()
        if draw < self.error_rate:
            self.stats["error_500"] += 1
            return web.json_response({"error": {"message": "injected failure",
                                                "type": "server_error", "code": None}},
                                     status=500)
        if draw < self.error_rate + self.timeout_rate:
            self.stats["timeout"] += 1
            await asyncio.sleep(self.hang_seconds)
        rid = f"chatcmpl-{next(self._ids)}-{self._tag}"
        if body.get("stream"):
            return await self._stream(request, body, rid)
        return web.json_response(self._whole(body, rid))

    def _tokens(self) -> tuple[list[int], list[float]]:
        ids = [self._random.randrange(3, VOCAB) for _ in PIECES]
        if self._random.random() < self.poison_rate:
            ids[0] = POISON
            self.stats["poison"] += 1
        return ids, [round(-self._random.uniform(0.1, 3.0), 4) for _ in PIECES]

    def _whole(self, body: dict[str, Any], rid: str) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": "".join(PIECES)}}
        data: dict[str, Any] = {"id": rid, "object": "chat.completion", "created": 1,
                                "model": body.get("model", "chaos-model"), "choices": [choice],
                                "usage": {"prompt_tokens": 5, "completion_tokens": len(PIECES),
                                          "total_tokens": 5 + len(PIECES)}}
        ids, logprobs = self._tokens()
        if body.get("logprobs"):
            choice["logprobs"] = {"content": [
                {"token": t, "logprob": lp, "bytes": None, "top_logprobs": []}
                for t, lp in zip(PIECES, logprobs, strict=True)]}
        if body.get("return_token_ids"):
            choice["token_ids"] = ids
            data["prompt_token_ids"] = self._prompt_ids(body)
        return data

    def _prompt_ids(self, body: dict[str, Any]) -> list[int]:
        """A few prompt token ids that depend on the prompt (so samples form groups)."""
        text = json.dumps(body.get("messages", []))
        return [1, *(ord(c) % (VOCAB - 3) + 3 for c in text[-6:])]

    async def _stream(self, request: web.Request, body: dict[str, Any],
                      rid: str) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        ids, logprobs = self._tokens()
        model = body.get("model", "chaos-model")
        first = {"role": "assistant", "content": ""}
        await resp.write(_event(rid, model, first, None, {}))
        for i, piece in enumerate(PIECES):
            extra: dict[str, Any] = {}
            if body.get("logprobs"):
                extra["logprobs"] = {"content": [{"token": piece, "logprob": logprobs[i],
                                                  "bytes": None, "top_logprobs": []}]}
            if body.get("return_token_ids"):
                extra["token_ids"] = [ids[i]]
            await resp.write(_event(rid, model, {"content": piece}, None, extra))
        last: dict[str, Any] = {}
        if body.get("return_token_ids"):
            last["prompt_token_ids"] = self._prompt_ids(body)
        await resp.write(_event(rid, model, {}, "stop", {}, last))
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 5, "completion_tokens": len(PIECES),
                     "total_tokens": 5 + len(PIECES)}
            await resp.write(b"data: " + json.dumps({
                "id": rid, "object": "chat.completion.chunk", "created": 1, "model": model,
                "choices": [], "usage": usage}).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def _event(rid: str, model: str, delta: dict[str, Any], finish: str | None,
           extra: dict[str, Any], top: dict[str, Any] | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish, **extra}
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": 1, "model": model,
             "choices": [choice], **(top or {})}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m chaos.upstream")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--timeout-rate", type=float, default=0.0)
    parser.add_argument("--hang-seconds", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--poison-rate", type=float, default=0.0)
    args = parser.parse_args()
    upstream = FaultyUpstream(args.error_rate, args.timeout_rate, args.hang_seconds, args.seed,
                              args.poison_rate)
    web.run_app(upstream.app(), host="127.0.0.1", port=args.port, print=None,
                access_log=None)


if __name__ == "__main__":
    main()
