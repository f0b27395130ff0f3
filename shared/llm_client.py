"""A small chat-completions client for the LLMs Reef calls itself (the judge, the skill-miner).

It speaks to any OpenAI-compatible ``/chat/completions`` endpoint or to an Azure OpenAI
deployment, over one shared aiohttp session per client. Each call has a total timeout;
timeouts, connection errors, 429 and 5xx are retried with short exponential backoff
(jittered); a semaphore bounds the calls in flight. Failures raise ``LLMCallError`` whose
``kind`` (``timeout``, ``connect``, ``http``, ``unparseable``) is meant as a metric label.

Not httpx: its connection pool scans every connection on every event, so with tens of
connections in flight it is CPU-bound (measured for the judge: 52-77 calls/s with httpx vs
284-1,400 with aiohttp at 200 ms latency).

Prompts and completions are never logged here.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

BACKOFF_BASE_SECONDS = 0.1
"""First retry waits about this long; each further retry twice as long (with jitter)."""
BACKOFF_MAX_SECONDS = 2.0
"""No retry waits longer than this."""

KIND_TIMEOUT = "timeout"
KIND_CONNECT = "connect"
KIND_HTTP = "http"
KIND_UNPARSEABLE = "unparseable"


class LLMCallError(Exception):
    """One call failed (after its retries); ``kind`` is its metric label, ``status`` the
    HTTP status when there was one."""

    def __init__(self, kind: str, *, retryable: bool, status: int | None = None) -> None:
        super().__init__(kind if status is None else f"{kind} {status}")
        self.kind = kind
        self.retryable = retryable
        self.status = status


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where chat completions are posted: the URL, the headers (auth) and the model name."""

    url: str
    headers: dict[str, str] = field(repr=False)
    model: str

    @classmethod
    def openai(cls, base_url: str, model: str, api_key: str | None = None) -> Endpoint:
        """An OpenAI-compatible endpoint: ``<base_url>/chat/completions``, bearer auth."""
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        return cls(f"{base_url.rstrip('/')}/chat/completions", headers, model)

    @classmethod
    def azure(cls, endpoint: str, deployment: str, api_version: str,
              api_key: str | None = None, model: str = "") -> Endpoint:
        """An Azure OpenAI deployment (``api-key`` header); ``model`` defaults to the
        deployment's name (Azure routes by the deployment and ignores it)."""
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["api-key"] = api_key
        url = (f"{endpoint.rstrip('/')}/openai/deployments/{quote(deployment, safe='')}"
               f"/chat/completions?api-version={quote(api_version, safe='')}")
        return cls(url, headers, model or deployment)


@dataclass(frozen=True, slots=True)
class Completion:
    """One chat completion: the first choice's text and the call's tokens."""

    text: str | None
    """The first choice's message content; None when it was not text."""
    prompt_tokens: int
    completion_tokens: int


class LLMClient:
    """Chat completions against one endpoint; one per process and purpose, shared by its
    tasks. Use ``async with`` or ``start()`` / ``close()``."""

    def __init__(self, endpoint: Endpoint, *, timeout: float, retries: int, concurrency: int,
                 on_retry: Callable[[str], None] | None = None) -> None:
        """``timeout``: seconds per attempt, all included; ``retries``: further attempts
        after a retryable failure; ``concurrency``: calls in flight at most (also the
        connection pool's size); ``on_retry(kind)`` is called before each retry."""
        self.endpoint = endpoint
        self.timeout = timeout
        self.retries = max(0, retries)
        self.concurrency = max(1, concurrency)
        self._on_retry = on_retry
        self._semaphore = asyncio.Semaphore(self.concurrency)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Open the HTTP session."""
        if self._session is None:
            n = self.concurrency
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=n, limit_per_host=n, keepalive_timeout=30),
                timeout=aiohttp.ClientTimeout(total=self.timeout))

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> LLMClient:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def complete(self, messages: list[dict[str, str]], *, max_tokens: int,
                       temperature: float,
                       response_format: dict[str, Any] | None = None) -> Completion:
        """One chat completion (retried as the module docstring says); raises
        ``LLMCallError``. ``response_format`` is passed as it is (e.g.
        ``{"type": "json_object"}``)."""
        body: dict[str, Any] = {"model": self.endpoint.model, "messages": messages,
                                "max_tokens": max_tokens, "temperature": temperature}
        if response_format is not None:
            body["response_format"] = response_format
        data = await self.post(orjson.dumps(body))
        prompt_tokens, completion_tokens = usage_tokens(data)
        return Completion(reply_text(data), prompt_tokens, completion_tokens)

    async def post(self, body: bytes) -> dict[str, Any]:
        """POST a prepared request body, with retries; the decoded JSON answer."""
        attempts = 1 + self.retries
        for attempt in range(attempts):
            try:
                return await self._attempt(body)
            except LLMCallError as exc:
                if not exc.retryable or attempt == attempts - 1:
                    raise
                if self._on_retry is not None:
                    self._on_retry(exc.kind)
                delay = min(BACKOFF_MAX_SECONDS, BACKOFF_BASE_SECONDS * 2 ** attempt)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _attempt(self, body: bytes) -> dict[str, Any]:
        """One HTTP request under the concurrency limit and the total timeout."""
        if self._session is None:
            raise RuntimeError("LLMClient.start() was not called")
        try:
            async with (self._semaphore,
                        asyncio.timeout(self.timeout),
                        self._session.post(self.endpoint.url, data=body,
                                           headers=self.endpoint.headers) as response):
                status = response.status
                content = await response.read()
        except TimeoutError:  # aiohttp's own timeouts are TimeoutErrors too
            raise LLMCallError(KIND_TIMEOUT, retryable=True) from None
        except aiohttp.ClientError:
            raise LLMCallError(KIND_CONNECT, retryable=True) from None
        if status == 429 or status >= 500:
            raise LLMCallError(KIND_HTTP, retryable=True, status=status)
        if status >= 300:
            raise LLMCallError(KIND_HTTP, retryable=False, status=status)
        try:
            data = orjson.loads(content)
        except orjson.JSONDecodeError:
            raise LLMCallError(KIND_UNPARSEABLE, retryable=False, status=status) from None
        if not isinstance(data, dict):
            raise LLMCallError(KIND_UNPARSEABLE, retryable=False, status=status)
        return data


def reply_text(data: dict[str, Any]) -> str | None:
    """The first choice's message content in a chat-completions answer, if it is text."""
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


def usage_tokens(data: dict[str, Any]) -> tuple[int, int]:
    """(prompt, completion) tokens from an answer's ``usage``; 0 where absent or odd."""
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return 0, 0
    return _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
