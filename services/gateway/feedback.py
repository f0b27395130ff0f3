"""``POST /v1/feedback``: explicit feedback from a user on a turn or a whole session.

A request names a session (``session_id`` in the body, or the ``X-Session-Id`` header,
which wins as it does on the chat route), optionally one turn of it, and a verdict::

    {"session_id": "s-1", "response_id": "chatcmpl-...", "rating": "up"}
    {"session_id": "s-1", "turn_index": 3, "score": -0.5, "text": "It is 42, not 41."}
    {"session_id": "s-1", "rating": "down"}                 # the whole session

Exactly one of ``rating`` (``"up"`` = 1.0, ``"down"`` = -1.0) and ``score`` (a float in
[-1, 1]) is required; at most one of ``response_id`` (the ``id`` of the chat completion
the client received) and ``turn_index`` (0-based, in the session); ``text`` (at most
4,000 characters) is an optional comment or correction. Unknown fields are ignored.
The answer is ``{"object": "feedback", "id", "session_id", "target", "score"}``.

Contract with the scorer
------------------------
Feedback lives in one Redis hash per session, ``Keys.feedback(tenant, session_id)``;
the tenant is the caller's (from its API key), so a key can only ever write feedback on
its own tenant's sessions. Fields:

- ``turn:<response id>`` -- feedback on the turn whose answer had that id;
- ``index:<n>`` -- feedback on the session's turn with ``turn_index`` n;
- ``session`` -- feedback on every turn of the session.

Each value is JSON ``{"score": float, "text": str | null, "created_at": float,
"id": str}``. A later feedback on the same target replaces the earlier one (last word
wins). The hash expires ``dedupe_ttl_seconds`` after the last feedback written to it.
When the scorer scores a turn it reads the hash and takes the first field present of
``turn:<turn.response_id>``, ``index:<turn.turn_index>``, ``session``.

If Redis cannot be reached the answer is a 503 (the client may retry); feedback is
small and not worth a local spool like the chat route's turns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Literal

import orjson
import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from services.gateway.auth import Authenticator
from services.gateway.errors import APIError
from services.gateway.request import parse_json, read_limited
from shared.keys import Keys
from shared.messages import new_id

log = logging.getLogger(__name__)

FEEDBACK_PATH = "/v1/feedback"
MAX_TEXT_CHARS = 4000
MAX_BODY_BYTES = 64 * 1024
"""Far above any valid feedback (4,000 characters of text, even all escaped)."""
WRITE_TIMEOUT_SECONDS = 3.0
"""Longest a feedback write waits for Redis (the client's own retries take over then)."""
SCORES = {"up": 1.0, "down": -1.0}
"""The score of each thumbs rating."""


class FeedbackRequest(BaseModel):
    """The body of ``POST /v1/feedback``; strict types, unknown fields ignored."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    session_id: str = Field(min_length=1, max_length=256)
    response_id: str | None = Field(None, min_length=1, max_length=256)
    turn_index: int | None = Field(None, ge=0)
    rating: Literal["up", "down"] | None = None
    score: float | None = Field(None, ge=-1.0, le=1.0, allow_inf_nan=False)
    text: str | None = Field(None, max_length=MAX_TEXT_CHARS)

    def target(self) -> str:
        """The hash field this feedback is stored under (see the module docstring)."""
        if self.response_id is not None:
            return f"turn:{self.response_id}"
        if self.turn_index is not None:
            return f"index:{self.turn_index}"
        return "session"

    def value(self) -> float:
        """The score in [-1, 1], from the rating or the score given."""
        if self.rating is not None:
            return SCORES[self.rating]
        assert self.score is not None  # checked in read_feedback
        return float(self.score)


def _invalid(param: str, message: str) -> APIError:
    return APIError(400, message, code="invalid_value", param=param)


def _validation_error(err: ErrorDetails) -> APIError:
    param = ".".join(str(p) for p in err["loc"]) or "body"
    if err["type"] == "missing":
        return _invalid(param, f"Missing required parameter: '{param}'.")
    return _invalid(param, f"Invalid '{param}': {err['msg']}.")


def read_feedback(raw: bytes, header_session: str | None) -> FeedbackRequest:
    """Parse and check a feedback body; raises a 400 ``APIError`` naming the field."""
    body: dict[str, Any] = parse_json(raw)
    if header_session:
        body["session_id"] = header_session
    try:
        req = FeedbackRequest.model_validate(body)
    except ValidationError as exc:
        raise _validation_error(exc.errors()[0]) from None
    if req.rating is not None and req.score is not None:
        raise _invalid("score", "Give either 'rating' or 'score', not both.")
    if req.rating is None and req.score is None:
        raise _invalid("rating", "Missing required parameter: 'rating' ('up' or 'down') "
                                 "or 'score' (a number in [-1, 1]).")
    if req.response_id is not None and req.turn_index is not None:
        raise _invalid("turn_index", "Give either 'response_id' or 'turn_index', not both.")
    return req


class FeedbackHandler:
    """Handles ``POST /v1/feedback``: authenticate, check, store under the caller's tenant."""

    def __init__(self, auth: Authenticator, redis: aioredis.Redis, keys: Keys,
                 ttl_seconds: int) -> None:
        self._auth = auth
        self._redis = redis
        self._keys = keys
        self._ttl = ttl_seconds

    async def __call__(self, request: Request) -> Response:
        caller = self._auth(request.headers)
        raw = await read_limited(request.stream(), MAX_BODY_BYTES)
        req = read_feedback(raw, request.headers.get("x-session-id"))
        feedback_id = "fb-" + new_id()
        target = req.target()
        score = req.value()
        value = orjson.dumps({"score": score, "text": req.text, "created_at": time.time(),
                              "id": feedback_id})
        await self._store(self._keys.feedback(caller.tenant, req.session_id), target, value)
        log.info("feedback_recorded", extra={"tenant": caller.tenant,
                                             "target": target.split(":", 1)[0]})
        body = {"object": "feedback", "id": feedback_id, "session_id": req.session_id,
                "target": target, "score": score}
        return Response(orjson.dumps(body), media_type="application/json")

    async def _store(self, key: str, field: str, value: bytes) -> None:
        """HSET and EXPIRE in one transaction; a 503 if Redis cannot be reached in time."""
        try:
            async with asyncio.timeout(WRITE_TIMEOUT_SECONDS):
                async with self._redis.pipeline(transaction=True) as pipe:
                    pipe.hset(key, field, value)
                    pipe.expire(key, self._ttl)
                    await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("feedback_redis_unreachable", extra={"error": type(exc).__name__})
            raise APIError(503, "Feedback could not be stored: the gateway's Redis is "
                                "unreachable. Please retry shortly.",
                           code="service_unavailable", headers={"Retry-After": "1"}) from None
