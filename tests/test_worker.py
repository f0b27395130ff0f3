"""Integration tests of the stream worker against a real, private redis-server."""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from shared.keys import Keys
from shared.messages import Message, ScoredV1, TurnV1, decode
from shared.metrics import serve_metrics
from shared.settings import Settings
from shared.worker import Reject, StreamWorker, publish
from tests.conftest import RedisServer, free_port
from tests.worker_proc import finished_key, started_key

STREAM = "turns"
GROUP = "scorer"
REPO = Path(__file__).resolve().parent.parent
EXIT_MARGIN_SECONDS = 2.0
"""Interpreter teardown on a loaded 2-core machine; an exit check, not a benchmark."""


def make_settings(server: RedisServer, namespace: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "profile": "dev", "redis_url": server.url, "namespace": namespace,
        "worker_block_ms": 100, "worker_claim_idle_ms": 200, "worker_batch_size": 16,
        "worker_concurrency": 8, "worker_max_deliveries": 3, "metrics_port": 0,
    }
    values.update(overrides)
    return Settings(**values)


def turn(i: int = 0) -> TurnV1:
    return TurnV1(tenant="acme", session_id="s1", turn_index=i, request_model="m",
                  upstream_model="m", messages=[{"role": "user", "content": f"q{i}"}],
                  response_message={"role": "assistant", "content": f"a{i}"})


class Recorder:
    """A handler that records its calls and then does what ``behaviour`` says."""

    def __init__(self, behaviour: Callable[[Message], Awaitable[None]] | None = None) -> None:
        self.calls: list[tuple[Message, str]] = []
        self.behaviour = behaviour

    async def __call__(self, message: Message, entry_id: str) -> None:
        self.calls.append((message, entry_id))
        if self.behaviour is not None:
            await self.behaviour(message)

    @property
    def message_ids(self) -> list[str]:
        return [m.id for m, _ in self.calls]


async def always_fail(message: Message) -> None:
    raise RuntimeError("judge timed out")


