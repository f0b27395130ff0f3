"""The skill-miner's handler for ``scored`` entries: keep, credit, retire, mine.

Per scored turn:

1. *Keep* it in its session's recent turns (``trajectory``), for later diagnoses.
2. *Credit* (a trainable turn with a reward and injected skills): the reward counts for
   the injected skills and for the comparable active skills that were not injected (see
   ``credit``); an injected skill whose credit shows it keeps hurting is retired, with
   the evidence as the reason. A revision of the turn's reward (a superseding entry after
   late feedback) moves what was counted to the new reward; a turn counts once.
3. *Mine* (a turn whose reward is below ``skill_update_threshold``): the session's
   trajectory goes to the LLM, whose proposals are curated into the library (``curate``).
   A turn is mined once, whichever of its revisions first made it fail.

While the LLM answers, the entry stays claimed (the worker's lease), so a slow answer is not
re-delivered to a second handler. Redelivery is harmless anyway: keeping is idempotent,
credit is guarded by a marker per turn (holding what was counted, written in the same
transaction), the LLM's validated answer is stored before it is applied (a redelivery
applies it again, it does not ask again), applying is idempotent per turn, and a marker
per turn closes mining.
An LLM failure raises, so the entry stays pending and the worker retries it after
``worker_claim_idle_ms``; after ``worker_max_deliveries`` it is dead-lettered, never lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import WatchError

from services.skill_miner import prompts
from services.skill_miner.credit import (
    Counted,
    CreditMove,
    comparable_without,
    credit_move,
    retirement_evidence,
)
from services.skill_miner.curate import Curator, Origin
from services.skill_miner.llm import Proposer, build_proposer
from services.skill_miner.metrics import OUTCOME_INVALID, MinerMetrics
from services.skill_miner.proposals import MinerAnswer
from services.skill_miner.similarity import Similarity, lexical_similarity, text_of
from services.skill_miner.trajectory import Trajectories, TurnRecord, record_of
from shared.keys import Keys
from shared.messages import Message, ScoredV1
from shared.redact import outbound_redactor
from shared.settings import Settings
from shared.skill_store import SkillNotFound, SkillStore
from shared.skills import Skill
from shared.worker import Reject

log = logging.getLogger("reef.skill_miner")

ACTIVE_CACHE_SECONDS = 5.0
"""How long a tenant's list of active skills is reused for credit (comparable skills);
a skill activated meanwhile starts collecting ``without`` credit a few seconds late."""


def _failed_before(settings: Settings, scored: ScoredV1) -> bool:
    """Whether a revision's previous reward already made the turn fail: that revision
    was mined (or is being mined), so this one is not."""
    return (scored.revision > 0 and scored.previous_reward is not None
            and scored.previous_reward < settings.skill_update_threshold)


def should_mine(settings: Settings, scored: ScoredV1) -> bool:
    """Whether a scored turn is mined for skills: a main turn whose reward is below
    ``skill_update_threshold``, when mining may propose anything."""
    return (scored.reward is not None and scored.reward < settings.skill_update_threshold
            and scored.turn.turn_type == "main" and scored.turn.turn_index >= 0
            and settings.max_new_skills > 0)


class SkillMiner:
    """The ``scored`` handler and what it needs; one per miner process."""

    def __init__(self, settings: Settings, redis: aioredis.Redis, metrics: MinerMetrics, *,
                 llm: Proposer | None = None,
                 similarity: Similarity = lexical_similarity) -> None:
        """``llm`` None builds one from the settings; ``similarity`` is the dedupe measure
        (lexical by default; pass an embedding one to dedupe paraphrases)."""
        self.settings = settings
        self.redis = redis
        self.keys = Keys(settings.namespace)
        self.metrics = metrics
        self.store = SkillStore(redis, self.keys, settings.stream_maxlen)
        self.llm = llm if llm is not None else build_proposer(settings, metrics)
        self.trajectories = Trajectories(redis, self.keys, outbound_redactor(settings))
        self.similarity = similarity
        self.curator = Curator(self.store, metrics, similarity, settings.skill_merge_similarity,
                               settings.skill_auto_promote)
        self._active: dict[str, tuple[float, list[Skill]]] = {}

    async def start(self) -> None:
        await self.llm.start()

    async def close(self) -> None:
        await self.llm.close()

    async def on_scored(self, message: Message, entry_id: str) -> None:
        """Keep, credit and mine one scored turn (see the module docstring)."""
        if not isinstance(message, ScoredV1):
            raise Reject(f"expected scored.v1, got {message.kind}")
        if message.turn.turn_index < 0:
            raise Reject("turn index unusable")
        await self.trajectories.record(message)
        # A revision may take back a reward counted before (now unscored or untrainable).
        reward = message.reward if message.trainable else None
        if reward is not None or message.revision > 0:
            if message.turn.skill_ids:
                await self.credit(message, reward)
            elif message.turn.turn_type == "main":
                await self.count_baseline(message, reward)
        if should_mine(self.settings, message) and not _failed_before(self.settings, message):
            await self.mine(message)

    # --- credit ------------------------------------------------------------------------

    async def credit(self, scored: ScoredV1, reward: float | None) -> None:
        """Count the turn's newest reward (None: none) for the injected and comparable
        skills, once per turn, then retire the injected skills that keep hurting."""
        turn = scored.turn

        async def queue(pipe: Any, move: CreditMove, without: tuple[str, ...]) -> None:
            await self.store.add_credit(turn.tenant, turn.skill_ids, move.reward,
                                        list(without), count=move.count, pipe=pipe)

        await self._count_once(scored, reward, queue)
        for skill in await self._skills(turn.tenant, turn.skill_ids):
            await self._retire_if_hurting(skill)

    async def count_baseline(self, scored: ScoredV1, reward: float | None) -> None:
        """Count a turn with no skill injected in its tenant's baseline (once per turn,
        at its newest reward)."""
        key = self.keys.skill_baseline(scored.turn.tenant)

        async def queue(pipe: Any, move: CreditMove, without: tuple[str, ...]) -> None:
            pipe.hincrby(key, "count", move.count)
            pipe.hincrbyfloat(key, "reward_sum", move.reward)

        await self._count_once(scored, reward, queue)

    async def _count_once(self, scored: ScoredV1, reward: float | None,
                          queue: Callable[[Any, CreditMove, tuple[str, ...]], Awaitable[None]]
                          ) -> None:
        """Apply the credit move of this revision and write what was counted into the
        turn's ``credit`` marker, in one transaction (retried if the marker changed)."""
        turn = scored.turn
        marker = self.keys.miner_done("credit", turn.tenant, turn.id)
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(marker)
                    raw = cast(bytes | None, await pipe.get(marker))
                    counted = Counted.parse(raw, scored.previous_reward)
                    move = credit_move(counted, scored.revision, reward)
                    if move is None:
                        await pipe.reset()  # type: ignore[no-untyped-call]
                        return
                    without = await self._without(scored, counted)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    await queue(pipe, move, without)
                    pipe.set(marker, Counted(scored.revision, reward, without).to_json(),
                             ex=self.settings.dedupe_ttl_seconds)
                    await pipe.execute()
                    return
                except WatchError:
                    await pipe.reset()  # type: ignore[no-untyped-call]  # a revision came first

    async def _without(self, scored: ScoredV1, counted: Counted | None) -> tuple[str, ...]:
        """The comparable skills credited without the turn: those counted before, if
        known, so a revision moves exactly what was counted."""
        if counted is not None and counted.without is not None:
            return counted.without
        turn = scored.turn
        if not turn.skill_ids:
            return ()
        injected = await self._skills(turn.tenant, turn.skill_ids)
        return tuple(comparable_without(injected, await self._active_skills(turn.tenant)))

    async def _baseline(self, tenant: str) -> tuple[int, float]:
        raw = cast(dict[bytes, bytes], await self.redis.hgetall(self.keys.skill_baseline(tenant)))
        return int(raw.get(b"count", 0)), float(raw.get(b"reward_sum", 0.0))

    async def _retire_if_hurting(self, skill: Skill) -> None:
        if skill.status != "active":
            return
        always = (await self._baseline(skill.tenant)
                  if skill.category in self.settings.skill_always_categories else None)
        evidence = retirement_evidence(skill, self.settings.skill_retire_min_turns,
                                       self.settings.skill_retire_margin,
                                       always_baseline=always)
        if evidence is None:
            return
        try:
            retired = await self.store.set_status(skill.tenant, skill.id, "retired", evidence)
        except SkillNotFound:
            return  # deleted meanwhile: nothing to retire
        if retired.retired_reason == evidence:  # not another replica's retirement
            self.metrics.retired.inc()
            credit = skill.credit
            log.warning("skill_miner.skill_retired", extra={
                "tenant": skill.tenant, "skill_id": skill.id, "with_count": credit.with_count,
                "with_mean": credit.with_mean, "without_count": credit.without_count,
                "without_mean": credit.without_mean})
        self._active.pop(skill.tenant, None)

    async def _skills(self, tenant: str, skill_ids: list[str]) -> list[Skill]:
        skills = [await self.store.get(tenant, skill_id) for skill_id in skill_ids]
        return [s for s in skills if s is not None]

    async def _active_skills(self, tenant: str) -> list[Skill]:
        cached = self._active.get(tenant)
        now = time.monotonic()
        if cached is not None and now - cached[0] < ACTIVE_CACHE_SECONDS:
            return cached[1]
        active = await self.store.list(tenant, "active")
        self._active[tenant] = (now, active)
        return active

    # --- mining ------------------------------------------------------------------------

    async def mine(self, scored: ScoredV1) -> None:
        """Diagnose the session up to this turn and curate the proposals (once per turn);
        the stream worker keeps the entry claimed while the LLM answers."""
        turn = scored.turn
        mined = self.keys.miner_done("mined", turn.tenant, turn.id)
        if await self.redis.exists(mined):
            return
        answer_key = self.keys.miner_answer(turn.tenant, turn.id)
        cached = await self.redis.get(answer_key)
        if cached is not None:
            answer: MinerAnswer | None = MinerAnswer.model_validate_json(cached)
        else:
            answer = await self._ask(scored)
            if answer is not None:
                await self.redis.set(answer_key, answer.model_dump_json(),
                                     ex=self.settings.dedupe_ttl_seconds)
        if answer is None:
            self.metrics.proposals.labels(OUTCOME_INVALID).inc()
            self.metrics.mined.labels("invalid").inc()
        else:
            origin = Origin(turn.tenant, turn.session_id, turn.id)
            for proposal in answer.skills:
                await self.curator.apply(proposal, origin)
            self.metrics.mined.labels("proposed" if answer.skills else "nothing").inc()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(mined, b"1", ex=self.settings.dedupe_ttl_seconds)
            pipe.delete(answer_key)
            await pipe.execute()

    async def _ask(self, scored: ScoredV1) -> MinerAnswer | None:
        """The LLM's validated answer for a failing turn (None: invalid twice)."""
        turn = scored.turn
        failing = record_of(scored, self.trajectories.redactor)
        if not self.llm.needs_context:  # it reads the failing turn only
            return await self.llm.propose([failing], failing, [], self.settings.max_new_skills)
        turns = await self.trajectories.up_to(turn.tenant, turn.session_id, turn.turn_index)
        if not any(r.turn_id == failing.turn_id for r in turns):
            turns.append(failing)  # trimmed already (a very late redelivery)
        existing = await self._relevant_skills(turn.tenant, failing)
        log.info("skill_miner.mining", extra={"tenant": turn.tenant, "turn_id": turn.id,
                                              "turns": len(turns)})
        return await self.llm.propose(turns, failing, existing, self.settings.max_new_skills)

    async def _relevant_skills(self, tenant: str, failing: TurnRecord) -> list[Skill]:
        """The tenant's live skills most similar to the failing turn, for the prompt (so
        the LLM can improve one instead of proposing a near-copy)."""
        existing = [s for s in await self.store.list(tenant) if s.status != "retired"]
        if len(existing) <= prompts.EXISTING_SKILLS_SHOWN:
            return existing
        scores = await asyncio.to_thread(self.similarity, f"{failing.request}\n{failing.answer}",
                                         [text_of(s) for s in existing])
        ranked = sorted(zip(scores, existing, strict=True), key=lambda p: p[0], reverse=True)
        return [s for _, s in ranked[:prompts.EXISTING_SKILLS_SHOWN]]
