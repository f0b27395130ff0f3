"""Recording turns off the request path: memory queue -> Redis, or a local spool.

The request handler calls ``Recorder.record(turn)``, which never blocks and never fails;
it returns a future that is done once the turn is in Redis or in the spool (fsynced). The
chat handler awaits it (bounded) before the last bytes of its answer, so a gateway killed
right after answering has no answered turn left only in its memory. A background task
sends queued turns to Redis in pipelines. A Lua script makes each
append idempotent and assigns the turn index in the same step (see ``_RECORD_LUA``).
While Redis is unreachable, turns are appended to a local JSONL spool; once Redis
answers again the spool is replayed in order, and only then do new turns go straight to
Redis again, so a session's turns keep their order.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.gateway.metrics import GatewayMetrics
from shared.keys import TURNS, Keys

log = logging.getLogger("reef.gateway.recorder")

OWNER_FIELD = "~owner"
"""The field of a session's response-id hash holding its owner (no response id starts with
``~``)."""

# Idempotent append: a turn id seen before is skipped; otherwise the session's counter
# gives the turn index, spliced into the JSON (the payload always ends with '}' and has
# no turn_index of its own). Splicing keeps the JSON byte-exact: cjson would round floats.
# The counter and the session's response id -> index hash (what feedback may name) expire
# ARGV[5] seconds after the session's last turn. The hash's field OWNER_FIELD holds the
# caller (ARGV[6]: a key id) of the session's first recorded turn.
_RECORD_LUA = """
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[3]) == false then return -1 end
local n = redis.call('INCR', KEYS[3]) - 1
redis.call('EXPIRE', KEYS[3], ARGV[5])
if ARGV[6] ~= '' then redis.call('HSETNX', KEYS[4], '""" + OWNER_FIELD + """', ARGV[6]) end
if ARGV[4] ~= '' or ARGV[6] ~= '' then
  if ARGV[4] ~= '' then redis.call('HSET', KEYS[4], ARGV[4], n) end
  redis.call('EXPIRE', KEYS[4], ARGV[5])
end
local data = string.sub(ARGV[1], 1, -2) .. ',"turn_index":' .. n .. '}'
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'kind', 'turn.v1', 'data', data)
return n
"""

RETRY_SECONDS = 1.0
"""How often a recorder in spool mode checks whether Redis is back."""

Queued = tuple[dict[str, Any], "asyncio.Future[None]"]
"""A turn waiting to be recorded, and the future done once it is durable."""


class Spool:
    """An append-only JSONL file of turns waiting for Redis."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def append(self, payloads: Sequence[bytes]) -> None:
        """Append turns; flushed to the OS so a gateway crash keeps them."""
        with self.path.open("ab") as f:
            f.write(b"".join(p + b"\n" for p in payloads))
            f.flush()
            os.fsync(f.fileno())

    def read_from(self, offset: int, limit: int) -> tuple[list[bytes], int]:
        """Up to ``limit`` whole lines from ``offset``, and the offset after them."""
        lines: list[bytes] = []
        with self.path.open("rb") as f:
            f.seek(offset)
            for line in f:
                if not line.endswith(b"\n"):
                    break  # a torn last line from a crash mid-write: not a turn yet
                lines.append(line[:-1])
                offset += len(line)
                if len(lines) >= limit:
                    break
        return lines, offset

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