@pytest.fixture
async def r(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


def new_worker(r: Redis, settings: Settings, handler: Any, consumer: str = "w1",
               registry: CollectorRegistry | None = None) -> StreamWorker:
    return StreamWorker(r, Keys(settings.namespace), STREAM, GROUP, consumer, handler, settings,
                        registry or CollectorRegistry())


@asynccontextmanager
async def running(worker: StreamWorker) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(worker.run())
    try:
        yield task
    finally:
        worker.stop()
        if not task.done():
            await asyncio.wait_for(task, 5)


async def eventually(check: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0) -> None:
    """Poll ``check`` (plain or async) until it holds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if await result if inspect.isawaitable(result) else result:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def pending(r: Redis, keys: Keys) -> int:
    return int((await r.xpending(keys.stream(STREAM), GROUP))["pending"])


async def _pending_is(r: Redis, keys: Keys, n: int) -> bool:
    return await pending(r, keys) == n


async def publish_turns(r: Redis, settings: Settings, n: int) -> list[TurnV1]:
    """Publish as the producers of a stream read by groups do (capped at the hard cap)."""
    turns = [turn(i) for i in range(n)]
    for t in turns:
        await publish(r, Keys(settings.namespace), STREAM, t,
                      settings.resolved_stream_hard_maxlen())
    return turns


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, {"stream": STREAM, "group": GROUP, **labels})
    return 0.0 if value is None else value


def spawn(settings: Settings, mode: str, consumer: str, log: Path,
          **env: str) -> subprocess.Popen[bytes]:
    """A worker process (tests/worker_proc.py) configured through REEF_* variables."""
    environment = {**os.environ, "REEF_PROFILE": "dev",
                   "REEF_REDIS_URL": settings.redis_url, "REEF_NAMESPACE": settings.namespace,
                   "REEF_WORKER_BLOCK_MS": str(settings.worker_block_ms),
                   "REEF_WORKER_CLAIM_IDLE_MS": "60000", "REEF_METRICS_PORT": "0", **env}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.worker_proc", mode, STREAM, GROUP, consumer],
            cwd=REPO, env=environment, stdout=out, stderr=subprocess.STDOUT)


# --- the happy path -------------------------------------------------------------------


async def test_processes_and_acks(redis_server: RedisServer, namespace: str, r: Redis) -> None:
    settings = make_settings(redis_server, namespace)
    keys = Keys(namespace)
    handler = Recorder()
    worker = new_worker(r, settings, handler)
    async with running(worker):  # started before the stream exists: MKSTREAM
        await eventually(lambda: r.exists(keys.stream(STREAM)))
        turns = await publish_turns(r, settings, 5)
        await eventually(lambda: len(handler.calls) == 5)
    assert handler.message_ids == [t.id for t in turns]
    assert all(isinstance(m, TurnV1) for m, _ in handler.calls)
    assert await pending(r, keys) == 0
    assert await worker.is_done(turns[0])
    consumers = await r.xinfo_consumers(keys.stream(STREAM), GROUP)
    assert consumers == []  # a clean stop with nothing pending leaves the group


async def test_publish_caps_the_stream(redis_server: RedisServer, namespace: str,
                                       r: Redis) -> None:
    keys = Keys(namespace)
    scored = ScoredV1(turn=turn(), reward=1.0)
    for _ in range(300):
        entry_id = await publish(r, keys, "scored", scored, maxlen=50)
    assert await r.xlen(keys.stream("scored")) < 300
    [(last_id, fields)] = await r.xrange(keys.stream("scored"), count=1, min=entry_id)
    assert last_id.decode() == entry_id
    assert decode(fields) == scored


async def test_duplicate_message_id_is_handled_once(redis_server: RedisServer, namespace: str,
                                                    r: Redis) -> None:
    settings = make_settings(redis_server, namespace)
    registry = CollectorRegistry()
    handler = Recorder()
    worker = new_worker(r, settings, handler, registry=registry)
    message = turn()
    for _ in range(2):  # a producer replay: same message id, two entries
        await publish(r, Keys(namespace), STREAM, message, settings.stream_maxlen)
    async with running(worker):
        await eventually(lambda: (sample(
            registry, "reef_worker_entries_total", outcome="duplicate") == 1))
    assert handler.message_ids == [message.id]
    assert await pending(r, Keys(namespace)) == 0


# --- restarts and crashes -------------------------------------------------------------


async def test_own_pending_entries_are_reread_after_restart(
        redis_server: RedisServer, namespace: str, r: Redis) -> None:
    # A claim idle time far beyond the test: only the start-up read of id 0 can find them.
    settings = make_settings(redis_server, namespace, worker_claim_idle_ms=60_000,
                             worker_max_deliveries=5)
    keys = Keys(namespace)
    turns = await publish_turns(r, settings, 3)
    failing = Recorder(always_fail)
    async with running(new_worker(r, settings, failing, consumer="scorer-1")):
        await eventually(lambda: len(failing.calls) == 3)
    assert await pending(r, keys) == 3

    handler = Recorder()
    async with running(new_worker(r, settings, handler, consumer="scorer-1")):
        await eventually(lambda: len(handler.calls) == 3, timeout=2)
        later = turn(9)
        await publish(r, keys, STREAM, later, settings.stream_maxlen)
        await eventually(lambda: len(handler.calls) == 4, timeout=2)
    assert sorted(handler.message_ids[:3]) == sorted(t.id for t in turns)
    assert handler.message_ids[3] == later.id
    assert await pending(r, keys) == 0


async def test_killed_workers_entries_are_finished_by_another(
        redis_server: RedisServer, namespace: str, r: Redis, tmp_path: Path) -> None:
    settings = make_settings(redis_server, namespace)
    keys = Keys(namespace)
    turns = await publish_turns(r, settings, 4)
    proc = spawn(settings, "hang", "doomed", tmp_path / "worker.log")
    try:
        await eventually(lambda: _llen_is(r, started_key(namespace), 4), timeout=15)
    finally:
        proc.kill()  # SIGKILL mid-batch: four handlers in flight, nothing acked
        proc.wait()
    summary = await r.xpending(keys.stream(STREAM), GROUP)
    assert summary["pending"] == 4
    assert summary["consumers"] == [{"name": b"doomed", "pending": 4}]

    registry = CollectorRegistry()
    handler = Recorder()
    async with running(new_worker(r, settings, handler, consumer="rescuer",
                                  registry=registry)):
        await eventually(lambda: len(handler.calls) == 4)
    assert sorted(handler.message_ids) == sorted(t.id for t in turns)
    assert await pending(r, keys) == 0
    assert sample(registry, "reef_worker_reclaimed_total") == 4


async def _llen_is(r: Redis, key: str, n: int) -> bool:
    return int(await r.llen(key)) == n


# --- failures and dead letters --------------------------------------------------------


async def test_malformed_entries_are_dead_lettered(redis_server: RedisServer, namespace: str,
                                                   r: Redis) -> None:
    settings = make_settings(redis_server, namespace)
    keys = Keys(namespace)
    registry = CollectorRegistry()
    garbage: list[tuple[dict[str, str], str]] = [
        ({"foo": "bar"}, "lacks 'kind' or 'data'"),
        ({"kind": "nope.v9", "data": "{}"}, "unknown message kind 'nope.v9'"),
        ({"kind": "turn.v1", "data": "not json{"}, "invalid turn.v1"),
        ({"kind": "turn.v1", "data": '{"tenant": 5}'}, "invalid turn.v1"),
    ]
    bad_ids = [(await r.xadd(keys.stream(STREAM), fields)).decode() for fields, _ in garbage]
    good = turn()
    await publish(r, keys, STREAM, good, settings.stream_maxlen)
    handler = Recorder()
    async with running(new_worker(r, settings, handler, registry=registry)):
        await eventually(lambda: len(handler.calls) == 1)
        await eventually(lambda: _xlen_is(r, keys.dead(STREAM), 4))
    assert handler.message_ids == [good.id]
    assert await pending(r, keys) == 0
    dead = await r.xrange(keys.dead(STREAM))
    for (_, fields), (original, reason), bad_id in zip(dead, garbage, bad_ids, strict=True):
        assert reason in fields[b"dead_reason"].decode()
        assert fields[b"dead_id"].decode() == bad_id
        assert fields[b"dead_stream"] == STREAM.encode()
        assert fields[b"dead_group"] == GROUP.encode()
        assert fields[b"dead_deliveries"] == b"1"
        assert {k.encode(): v.encode() for k, v in original.items()}.items() <= fields.items()
    assert sample(registry, "reef_worker_entries_total", outcome="dead_lettered") == 4
    assert sample(registry, "reef_worker_entries_total", outcome="processed") == 1


async def _xlen_is(r: Redis, key: str, n: int) -> bool:
    return int(await r.xlen(key)) == n


async def test_always_failing_entry_is_dead_lettered_once(
        redis_server: RedisServer, namespace: str, r: Redis) -> None:
    settings = make_settings(redis_server, namespace, worker_max_deliveries=3)
    keys = Keys(namespace)
    [message] = await publish_turns(r, settings, 1)
    handler = Recorder(always_fail)
    # Two workers of the group compete for the reclaims; the entry still dies once.
    async with running(new_worker(r, settings, handler, consumer="a")), \
            running(new_worker(r, settings, handler, consumer="b")):
        await eventually(lambda: _xlen_is(r, keys.dead(STREAM), 1))
        await asyncio.sleep(3 * settings.worker_claim_idle_ms / 1000)
    assert await r.xlen(keys.dead(STREAM)) == 1
    assert len(handler.calls) == settings.worker_max_deliveries
    assert await pending(r, keys) == 0
    [(_, fields)] = await r.xrange(keys.dead(STREAM))
    assert fields[b"dead_deliveries"] == b"3"
    assert b"RuntimeError: judge timed out" in fields[b"dead_reason"]
    assert decode(fields) == message


async def test_entry_whose_consumers_keep_dying_is_dead_lettered_unhandled(
        redis_server: RedisServer, namespace: str, r: Redis) -> None:
    settings = make_settings(redis_server, namespace, worker_max_deliveries=3)
    keys = Keys(namespace)
    [message] = await publish_turns(r, settings, 1)
    await r.xgroup_create(keys.stream(STREAM), GROUP, id="0")
    [[_, [(entry_id, _)]]] = await r.xreadgroup(GROUP, "ghost", {keys.stream(STREAM): ">"})
    for _ in range(2):  # two more deliveries whose workers died mid-handler
        await r.xclaim(keys.stream(STREAM), GROUP, "ghost", 0, [entry_id])
    handler = Recorder()
    async with running(new_worker(r, settings, handler)):
        await eventually(lambda: _xlen_is(r, keys.dead(STREAM), 1))
    assert handler.calls == []
    [(_, fields)] = await r.xrange(keys.dead(STREAM))
    assert fields[b"dead_deliveries"] == b"4"
    assert fields[b"dead_reason"].startswith(b"abandoned after 3 deliveries")
    assert decode(fields) == message
    assert await pending(r, keys) == 0


async def test_rejected_entry_is_dead_lettered_at_once(redis_server: RedisServer,
                                                       namespace: str, r: Redis) -> None:
    settings = make_settings(redis_server, namespace)
    keys = Keys(namespace)
    await publish_turns(r, settings, 1)

    async def reject(message: Message) -> None:
        raise Reject("tenant unknown")

    handler = Recorder(reject)
    async with running(new_worker(r, settings, handler)):
        await eventually(lambda: _xlen_is(r, keys.dead(STREAM), 1))
    [(_, fields)] = await r.xrange(keys.dead(STREAM))
    assert fields[b"dead_reason"] == b"rejected: tenant unknown"
    assert len(handler.calls) == 1


# --- stopping -------------------------------------------------------------------------


async def test_sigterm_finishes_the_entry_in_hand(redis_server: RedisServer, namespace: str,
                                                  r: Redis, tmp_path: Path) -> None:
    settings = make_settings(redis_server, namespace, worker_block_ms=1000)
    keys = Keys(namespace)
    [first] = await publish_turns(r, settings, 1)
    proc = spawn(settings, "slow", "graceful", tmp_path / "worker.log",
                 WORKER_PROC_SLOW_SECONDS="0.5")
    try:
        await eventually(lambda: _llen_is(r, started_key(namespace), 1), timeout=15)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        later = turn(1)  # published after the signal: must not be read any more
        await publish(r, keys, STREAM, later, settings.stream_maxlen)
        returncode = await asyncio.to_thread(proc.wait, 10)
        elapsed = time.monotonic() - sent
    finally:
        proc.kill()
    assert returncode == 0, (tmp_path / "worker.log").read_text()
    assert elapsed < 0.5 + settings.worker_block_ms / 1000 + EXIT_MARGIN_SECONDS
    assert await r.lrange(finished_key(namespace), 0, -1) == [first.id.encode()]
    assert await pending(r, keys) == 0
    [group] = await r.xinfo_groups(keys.stream(STREAM))
    assert group["lag"] == 1


async def test_sigterm_while_idle_exits_within_block_timeout(
        redis_server: RedisServer, namespace: str, r: Redis, tmp_path: Path) -> None:
    settings = make_settings(redis_server, namespace, worker_block_ms=1000)
    keys = Keys(namespace)
    proc = spawn(settings, "slow", "idle", tmp_path / "worker.log")
    try:
        async def reading() -> bool:
            if not await r.exists(keys.stream(STREAM)):
                return False
            return len(await r.xinfo_consumers(keys.stream(STREAM), GROUP)) == 1
        await eventually(reading, timeout=15)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        returncode = await asyncio.to_thread(proc.wait, 10)
        elapsed = time.monotonic() - sent
    finally:
        proc.kill()
    assert returncode == 0, (tmp_path / "worker.log").read_text()
    assert elapsed < settings.worker_block_ms / 1000 + EXIT_MARGIN_SECONDS


async def test_second_sigterm_abandons_a_hung_handler(
        redis_server: RedisServer, namespace: str, r: Redis, tmp_path: Path) -> None:
    settings = make_settings(redis_server, namespace)
    keys = Keys(namespace)
    await publish_turns(r, settings, 1)
    proc = spawn(settings, "hang", "stuck", tmp_path / "worker.log")
    try:
        await eventually(lambda: _llen_is(r, started_key(namespace), 1), timeout=15)
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        assert proc.poll() is None  # still finishing the batch in hand
        proc.send_signal(signal.SIGTERM)
        returncode = await asyncio.to_thread(proc.wait, 5)
    finally:
        proc.kill()
    assert returncode == 0, (tmp_path / "worker.log").read_text()
    assert await pending(r, keys) == 1  # left for another worker to reclaim


async def test_cancel_does_not_lose_the_ack(redis_server: RedisServer, namespace: str,
                                            r: Redis) -> None:
    settings = make_settings(redis_server, namespace)
    keys = Keys(namespace)
    [message] = await publish_turns(r, settings, 1)
    returned = asyncio.Event()

    async def finish(message: Message) -> None:
        returned.set()  # the handler is done; its ack is about to start

    worker = new_worker(r, settings, Recorder(finish))
    task = asyncio.create_task(worker.run())
    await returned.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await pending(r, keys) == 0
    assert await worker.is_done(message)


async def test_survives_a_redis_restart(redis_server: RedisServer, namespace: str,
                                        r: Redis) -> None:
    settings = make_settings(redis_server, namespace)
    handler = Recorder()
    async with running(new_worker(r, settings, handler)):
        await publish_turns(r, settings, 1)
        await eventually(lambda: len(handler.calls) == 1)
        await eventually(lambda: _pending_is(r, Keys(namespace), 0))
        redis_server.kill()
        try:
            await asyncio.sleep(0.5)  # the worker's read fails; it backs off and retries
        finally:
            redis_server.start()
        after = turn(7)
        await publish(r, Keys(namespace), STREAM, after, settings.stream_maxlen)
        await eventually(lambda: after.id in handler.message_ids, timeout=10)
    assert len(handler.calls) == 2


# --- concurrency and metrics ----------------------------------------------------------


@pytest.mark.parametrize("concurrency", [3, 8])
async def test_batch_entries_overlap_up_to_concurrency(
        redis_server: RedisServer, namespace: str, r: Redis, concurrency: int) -> None:
    settings = make_settings(redis_server, namespace, worker_concurrency=concurrency)
    await publish_turns(r, settings, 8)  # before the worker starts: one batch of 8
    in_flight = peak = 0
    first_start = last_end = 0.0

    async def slow(message: Message) -> None:
        nonlocal in_flight, peak, first_start, last_end
        first_start = first_start or time.monotonic()
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.2)
        in_flight -= 1
        last_end = time.monotonic()

    handler = Recorder(slow)
    async with running(new_worker(r, settings, handler)):
        await eventually(lambda: len(handler.calls) == 8 and in_flight == 0)
    assert peak == concurrency  # behaviour, not speed: the limit is reached, never passed
    assert last_end - first_start < 8 * 0.2  # well under the serial time


async def test_metrics_move(redis_server: RedisServer, namespace: str, r: Redis) -> None:
    settings = make_settings(redis_server, namespace, metrics_port=free_port())
    keys = Keys(namespace)
    registry = CollectorRegistry()
    flaky_seen: set[str] = set()

    async def flaky(message: Message) -> None:
        if isinstance(message, TurnV1) and message.turn_index == 0 and message.id not in flaky_seen:
            flaky_seen.add(message.id)
            raise RuntimeError("transient")

    worker = new_worker(r, settings, Recorder(flaky), registry=registry)
    await worker.ensure_group()
    await publish_turns(r, settings, 3)
    await r.xadd(keys.stream(STREAM), {"kind": "garbage"})
    await worker.refresh_gauges()
    assert sample(registry, "reef_worker_lag_entries") == 4
    assert sample(registry, "reef_worker_pending_entries") == 0

    async with running(worker):
        await eventually(lambda: (sample(
            registry, "reef_worker_entries_total", outcome="processed") == 3))
    await worker.refresh_gauges()
    assert sample(registry, "reef_worker_entries_total", outcome="failed") == 1
    assert sample(registry, "reef_worker_entries_total", outcome="dead_lettered") == 1
    assert sample(registry, "reef_worker_reclaimed_total") == 1
    assert sample(registry, "reef_worker_handler_duration_seconds_count",
                  outcome="processed") == 3
    assert sample(registry, "reef_worker_lag_entries") == 0
    assert sample(registry, "reef_worker_pending_entries") == 0

    served = serve_metrics(settings, registry, addr="127.0.0.1")
    assert served is not None
    try:
        url = f"http://127.0.0.1:{settings.metrics_port}/metrics"
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
    finally:
        served[0].shutdown()
        served[0].server_close()
    assert (b'reef_worker_entries_total{group="scorer",outcome="processed",stream="turns"} 3.0'
            in body)
    assert serve_metrics(make_settings(redis_server, namespace)) is None
