"""Sessions as the miner sees them: a few recent scored turns each, kept in Redis.

Each scored turn is stored compactly (what the user sent, what the assistant answered, the
reward and what followed) in a sorted set per session scored by turn index
(``Keys.miner_session``): adding the same turn twice changes nothing, so a redelivered
entry is harmless, and a revision of a turn (its reward revised by late feedback) replaces
the turn's earlier record (readers keep the newest revision of each turn); the set keeps
the newest ``TRAJECTORY_TURNS`` turns and expires ``TRAJECTORY_TTL_SECONDS`` after the
session's last scored turn. Any miner replica can then
assemble a session's trajectory, whichever replica saw its earlier turns.

Texts are cut to ``TEXT_CHARS``: the miner needs the gist of each turn, and the turn's own
``messages`` (the whole history) would make the set grow with the square of its length.
Before that, secrets and personal data are replaced by placeholders (``shared.redact``;
the ``redact_outbound`` setting): a record is what the skill-evolution LLM is shown.
"""

from __future__ import annotations

from typing import Any, cast

import orjson
import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field

from shared.keys import Keys
from shared.messages import ScoredV1
from shared.redact import DEFAULT, Redactor

TRAJECTORY_TURNS = 20
"""Scored turns kept per session (the newest)."""
TRAJECTORY_TTL_SECONDS = 24 * 3600
"""A session's turns are forgotten this long after its last scored turn."""
TEXT_CHARS = 2000
"""Each text of a kept turn (request, answer, follow-up) is cut to this length."""


class TurnRecord(BaseModel):
    """One scored turn, as kept for trajectories."""

    model_config = ConfigDict(frozen=True)

    turn_id: str
    index: int
    request: str
    """What arrived since the assistant's previous answer: the user's message, tool results."""
    answer: str
    """The assistant's answer (text, and the tools it called)."""
    reward: float | None
    follow_up: str = ""
    signals: list[str] = Field(default_factory=list)
    """Reward components and implicit signals that fired (``implicit.correction`` ...)."""
    skill_ids: list[str] = Field(default_factory=list)
    revision: int = 0
    """The revision of the turn's reward (see ``ScoredV1.revision``)."""


def record_of(scored: ScoredV1, redactor: Redactor | None = DEFAULT) -> TurnRecord:
    """The compact record of a scored turn, its texts redacted by ``redactor`` (None:
    kept as they are) before they are cut."""
    turn = scored.turn

    def text(raw: str) -> str:
        return _cut(raw if redactor is None else redactor.redact(raw)[0])

    return TurnRecord(
        turn_id=turn.id, index=turn.turn_index, request=text(_since_last_answer(turn.messages)),
        answer=text(_render(turn.response_message)), reward=scored.reward,
        follow_up=text("\n".join(_render(m) for m in scored.follow_up)),
        signals=sorted(scored.components), skill_ids=list(turn.skill_ids),
        revision=scored.revision)


class Trajectories:
    """Stores and reads the recent turns of sessions (redacted by ``redactor``)."""

    def __init__(self, redis: aioredis.Redis, keys: Keys,
                 redactor: Redactor | None = DEFAULT) -> None:
        self._redis = redis
        self._keys = keys
        self.redactor = redactor

    async def record(self, scored: ScoredV1) -> None:
        """Keep a scored turn in its session (idempotent)."""
        turn = scored.turn
        key = self._keys.miner_session(turn.tenant, turn.session_id)
        member = record_of(scored, self.redactor).model_dump_json().encode()
        async with self._redis.pipeline(transaction=True) as pipe:
            if scored.revision > 0:  # the turn's earlier revisions (the only turn there)
                pipe.zremrangebyscore(key, turn.turn_index, turn.turn_index)
            pipe.zadd(key, {member: turn.turn_index})
            pipe.zremrangebyrank(key, 0, -(TRAJECTORY_TURNS + 1))
            pipe.expire(key, TRAJECTORY_TTL_SECONDS)
            await pipe.execute()

    async def up_to(self, tenant: str, session_id: str, index: int) -> list[TurnRecord]:
        """The session's kept turns up to and including turn ``index``, oldest first."""
        raw = cast(list[bytes], await self._redis.zrangebyscore(
            self._keys.miner_session(tenant, session_id), "-inf", index))
        records: dict[str, TurnRecord] = {}
        for member in raw:
            record = TurnRecord.model_validate_json(member)
            kept = records.get(record.turn_id)
            if kept is None or record.revision >= kept.revision:  # the same turn twice
                records[record.turn_id] = record
        return sorted(records.values(), key=lambda r: r.index)


def _since_last_answer(messages: list[dict[str, Any]]) -> str:
    """The messages after the last assistant message: this turn's request."""
    start = 0
    for i, message in enumerate(messages):
        if message.get("role") == "assistant":
            start = i + 1
    return "\n".join(_render(m) for m in messages[start:] if m.get("role") != "system")


def _render(message: dict[str, Any]) -> str:
    """A message as ``role: text`` (content parts joined; tool calls named)."""
    role = str(message.get("role", "?"))
    parts = [_content_text(message.get("content"))]
    for call in message.get("tool_calls") or []:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            function = {}
        parts.append(f"[calls tool {function.get('name', '?')}"
                     f"({str(function.get('arguments', ''))[:300]})]")
    text = " ".join(p for p in parts if p)
    return f"{role}: {text}"


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content
                        if isinstance(part, dict) and part.get("type") == "text")
    return "" if content is None else orjson.dumps(content).decode()


def _cut(text: str) -> str:
    return text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS - 1] + "…"
