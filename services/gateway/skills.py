"""Skill injection: the most relevant active skills of a tenant, added to a main turn's
system prompt, and the index they come from kept current from the ``skills`` stream.

Every gateway replica holds its own index (``shared.skill_index``) in memory. At start it
loads the embedding model (in a thread, while serving: until then nothing is injected) and
every tenant's active skills; then it follows the whole ``skills`` stream (no consumer
group: every replica needs every event) and, per event, re-reads that one skill and
re-indexes its tenant. Nothing on the request path waits on Redis. Skills of the
``skill_always_categories`` (standing preferences) go into every main turn of their tenant,
ahead of the retrieved ones.

The block is appended to the first system (or developer) message, or becomes the system
message when there is none. Appending, not prepending, keeps the agent's own system prompt
a stable prefix for the upstream's prompt cache.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.gateway.metrics import GatewayMetrics
from services.gateway.request import ChatRequest
from shared.keys import SKILLS, Keys
from shared.messages import BadMessage, SkillEventV1, decode
from shared.settings import Settings
from shared.skill_index import (
    Embedder,
    Hit,
    Mode,
    SkillIndex,
    embedding_available,
    query_text,
)
from shared.skill_store import SkillStore
from shared.skills import Skill

log = logging.getLogger("reef.gateway.skills")

BLOCK_MS = 2000
"""Block of each XREAD; below the client's socket timeout (5 s)."""
OPEN, CLOSE = "<reef-skills>", "</reef-skills>"
HEADER = ("Skills learned from earlier conversations that may apply to this request. "
          "Follow the ones that fit it; ignore the others.")
T = TypeVar("T")
CHARS_PER_TOKEN = 4
"""Token estimate for the budget: about four characters per token in English."""


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def render_skill(skill: Skill) -> str:
    """One skill in the block; a body cannot close the block early."""
    body = skill.body.replace(OPEN, "").replace(CLOSE, "").strip()
    return f'<skill name="{skill.name}">\n{body}\n</skill>\n'


def fit_budget(hits: list[Hit], budget: int) -> list[Skill]:
    """The hits, best first, whose block fits ``budget`` estimated tokens; a skill too
    long for what is left is dropped and the next (lower-ranked, maybe shorter) tried."""
    used = estimate_tokens(f"{OPEN}\n{HEADER}\n{CLOSE}")
    chosen: list[Skill] = []
    for hit in hits:
        cost = estimate_tokens(render_skill(hit.skill))
        if used + cost <= budget:
            chosen.append(hit.skill)
            used += cost
    return chosen


def render_block(skills: list[Skill]) -> str:
    return f"{OPEN}\n{HEADER}\n{''.join(render_skill(s) for s in skills)}{CLOSE}"


def add_to_system(messages: list[Any], block: str) -> list[Any]:
    """``messages`` with ``block`` at the end of the leading system/developer message, or in
    a new system message first (the client's message objects are not modified)."""
    first = messages[0] if messages else None
    if not (isinstance(first, dict) and first.get("role") in ("system", "developer")):
        return [{"role": "system", "content": block}, *messages]
    content = first.get("content")
    if isinstance(content, list):
        content = [*content, {"type": "text", "text": block}]
    elif isinstance(content, str) and content.strip():
        content = f"{content}\n\n{block}"
    else:
        content = block
    return [{**first, "content": content}, *messages[1:]]


def resolve_mode(settings: Settings) -> Mode:
    """``retrieval_mode``, or ``bm25`` when embeddings are asked for but not installed."""
    if settings.retrieval_mode == "embedding" and not embedding_available():
        log.warning("gateway.skills_bm25_fallback", extra={"reason": "skills extra missing"})
        return "bm25"
    return settings.retrieval_mode


