"""Answering one chat-completions request: prompt, sampling parameters, response bodies."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from jinja2 import TemplateError
from starlette.requests import Request

from services.policy.engine import Delta, PolicyEngine, SamplingParams
from services.policy.lora import Adapter
from services.policy.registry import holding
from services.policy.sampling import LogprobsMode
from services.policy.schemas import (
    ChatCompletionRequest,
    ChoiceBuilder,
    completion_id,
    error_body,
    logprob_entries,
    now,
    usage,
)
from services.policy.text import TokenTexts

log = logging.getLogger(__name__)

MAX_CHOICES = 8
"""Largest ``n``: choices are sampled one after another, so many would be slow."""


class BadRequestError(ValueError):
    """The request cannot be answered as asked; becomes a 400 in OpenAI's error shape."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True, slots=True)
class Job:
    """A validated request, ready for the engine."""

    request: ChatCompletionRequest
    prompt_ids: list[int]
    params: SamplingParams
    n: int
    model_name: str
    """The ``model`` of the answer: the adapter's name, or the base model's."""
    adapter: Adapter | None = None
    """The LoRA adapter chosen when the request arrived (None: the base model)."""


def prepare(req: ChatCompletionRequest, engine: PolicyEngine, model_name: str,
            max_new_tokens_cap: int, adapter: Adapter | None = None,
            logprobs_mode: LogprobsMode = "processed_logprobs") -> Job:
    """Validate ``req`` and turn it into a job; raises ``BadRequestError``."""
    n = req.n or 1
    if n > MAX_CHOICES:
        raise BadRequestError(f"n is at most {MAX_CHOICES} on this server", param="n")
    if req.top_logprobs and not req.logprobs:
        raise BadRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
    prompt_ids = _prompt_ids(req, engine.tokenizer)
    requested = req.max_completion_tokens or req.max_tokens or max_new_tokens_cap
    max_new = engine.max_new_tokens_for(len(prompt_ids), min(requested, max_new_tokens_cap))
    if max_new < 1:
        raise BadRequestError(
            f"the prompt has {len(prompt_ids)} tokens; the model's context is "
            f"{engine.context_length}", param="messages", code="context_length_exceeded")
    params = SamplingParams(
        max_new_tokens=max_new,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(req.top_k or 0, 0),
        seed=req.seed,
        stop=req.stop_strings(),
        top_logprobs=(req.top_logprobs or 0) if req.logprobs else 0,
        logprobs_mode=req.logprobs_mode or logprobs_mode,
    )
    return Job(req, prompt_ids, params, n, adapter.name if adapter else model_name, adapter)


def sampling_header(job: Job, engine: PolicyEngine) -> str:
    """The ``x-reef-sampling`` value: what the logprobs are of and how the answer was
    sampled (the effective values, defaults included; the seed of choice 0)."""
    p = job.params
    return orjson.dumps({
        "logprobs_kind": engine.logprobs_kind(p), "temperature": p.temperature,
        "top_p": p.top_p, "top_k": p.top_k, "seed": p.seed, "greedy": p.greedy}).decode()


def _prompt_ids(req: ChatCompletionRequest, tokenizer: Any) -> list[int]:
    """The prompt's token ids, through the tokenizer's chat template."""
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True)
    except TemplateError as exc:
        raise BadRequestError(f"the chat template refused the messages: {exc}",
                              param="messages") from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


async def _cancel_on_disconnect(request: Request, cancel: threading.Event) -> None:
    """Set ``cancel`` when the client hangs up (the body is already read)."""
    while not cancel.is_set():
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancel.set()


async def complete(job: Job, engine: PolicyEngine, texts: TokenTexts,
                   request: Request) -> dict[str, Any]:
    """The body of a non-streamed answer."""
    cancel = threading.Event()
    watcher = asyncio.create_task(_cancel_on_disconnect(request, cancel))
    builders = [ChoiceBuilder(i) for i in range(job.n)]
    try:
        with holding(job.adapter):
            async for delta in engine.stream(job.prompt_ids, job.params, job.n, cancel,
                                             job.adapter):
                builders[delta.index].add(delta)
    finally:
        watcher.cancel()
    req = job.request
    body: dict[str, Any] = {
        "id": completion_id(), "object": "chat.completion", "created": now(),
        "model": job.model_name,
        "choices": [b.render(texts, bool(req.logprobs), bool(req.top_logprobs),
                             bool(req.return_token_ids)) for b in builders],
        "usage": usage(len(job.prompt_ids), sum(len(b.tokens) for b in builders)),
    }
    if req.return_token_ids:
        body["prompt_token_ids"] = job.prompt_ids
    return body


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class ChunkWriter:
    """Renders deltas as ``chat.completion.chunk`` events for one streamed answer."""

    def __init__(self, job: Job, texts: TokenTexts) -> None:
        self.job = job
        self.texts = texts
        self.id = completion_id()
        self.created = now()
        self.completion_tokens = 0
        self._started: set[int] = set()
        self._first = True

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        """One SSE event carrying ``choices``."""
        return _sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                     "model": self.job.model_name, "choices": choices, **extra})

    def delta(self, delta: Delta) -> bytes:
        """The event for one engine delta."""
        req = self.job.request
        body: dict[str, Any] = {"content": delta.text}
        extra: dict[str, Any] = {}
        if delta.index not in self._started:
            self._started.add(delta.index)
            body = {"role": "assistant", **body}
        if self._first and req.return_token_ids:
            extra["prompt_token_ids"] = self.job.prompt_ids
        self._first = False
        self.completion_tokens += len(delta.tokens)
        choice: dict[str, Any] = {
            "index": delta.index, "delta": body, "finish_reason": delta.finish_reason,
            "logprobs": ({"content": logprob_entries(delta.tokens, self.texts,
                                                     bool(req.top_logprobs))}
                         if req.logprobs else None),
        }
        if req.return_token_ids:
            choice["token_ids"] = [t.token_id for t in delta.tokens]
        return self.chunk([choice], **extra)


async def stream(job: Job, engine: PolicyEngine, texts: TokenTexts) -> AsyncIterator[bytes]:
    """The SSE body of a streamed answer; closing it stops the generation."""
    writer = ChunkWriter(job, texts)
    cancel = threading.Event()
    try:
        with holding(job.adapter):
            async for delta in engine.stream(job.prompt_ids, job.params, job.n, cancel,
                                             job.adapter):
                yield writer.delta(delta)
    except RuntimeError:  # what torch raises; the status line is already sent
        log.exception("policy.generation_failed")
        yield _sse(error_body("generation failed", type_="server_error"))
    else:
        options = job.request.stream_options
        if options is not None and options.include_usage:
            yield writer.chunk([], usage=usage(len(job.prompt_ids), writer.completion_tokens))
    finally:
        cancel.set()
    yield b"data: [DONE]\n\n"
