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
its own tenant's sessions; and only on its own sessions: the key that made a session's
first turn owns it (the recorder notes its ``key_id`` in the session's response-id hash,
``OWNER_FIELD``), and feedback from another key of the tenant is a 403 — rewards steer
what the session's adapter learns. The tenant's admin key (``tenant_admin_keys``) may
give feedback on any session of its tenant. Fields:

- ``turn:<response id>`` -- feedback on the turn whose answer had that id;
- ``index:<n>`` -- feedback on the session's turn with ``turn_index`` n;
- ``session`` -- feedback on every turn of the session.

Each value is JSON ``{"score": float, "text": str | null, "created_at": float,
"id": str}``. A later feedback on the same target replaces the earlier one (last word
wins). The hash expires ``feedback_window_seconds`` after the last feedback written to
it. When the scorer scores a turn it reads the hash and takes the first field present of
``turn:<turn.response_id>``, ``index:<turn.turn_index>``, ``session``.

In the same transaction a ``feedback.v1`` event (``FeedbackV1``: the target and the turn
index it names, no score or text) is appended to the ``feedback`` stream. The scorer
consumes it and, for a turn it already scored within ``feedback_window_seconds``,
publishes a superseding ``scored`` entry with the reward recombined (see
``services.scorer.revise``); a turn not scored yet simply reads the hash when it is.

Sessions and answers that do not exist: 404
-------------------------------------------
A session exists while the recorder's turn counter (``Keys.turn_index``) does; a
response id exists when the recorder noted it in the session's ``Keys.session_responses``
hash; a turn index exists when it is below the counter. All three expire
``feedback_window_seconds`` after the session's last turn (the recorder's Lua refreshes
them; feedback refreshes them too) -- that setting, not ``dedupe_ttl_seconds``: the
counter is what makes a session nameable, so it lives as long as feedback may count.
Anything else is a 404 (``code: "not_found"``, ``param`` naming the field), also when
another tenant has a session of that id.

The race: a client may send feedback milliseconds after its answer. The chat route
sends an answer's last bytes only once its turn is in Redis (``DURABLE_WAIT_SECONDS``,
bounded), so before a 404 this gateway waits for its own recorder to flush what it
holds (``FLUSH_WAIT_SECONDS``) and re-checks for up to ``feedback_not_found_wait_seconds``
(1.5 s); while its recorder is spooling (Redis was unreachable) it answers 503 instead.
What remains is the cross-replica window: feedback sent to this replica for a turn
another replica still holds longer than that -- a streamed answer whose id the client
read from an early chunk before ``[DONE]``, a recorder slower than
``DURABLE_WAIT_SECONDS``, or a replica spooling while Redis is unreachable from it only.
Such feedback is a 404; the client may retry it once the answer is complete.

If Redis cannot be reached the answer is a 503 (the client may retry); feedback is
small and not worth a local spool like the chat route's turns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, Literal

import orjson
import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from services.gateway.auth import Authenticator, Caller
from services.gateway.errors import APIError
from services.gateway.recorder import OWNER_FIELD, Recorder
from services.gateway.request import parse_json, read_limited
from shared.keys import FEEDBACK, Keys
from shared.messages import FeedbackV1, new_id
from shared.settings import Settings, hash_api_key, key_id

log = logging.getLogger(__name__)

