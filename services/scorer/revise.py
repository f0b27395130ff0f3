"""Late feedback: superseding ``scored`` entries for turns already scored.

When the scorer publishes a turn's first score it keeps a compact record of it
(``ScoreRecord``: the entry's stream id, reward, components, the explicit feedback used,
the revision) in its session's hash ``Keys.session_scored``, field ``<turn index>``; the
hash expires ``feedback_window_seconds`` after the session's last score. A
``feedback.v1`` event from the gateway (or the scorer's own check right after a first
score, which closes the race with feedback stored while the judge was busy) makes it
compare each named turn's current explicit feedback with the one its newest revision
used. When they differ, the reward is recombined (``combine``) from the recorded
components and the new explicit score, and a ``scored.v1`` with ``revision`` + 1,
``previous_reward`` and the id ``scored_id(turn id, revision)`` is appended, carrying the
full turn read back from the first entry (``XRANGE`` by its stream id). A turn scored
longer than the window ago, or whose first entry was trimmed from the stream, is counted
(``reef_scorer_late_feedback_total``) and left as it is.

Exactly once per revision: ``PUBLISH_LUA`` runs ``shared.worker.APPEND_ONCE_LUA`` (a
marker per message id, that is per (turn, revision)) and writes the record in the same
step, only while the record is still the one the revision was computed from (compare
and set). Two replicas, a redelivered or a replayed event all end with one entry per
revision, and the newest revision carries the last feedback written.
"""

from __future__ import annotations

import logging
import time
from typing import Any, cast

import orjson
import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict

from services.scorer.combine import combine
from services.scorer.explicit import Explicit, feedback_fields, first_feedback
from services.scorer.metrics import ScorerMetrics
from shared.keys import SCORED, Keys
from shared.messages import BadMessage, FeedbackV1, Message, ScoredV1, decode, scored_id
from shared.settings import Settings
from shared.worker import APPEND_ONCE_LUA, Reject

log = logging.getLogger("reef.scorer")

PUBLISH_LUA = """
-- KEYS: marker, scored stream, the session's scored hash
-- ARGV: marker ttl, maxlen, kind, data (APPEND_ONCE_LUA's); record field ('' keeps no
-- record), record JSON, record ttl, the record it replaces ('' on a first score)
if ARGV[8] ~= '' and redis.call('HGET', KEYS[3], ARGV[5]) ~= ARGV[8] then return -1 end
local appended = (function()
""" + APPEND_ONCE_LUA + """
end)()
if appended == 0 or ARGV[5] == '' then return appended end
local record = ARGV[6]
if ARGV[8] == '' then
  -- nothing ran in between: the stream's last entry is the one just appended
  local id = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1][1]
  record = string.sub(record, 1, -2) .. ',"entry":"' .. id .. '"}'
end
redis.call('HSET', KEYS[3], ARGV[5], record)
redis.call('EXPIRE', KEYS[3], ARGV[7])
return 1
"""
"""Append a ``scored`` entry once and keep its record; 1 appended, 0 already appended
(by message id), -1 the record changed since it was read (read it again)."""

CAS_ATTEMPTS = 5
"""Re-reads of a record that another replica revised meanwhile, before giving up (the
event stays pending and is retried)."""
OUTCOMES = ("applied", "unchanged", "not_scored", "too_late", "entry_gone")
"""Outcomes of a feedback event, most telling first (a session event names many turns)."""


class ScoreRecord(BaseModel):
    """What the scorer keeps of a scored turn for late feedback."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    turn_id: str
    index: int
    response_id: str | None = None
    entry: str = ""
    """Stream id of the turn's first ``scored`` entry (written by ``PUBLISH_LUA``)."""
    revision: int = 0
    reward: float | None
    components: dict[str, float]
    explicit: float | None = None
    explicit_text: str | None = None
    judge_hint: str | None = None
    scored_at: float
    """When the first score was published: the window counts from it."""

    def used(self) -> Explicit | None:
        """The explicit feedback the newest revision was computed with."""
        return None if self.explicit is None else (self.explicit, self.explicit_text)


def first_record(scored: ScoredV1, explicit: Explicit | None,
                 judge_hint: str | None) -> ScoreRecord:
    """The record of a turn's first score (its ``entry`` is added when appended)."""
    return ScoreRecord(
        turn_id=scored.turn.id, index=scored.turn.turn_index,
        response_id=scored.turn.response_id, reward=scored.reward,
        components=scored.components, explicit=None if explicit is None else explicit[0],
        explicit_text=None if explicit is None else explicit[1], judge_hint=judge_hint,
        scored_at=time.time())