class Recorder:
    """Queue of turns to record, drained by one background task."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, spool_path: Path,
                 metrics: GatewayMetrics, maxlen: int, dedupe_ttl: int,
                 batch_size: int = 256, *, session_ttl: int | None = None) -> None:
        """``session_ttl``: how long a session's turn counter and response ids live after
        its last turn (``feedback_window_seconds``; default ``dedupe_ttl``)."""
        self._redis = redis
        self._keys = keys
        self._metrics = metrics
        self._maxlen = maxlen
        self._ttl = dedupe_ttl
        self._session_ttl = session_ttl if session_ttl is not None else dedupe_ttl
        self._last: asyncio.Future[None] | None = None
        self._batch_size = batch_size
        self._queue: asyncio.Queue[Queued] = asyncio.Queue()
        self._script = redis.register_script(_RECORD_LUA)
        self.spool = Spool(spool_path)
        self._spool_offset = 0
        self.spooling = self.spool.size() > 0  # a previous run left turns behind
        self._task: asyncio.Task[None] | None = None

    def record(self, turn: dict[str, Any]) -> asyncio.Future[None]:
        """Queue a turn (a ``TurnV1`` as a dict, without ``turn_index``). Never blocks;
        the future is done once the turn is in Redis or in the spool."""
        durable: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((turn, durable))
        self._last = durable
        return durable

    async def flushed(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) until every turn queued before this call is
        in Redis or the spool: turns are settled in the order they were queued."""
        last = self._last
        if last is None or last.done():
            return
        with suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(last), timeout)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="reef-recorder")

    async def close(self, timeout: float = 5.0) -> None:
        """Stop, sending what is queued to Redis or, failing that, to the spool."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        leftover = [self._queue.get_nowait() for _ in range(self._queue.qsize())]
        if leftover:
            payloads = [orjson.dumps(t) for t, _ in leftover]
            try:
                if self.spooling:
                    raise ConnectionError("spool not yet replayed")
                await asyncio.wait_for(self._send(payloads), timeout)
            except (RedisError, OSError, TimeoutError):
                self._to_spool(payloads)
            _settle(leftover)

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            turns = [t for t, _ in batch]
            payloads = [orjson.dumps(t) for t in turns]
            if not self.spooling:
                try:
                    await self._send(payloads, turns)
                    _settle(batch)
                    continue
                except (RedisError, OSError) as exc:
                    log.warning("redis_unreachable_spooling", extra={"error": type(exc).__name__})
                    self.spooling = True
            if payloads:
                self._to_spool(payloads)
            _settle(batch)
            await self._replay()

    async def _next_batch(self) -> list[Queued]:
        """The queued turns, waiting for one; in spool mode, wake up to retry Redis."""
        batch: list[Queued] = []
        if self._queue.empty():
            if self.spooling:
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), RETRY_SECONDS))
                except TimeoutError:
                    return batch
            else:
                batch.append(await self._queue.get())
        while len(batch) < self._batch_size and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        self._metrics.recorder_queue.set(self._queue.qsize())
        return batch

    async def _send(self, payloads: Sequence[bytes],
                    turns: Sequence[dict[str, Any]] | None = None) -> None:
        """Append turns in one pipeline; ``turns`` are the payloads parsed, if at hand."""
        if not payloads:
            return
        stream = self._keys.stream(TURNS)
        parsed = turns if turns is not None else [orjson.loads(p) for p in payloads]
        async with self._redis.pipeline(transaction=False) as pipe:
            for payload, turn in zip(payloads, parsed, strict=True):
                tenant, session = turn["tenant"], turn["session_id"]
                await self._script(
                    keys=[stream, self._keys.dedupe("turn", turn["id"]),
                          self._keys.turn_index(tenant, session),
                          self._keys.session_responses(tenant, session)],
                    args=[payload, self._maxlen, self._ttl, turn.get("response_id") or "",
                          self._session_ttl, turn.get("caller") or ""], client=pipe)
            await pipe.execute()
        self._metrics.turns_recorded.inc(len(payloads))

    def _to_spool(self, payloads: Sequence[bytes]) -> None:
        try:
            self.spool.append(payloads)
            self._metrics.turns_spooled.inc(len(payloads))
        except OSError:
            log.exception("spool_write_failed")
            self._metrics.turns_lost.inc(len(payloads))
        self._metrics.spool_bytes.set(self.spool.size())

    async def _replay(self) -> None:
        """Send the spool to Redis in order; leave spool mode when it is all sent."""
        try:
            while True:
                lines, end = self.spool.read_from(self._spool_offset, self._batch_size)
                if not lines:
                    break
                await self._send(lines)
                self._spool_offset = end
                self._metrics.turns_replayed.inc(len(lines))
        except (RedisError, OSError):
            return  # still down; the turns stay spooled, retried in RETRY_SECONDS
        self.spool.clear()
        self._spool_offset = 0
        self.spooling = False
        self._metrics.spool_bytes.set(0)
        log.info("spool_replayed")


def _settle(batch: Sequence[Queued]) -> None:
    """Tell the requests waiting on these turns that they are in Redis or the spool (or
    that the spool failed: the loss is counted, and the answer must not wait forever)."""
    for _, durable in batch:
        if not durable.done():
            durable.set_result(None)
