"""The skill library in Redis: the source of truth every gateway replica and the miner share.

Per tenant (see ``shared.keys``): one JSON document per skill (``Keys.skill``), a hash of
its credit counters (``Keys.skill_credit``), and a name -> id hash (``Keys.skill_names``)
that keeps names unique. Every write happens in one MULTI/EXEC (optimistic, WATCHing what
it read) together with the ``skill.v1`` event it announces on the ``skills`` stream, so a
gateway that sees the event always finds the write, and no write goes unannounced.

Credit counters are the exception: they change on every scored turn, are incremented
atomically in place, and announce nothing (retrieval does not depend on them).

Skill ids look like ``sk_<16 hex>``; names are kebab-case, so an id is never a valid name
and an API may accept either (``resolve``).
"""

from __future__ import annotations

import asyncio
import builtins
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, Literal, TypeVar

import redis.asyncio as aioredis
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisError, WatchError

from shared.keys import SKILLS, Keys
from shared.messages import SkillEventV1
from shared.skills import Credit, Provenance, Skill, SkillStatus, SkillVersion, StatusChange

NAME_RE = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
"""Kebab-case: lowercase letters and digits in words joined by single hyphens."""
ID_RE = re.compile(r"^sk_[0-9a-f]{16}$")
CATEGORY_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
MAX_NAME_CHARS = 64
"""As in the Agent Skills format."""
MAX_DESCRIPTION_CHARS = 1024
"""As in the Agent Skills format."""
MAX_BODY_CHARS = 20_000
MAX_CATEGORY_CHARS = 64
MAX_REASON_CHARS = 2_000
MAX_PROVENANCE_IDS = 200
"""Session and turn ids kept per skill (the newest): provenance must not grow forever."""
MAX_HISTORY = 100
"""Earlier versions kept per skill (the newest)."""
STATUSES: tuple[SkillStatus, ...] = ("candidate", "active", "retired")
_CREDIT_FIELDS = ("with_count", "with_reward_sum", "without_count", "without_reward_sum")

Action = Literal["created", "updated", "activated", "retired", "deleted"]
T = TypeVar("T")


class SkillExists(ValueError):
    """A skill with that name already exists in the tenant."""


class SkillNotFound(KeyError):
    """No skill with that id (or name) in the tenant."""


