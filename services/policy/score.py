"""``POST /v1/completions`` in scoring mode: the log-probabilities of a given sequence.

This is how a teacher is asked for on-policy distillation, as with vLLM: ``prompt`` holds
the token ids (or text), ``echo: true``, ``logprobs: 1`` and ``max_tokens: 0``; the answer's
``choices[0].logprobs.token_logprobs`` has one value per prompt token (``null`` for the
first, which has no context). Generating text is what ``/v1/chat/completions`` is for, so
any other ``max_tokens`` is refused.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from services.policy.chat import BadRequestError
from services.policy.engine import PolicyEngine
from services.policy.lora import Adapter
from services.policy.registry import holding
from services.policy.schemas import completion_id, now, usage


class CompletionRequest(BaseModel):
    """``POST /v1/completions``; fields the server does not use are accepted."""

    model_config = ConfigDict(extra="allow")

    model: str = ""
    prompt: str | list[int] = Field(min_length=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0)
    max_tokens: int | None = 16


async def score(req: CompletionRequest, engine: PolicyEngine, model_name: str,
                adapter: Adapter | None) -> dict[str, Any]:
    """The scoring answer for ``req`` (see the module docstring)."""
    if req.max_tokens != 0 or not req.echo:
        raise BadRequestError("this server's /v1/completions only scores prompts: send "
                              "max_tokens 0 and echo true (generate with /v1/chat/completions)",
                              param="max_tokens")
    ids = (req.prompt if isinstance(req.prompt, list)
           else engine.tokenizer(req.prompt, add_special_tokens=False)["input_ids"])
    vocab = engine.vocab_size
    if any(i < 0 or i >= vocab for i in ids):
        raise BadRequestError(f"token ids must be in [0, {vocab})", param="prompt")
    if engine.context_length and len(ids) > engine.context_length:
        raise BadRequestError(f"prompt longer than the context ({engine.context_length})",
                              param="prompt")
    values: list[float | None] = [None]
    if len(ids) > 1:
        with holding(adapter):
            values += await engine.score(ids, adapter)
    tokens = engine.tokenizer.convert_ids_to_tokens(ids)
    logprobs = None if req.logprobs is None else {
        "tokens": tokens, "token_logprobs": values, "top_logprobs": None,
        "text_offset": None}
    return {"id": completion_id().replace("chatcmpl", "cmpl"), "object": "text_completion",
            "created": now(), "model": adapter.name if adapter else model_name,
            "choices": [{"index": 0, "text": engine.tokenizer.decode(ids), "logprobs": logprobs,
                         "finish_reason": "length", "prompt_token_ids": ids}],
            "usage": usage(len(ids), 0)}