class SkillInjector:
    """Retrieves and injects skills into main turns; keeps the index current."""

    def __init__(self, settings: Settings, redis: aioredis.Redis,
                 metrics: GatewayMetrics) -> None:
        self._settings = settings
        self._redis = redis
        self._metrics = metrics
        keys = Keys(settings.namespace)
        self._store = SkillStore(redis, keys, settings.stream_maxlen)
        self._stream = keys.stream(SKILLS)
        self.index: SkillIndex | None = None
        """None until the model is loaded and the library read (nothing injected then)."""
        self._active: dict[str, dict[str, Skill]] = {}
        """Active skills by tenant and id, as last read from Redis."""
        self._always_categories = frozenset(settings.skill_always_categories)
        self._always: dict[str, tuple[Skill, ...]] = {}
        """Active skills of ``skill_always_categories`` by tenant: in every main turn."""
        # One thread: queries are ~ms each, and torch runs one thread per forward pass.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="reef-skills")
        self._task: asyncio.Task[None] | None = None

    async def inject(self, chat: ChatRequest, tenant: str) -> tuple[str, ...]:
        """Add the tenant's relevant skills to ``chat.body``; the ids injected."""
        index = self.index
        if index is None or not index.has_skills(tenant):
            self._metrics.skills_injected.observe(0)
            return ()
        query = query_text(chat.body["messages"])
        if not query:
            self._metrics.skills_injected.observe(0)
            return ()
        started = time.perf_counter()
        try:
            hits = await asyncio.get_running_loop().run_in_executor(
                self._executor, index.search, tenant, query, self._settings.skill_top_k)
        except (RuntimeError, ValueError) as exc:  # answer without skills
            log.warning("gateway.skill_retrieval_failed", extra={"error": type(exc).__name__})
            hits = []
        self._metrics.skill_retrieval_seconds.observe(time.perf_counter() - started)
        always = self._always.get(tenant, ())
        if always:  # standing preferences first; never twice
            hits = [*(Hit(s, 1.0) for s in always),
                    *(h for h in hits if h.skill.category not in self._always_categories)]
        chosen = fit_budget(hits, self._settings.skill_token_budget)
        self._metrics.skills_injected.observe(len(chosen))
        if not chosen:
            return ()
        chat.body["messages"] = add_to_system(chat.body["messages"], render_block(chosen))
        chat.changed = True
        return tuple(s.id for s in chosen)

    def start(self) -> None:
        self._task = asyncio.create_task(self._follow(), name="reef-skills")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    # --- keeping the index current ---------------------------------------------------------

    async def _follow(self) -> None:
        last = await self._retry(self._last_id)  # events after this are applied below
        index = await self._open_index()
        for tenant in await self._retry(self._store.tenants):
            try:
                skills = await self._retry(partial(self._store.list, tenant, "active"))
            except ValueError as exc:  # a skill that does not validate: skip the tenant
                log.warning("gateway.skills_unreadable", extra={"tenant": tenant,
                                                                "error": type(exc).__name__})
                continue
            self._active[tenant] = {s.id: s for s in skills}
            await self._build(index, tenant)
        self.index = index
        log.info("gateway.skills_ready", extra={"mode": index.mode, "skills": index.size()})
        while True:
            try:
                reply = await self._redis.xread({self._stream: last}, block=BLOCK_MS,
                                                count=500)
            except (RedisError, OSError):
                await asyncio.sleep(1.0)  # Redis away: inject from the index we have
                continue
            changed: set[str] = set()
            for _, entries in cast(list[Any], reply or []):
                for entry_id, fields in entries:
                    last = entry_id
                    changed.add(await self._apply(fields) or "")
            changed.discard("")
            for tenant in sorted(changed):  # a burst of events re-indexes a tenant once
                await self._build(index, tenant)

    async def _open_index(self) -> SkillIndex:
        s = self._settings
        mode = resolve_mode(s)
        embedder = None
        if mode == "embedding":
            try:
                embedder = await asyncio.to_thread(Embedder)
            except (ImportError, OSError, RuntimeError, ValueError) as exc:
                log.warning("gateway.skills_bm25_fallback",
                            extra={"reason": "model failed to load",
                                   "error": type(exc).__name__})
                mode = "bm25"
        for known in ("embedding", "bm25"):
            self._metrics.skill_retrieval_mode.labels(known).set(int(known == mode))
        return SkillIndex(mode, embedder, min_similarity=s.skill_min_similarity,
                          min_bm25=s.skill_min_bm25)

    async def _apply(self, fields: dict[bytes, bytes]) -> str | None:
        """Fold one event into ``_active``; the tenant to re-index, if any."""
        try:
            event = decode(fields)
        except BadMessage as exc:  # skipped: a follower has no group to dead-letter in
            log.error("gateway.bad_skill_event", extra={"error": str(exc)[:200]})
            return None
        if not isinstance(event, SkillEventV1):
            log.error("gateway.bad_skill_event", extra={"error": f"kind {event.kind}"})
            return None
        skills = self._active.setdefault(event.tenant, {})
        skill = None
        if event.action != "deleted":
            try:
                skill = await self._retry(partial(self._store.get, event.tenant,
                                                  event.skill_id))
            except ValueError as exc:  # does not validate: treated as gone
                log.warning("gateway.skills_unreadable", extra={"tenant": event.tenant,
                                                                "error": type(exc).__name__})
        if skill is not None and skill.status == "active":
            skills[skill.id] = skill
        elif skills.pop(event.skill_id, None) is None:
            return None  # neither was nor is active: the index does not change
        return event.tenant

    async def _build(self, index: SkillIndex, tenant: str) -> None:
        skills = list(self._active.get(tenant, {}).values())
        self._always[tenant] = tuple(sorted(
            (s for s in skills if s.category in self._always_categories), key=lambda s: s.name))
        # Builds run one at a time (this task), so the index's vector cache has one writer.
        await asyncio.to_thread(index.build, tenant, skills)
        self._metrics.skills_indexed.set(index.size())

    async def _last_id(self) -> bytes | str:
        entries = cast(list[Any], await self._redis.xrevrange(self._stream, count=1))
        return entries[0][0] if entries else "0-0"

    @staticmethod
    async def _retry(call: Callable[[], Awaitable[T]]) -> T:
        """``await call()`` until Redis answers."""
        while True:
            try:
                return await call()
            except (RedisError, OSError):
                await asyncio.sleep(1.0)