class InvalidSkill(ValueError):
    """A field of a skill is not acceptable; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def new_skill_id() -> str:
    return "sk_" + uuid.uuid4().hex[:16]


def check_tenant(tenant: str) -> str:
    if not tenant or len(tenant) > 256 or any(c.isspace() for c in tenant):
        raise InvalidSkill("tenant", f"Invalid tenant {tenant!r}: 1-256 characters, no spaces.")
    return tenant


def check_name(name: str) -> str:
    """A valid skill name, or ``InvalidSkill``."""
    if not isinstance(name, str) or len(name) > MAX_NAME_CHARS or not NAME_RE.match(name):
        raise InvalidSkill("name", f"Invalid name {name!r}: kebab-case (lowercase letters, "
                                   f"digits, single hyphens), at most {MAX_NAME_CHARS} chars.")
    return name


def _check_text(field: str, value: str, limit: int, one_line: bool = False) -> str:
    text = value.strip() if isinstance(value, str) else ""
    if not text:
        raise InvalidSkill(field, f"'{field}' must not be empty.")
    if len(text) > limit:
        raise InvalidSkill(field, f"'{field}' is longer than {limit} characters.")
    if one_line and "\n" in text:
        raise InvalidSkill(field, f"'{field}' must be one line.")
    return text


def check_category(category: str) -> str:
    """A valid category, or ``InvalidSkill``."""
    if (not isinstance(category, str) or len(category) > MAX_CATEGORY_CHARS
            or not CATEGORY_RE.match(category)):
        raise InvalidSkill("category", f"Invalid category {category!r}: lowercase letters, "
                                       "digits, '-' and '_'.")
    return category


def _check_status(status: str) -> SkillStatus:
    for known in STATUSES:
        if status == known:
            return known
    raise InvalidSkill("status", f"Invalid status {status!r}: one of {', '.join(STATUSES)}.")


def _merge_ids(old: list[str], new: list[str]) -> list[str]:
    merged = list(dict.fromkeys([*old, *new]))
    return merged[-MAX_PROVENANCE_IDS:]


def merge_provenance(old: Provenance, new: Provenance | None) -> Provenance:
    """``old`` with the sessions and turns of ``new`` added (the source stays ``old``'s)."""
    if new is None:
        return old
    return Provenance(source=old.source,
                      session_ids=_merge_ids(old.session_ids, new.session_ids),
                      turn_ids=_merge_ids(old.turn_ids, new.turn_ids))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# KEYS: 2n credit keys then 2n skill keys (n = number of ids); ARGV: n, n_with, reward.
# A counter is only incremented while its skill exists: a late credit for a deleted skill
# must not leave an orphan hash behind. ARGV[4] is the change of the turn counts (1; 0
# when a revised reward moves credit already counted).
_ADD_CREDIT = """
local n = tonumber(ARGV[1])
local n_with = tonumber(ARGV[2])
for i = 1, n do
  if redis.call('EXISTS', KEYS[n + i]) == 1 then
    if i <= n_with then
      redis.call('HINCRBY', KEYS[i], 'with_count', ARGV[4])
      redis.call('HINCRBYFLOAT', KEYS[i], 'with_reward_sum', ARGV[3])
    else
      redis.call('HINCRBY', KEYS[i], 'without_count', ARGV[4])
      redis.call('HINCRBYFLOAT', KEYS[i], 'without_reward_sum', ARGV[3])
    end
  end
end
return 1
"""


class SkillStore:
    """A tenant-scoped skill library on Redis. Every method takes the tenant; nothing reads
    or writes across tenants except ``tenants`` and ``status_counts``."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, maxlen: int) -> None:
        self._redis = redis
        self._keys = keys
        self._maxlen = maxlen
        self._add_credit = redis.register_script(_ADD_CREDIT)

    # --- reads ---------------------------------------------------------------------------

    async def get(self, tenant: str, skill_id: str) -> Skill | None:
        """The skill with its credit, or None (also for an id that cannot exist)."""
        if not ID_RE.match(skill_id):
            return None
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(self._keys.skill(tenant, skill_id))
            pipe.hgetall(self._keys.skill_credit(tenant, skill_id))
            raw, credit = await pipe.execute()
        return _assemble(raw, credit)

    async def by_name(self, tenant: str, name: str) -> Skill | None:
        skill_id = await self._redis.hget(self._keys.skill_names(tenant), name)
        return None if skill_id is None else await self.get(tenant, _text(skill_id))

    async def resolve(self, tenant: str, id_or_name: str) -> Skill | None:
        """By id when it looks like one, else by name."""
        if ID_RE.match(id_or_name):
            return await self.get(tenant, id_or_name)
        return await self.by_name(tenant, id_or_name)

    async def list(self, tenant: str, status: SkillStatus | None = None) -> list[Skill]:
        """The tenant's skills (with credit), sorted by name; only ``status`` if given."""
        ids = [_text(v) for v in await self._redis.hvals(self._keys.skill_names(tenant))]
        if not ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for skill_id in ids:
                pipe.get(self._keys.skill(tenant, skill_id))
                pipe.hgetall(self._keys.skill_credit(tenant, skill_id))
            replies = await pipe.execute()
        skills = [_assemble(replies[i], replies[i + 1]) for i in range(0, len(replies), 2)]
        found = [s for s in skills if s is not None and (status is None or s.status == status)]
        return sorted(found, key=lambda s: s.name)

    async def tenants(self) -> builtins.list[str]:
        """Tenants that have (or had) skills, sorted."""
        return sorted(_text(t) for t in await self._redis.smembers(self._keys.skill_tenants()))

    async def status_counts(self) -> dict[str, int]:
        """Number of skills per status over all tenants (kept up to date with each write)."""
        raw = await self._redis.hgetall(self._keys.skill_status_counts())
        counts = {_text(k): int(v) for k, v in raw.items()}
        return {s: counts.get(s, 0) for s in STATUSES}

    # --- writes --------------------------------------------------------------------------

    async def create(self, tenant: str, *, name: str, description: str, body: str,
                     category: str = "general", status: SkillStatus = "candidate",
                     provenance: Provenance | None = None, reason: str = "created") -> Skill:
        """A new skill (version 1); ``SkillExists`` if the tenant has one of that name."""
        now = time.time()
        skill = Skill(
            id=new_skill_id(), tenant=check_tenant(tenant), name=check_name(name),
            description=_check_text("description", description, MAX_DESCRIPTION_CHARS, True),
            body=_check_text("body", body, MAX_BODY_CHARS), category=check_category(category),
            status=_check_status(status), provenance=provenance or Provenance(source="admin"),
            created_at=now, updated_at=now, changed_at=now,
            reason=_check_text("reason", reason, MAX_REASON_CHARS))
        names = self._keys.skill_names(tenant)

        async def attempt(pipe: Any) -> Skill:
            await pipe.watch(names)
            if await pipe.hexists(names, skill.name):
                raise SkillExists(f"A skill named {skill.name!r} already exists.")
            pipe.multi()
            pipe.set(self._keys.skill(tenant, skill.id), _dump(skill))
            pipe.hset(names, skill.name, skill.id)
            pipe.sadd(self._keys.skill_tenants(), tenant)
            pipe.hincrby(self._keys.skill_status_counts(), skill.status, 1)
            self._announce(pipe, skill, "created")
            await pipe.execute()
            return skill

        return await self._transact(attempt)

    async def update(self, tenant: str, skill_id: str, *, description: str | None = None,
                     body: str | None = None, category: str | None = None, reason: str,
                     provenance: Provenance | None = None) -> Skill:
        """A new version: the current one goes to ``history``, provenance is merged."""
        reason = _check_text("reason", reason, MAX_REASON_CHARS)
        if description is not None:
            description = _check_text("description", description, MAX_DESCRIPTION_CHARS, True)
        if body is not None:
            body = _check_text("body", body, MAX_BODY_CHARS)
        if category is not None:
            category = check_category(category)

        def change(old: Skill, now: float) -> Skill:
            previous = SkillVersion(version=old.version, description=old.description,
                                    body=old.body, category=old.category,
                                    changed_at=old.changed_at, reason=old.reason)
            return old.model_copy(update={
                "description": description if description is not None else old.description,
                "body": body if body is not None else old.body,
                "category": category if category is not None else old.category,
                "version": old.version + 1,
                "history": [*old.history, previous][-MAX_HISTORY:],
                "provenance": merge_provenance(old.provenance, provenance),
                "reason": reason, "changed_at": now, "updated_at": now})

        return await self._modify(tenant, skill_id, change, "updated")

    async def set_status(self, tenant: str, skill_id: str, status: SkillStatus,
                         reason: str) -> Skill:
        """Approve (``active``), retire, or send back to ``candidate``; the reason is kept
        in ``status_history`` (and in ``retired_reason`` when retiring). Setting the status
        a skill already has changes nothing."""
        status = _check_status(status)
        reason = _check_text("reason", reason, MAX_REASON_CHARS)
        action: Action = ("activated" if status == "active"
                          else "retired" if status == "retired" else "updated")

        def change(old: Skill, now: float) -> Skill | None:
            if old.status == status:
                return None
            entry = StatusChange(status=status, changed_at=now, reason=reason)
            return old.model_copy(update={
                "status": status, "updated_at": now,
                "status_history": [*old.status_history, entry][-MAX_HISTORY:],
                "retired_reason": reason if status == "retired" else None})

        return await self._modify(tenant, skill_id, change, action)

    async def add_credit(self, tenant: str, skill_ids_with: builtins.list[str], reward: float,
                         skill_ids_without: builtins.list[str], *, count: int = 1,
                         pipe: Any = None) -> None:
        """Count a turn's reward for the skills injected into it (``with``) and for the
        comparable skills that were not (``without``); unknown ids are skipped. ``count``
        is added to the turn counts (0 moves a revised turn's reward: ``reward`` is then
        the difference); ``pipe`` queues it in a transaction instead of running it."""
        with_ids = [i for i in dict.fromkeys(skill_ids_with) if ID_RE.match(i)]
        without = [i for i in dict.fromkeys(skill_ids_without)
                   if ID_RE.match(i) and i not in with_ids]
        ids = [*with_ids, *without]
        if not ids:
            return
        keys = [self._keys.skill_credit(tenant, i) for i in ids]
        keys += [self._keys.skill(tenant, i) for i in ids]
        await self._add_credit(keys=keys, args=[len(ids), len(with_ids), repr(float(reward)),
                                                count], client=pipe)

    async def delete(self, tenant: str, skill_id: str) -> None:
        """Remove a skill, its credit and its name; ``SkillNotFound`` if there is none."""
        key = self._keys.skill(tenant, skill_id)
        names = self._keys.skill_names(tenant)

        async def attempt(pipe: Any) -> None:
            await pipe.watch(key, names)
            skill = _assemble(await pipe.get(key), {}) if ID_RE.match(skill_id) else None
            if skill is None:
                raise SkillNotFound(skill_id)
            pipe.multi()
            pipe.delete(key, self._keys.skill_credit(tenant, skill_id))
            pipe.hdel(names, skill.name)
            pipe.hincrby(self._keys.skill_status_counts(), skill.status, -1)
            self._announce(pipe, skill, "deleted")
            await pipe.execute()

        await self._transact(attempt)

    # --- internals -----------------------------------------------------------------------

    async def _modify(self, tenant: str, skill_id: str,
                      change: Callable[[Skill, float], Skill | None], action: Action) -> Skill:
        """Read, change and write one skill with its event in one transaction (retried
        when another writer got there first)."""
        key = self._keys.skill(tenant, skill_id)

        async def attempt(pipe: Any) -> Skill:
            await pipe.watch(key)
            raw = await pipe.get(key) if ID_RE.match(skill_id) else None
            old = _assemble(raw, {})
            if old is None:
                raise SkillNotFound(skill_id)
            new = change(old, time.time())
            if new is None:
                await pipe.unwatch()
                return old
            pipe.multi()
            pipe.set(key, _dump(new))
            if new.status != old.status:
                counts = self._keys.skill_status_counts()
                pipe.hincrby(counts, old.status, -1)
                pipe.hincrby(counts, new.status, 1)
            self._announce(pipe, new, action)
            await pipe.execute()
            return new

        skill = await self._transact(attempt)
        credit = await self._redis.hgetall(self._keys.skill_credit(tenant, skill_id))
        return skill.model_copy(update={"credit": _credit(credit)})

    async def _transact(self, attempt: Callable[[Any], Awaitable[T]]) -> T:
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    return await attempt(pipe)
                except WatchError:
                    await pipe.reset()  # type: ignore[no-untyped-call]  # another writer came first

    def _announce(self, pipe: Any, skill: Skill, action: Action) -> None:
        event = SkillEventV1(tenant=skill.tenant, skill_id=skill.id, action=action,
                             version=skill.version)
        pipe.xadd(self._keys.stream(SKILLS), event.to_fields(), maxlen=self._maxlen,
                  approximate=True)


def _dump(skill: Skill) -> str:
    return skill.model_dump_json(exclude={"credit"})


def _credit(raw: dict[Any, Any]) -> Credit:
    values = {_text(k): float(v) for k, v in raw.items()}
    return Credit(with_count=int(values.get("with_count", 0)),
                  with_reward_sum=values.get("with_reward_sum", 0.0),
                  without_count=int(values.get("without_count", 0)),
                  without_reward_sum=values.get("without_reward_sum", 0.0))


def _assemble(raw: bytes | str | None, credit: dict[Any, Any]) -> Skill | None:
    if raw is None:
        return None
    return Skill.model_validate_json(raw).model_copy(update={"credit": _credit(credit)})


class SkillStatusCollector(Collector):
    """The ``reef_skills{status}`` gauge: skills per status over all tenants.

    A scrape answers from a cache and, when it is older than ``max_age`` seconds, starts
    one background refresh (a single HGETALL of counters every write keeps up to date), so a
    scrape never waits on Redis; values lag by at most one scrape interval. Register it on a
    registry inside the process's event loop (the gateway's) and call ``refresh`` once if
    the first scrape must already be exact."""

    def __init__(self, store: SkillStore, max_age: float = 1.0) -> None:
        self._store = store
        self._max_age = max_age
        self._counts: dict[str, int] = dict.fromkeys(STATUSES, 0)
        self._at = float("-inf")
        self._refreshing: asyncio.Task[None] | None = None

    async def refresh(self) -> None:
        """Read the counts now (a Redis error keeps the last values)."""
        try:
            self._counts = await self._store.status_counts()
            self._at = time.monotonic()
        except (RedisError, OSError):
            pass  # the gauge keeps its last values; the next scrape retries

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily("reef_skills", "Skills by status, over all tenants.",
                                  labels=["status"])]

    def collect(self) -> Iterator[Metric]:
        self._maybe_refresh()
        family = GaugeMetricFamily("reef_skills", "Skills by status, over all tenants.",
                                   labels=["status"])
        for status in STATUSES:
            family.add_metric([status], max(0, self._counts.get(status, 0)))
        yield family

    def _maybe_refresh(self) -> None:
        if time.monotonic() - self._at < self._max_age:
            return
        if self._refreshing is not None and not self._refreshing.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # scraped outside an event loop: serve the cache
        self._refreshing = loop.create_task(self.refresh())
