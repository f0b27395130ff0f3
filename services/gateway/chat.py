"""``POST /v1/chat/completions``: forward, relay, and record the turn on the side.

Framework-free: ``ChatHandler`` returns a ``Reply`` (a whole body, or an async iterator of
SSE events) that the ASGI endpoint in ``services.gateway.endpoint`` sends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from services.gateway.adapters import POLICY_VERSION_HEADER, AdapterRouter
from services.gateway.assemble import (
    Answer,
    StreamAssembler,
    from_response,
    sampling_fields,
    strip_unasked,
)
from services.gateway.errors import APIError, error_body, upstream_error
from services.gateway.metrics import GatewayMetrics
from services.gateway.recorder import Recorder
from services.gateway.request import ChatRequest
from services.gateway.skills import SkillInjector
from services.gateway.upstream import Upstream
from shared.messages import SAMPLING_HEADER, new_id
from shared.settings import Settings

DURABLE_WAIT_SECONDS = 2.0
"""Longest an answer's last bytes wait for its turn to be in Redis or the spool (a
pipeline round trip, normally); past it the answer goes out and the turn stays queued."""


@dataclass(slots=True)
class Reply:
    """What to answer: a whole JSON body, or a stream of SSE events."""

    session_id: str
    body: bytes = b""
    events: AsyncIterator[bytes] | None = None
    routed: str | None = None
    """The adapter a streamed answer was routed to: released (``AdapterRouter.release``)
    by whoever sends the stream, once it ended."""


class ChatHandler:
    """Forwards chat requests upstream and hands finished turns to the recorder."""

    def __init__(self, settings: Settings, upstream: Upstream, recorder: Recorder,
                 metrics: GatewayMetrics, router: AdapterRouter,
                 skills: SkillInjector | None = None) -> None:
        self._settings = settings
        self._skills = skills
        """None when ``use_skills`` is off: the hot path then does no skill work at all."""
        self._router = router
        self._upstream = upstream
        self._recorder = recorder
        self._metrics = metrics
        # Label children bound once: .labels() costs a lock and a dict lookup per call.
        self._ok_whole = metrics.requests.labels("false", "200")
        self._seconds = {stream: metrics.request_seconds.labels(str(stream).lower())
                         for stream in (False, True)}

    def _ask_for_training_data(self, chat: ChatRequest) -> tuple[bool, bool, bool]:
        """Add the logprobs/token-id/usage asks; return which ones the client lacked."""
        body, s = chat.body, self._settings
        strip_logprobs = s.request_logprobs and not chat.wants_logprobs
        strip_ids = s.request_token_ids and not chat.wants_token_ids
        strip_usage = chat.stream and s.request_stream_usage and not chat.wants_usage
        if strip_logprobs:
            body["logprobs"] = True
        if strip_ids:
            body["return_token_ids"] = True
        if strip_usage:
            options = body.get("stream_options")
            body["stream_options"] = {**(options if isinstance(options, dict) else {}),
                                      "include_usage": True}
        return strip_logprobs, strip_ids, strip_usage

    async def __call__(self, chat: ChatRequest, tenant: str, started: float,
                       raw: bytes) -> Reply:
        """Forward ``chat``; ``raw`` is the client's body, sent as is when unchanged. A
        request routed to an adapter is counted on it (``AdapterRouter.hold``) until its
        answer ended: the upstream keeps that adapter loaded meanwhile."""
        adapter = self._router.route(tenant, chat.body["model"])
        streamed = False
        if adapter is not None:
            chat.body["model"] = adapter
            chat.changed = True
            self._router.hold(adapter)
        try:
            skill_ids: tuple[str, ...] = ()
            if self._skills is not None and chat.turn_type == "main":
                skill_ids = await self._skills.inject(chat, tenant)
            strips = self._ask_for_training_data(chat)
            payload = orjson.dumps(chat.body) if chat.changed or any(strips) else raw
            resp = await self._upstream.request("POST", "/chat/completions", payload)
            if resp.status >= 400:
                try:
                    body = await resp.read()
                finally:
                    resp.release()
                raise upstream_error(resp.status, body)
            if chat.stream and resp.content_type == "text/event-stream":
                streamed = True  # released by the endpoint once the stream was sent
                return Reply(chat.session_id, events=self._relay(
                    resp, chat, tenant, started, strips, skill_ids), routed=adapter)
            return await self._whole(resp, chat, tenant, started, strips, skill_ids)
        finally:
            if adapter is not None and not streamed:
                self._router.release(adapter)

    def release(self, reply: Reply) -> None:
        """A streamed reply was sent (or abandoned): its adapter is free of it."""
        if reply.routed is not None:
            self._router.release(reply.routed)
            reply.routed = None

    async def _whole(self, resp: aiohttp.ClientResponse, chat: ChatRequest, tenant: str,
                     started: float, strips: tuple[bool, bool, bool],
                     skill_ids: tuple[str, ...]) -> Reply:
        try:
            raw = await resp.read()
        except TimeoutError:
            raise APIError(504, "The upstream model did not answer in time.",
                           code="upstream_timeout") from None
        except aiohttp.ClientError as exc:
            raise APIError(502, f"The upstream connection failed ({type(exc).__name__}).",
                           code="upstream_error") from None
        finally:
            resp.release()
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise APIError(502, "The upstream answered with invalid JSON.",
                           code="upstream_error") from None
        answer = from_response(data)
        if strips[0] or strips[1]:
            strip_unasked(data, strips[0], strips[1])
            raw = orjson.dumps(data)
        await _durable(self._record(chat, tenant, answer, resp, started, True, skill_ids))
        self._ok_whole.inc()
        return Reply(chat.session_id, body=raw)

    async def _relay(self, resp: aiohttp.ClientResponse, chat: ChatRequest, tenant: str,
                     started: float, strips: tuple[bool, bool, bool],
                     skill_ids: tuple[str, ...]) -> AsyncIterator[bytes]:
        """Each upstream SSE event reaches the client as soon as it is complete, but for
        ``[DONE]`` (or the end of the body): it waits until the turn is durable."""
        assembler = StreamAssembler()
        completed = recorded = False
        event: list[bytes] = []
        held = b""
        try:
            async for line in resp.content:
                if line.strip():
                    event.append(line)
                    continue
                out = self._event(event, assembler, strips)
                event = []
                if out.strip() in _DONE_EVENTS:
                    held = out
                elif out:
                    yield out
            out = self._event(event, assembler, strips)
            if out.strip() in _DONE_EVENTS:
                held = out
            elif out:
                yield out
            completed = recorded = True
            await _durable(self._record(chat, tenant, assembler.finish(), resp, started, True,
                                        skill_ids))
            if held:
                yield held
        except (TimeoutError, aiohttp.ClientError) as exc:
            kind = "timeout" if isinstance(exc, TimeoutError) else "stream"
            self._metrics.upstream_errors.labels(kind).inc()
            yield b"data: " + error_body(502, f"The upstream stream broke ({kind}).",
                                         code="upstream_error") + b"\n\n"
        finally:
            # Closing (not releasing) an unfinished response drops the upstream connection,
            # so a client that went away also stops the upstream's generation.
            resp.release() if completed else resp.close()
            if not recorded:
                self._record(chat, tenant, assembler.finish(), resp, started, completed,
                             skill_ids)
            self._metrics.requests.labels("true", "200" if completed else "aborted").inc()

    @staticmethod
    def _event(lines: list[bytes], assembler: StreamAssembler,
               strips: tuple[bool, bool, bool]) -> bytes:
        """One SSE event, folded into the answer; rewritten only if Reef added to it."""
        if not lines:
            return b""
        changed = False
        out: list[bytes] = []
        for line in lines:
            if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                out.append(line)
                continue
            try:
                chunk = orjson.loads(line[5:])
            except orjson.JSONDecodeError:
                out.append(line)
                continue
            if isinstance(chunk, dict):
                assembler.add(chunk)
                rewritten = _rewrite_chunk(chunk, strips)
                if rewritten is not None:
                    changed = True
                    if rewritten:
                        out.append(b"data: " + rewritten + b"\n")
                    continue
            out.append(line)
        if changed and not any(line.startswith(b"data:") for line in out):
            return b""
        return b"".join(out) + b"\n"

    def _record(self, chat: ChatRequest, tenant: str, answer: Answer,
                resp: aiohttp.ClientResponse, started: float, completed: bool,
                skill_ids: tuple[str, ...]) -> asyncio.Future[None]:
        """Queue the turn; the future is done once it is in Redis or the spool."""
        latency = time.perf_counter() - started
        self._seconds[chat.stream].observe(latency)
        body = chat.body
        sampled = answer.sampled()
        if sampled is not None:
            sampled.update(sampling_fields(body, resp.headers.get(SAMPLING_HEADER)))
        return self._recorder.record({
            "kind": "turn.v1", "id": new_id(), "created_at": time.time(),
            "tenant": tenant, "session_id": chat.session_id, "turn_type": chat.turn_type,
            "session_done": chat.session_done, "request_model": chat.request_model,
            "upstream_model": body["model"],
            "policy_version": resp.headers.get(POLICY_VERSION_HEADER),
            "messages": body["messages"],
            "request_params": {k: v for k, v in body.items() if k != "messages"},
            "response_message": answer.message, "finish_reason": answer.finish_reason,
            "usage": answer.usage, "sampled": sampled,
            "latency_seconds": latency, "stream": chat.stream, "completed": completed,
            "skill_ids": skill_ids, "response_id": answer.response_id,
            "caller": chat.caller,
        })


_DONE_EVENTS = (b"data: [DONE]", b"data:[DONE]")


async def _durable(recorded: asyncio.Future[None]) -> None:
    """Wait (at most ``DURABLE_WAIT_SECONDS``) until a turn is in Redis or the spool."""
    with suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(recorded), DURABLE_WAIT_SECONDS)


def _rewrite_chunk(chunk: dict[str, Any], strips: tuple[bool, bool, bool]) -> bytes | None:
    """None: forward the chunk as it came; b"": drop it; else its new JSON."""
    strip_logprobs, strip_ids, strip_usage = strips
    if strip_usage and chunk.get("usage") and not chunk.get("choices"):
        return b""
    if not (strip_logprobs or strip_ids or (strip_usage and "usage" in chunk)):
        return None
    if strip_usage:
        chunk.pop("usage", None)
    strip_unasked(chunk, strip_logprobs, strip_ids)
    return orjson.dumps(chunk)
