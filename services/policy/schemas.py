"""The OpenAI chat-completions wire format the policy server speaks.

Requests accept unknown fields (as vLLM's server does): agents send ``tools``,
``user``, ``metadata`` and more, which a small local model simply ignores.
``return_token_ids`` follows vLLM: sampled ids per choice (and per streamed delta),
``prompt_token_ids`` on the response (or on the first streamed chunk).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from services.policy.engine import Delta
from services.policy.sampling import LogprobsMode, SampledToken
from services.policy.text import TokenTexts


class ChatMessage(BaseModel):
    """One message of the conversation; content may be a string or a list of parts."""

    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text, with the text parts of a multi-part content joined."""
        if isinstance(self.content, list):
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``; fields the server does not use are accepted."""

    model_config = ConfigDict(extra="allow")

    model: str = ""
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    """Keep only the k most likely tokens (vLLM's extension; 0 or -1: no cut)."""
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool | None = False
    logprobs_mode: LogprobsMode | None = None
    """``processed_logprobs`` (the distribution each token was drawn from) or
    ``raw_logprobs`` (the model's own); None: the server's ``policy_logprobs_mode``. vLLM
    takes this as a server option; here a request may pick it too."""

    def stop_strings(self) -> tuple[str, ...]:
        """``stop`` as a tuple (OpenAI allows one string or a list)."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


def completion_id() -> str:
    """A fresh ``chatcmpl-`` id."""
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    """``created`` timestamp: whole seconds."""
    return int(time.time())


def logprob_entries(tokens: tuple[SampledToken, ...], texts: TokenTexts,
                    with_top: bool) -> list[dict[str, Any]]:
    """OpenAI's ``logprobs.content`` entries for ``tokens``."""
    entries = []
    for token in tokens:
        text, raw = texts.get(token.token_id)
        top = []
        if with_top:
            for token_id, logprob in token.top:
                alt_text, alt_raw = texts.get(token_id)
                top.append({"token": alt_text, "logprob": logprob, "bytes": list(alt_raw)})
        entries.append({"token": text, "logprob": token.logprob, "bytes": list(raw),
                        "top_logprobs": top})
    return entries


class ChoiceBuilder:
    """Collects one choice's deltas into the message of a non-streamed answer."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.text: list[str] = []
        self.tokens: list[SampledToken] = []
        self.finish_reason: str | None = None

    def add(self, delta: Delta) -> None:
        """Append a delta of this choice."""
        self.text.append(delta.text)
        self.tokens.extend(delta.tokens)
        self.finish_reason = delta.finish_reason or self.finish_reason

    def render(self, texts: TokenTexts, logprobs: bool, top: bool,
               token_ids: bool) -> dict[str, Any]:
        """The ``choices[i]`` object."""
        choice: dict[str, Any] = {
            "index": self.index,
            "message": {"role": "assistant", "content": "".join(self.text)},
            "finish_reason": self.finish_reason,
            "logprobs": ({"content": logprob_entries(tuple(self.tokens), texts, top)}
                         if logprobs else None),
        }
        if token_ids:
            choice["token_ids"] = [t.token_id for t in self.tokens]
        return choice


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The ``usage`` object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """An error in OpenAI's shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> Response:
    """``body`` as a JSON response."""
    return Response(orjson.dumps(body), status_code=status, media_type="application/json",
                    headers=headers)


def error_response(status: int, message: str, type_: str, param: str | None = None,
                   code: str | None = None) -> Response:
    """An error response in OpenAI's shape."""
    return json_response(error_body(message, type_, param, code), status)


class LoadLoraAdapterRequest(BaseModel):
    """``POST /v1/load_lora_adapter``, as vLLM takes it (extra fields accepted)."""

    model_config = ConfigDict(extra="allow")

    lora_name: str = ""
    lora_path: str = ""
    load_inplace: bool = False
    """Replace an adapter already loaded under ``lora_name`` (else that is a 400)."""


class UnloadLoraAdapterRequest(BaseModel):
    """``POST /v1/unload_lora_adapter``, as vLLM takes it (``lora_int_id`` is ignored)."""

    model_config = ConfigDict(extra="allow")

    lora_name: str = ""
    lora_int_id: int | None = None
