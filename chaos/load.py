"""The chaos load: sessions of 1-4 turns through the gateway with the official ``openai``
client, streaming and not, with Reef's session headers; the last turn of a session says
``X-Session-Done``. Every answered turn is kept by the completion id the client saw.

A turn is *answered* when the client got a whole answer: a 200 body, or a stream that
ended with a finish reason and no error event. Failed turns are counted by kind; the
client does not retry (``max_retries=0``), so every turn sent is one request.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, cast

import httpx
import openai

FOLLOW_UPS = ("Thanks, that works!", "No, that's wrong. Try again.",
              "Can you say more about that?", "Perfect, exactly what I needed.",
              "That doesn't work, it still fails.")
"""What the scripted user says next: praise, corrections and plain questions, so the
scorer's implicit rewards vary and the skill-miner has failing turns to mine."""


@dataclass
class LoadResult:
    """What the client saw."""

    sent: int = 0
    answered: dict[str, bool] = field(default_factory=dict)
    """Completion id -> whether it was streamed."""
    errors: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    latencies: list[tuple[float, float]] = field(default_factory=list)
    """(when it started, seconds to the whole answer) per answered turn."""
    sessions: dict[str, tuple[str, float]] = field(default_factory=dict)
    """Completion id -> (its session id, when it was answered), for late feedback."""
    done: bool = False
    """The load has ended."""

    @property
    def streamed(self) -> int:
        return sum(self.answered.values())


class Pacer:
    """Spaces turn starts ``1 / rate`` seconds apart (no pacing when rate is 0)."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self._next = time.monotonic()
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        if not self.interval:
            return
        async with self._lock:
            now = time.monotonic()
            self._next = max(self._next + self.interval, now)
            delay = self._next - now
        if delay > 0:
            await asyncio.sleep(delay)


class Load:
    """Runs sessions until ``turns`` turns were sent."""

    def __init__(self, base_url: str, api_key: str, model: str, turns: int, concurrency: int,
                 rate: float, stream_share: float = 0.5, seed: int | None = None) -> None:
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0,
                                         timeout=30.0)
        self.model = model
        self.turns = turns
        self.concurrency = concurrency
        self.stream_share = stream_share
        self.pacer = Pacer(rate)
        self.random = random.Random(seed)
        self.result = LoadResult()
        self._budget = turns

    async def run(self) -> LoadResult:
        started = time.monotonic()
        try:
            await asyncio.gather(*(self._sessions() for _ in range(self.concurrency)))
        finally:
            await self.client.close()
            self.result.done = True
        self.result.seconds = time.monotonic() - started
        return self.result

    async def _sessions(self) -> None:
        while self._budget > 0:
            length = min(self.random.randint(1, 4), self._budget)
            self._budget -= length
            await self._session(length)

    async def _session(self, length: int) -> None:
        session = uuid.uuid4().hex
        messages: list[dict[str, Any]] = [
            {"role": "user", "content": f"Question {session[:6]}: how do I list files?"}]
        for i in range(length):
            await self.pacer.wait()
            headers = {"X-Session-Id": session}
            if i == length - 1:
                headers["X-Session-Done"] = "true"
            answer = await self._turn(messages, headers)
            if answer is not None:
                messages.append({"role": "assistant", "content": answer})
            messages.append({"role": "user", "content": self.random.choice(FOLLOW_UPS)})

    async def _turn(self, messages: list[dict[str, Any]], headers: dict[str, str]) -> str | None:
        """One turn; the answer's text, or None when it was not answered."""
        self.result.sent += 1
        stream = self.random.random() < self.stream_share
        started = time.monotonic()
        try:
            if stream:
                rid, text = await self._streamed(messages, headers)
            else:
                reply = await self.client.chat.completions.create(
                    model=self.model, messages=cast(Any, messages),
                    extra_headers=headers)
                rid, text = reply.id, reply.choices[0].message.content or ""
        except openai.APIStatusError as exc:
            self.result.errors[f"http_{exc.status_code}"] += 1
            return None
        except openai.APITimeoutError:
            self.result.errors["client_timeout"] += 1
            return None
        except openai.APIConnectionError:
            self.result.errors["connection"] += 1
            await asyncio.sleep(1.0)  # the gateway is down: do not spin
            return None
        except openai.APIError:  # an error event inside a stream
            self.result.errors["stream_error"] += 1
            return None
        except httpx.HTTPError:  # the connection broke mid-stream
            self.result.errors["stream_broken"] += 1
            return None
        if rid is None:
            self.result.errors["stream_unfinished"] += 1
            return None
        self.result.answered[rid] = stream
        self.result.latencies.append((started, time.monotonic() - started))
        self.result.sessions[rid] = (headers["X-Session-Id"], time.monotonic())
        return text

    async def _streamed(self, messages: list[dict[str, Any]],
                        headers: dict[str, str]) -> tuple[str | None, str]:
        """A streamed turn's completion id (None unless it finished) and text."""
        rid: str | None = None
        finished = False
        parts: list[str] = []
        events = await self.client.chat.completions.create(
            model=self.model, messages=cast(Any, messages), stream=True,
            extra_headers=headers)
        async for chunk in events:
            rid = chunk.id
            for choice in chunk.choices:
                if choice.delta.content:
                    parts.append(choice.delta.content)
                if choice.finish_reason:
                    finished = True
        return (rid if finished else None), "".join(parts)
