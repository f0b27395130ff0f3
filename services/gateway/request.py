"""Reading a chat-completions request: parse, check, and split Reef's own fields off.

Validation is hand-written and shallow on purpose: it checks what Reef relies on and
what the upstream would otherwise reject with a less clear message, and leaves every
field it does not know untouched for the upstream.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import orjson

from services.gateway.errors import APIError
from shared.settings import Settings, key_id

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays and objects a body may have (``RequestLimits`` overrides it
on the chat route). orjson parses up to 1,024 levels but serialises only up to 254, and a
turn is re-serialised inside other messages: a deeper body would fail after its answer."""
ORJSON_MAX_DEPTH = 254
"""The deepest nesting ``orjson.dumps`` writes (it raises beyond it)."""
_NOT_IN_HEADERS = re.compile("[\x00-\x08\x0a-\x1f\x7f]")
"""Characters an HTTP header value cannot hold (a tab can)."""
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
    caller: str = ""
    """``key_id`` of the caller's key: recorded on the turn (the session's owner)."""


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """What a chat request may ask for (``Settings.max_choices`` ...)."""

    max_choices: int = 16
    max_output_tokens: int = 131_072
    max_json_depth: int = MAX_JSON_DEPTH

    @classmethod
    def of(cls, settings: Settings) -> RequestLimits:
        return cls(settings.max_choices, settings.max_output_tokens, settings.max_json_depth)


DEFAULT_LIMITS = RequestLimits()


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


def check_content_type(headers: Mapping[str, str]) -> None:
    """A body declared as something other than JSON is a 415; none declared is read as
    JSON (what the client meant, whatever its HTTP library forgot)."""
    declared = headers.get("content-type")
    if declared is None:
        return
    media = declared.split(";", 1)[0].strip().lower()
    if media == "application/json" or (media.startswith("application/")
                                       and media.endswith("+json")):
        return
    raise APIError(415, f"Unsupported Content-Type {declared[:100]!r}: send the body as JSON "
                        "with 'Content-Type: application/json'.",
                   code="unsupported_media_type")


