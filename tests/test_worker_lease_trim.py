"""The stream worker's lease (a slow handler keeps its entry) and trim (a lagging group's
entries are never trimmed; entries gone anyway count as lost), against a real redis-server.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from shared.keys import Keys
from shared.messages import Message
from shared.settings import Settings
from shared.stream_trim import Trimmer
from shared.worker import StreamWorker
from tests.conftest import RedisServer
from tests.test_worker import (
    GROUP,
    STREAM,
    Recorder,
    _llen_is,
    _pending_is,
    eventually,
    make_settings,
    new_worker,
    publish_turns,
    running,
    sample,
    spawn,
)
from tests.worker_proc import started_key

LAGGING = "lagging"
"""A second group of the stream, whose consumers are down at first."""


@pytest.fixture
async def r(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


def lagging_worker(r: Redis, settings: Settings, handler: Recorder,
                   registry: CollectorRegistry | None = None) -> StreamWorker:
    return StreamWorker(r, Keys(settings.namespace), STREAM, LAGGING, "l1", handler, settings,
                        registry or CollectorRegistry())


def trim_sample(registry: CollectorRegistry, name: str, group: str | None = GROUP) -> float:
    labels = {"stream": STREAM} if group is None else {"stream": STREAM, "group": group}
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def _xlen_at_most(r: Redis, key: str, n: int) -> bool:
    return int(await r.xlen(key)) <= n


# --- trim -----------------------------------------------------------------------------


async def test_trim_waits_for_a_lagging_group_then_resumes(
        redis_server: RedisServer, namespace: str, r: Redis) -> None:
    # The cap is small (50); the producers' hard cap is far above the test's entries.
    settings = make_settings(redis_server, namespace, stream_maxlen=50,
                             stream_hard_maxlen=100_000, stream_trim_interval_seconds=0.05)
    stream = Keys(namespace).stream(STREAM)
    registry = CollectorRegistry()
    fast, slow = Recorder(), Recorder()
    await lagging_worker(r, settings, slow).ensure_group()  # its consumers are down
    async with running(new_worker(r, settings, fast, registry=registry)):
        turns = await publish_turns(r, settings, 400)
        await eventually(lambda: len(fast.calls) == 400)
        await asyncio.sleep(0.3)  # a few trims
        assert await r.xlen(stream) == 400  # nothing the lagging group has not read
        assert trim_sample(registry, "reef_stream_over_cap_entries", LAGGING) == 350
    assert trim_sample(registry, "reef_stream_trimmed_entries_total", None) == 0

    # The lagging group catches up; the trim resumes, down to about stream_maxlen.
    async with running(lagging_worker(r, settings, slow, registry)), \
            running(new_worker(r, settings, Recorder(), registry=registry)):
        await eventually(lambda: len(slow.calls) == 400)
        await eventually(lambda: _xlen_at_most(r, stream, 50))
    assert sorted(slow.message_ids) == sorted(t.id for t in turns)
    assert await r.xlen(stream) >= 50 - 100  # whole nodes of at most 100 entries
    assert trim_sample(registry, "reef_stream_over_cap_entries", LAGGING) == 0
    assert trim_sample(registry, "reef_stream_trimmed_entries_total", None) >= 300
    assert trim_sample(registry, "reef_stream_entries_lost_total") == 0
    assert trim_sample(registry, "reef_stream_entries_lost_total", LAGGING) == 0


async def test_entries_trimmed_before_delivery_count_as_lost(
        redis_server: RedisServer, namespace: str, r: Redis) -> None:
    # The producers' hard cap (100) removes entries no group has read yet.
    settings = make_settings(redis_server, namespace, stream_maxlen=50, stream_hard_maxlen=100,
                             stream_trim_interval_seconds=0.05)
    stream = Keys(namespace).stream(STREAM)
    registry = CollectorRegistry()
    handler = Recorder()
    await lagging_worker(r, settings, Recorder()).ensure_group()
    await new_worker(r, settings, handler).ensure_group()
    await publish_turns(r, settings, 400)
    kept = int(await r.xlen(stream))
    assert kept < 400
    async with running(new_worker(r, settings, handler, registry=registry)):
        await eventually(lambda: len(handler.calls) == kept)
        await eventually(lambda: trim_sample(
            registry, "reef_stream_entries_lost_total", LAGGING) > 0)
        await asyncio.sleep(0.3)  # more trims: each loss counts once
    assert trim_sample(registry, "reef_stream_entries_lost_total") == 400 - kept
    assert trim_sample(registry, "reef_stream_entries_lost_total", LAGGING) == 400 - kept
    assert sample(registry, "reef_worker_entries_total", outcome="duplicate") == 0
    [lagging] = [g for g in await r.xinfo_groups(stream) if g["name"] == LAGGING.encode()]
    assert lagging["lag"] == kept  # its lag no longer counts the lost entries


async def test_a_stale_read_counter_is_restated_without_a_false_loss(
        redis_server: RedisServer, namespace: str, r: Redis) -> None:
    """Redis 7.0 does not persist a group's read counter with its reads: after a restart
    (AOF) or a failover it can be behind. That is neither a loss nor lag."""
    settings = make_settings(redis_server, namespace)
    stream = Keys(namespace).stream(STREAM)
    await new_worker(r, settings, Recorder()).ensure_group()
    await publish_turns(r, settings, 50)
    [[_, read]] = await r.xreadgroup(GROUP, "w1", {stream: ">"}, count=50)
    await r.xgroup_setid(stream, GROUP, read[-1][0], entries_read=10)  # what a restart leaves
    trim = await Trimmer(r, stream, settings.stream_maxlen).trim()
    assert trim.lost == {}
    [group] = await r.xinfo_groups(stream)
    assert (group["entries-read"], group["lag"]) == (50, 0)


# --- lost, not duplicate --------------------------------------------------------------


async def test_entry_deleted_while_pending_counts_as_lost_not_duplicate(
        redis_server: RedisServer, namespace: str, r: Redis) -> None:
    settings = make_settings(redis_server, namespace)
    keys = Keys(namespace)
    stream = keys.stream(STREAM)
    registry = CollectorRegistry()
    turns = await publish_turns(r, settings, 3)
    await new_worker(r, settings, Recorder()).ensure_group()
    # w1 (restarted below) and a dead "ghost" each hold an entry, deleted since (XDEL).
    [[_, [(mine, _)]]] = await r.xreadgroup(GROUP, "w1", {stream: ">"}, count=1)
    [[_, [(ghosts, _)]]] = await r.xreadgroup(GROUP, "ghost", {stream: ">"}, count=1)
    await r.xdel(stream, mine, ghosts)
    handler = Recorder()
    async with running(new_worker(r, settings, handler, consumer="w1", registry=registry)):
        await eventually(lambda: len(handler.calls) == 1)
        await eventually(lambda: _pending_is(r, keys, 0))
        await eventually(lambda: sample(registry, "reef_stream_entries_lost_total") == 2)
    assert handler.message_ids == [turns[2].id]
    assert sample(registry, "reef_worker_entries_total", outcome="duplicate") == 0


# --- the lease ------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["per_entry", "batch"])
async def test_slow_handler_keeps_its_entry(redis_server: RedisServer, namespace: str,
                                            r: Redis, shape: str) -> None:
    """Two workers; the handler runs 3x the claim idle time. The worker handling the entry
    keeps it claimed, so the other never takes it over: handled once, delivered once. The
    batch shape is the scorer's judge stage (a batch handler)."""
    settings = make_settings(redis_server, namespace, worker_claim_idle_ms=500)
    keys = Keys(namespace)
    registry = CollectorRegistry()
    handler = Recorder(lambda message: asyncio.sleep(1.5))

    async def batch(items: list[tuple[Message, str]]) -> list[Exception | None]:
        await asyncio.gather(*(handler(m, entry_id) for m, entry_id in items))
        return [None] * len(items)

    def worker(consumer: str) -> StreamWorker:
        if shape == "per_entry":
            return new_worker(r, settings, handler, consumer=consumer, registry=registry)
        return StreamWorker(r, keys, STREAM, GROUP, consumer, None, settings, registry,
                            batch_handler=batch)

    [message] = await publish_turns(r, settings, 1)
    async with running(worker("a")), running(worker("b")):
        await eventually(lambda: len(handler.calls) == 1)
        await asyncio.sleep(1.2)  # well past the idle time, the handler still running
        [held] = await r.xpending_range(keys.stream(STREAM), GROUP, "-", "+", 10)
        assert held["times_delivered"] == 1
        assert held["time_since_delivered"] < settings.worker_claim_idle_ms
        await eventually(lambda: _pending_is(r, keys, 0))
        await asyncio.sleep(0.6)
    assert handler.message_ids == [message.id]
    assert sample(registry, "reef_worker_reclaimed_total") == 0
    assert sample(registry, "reef_worker_entries_total", outcome="duplicate") == 0
    assert sample(registry, "reef_worker_entries_total", outcome="processed") == 1


async def test_killed_workers_entry_is_reclaimed_despite_the_lease(
        redis_server: RedisServer, namespace: str, r: Redis, tmp_path: Path) -> None:
    settings = make_settings(redis_server, namespace, worker_claim_idle_ms=500)
    keys = Keys(namespace)
    registry = CollectorRegistry()
    [message] = await publish_turns(r, settings, 1)
    proc = spawn(settings, "hang", "doomed", tmp_path / "worker.log",
                 REEF_WORKER_CLAIM_IDLE_MS=str(settings.worker_claim_idle_ms))
    handler = Recorder()
    try:
        await eventually(lambda: _llen_is(r, started_key(namespace), 1), timeout=15)
        async with running(new_worker(r, settings, handler, consumer="rescuer",
                                      registry=registry)):
            await asyncio.sleep(1.5)  # the hung handler's worker is alive: it keeps the entry
            assert handler.calls == []
            proc.kill()
            await asyncio.to_thread(proc.wait)
            await eventually(lambda: len(handler.calls) == 1)
            await eventually(lambda: _pending_is(r, keys, 0))
    finally:
        proc.kill()
        proc.wait()
    assert handler.message_ids == [message.id]
    assert sample(registry, "reef_worker_reclaimed_total") == 1
