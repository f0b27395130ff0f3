"""The scorer service: two stages over Redis Streams, and an idle sweep.

1. ``turns`` -> session bookkeeping (``Sessions.arrive``): each turn is stored in its
   session and whatever it finalises is appended to the internal ``finalised`` stream.
2. ``finalised`` -> rewards (implicit feedback, the judge, explicit feedback) -> one
   ``scored`` entry per turn. The append is guarded by a marker keyed by the turn id in
   the same Lua step, so a redelivery or a second replica never scores a turn twice.

Splitting the stages makes each one's work durable before its ack: a scorer killed
between finalising a turn and scoring it leaves a pending ``finalised`` entry that any
replica reclaims.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from typing import Any, cast

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.scorer.combine import combine
from services.scorer.implicit import implicit_reward
from services.scorer.judge import Judge, Verdict
from services.scorer.metrics import ScorerMetrics
from services.scorer.sessions import Sessions
from shared.keys import SCORED, Keys
from shared.messages import FinalisedV1, Message, ScoredV1, TurnV1
from shared.settings import Settings
from shared.worker import APPEND_ONCE_LUA, Reject

log = logging.getLogger("reef.scorer")

_SAFE_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
"""Turn ids go into JSON built in Lua; anything else is rejected (dead-lettered)."""



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
        self.sessions = Sessions(redis, self.keys, settings.stream_maxlen,
                                 settings.session_idle_seconds, ttl)
        self._publish_once = redis.register_script(APPEND_ONCE_LUA)  # one scored entry per turn

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
                            scored: list[tuple[ScoredV1, str] | BaseException]
                            ) -> list[Exception | None]:
        outcomes: list[Exception | None] = []
        async with self.redis.pipeline(transaction=False) as pipe:
            for fin, result in zip(fins, scored, strict=True):
                if isinstance(result, BaseException):
                    continue
                await self._publish_once(
                    keys=[self.keys.dedupe("scored", fin.turn.id), self.keys.stream(SCORED)],
                    args=[self.settings.dedupe_ttl_seconds, self.settings.stream_maxlen,
                          "scored.v1", orjson.dumps(result[0].model_dump(mode="json"))],
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
                self._observe(fin, *result)
        return outcomes

    def _observe(self, fin: FinalisedV1, scored: ScoredV1, source: str) -> None:
        self.metrics.finalised.labels(fin.reason).inc()
        self.metrics.finalisation_lag.observe(max(0.0, fin.created_at - fin.turn.created_at))
        self._count(scored, source)

    async def score(self, fin: FinalisedV1, explicit: tuple[float, str | None] | None = None
                    ) -> tuple[ScoredV1, str]:
        """The scored message of a finalised turn and the source of its reward (for
        metrics); no side effects but judge calls. ``explicit`` is the user's feedback."""
        turn, s = fin.turn, self.settings
        base: dict[str, Any] = {"id": turn.id, "turn": turn, "follow_up": fin.follow_up,
                                "reason": fin.reason}
        if turn.turn_type == "side" and not s.train_side_turns:
            return ScoredV1(**base, reward=None, trainable=False), "none"
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
        return scored, combined.source

    async def _judge(self, turn: TurnV1, follow_up: list[dict[str, Any]]) -> Verdict | None:
        if self.judge is None:
            return None
        return await self.judge.judge(turn, follow_up)

    async def _explicit_many(self, turns: list[TurnV1]
                             ) -> list[tuple[float, str | None] | None]:
        """The user's explicit feedback on each turn (or its session), if any, in one
        round trip: the most specific wins (response id, then turn index, then session)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for turn in turns:
                pipe.hmget(self.keys.feedback(turn.tenant, turn.session_id),
                           _feedback_fields(turn))
            replies = await pipe.execute() if turns else []
        return [_first_feedback(cast(list[bytes | None], values), turn.tenant)
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


def _feedback_fields(turn: TurnV1) -> list[str]:
    fields = [f"index:{turn.turn_index}", "session"]
    if turn.response_id:
        fields.insert(0, f"turn:{turn.response_id}")
    return fields


def _first_feedback(values: list[bytes | None], tenant: str) -> tuple[float, str | None] | None:
    for raw in values:
        if raw is None:
            continue
        try:
            data = orjson.loads(raw)
            score = float(data["score"])
            text = data.get("text")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            score = math.nan
        if math.isnan(score):
            log.warning("scorer.bad_feedback_entry", extra={"tenant": tenant})
            continue
        # A text that is not a string is dropped, not the whole turn with it.
        return max(-1.0, min(1.0, score)), text if isinstance(text, str) else None
    return None


def _hint(verdict: Verdict | None, explicit: tuple[float, str | None] | None) -> str | None:
    """A corrective hint for on-policy distillation: the user's own words on a turn they
    rated down beat the judge's."""
    if explicit is not None and explicit[0] < 0 and explicit[1]:
        return explicit[1]
    return None if verdict is None else verdict.hint
