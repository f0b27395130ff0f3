"""Reading a chat-completions request: parse, check, and split Reef's own fields off.

Validation is hand-written and shallow on purpose: it checks what Reef relies on and
what the upstream would otherwise reject with a less clear message, and leaves every
field it does not know untouched for the upstream.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import orjson

from services.gateway.errors import APIError

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
SESSION_FIELDS = ("session_id", "turn_type", "session_done")
"""Body equivalents of Reef's session headers; removed before the body goes upstream."""


@dataclass(slots=True)
class ChatRequest:
    """A checked request and what Reef derived from it."""

    body: dict[str, Any]
    """What goes upstream (Reef's fields removed, model mapped)."""
    request_model: str
    stream: bool
    session_id: str
    turn_type: str
    session_done: bool
    wants_logprobs: bool
    wants_token_ids: bool
    wants_usage: bool
    changed: bool
    """Whether ``body`` differs from what the client sent (else the raw bytes are sent)."""


def too_large(limit: int) -> APIError:
    return APIError(413, f"Request body exceeds {limit} bytes.", code="request_too_large")


async def read_limited(chunks: AsyncIterable[bytes], limit: int) -> bytes:
    """A body read from ``chunks`` (e.g. Starlette's ``request.stream()``), or a 413 as
    soon as it grows past ``limit`` bytes."""
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        parts.append(chunk)
    return b"".join(parts)


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise APIError(400, "We could not parse the JSON body of your request.",
                       code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    return body


def _field_error(param: str, message: str) -> APIError:
    return APIError(400, message, code="invalid_value", param=param)


def check_messages(messages: Any) -> None:
    """Messages must be a non-empty list of objects with a known role."""
    if messages is None:
        raise _field_error("messages", "Missing required parameter: 'messages'.")
    if not isinstance(messages, list) or not messages:
        raise _field_error("messages", "'messages' must be a non-empty array.")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _field_error(f"messages[{i}]", f"messages[{i}] must be an object.")
        role = message.get("role")
        if role not in ROLES:
            raise _field_error(f"messages[{i}].role",
                               f"messages[{i}].role must be one of {sorted(ROLES)}, "
                               f"got {role!r}.")


def _check_types(body: dict[str, Any]) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _field_error("model", "'model' must be a non-empty string.")
    for name in ("stream", "logprobs"):
        if name in body and body[name] is not None and not isinstance(body[name], bool):
            raise _field_error(name, f"'{name}' must be a boolean.")
    for name in ("n", "max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < 1):
            raise _field_error(name, f"'{name}' must be a positive integer.")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise _field_error("tools", "'tools' must be an array.")


def session_from(headers: Mapping[str, str], body: MutableMapping[str, Any], tenant: str,
                 key_hash: str) -> tuple[str, str, bool]:
    """Session id, turn type and done flag; headers win over body fields.

    Without a session id, the session is stable per (API key, ``user`` field), so
    different end users of one key never share a session."""
    sid = headers.get("x-session-id") or body.pop("session_id", None)
    body.pop("session_id", None)
    turn_type = headers.get("x-turn-type") or body.pop("turn_type", None) or "main"
    body.pop("turn_type", None)
    done_raw = headers.get("x-session-done")
    done_body = body.pop("session_done", None)
    done = (done_raw.strip().lower() in ("1", "true", "yes")) if done_raw else bool(done_body)
    if turn_type not in ("main", "side"):
        raise APIError(400, "X-Turn-Type must be 'main' or 'side'.", code="invalid_value",
                       param="turn_type")
    if not sid:
        user = body.get("user")
        seed = f"{tenant}\x00{key_hash}\x00{user if isinstance(user, str) else ''}"
        sid = "auto-" + hashlib.sha256(seed.encode()).hexdigest()[:24]
    elif not isinstance(sid, str) or len(sid) > 256:
        raise APIError(400, "The session id must be a string of at most 256 characters.",
                       code="invalid_value", param="session_id")
    return sid, turn_type, done


def read_chat_request(body: dict[str, Any], headers: Mapping[str, str], tenant: str,
                      key_hash: str, model_map: dict[str, str]) -> ChatRequest:
    """Check a parsed body and derive what Reef needs; raises ``APIError``."""
    _check_types(body)
    check_messages(body.get("messages"))
    changed = any(name in body for name in SESSION_FIELDS)
    session_id, turn_type, done = session_from(headers, body, tenant, key_hash)
    request_model = body["model"]
    if request_model in model_map:
        body["model"] = model_map[request_model]
        changed = True
    stream_options = body.get("stream_options")
    return ChatRequest(
        body=body,
        request_model=request_model,
        stream=bool(body.get("stream")),
        session_id=session_id,
        turn_type=turn_type,
        session_done=done,
        wants_logprobs=bool(body.get("logprobs")),
        wants_token_ids=bool(body.get("return_token_ids")),
        wants_usage=isinstance(stream_options, dict) and bool(stream_options.get("include_usage")),
        changed=changed,
    )
