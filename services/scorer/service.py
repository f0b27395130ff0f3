"""The scorer service: two stages over Redis Streams, and an idle sweep.

1. ``turns`` -> session bookkeeping (``Sessions.arrive``): each turn is stored in its
   session and whatever it finalises is appended to the internal ``finalised`` stream.
2. ``finalised`` -> rewards (implicit feedback, the judge, explicit feedback) -> one
   ``scored`` entry per turn. The append is guarded by a marker keyed by the turn id in
   the same Lua step, so a redelivery or a second replica never scores a turn twice;
   the same step keeps a record of the score for late feedback (``revise``).
3. ``feedback`` -> superseding ``scored`` entries (``revise``): explicit feedback on a
   turn already scored revises its reward, once per revision.

Splitting the stages makes each one's work durable before its ack: a scorer killed
between finalising a turn and scoring it leaves a pending ``finalised`` entry that any
replica reclaims.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any, NamedTuple, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.scorer.combine import combine
from services.scorer.explicit import Explicit, feedback_fields, first_feedback
from services.scorer.implicit import implicit_reward
from services.scorer.judge import Judge, Verdict
from services.scorer.metrics import ScorerMetrics
from services.scorer.revise import RevisionConflict, Revisions, ScoreRecord, first_record
from services.scorer.sessions import Sessions
from shared.keys import Keys
from shared.messages import FinalisedV1, Message, ScoredV1, TurnV1
from shared.settings import Settings
from shared.worker import Reject

log = logging.getLogger("reef.scorer")

_SAFE_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
"""Turn ids go into JSON built in Lua; anything else is rejected (dead-lettered)."""


class Scoring(NamedTuple):
    """A finalised turn's score: the message, its reward's source (for metrics) and
    the record kept for late feedback (None: the turn is never revised)."""

    scored: ScoredV1
    source: str
    record: ScoreRecord | None


class Scorer:
    """The handlers of both stages and the idle sweep; one per scorer process."""

    def __init__(self, settings: Settings, redis: aioredis.Redis, metrics: ScorerMetrics,
                 judge: Judge | None = None) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = Keys(settings.namespace)
        self.metrics = metrics
        self.judge = judge if judge is not None or not settings.use_prm else Judge(
            settings, metrics)
        ttl = int(max(settings.session_idle_seconds * 4, 3600))
        self.sessions = Sessions(redis, self.keys, settings.resolved_stream_hard_maxlen(),
                                 settings.session_idle_seconds, ttl)
        self.revisions = Revisions(settings, redis, self.keys, metrics)

    async def start(self) -> None:
        if self.judge is not None:
            await self.judge.start()

    async def close(self) -> None:
        if self.judge is not None:
            await self.judge.close()

    # --- stage 1: turns -> finalised ------------------------------------------------------

    async def on_turns(self, batch: list[tuple[Message, str]]) -> list[Exception | None]:
        """Store a batch of turns in their sessions (one round trip); each finalises what
        its arrival completes."""
        errors: list[Exception | None] = [_check_turn(message) for message, _ in batch]
        usable = [cast(TurnV1, m) for (m, _), e in zip(batch, errors, strict=True) if e is None]
        results = iter(await self.sessions.arrive_many(usable) if usable else [])
        return [next(results) if error is None else error for error in errors]

    async def sweep(self, stopping: asyncio.Event) -> None:
        """Finalise sessions idle for ``session_idle_seconds``, until ``stopping``."""
        while not stopping.is_set():
            try:
                for session_key in await self.sessions.idle_sessions():
                    await self.sessions.sweep(session_key)
            except (RedisError, OSError) as exc:
                log.warning("scorer.sweep_failed", extra={"error": type(exc).__name__})
            try:
                await asyncio.wait_for(stopping.wait(), self.settings.sweep_interval_seconds)
            except TimeoutError:
                continue

    # --- stage 2: finalised -> scored -----------------------------------------------------

    async def on_finalised(self, batch: list[tuple[Message, str]]) -> list[Exception | None]:
        """Score a batch of finalised turns (judge calls concurrently) and publish one
        ``scored`` entry per turn, once, in one round trip."""
        errors: list[Exception | None] = [
            None if isinstance(m, FinalisedV1) else Reject(f"expected finalised.v1, got {m.kind}")
            for m, _ in batch]
        fins = [cast(FinalisedV1, m) for (m, _), e in zip(batch, errors, strict=True) if e is None]
        feedback = await self._explicit_many([f.turn for f in fins])
        scored = await asyncio.gather(*(self.score(f, fb) for f, fb in zip(fins, feedback,
                                                                           strict=True)),
                                      return_exceptions=True)
        outcomes = iter(await self._publish_many(fins, scored))
        return [next(outcomes) if error is None else error for error in errors]

    async def _publish_many(self, fins: list[FinalisedV1],
                            scored: list[Scoring | BaseException]
                            ) -> list[Exception | None]:
        """Append each turn's scored entry once, with its record (one round trip); then
        revise those whose feedback changed while they were scored (on a redelivery
        too: that check failing leaves the entries pending)."""
        outcomes: list[Exception | None] = []
        kept: list[tuple[int, ScoredV1, ScoreRecord]] = []
        async with self.redis.pipeline(transaction=False) as pipe:
            for result in scored:
                if not isinstance(result, BaseException):
                    await self.revisions.publish(
                        **self.revisions.publish_call(result.scored, result.record),
                        client=pipe)
            published = iter(await pipe.execute(raise_on_error=False) if fins else [])
        for fin, result in zip(fins, scored, strict=True):
            if isinstance(result, Exception):
                outcomes.append(result)
                continue
            if isinstance(result, BaseException):
                raise result
            done = next(published)
            if isinstance(done, Exception):
                outcomes.append(done)
                continue
            outcomes.append(None)
            if done:
                self._observe(fin, result.scored, result.source)
            if result.record is not None:
                kept.append((len(outcomes) - 1, result.scored, result.record))
        try:
            await self.revisions.recheck([(scored, record) for _, scored, record in kept])
        except (RedisError, OSError, RevisionConflict) as exc:
            for position, _, _ in kept:
                outcomes[position] = exc
        return outcomes

    def _observe(self, fin: FinalisedV1, scored: ScoredV1, source: str) -> None:
        self.metrics.finalised.labels(fin.reason).inc()
        self.metrics.finalisation_lag.observe(max(0.0, fin.created_at - fin.turn.created_at))
        self._count(scored, source)

    async def score(self, fin: FinalisedV1, explicit: Explicit | None = None) -> Scoring:
        """The scored message of a finalised turn, the source of its reward and its
        record; no side effects but judge calls. ``explicit`` is the user's feedback."""
        turn, s = fin.turn, self.settings
        base: dict[str, Any] = {"id": turn.id, "turn": turn, "follow_up": fin.follow_up,
                                "reason": fin.reason}
        if turn.turn_type == "side" and not s.train_side_turns:
            return Scoring(ScoredV1(**base, reward=None, trainable=False), "none", None)
        implicit = implicit_reward(turn, fin.follow_up) if s.use_implicit else None
        verdict = await self._judge(turn, fin.follow_up)
        judge_score = None if verdict is None else verdict.score
        implicit_score = None if implicit is None else implicit.score
        if implicit is not None and not implicit.signals and judge_score is not None:
            implicit_score = None  # "replied, nothing in it" should not dilute a verdict
        combined = combine(
            judge=judge_score, judge_required=s.use_prm, implicit=implicit_score,
            implicit_signals={} if implicit is None else implicit.signals,
            explicit=None if explicit is None else explicit[0],
            weights=s.reward_weights, explicit_overrides=s.explicit_overrides)
        trainable = combined.reward is not None and turn.completed
        scored = ScoredV1(
            **base, reward=combined.reward, components=combined.components,
            votes=[] if verdict is None else verdict.votes,
            rationale="" if verdict is None else verdict.rationale,
            trainable=trainable,
            teacher_hint=_hint(verdict, explicit),
            judge_tokens=0 if verdict is None else verdict.prompt_tokens
            + verdict.completion_tokens)
        hint = None if verdict is None else verdict.hint
        return Scoring(scored, combined.source, first_record(scored, explicit, hint))

    async def _judge(self, turn: TurnV1, follow_up: list[dict[str, Any]]) -> Verdict | None:
        if self.judge is None:
            return None
        return await self.judge.judge(turn, follow_up)

    async def _explicit_many(self, turns: list[TurnV1]) -> list[Explicit | None]:
        """The user's explicit feedback on each turn (or its session), if any, in one
        round trip: the most specific wins (response id, then turn index, then session)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for turn in turns:
                pipe.hmget(self.keys.feedback(turn.tenant, turn.session_id),
                           feedback_fields(turn.turn_index, turn.response_id))
            replies = await pipe.execute() if turns else []
        return [first_feedback(cast(list[bytes | None], values), turn.tenant)
                for turn, values in zip(turns, replies, strict=True)]

    def _count(self, scored: ScoredV1, source: str) -> None:
        if scored.reward is None:
            outcome = "untrained" if scored.reason == "side_turn" else "unscored"
            self.metrics.scored.labels(source, outcome).inc()
            return
        self.metrics.scored.labels(source, "scored").inc()
        self.metrics.observe_reward(scored.reward)


def _check_turn(message: Message) -> Exception | None:
    if not isinstance(message, TurnV1):
        return Reject(f"expected turn.v1, got {message.kind}")
    if not _SAFE_ID.match(message.id) or message.turn_index < 0:
        return Reject("turn id or index unusable")
    return None


def _hint(verdict: Verdict | None, explicit: Explicit | None) -> str | None:
    """A corrective hint for on-policy distillation: the user's own words on a turn they
    rated down beat the judge's."""
    if explicit is not None and explicit[0] < 0 and explicit[1]:
        return explicit[1]
    return None if verdict is None else verdict.hint