class Revisions:
    """Publishes scored entries with their records, and revises them on late feedback."""

    def __init__(self, settings: Settings, redis: aioredis.Redis, keys: Keys,
                 metrics: ScorerMetrics) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = keys
        self.metrics = metrics
        self.publish = redis.register_script(PUBLISH_LUA)
        for outcome in OUTCOMES:
            metrics.late_feedback.labels(outcome)

    def publish_call(self, scored: ScoredV1, record: ScoreRecord | None,
                     replaces: bytes = b"") -> dict[str, Any]:
        """The ``PUBLISH_LUA`` call appending ``scored`` once (by its message id) and
        keeping ``record`` (None: none kept) if the record is still ``replaces``."""
        turn = scored.turn
        exclude = {"entry"} if not replaces else set()
        return {"keys": [self.keys.dedupe("scored", scored.id), self.keys.stream(SCORED),
                         self.keys.session_scored(turn.tenant, turn.session_id)],
                "args": [self.settings.dedupe_ttl_seconds,
                         self.settings.resolved_stream_hard_maxlen(),  # read by groups
                         scored.kind, orjson.dumps(scored.model_dump(mode="json")),
                         "" if record is None else str(record.index),
                         b"" if record is None else record.model_dump_json(exclude=exclude),
                         self.settings.feedback_window_seconds, replaces]}

    async def on_feedback(self, message: Message, entry_id: str) -> None:
        """Handle a ``feedback.v1`` event: revise the already scored turns it names."""
        if not isinstance(message, FeedbackV1):
            raise Reject(f"expected feedback.v1, got {message.kind}")
        outcomes = await self.revise(message.tenant, message.session_id, message.turn_index)
        outcome = next((o for o in OUTCOMES if o in outcomes), "not_scored")
        self.metrics.late_feedback.labels(outcome).inc()

    async def revise(self, tenant: str, session_id: str, index: int | None) -> list[str]:
        """Revise turn ``index`` (None: every scored turn of the session) if its explicit
        feedback changed; the outcome for each turn."""
        key = self.keys.session_scored(tenant, session_id)
        if index is None:
            fields = [_text(f) for f in cast(list[bytes], await self.redis.hkeys(key))]
        else:
            fields = [str(index)]
        return [await self.revise_turn(tenant, session_id, field) for field in fields]

    async def recheck(self, published: list[tuple[ScoredV1, ScoreRecord]]) -> None:
        """Right after first scores: revise the turns whose feedback changed while they
        were being scored (its event found no record yet)."""
        if not published:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for scored, record in published:
                pipe.hmget(self.keys.feedback(scored.turn.tenant, scored.turn.session_id),
                           feedback_fields(record.index, record.response_id))
            replies = await pipe.execute()
        for (scored, record), values in zip(published, replies, strict=True):
            if first_feedback(values, scored.turn.tenant) != record.used():
                await self.revise_turn(scored.turn.tenant, scored.turn.session_id,
                                       str(record.index))

    async def revise_turn(self, tenant: str, session_id: str, field: str) -> str:
        """Publish the next revision of one turn if its explicit feedback changed."""
        key = self.keys.session_scored(tenant, session_id)
        for _ in range(CAS_ATTEMPTS):
            raw = cast(bytes | None, await self.redis.hget(key, field))
            if raw is None:
                return "not_scored"
            record = ScoreRecord.model_validate_json(raw)
            if time.time() - record.scored_at > self.settings.feedback_window_seconds:
                return "too_late"
            explicit = await self._explicit(tenant, session_id, record)
            if explicit == record.used():
                return "unchanged"
            original = await self._original(record.entry)
            if original is None:
                log.warning("scorer.revision_entry_gone",
                            extra={"tenant": tenant, "turn_id": record.turn_id})
                return "entry_gone"
            scored, revised = self.superseding(original, record, explicit)
            done = await self.publish(**self.publish_call(scored, revised, raw))
            if done == 1:
                self.metrics.revisions.inc()
                return "applied"
            if done == 0:  # this revision's id was appended already (a replayed export)
                return "unchanged"
        raise RevisionConflict(f"record of turn {field} kept changing")

    def superseding(self, original: ScoredV1, record: ScoreRecord, explicit: Explicit | None
                    ) -> tuple[ScoredV1, ScoreRecord]:
        """The next revision of a turn: its reward recombined with ``explicit``."""
        s, components = self.settings, dict(record.components)
        components.pop("explicit", None)
        signals = {k.removeprefix("implicit."): v for k, v in components.items()
                   if k.startswith("implicit.")}
        combined = combine(
            judge=components.get("judge"), judge_required=s.use_prm,
            implicit=components.get("implicit"), implicit_signals=signals,
            explicit=None if explicit is None else explicit[0],
            weights=s.reward_weights, explicit_overrides=s.explicit_overrides)
        revision = record.revision + 1
        hint = (explicit[1] if explicit is not None and explicit[0] < 0 and explicit[1]
                else record.judge_hint)
        scored = ScoredV1.model_validate({
            **dict(original), "id": scored_id(original.turn.id, revision),
            "created_at": time.time(), "reward": combined.reward,
            "components": combined.components,
            "trainable": combined.reward is not None and original.turn.completed,
            "teacher_hint": hint, "judge_tokens": 0, "revision": revision,
            "previous_reward": record.reward})
        revised = record.model_copy(update={
            "revision": revision, "reward": combined.reward,
            "components": combined.components,
            "explicit": None if explicit is None else explicit[0],
            "explicit_text": None if explicit is None else explicit[1]})
        return scored, revised

    async def _explicit(self, tenant: str, session_id: str,
                        record: ScoreRecord) -> Explicit | None:
        values = await self.redis.hmget(self.keys.feedback(tenant, session_id),
                                        feedback_fields(record.index, record.response_id))
        return first_feedback(cast(list[bytes | None], values), tenant)

    async def _original(self, entry: str) -> ScoredV1 | None:
        """The turn's first scored entry, or None when it was trimmed away."""
        if not entry:
            return None
        found = cast(list[tuple[bytes, dict[bytes, bytes]]],
                     await self.redis.xrange(self.keys.stream(SCORED), entry, entry))
        if not found:
            return None
        try:
            message = decode(found[0][1])
        except BadMessage:
            return None
        return message if isinstance(message, ScoredV1) else None


class RevisionConflict(RuntimeError):
    """A turn's record changed on every attempt: the event is retried later."""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
