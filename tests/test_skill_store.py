"""The skill library on a real Redis: versions and history, unique names, tenant isolation,
credit counters, and events written in the same transaction as each change."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, generate_latest

from shared.keys import SKILLS, Keys
from shared.messages import SkillEventV1, decode
from shared.skill_store import (
    InvalidSkill,
    SkillExists,
    SkillNotFound,
    SkillStatusCollector,
    SkillStore,
)
from shared.skills import Provenance
from tests.conftest import RedisServer


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(port=redis_server.port)
    yield client
    await client.aclose()


@pytest.fixture
def store(redis: aioredis.Redis, namespace: str) -> SkillStore:
    return SkillStore(redis, Keys(namespace), maxlen=10_000)


async def events(redis: aioredis.Redis, namespace: str) -> list[SkillEventV1]:
    entries = await redis.xrange(Keys(namespace).stream(SKILLS))
    out = []
    for _, fields in entries:
        message = decode(fields)
        assert isinstance(message, SkillEventV1)
        out.append(message)
    return out


async def make(store: SkillStore, tenant: str = "alpha", name: str = "answer-first",
               **kw: Any) -> Any:
    return await store.create(tenant, name=name, description="When a question is asked.",
                              body="Answer the question in the first sentence.", **kw)


async def test_create_get_by_name_and_list(store: SkillStore) -> None:
    skill = await make(store)
    assert skill.id.startswith("sk_") and skill.version == 1 and skill.status == "candidate"
    assert skill.history == [] and skill.reason == "created"
    assert await store.get("alpha", skill.id) == skill
    assert await store.by_name("alpha", "answer-first") == skill
    assert await store.resolve("alpha", "answer-first") == skill
    assert await store.resolve("alpha", skill.id) == skill
    other = await make(store, name="be-brief", status="active")
    assert [s.name for s in await store.list("alpha")] == ["answer-first", "be-brief"]
    assert await store.list("alpha", "active") == [other]
    assert await store.get("alpha", "sk_0000000000000000") is None
    assert await store.get("alpha", "../../etc") is None
    assert await store.tenants() == ["alpha"]


async def test_names_are_unique_per_tenant_and_validated(store: SkillStore) -> None:
    await make(store)
    with pytest.raises(SkillExists):
        await make(store)
    await make(store, tenant="beta")  # another tenant may use the name
    for bad in ("Answer", "answer_first", "-x", "a--b", "a b", "x" * 65, ""):
        with pytest.raises(InvalidSkill) as err:
            await make(store, name=bad)
        assert err.value.field == "name"
    with pytest.raises(InvalidSkill) as err:
        await store.create("alpha", name="ok", description=" ", body="b")
    assert err.value.field == "description"
    with pytest.raises(InvalidSkill) as err:
        await store.create("alpha", name="ok", description="d", body="b",
                           status="live")  # type: ignore[arg-type]
    assert err.value.field == "status"


async def test_concurrent_creates_of_one_name_make_one_skill(store: SkillStore) -> None:
    results = await asyncio.gather(*(make(store, name="same") for _ in range(10)),
                                   return_exceptions=True)
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert all(isinstance(r, SkillExists) for r in results if isinstance(r, BaseException))
    assert len(await store.list("alpha")) == 1


async def test_update_makes_a_version_keeps_history_and_merges_provenance(
        store: SkillStore) -> None:
    skill = await make(store, provenance=Provenance(source="miner", session_ids=["s1"],
                                                    turn_ids=["t1"]))
    v2 = await store.update("alpha", skill.id, body="Lead with the answer.", reason="edited",
                            provenance=Provenance(source="miner", session_ids=["s2", "s1"],
                                                  turn_ids=["t2"]))
    assert v2.version == 2 and v2.body == "Lead with the answer." and v2.reason == "edited"
    assert v2.description == skill.description
    assert [(h.version, h.body, h.reason) for h in v2.history] == [
        (1, skill.body, "created")]
    assert v2.provenance.source == "miner"
    assert v2.provenance.session_ids == ["s1", "s2"]
    assert v2.provenance.turn_ids == ["t1", "t2"]
    v3 = await store.update("alpha", skill.id, category="style", reason="merged")
    assert v3.version == 3 and v3.category == "style"
    assert [h.version for h in v3.history] == [1, 2]
    assert v3.history[1].reason == "edited"
    assert await store.get("alpha", skill.id) == v3
    with pytest.raises(SkillNotFound):
        await store.update("alpha", "sk_0123456789abcdef", body="x", reason="edited")


async def test_concurrent_updates_lose_no_version(store: SkillStore) -> None:
    skill = await make(store)
    await asyncio.gather(*(store.update("alpha", skill.id, body=f"Body {i}.", reason="edited")
                           for i in range(8)))
    final = await store.get("alpha", skill.id)
    assert final is not None and final.version == 9
    assert [h.version for h in final.history] == list(range(1, 9))


async def test_status_changes_are_recorded(store: SkillStore) -> None:
    skill = await make(store)
    active = await store.set_status("alpha", skill.id, "active", "approved by admin")
    assert active.status == "active" and active.version == 1
    same = await store.set_status("alpha", skill.id, "active", "again")
    assert same.status_history == active.status_history  # no-op
    retired = await store.set_status("alpha", skill.id, "retired", "hurts: -0.4 vs 0.1")
    assert retired.retired_reason == "hurts: -0.4 vs 0.1"
    assert [(c.status, c.reason) for c in retired.status_history] == [
        ("active", "approved by admin"), ("retired", "hurts: -0.4 vs 0.1")]
    back = await store.set_status("alpha", skill.id, "candidate", "second look")
    assert back.retired_reason is None
    with pytest.raises(SkillNotFound):
        await store.set_status("beta", skill.id, "active", "x")


async def test_tenants_are_isolated(store: SkillStore) -> None:
    a = await make(store, tenant="alpha")
    b = await make(store, tenant="beta")
    assert a.id != b.id
    assert await store.get("beta", a.id) is None
    assert [s.id for s in await store.list("beta")] == [b.id]
    with pytest.raises(SkillNotFound):
        await store.update("beta", a.id, body="hijack", reason="edited")
    with pytest.raises(SkillNotFound):
        await store.delete("beta", a.id)
    await store.add_credit("beta", [a.id], 1.0, [])
    got = await store.get("alpha", a.id)
    assert got is not None and got.credit.with_count == 0
    assert await store.tenants() == ["alpha", "beta"]
    # A tenant name containing ':' cannot reach into another tenant's keys.
    colon = await make(store, tenant="alpha:skills", name="other")
    assert await store.get("alpha", colon.id) is None
    assert [s.name for s in await store.list("alpha")] == ["answer-first"]


async def test_credit_counters(store: SkillStore) -> None:
    one = await make(store, name="one")
    two = await make(store, name="two")
    await store.add_credit("alpha", [one.id], 1.0, [two.id])
    await store.add_credit("alpha", [one.id, one.id], -0.5, [two.id, "sk_0000000000000000"])
    await asyncio.gather(*(store.add_credit("alpha", [two.id], 0.25, []) for _ in range(20)))
    got_one = await store.get("alpha", one.id)
    got_two = await store.get("alpha", two.id)
    assert got_one is not None and got_two is not None
    assert (got_one.credit.with_count, got_one.credit.with_reward_sum) == (2, 0.5)
    assert got_one.credit.with_mean == 0.25 and got_one.credit.without_mean is None
    assert (got_two.credit.without_count, got_two.credit.without_reward_sum) == (2, 0.5)
    assert (got_two.credit.with_count, got_two.credit.with_reward_sum) == (20, 5.0)
    listed = {s.name: s for s in await store.list("alpha")}
    assert listed["two"].credit == got_two.credit
    updated = await store.update("alpha", one.id, body="New.", reason="edited")
    assert updated.credit == got_one.credit  # a new version keeps its credit


async def test_delete_frees_the_name_and_leaves_no_credit(
        store: SkillStore, redis: aioredis.Redis, namespace: str) -> None:
    skill = await make(store)
    await store.add_credit("alpha", [skill.id], 1.0, [])
    await store.delete("alpha", skill.id)
    assert await store.get("alpha", skill.id) is None
    assert await store.list("alpha") == []
    await store.add_credit("alpha", [skill.id], 1.0, [])  # late credit: no orphan hash
    assert await redis.exists(Keys(namespace).skill_credit("alpha", skill.id)) == 0
    with pytest.raises(SkillNotFound):
        await store.delete("alpha", skill.id)
    again = await make(store)
    assert again.id != skill.id


async def test_every_change_appends_one_event(store: SkillStore, redis: aioredis.Redis,
                                              namespace: str) -> None:
    skill = await make(store)
    await store.update("alpha", skill.id, body="b2", reason="edited")
    await store.set_status("alpha", skill.id, "active", "ok")
    await store.set_status("alpha", skill.id, "active", "no-op")
    await store.add_credit("alpha", [skill.id], 1.0, [])  # counters announce nothing
    await store.set_status("alpha", skill.id, "retired", "bad")
    await store.delete("alpha", skill.id)
    await make(store, name="x")
    with pytest.raises(SkillExists):
        await make(store, name="x")
    got = [(e.tenant, e.skill_id, e.action, e.version) for e in await events(redis, namespace)]
    x = await store.by_name("alpha", "x")
    assert x is not None
    assert got == [("alpha", skill.id, "created", 1), ("alpha", skill.id, "updated", 2),
                   ("alpha", skill.id, "activated", 2), ("alpha", skill.id, "retired", 2),
                   ("alpha", skill.id, "deleted", 2), ("alpha", x.id, "created", 1)]


async def test_event_and_write_are_one_transaction(store: SkillStore, redis_server: RedisServer,
                                                   namespace: str) -> None:
    """MONITOR shows every XADD to the skills stream inside the MULTI/EXEC that writes the
    skill, so no reader can see an event before its write, nor a write without its event."""
    monitor_client = aioredis.Redis(port=redis_server.port)
    seen: list[str] = []
    async with monitor_client.monitor() as monitor:
        async def listen() -> None:
            async for command in monitor.listen():
                seen.append(command["command"])

        task = asyncio.create_task(listen())
        await asyncio.sleep(0.1)
        skill = await make(store)
        await store.update("alpha", skill.id, body="b2", reason="edited")
        await store.set_status("alpha", skill.id, "active", "ok")
        await store.delete("alpha", skill.id)
        await asyncio.sleep(0.2)
        task.cancel()
    await monitor_client.aclose()
    stream = Keys(namespace).stream(SKILLS)
    skill_key = Keys(namespace).skill("alpha", skill.id)
    blocks: list[list[str]] = []
    current: list[str] | None = None
    for command in seen:
        if command == "MULTI":
            current = []
        elif command == "EXEC" and current is not None:
            blocks.append(current)
            current = None
        elif current is not None:
            current.append(command)
        else:
            assert not command.startswith(f"XADD {stream}"), command
    assert len(blocks) == 4
    for block in blocks:
        assert sum(c.startswith(f"XADD {stream}") for c in block) == 1
        assert any(c.startswith((f"SET {skill_key}", f"DEL {skill_key}")) for c in block)
        assert block[-1].startswith(f"XADD {stream}")


async def test_status_gauge(store: SkillStore) -> None:
    await make(store, name="a", status="active")
    await make(store, name="b", status="active")
    c = await make(store, name="c")
    await store.set_status("alpha", c.id, "retired", "bad")
    await make(store, tenant="beta", name="d")
    registry = CollectorRegistry()
    collector = SkillStatusCollector(store, max_age=0.0)
    registry.register(collector)
    generate_latest(registry)  # a scrape starts a background refresh
    await asyncio.sleep(0.1)
    text = generate_latest(registry).decode()
    assert 'reef_skills{status="active"} 2.0' in text
    assert 'reef_skills{status="candidate"} 1.0' in text
    assert 'reef_skills{status="retired"} 1.0' in text
    await store.delete("alpha", c.id)
    await collector.refresh()
    assert await store.status_counts() == {"candidate": 1, "active": 2, "retired": 0}