def parse_json(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> dict[str, Any]:
    """The body as a JSON object no deeper than ``max_depth``, or a 400."""
    if not raw or raw.isspace():
        raise APIError(400, "The request body is empty: send a JSON object.",
                       code="invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise APIError(400, f"We could not parse the JSON body of your request ({exc}). "
                            "Send a JSON object encoded as UTF-8.",
                       code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    # Counting brackets is C-fast: a body with no more of them than max_depth cannot be
    # too deep, so only a body with many is checked.
    if raw.count(b"[") + raw.count(b"{") > max_depth and too_deep(body, max_depth):
        raise APIError(400, f"The JSON body is nested more than {max_depth} levels deep.",
                       code="invalid_json")
    return body


def too_deep(value: Any, max_depth: int) -> bool:
    """Whether parsed JSON nests more than ``max_depth`` levels, found at C speed: orjson
    writes at most ``ORJSON_MAX_DEPTH`` levels, so ``value`` inside enough extra lists to
    leave ``max_depth`` levels for it fails exactly when it is deeper (a Python walk of a
    100-message conversation cost ~4x its parse; this costs a fraction of it)."""
    wrapped = value
    for _ in range(ORJSON_MAX_DEPTH - max_depth):
        wrapped = [wrapped]
    try:
        orjson.dumps(wrapped)
    except TypeError as exc:  # parsed JSON has no unserialisable values: only the depth
        if "Recursion limit" not in str(exc):
            raise
        return True
    return False


def _field_error(param: str, message: str) -> APIError:
    return APIError(400, message, code="invalid_value", param=param)


def check_messages(messages: Any) -> None:
    """Messages must be a non-empty list of objects with a known role; content, when
    given, a string or an array of typed parts (a missing one is left to the upstream:
    OpenAI requires it, some servers do not); a tool message names its ``tool_call_id``;
    tool calls are well formed. Every message of every request passes here, so the
    names of fields in errors are only built once there is an error."""
    if messages is None:
        raise _field_error("messages", "Missing required parameter: 'messages'.")
    if not isinstance(messages, list) or not messages:
        raise _field_error("messages", "'messages' must be a non-empty array.")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _field_error(f"messages[{i}]", f"messages[{i}] must be an object.")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:  # a dict is unhashable
            raise _field_error(f"messages[{i}].role",
                               f"messages[{i}].role must be one of {sorted(ROLES)}, "
                               f"got {str(role)[:40]!r}.")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            _check_content(i, content)
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise _field_error(f"messages[{i}].tool_call_id",
                                   f"messages[{i}].tool_call_id is required on a 'tool' "
                                   "message: the id of the tool call it answers.")
        tool_calls = message.get("tool_calls")
        if tool_calls is not None:
            _check_tool_calls(i, tool_calls)


def _check_content(i: int, content: Any) -> None:
    if not isinstance(content, list):
        where = f"messages[{i}].content"
        raise _field_error(where, f"{where} must be a string or an array of content "
                                  f"parts, got {type(content).__name__}.")
    for j, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            where = f"messages[{i}].content[{j}]"
            raise _field_error(where, f"{where} must be an object with a string 'type' "
                                      "(e.g. {'type': 'text', 'text': ...}).")


def _check_tool_calls(i: int, tool_calls: Any) -> None:
    """An array of ``{"id", "type": "function", "function": {"name", "arguments"}}``
    with the arguments JSON-encoded in a string (as OpenAI's answers give them)."""
    if not isinstance(tool_calls, list):
        where = f"messages[{i}].tool_calls"
        raise _field_error(where, f"{where} must be an array of tool calls.")
    for k, call in enumerate(tool_calls):
        if not isinstance(call, dict):
            raise _tool_call_error(i, k, "", "must be an object.")
        if "id" in call and not isinstance(call["id"], str):
            raise _tool_call_error(i, k, ".id", "must be a string.")
        if call.get("type", "function") != "function":
            continue  # another kind of tool call (custom tools): the upstream judges it
        function = call.get("function")
        if not isinstance(function, dict):
            raise _tool_call_error(i, k, ".function",
                                   "must be an object with 'name' and 'arguments'.")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise _tool_call_error(i, k, ".function.name", "must be a non-empty string.")
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            raise _tool_call_error(i, k, ".function.arguments",
                                   "must be a string (the arguments as JSON text), got "
                                   f"{type(arguments).__name__}.")


def _tool_call_error(i: int, k: int, field: str, problem: str) -> APIError:
    where = f"messages[{i}].tool_calls[{k}]{field}"
    return _field_error(where, f"{where} {problem}")


def _check_types(body: dict[str, Any], limits: RequestLimits) -> None:
    model = body.get("model")
    if model is None:
        raise _field_error("model", "Missing required parameter: 'model'.")
    if not isinstance(model, str) or not model:
        raise _field_error("model", "'model' must be a non-empty string.")
    for name in ("stream", "logprobs"):
        if name in body and body[name] is not None and not isinstance(body[name], bool):
            raise _field_error(name, f"'{name}' must be a boolean.")
    _check_count(body, "n", limits.max_choices)
    for name in ("max_tokens", "max_completion_tokens"):
        _check_count(body, name, limits.max_output_tokens)
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise _field_error("tools", "'tools' must be an array.")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _field_error("stream_options", "'stream_options' must be an object.")


def _check_count(body: dict[str, Any], name: str, limit: int) -> None:
    value = body.get(name)
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _field_error(name, f"'{name}' must be a positive integer.")
    if value > limit:
        raise _field_error(name, f"'{name}' is {value}; this gateway allows at most {limit}.")


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
    elif not isinstance(sid, str) or len(sid) > 256 or _NOT_IN_HEADERS.search(sid):
        # It is echoed in X-Reef-Session-Id: a control character there made uvicorn drop
        # the connection after the turn was answered upstream (found by schemathesis).
        raise APIError(400, "The session id must be a string of at most 256 characters, "
                            "without control characters.",
                       code="invalid_value", param="session_id")
    return sid, turn_type, done


def read_chat_request(body: dict[str, Any], headers: Mapping[str, str], tenant: str,
                      key_hash: str, model_map: dict[str, str],
                      limits: RequestLimits = DEFAULT_LIMITS) -> ChatRequest:
    """Check a parsed body and derive what Reef needs; raises ``APIError``."""
    _check_types(body, limits)
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
        caller=key_id(key_hash),
    )