ADMIN_CALLER = "tenant-admin"
"""The key id of a tenant admin key's calls (it owns no session, and may name any)."""
FEEDBACK_PATH = "/v1/feedback"
MAX_TEXT_CHARS = 4000
MAX_BODY_BYTES = 64 * 1024
"""Far above any valid feedback (4,000 characters of text, even all escaped)."""
WRITE_TIMEOUT_SECONDS = 3.0
"""Longest a feedback write waits for Redis (the client's own retries take over then)."""
SCORES = {"up": 1.0, "down": -1.0}
"""The score of each thumbs rating."""
FLUSH_WAIT_SECONDS = 2.0
"""Longest feedback naming something not found waits for this gateway's recorder to
flush (the chat route's own bound, ``DURABLE_WAIT_SECONDS``)."""
RECHECK_SECONDS = 0.25
"""Pause between two checks while waiting."""
NOT_FOUND = {
    "session_id": "No session with this id in your tenant (or it ended more than "
                  "feedback_window_seconds ago).",
    "response_id": "No answer with this id in the session.",
    "turn_index": "No turn with this index in the session.",
}
"""The 404 message for each field that names something missing."""


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
    """Handles ``POST /v1/feedback``: authenticate, check, find the session and turn in
    the caller's tenant, store the feedback and its event."""

    def __init__(self, auth: Authenticator, redis: aioredis.Redis, keys: Keys,
                 recorder: Recorder, settings: Settings) -> None:
        self._auth = auth
        self._admin_keys = dict(settings.tenant_admin_keys)
        """Tenant admin key hash -> its tenant: it may give feedback on any session."""
        self._redis = redis
        self._keys = keys
        self._recorder = recorder
        self._ttl = settings.feedback_window_seconds
        self._maxlen = settings.resolved_stream_hard_maxlen()  # read by a group
        self._wait = settings.feedback_not_found_wait_seconds

    async def __call__(self, request: Request) -> Response:
        caller = self._caller(request.headers)
        raw = await read_limited(request.stream(), MAX_BODY_BYTES)
        req = read_feedback(raw, request.headers.get("x-session-id"))
        turn_index = await self._find(caller, req)
        feedback_id = "fb-" + new_id()
        target = req.target()
        score = req.value()
        value = orjson.dumps({"score": score, "text": req.text, "created_at": time.time(),
                              "id": feedback_id})
        event = FeedbackV1(id=feedback_id, tenant=caller.tenant, session_id=req.session_id,
                           target=target, turn_index=turn_index)
        await self._store(caller.tenant, req.session_id, target, value, event)
        log.info("feedback_recorded", extra={"tenant": caller.tenant,
                                             "target": target.split(":", 1)[0]})
        body = {"object": "feedback", "id": feedback_id, "session_id": req.session_id,
                "target": target, "score": score}
        return Response(orjson.dumps(body), media_type="application/json")

    def _caller(self, headers: Mapping[str, str]) -> Caller:
        """The caller: an inference key of the tenant, or the tenant's admin key
        (``tenant_admin_keys``; it may give feedback on any session of its tenant)."""
        header = headers.get("authorization") or ""
        if header[:7].lower() == "bearer ":
            tenant = self._admin_keys.get(hash_api_key(header[7:].strip()))
            if tenant is not None:
                return Caller(tenant, ADMIN_CALLER)
        return self._auth(headers)

    async def _find(self, caller: Caller, req: FeedbackRequest) -> int | None:
        """The index of the turn the feedback names (None: the whole session). Not found:
        wait for this gateway's recorder, re-check for ``feedback_not_found_wait_seconds``,
        then a 404 (a 503 while the recorder spools: the turn may be in its spool). A 403
        when the session is another key's (see ``OWNER_FIELD``)."""
        tenant = caller.tenant
        missing, index, owner = await self._lookup(tenant, req)
        if missing is None:
            _check_owner(caller, owner)
            return index
        deadline = time.monotonic() + self._wait
        await self._recorder.flushed(FLUSH_WAIT_SECONDS)
        while True:
            missing, index, owner = await self._lookup(tenant, req)
            if missing is None:
                _check_owner(caller, owner)
                return index
            if self._recorder.spooling:
                raise _unavailable("Feedback could not be matched to its turn yet: the "
                                   "gateway is still writing turns to Redis.")
            if time.monotonic() >= deadline:
                log.info("feedback_not_found", extra={"tenant": tenant, "param": missing})
                raise APIError(404, NOT_FOUND[missing], code="not_found", param=missing)
            await asyncio.sleep(RECHECK_SECONDS)

    async def _lookup(self, tenant: str, req: FeedbackRequest
                      ) -> tuple[str | None, int | None, bytes | None]:
        """What is missing (the field naming it) or None, the turn index named, and the
        session's owner (a key id; None for sessions recorded before owners were)."""
        responses = self._keys.session_responses(tenant, req.session_id)
        async with _redis_call(), self._redis.pipeline(transaction=False) as pipe:
            pipe.get(self._keys.turn_index(tenant, req.session_id))
            pipe.hmget(responses, [OWNER_FIELD, req.response_id or OWNER_FIELD])
            count, (owner, index) = await pipe.execute()
        if count is None:
            return "session_id", None, owner
        if req.response_id is not None:
            if index is None:
                return "response_id", None, owner
            return None, int(index), owner
        if req.turn_index is not None and req.turn_index >= int(count):
            return "turn_index", None, owner
        return None, req.turn_index, owner

    async def _store(self, tenant: str, session_id: str, field: str, value: bytes,
                     event: FeedbackV1) -> None:
        """HSET, the event's XADD and the session's expiries in one transaction; a 503 if
        Redis cannot be reached in time."""
        key = self._keys.feedback(tenant, session_id)
        async with _redis_call(), self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, field, value)
            # The session's keys live as long as feedback on it may count.
            for session_key in (key, self._keys.turn_index(tenant, session_id),
                                self._keys.session_responses(tenant, session_id)):
                pipe.expire(session_key, self._ttl)
            pipe.xadd(self._keys.stream(FEEDBACK), event.to_fields(),  # type: ignore[arg-type]
                      maxlen=self._maxlen, approximate=True)
            await pipe.execute()


def _unavailable(message: str) -> APIError:
    return APIError(503, message, code="service_unavailable", headers={"Retry-After": "1"})


@asynccontextmanager
async def _redis_call() -> AsyncIterator[None]:
    """Bound a Redis call by ``WRITE_TIMEOUT_SECONDS``; unreachable: a 503."""
    try:
        async with asyncio.timeout(WRITE_TIMEOUT_SECONDS):
            yield
    except (RedisError, OSError, TimeoutError) as exc:
        log.warning("feedback_redis_unreachable", extra={"error": type(exc).__name__})
        raise _unavailable("Feedback could not be stored: the gateway's Redis is "
                           "unreachable. Please retry shortly.") from None


def _check_owner(caller: Caller, owner: bytes | None) -> None:
    """Feedback steers the rewards of a session's turns: only the key that made them (the
    session's owner) or the tenant's admin key may give it (a 403 otherwise)."""
    if owner is None or caller.key_hash == ADMIN_CALLER:
        return
    if owner.decode() != key_id(caller.key_hash):
        raise APIError(403, "Feedback on this session is taken only from the API key that "
                            "made its turns, or from the tenant's admin key.",
                       code="permission_denied", param="session_id")
