"""The stream worker: the one consumer-group loop every Reef consumer service runs.

Guarantees (at-least-once, made effectively-once by message-id dedupe):

- The group is created with ``MKSTREAM`` from the start of the stream (``create_group``);
  a restarted worker first re-reads its own pending entries (id ``0``), then new ones.
- An entry is acked only after the handler returned, together with a "handled" marker
  keyed by the message id (``Keys.handled``); a redelivered or replayed message whose
  marker exists is acked without calling the handler again. Handlers must still be
  idempotent (a crash between their effects and the ack re-runs them); a handler that
  writes its effects in one Redis MULTI can add ``worker.mark_done(pipe, message)`` to it.
- A handler that raises leaves its entry pending; any worker of the group takes it over
  with ``XAUTOCLAIM`` once it has been idle ``worker_claim_idle_ms`` (the idle time is the
  backoff). After ``worker_max_deliveries`` deliveries, an entry that fails validation, or
  a handler raising ``Reject``, the entry is moved to the dead-letter stream
  (``Keys.dead``) and acked atomically.
- Lease: the entries in a worker's hands (delivered, not yet settled) stay claimed however
  long their handler runs. One task per worker wakes every sixth of
  ``worker_claim_idle_ms`` and re-claims (``XCLAIM ... JUSTID``: the idle time restarts,
  the delivery count does not grow) those held a third of it or longer that are still
  pending at this consumer (``RENEW_LUA``). So a slow handler (the LLM judge, the miner's
  LLM) is not paid for twice: an entry is reclaimed only when its worker died, hung its
  event loop, or lost Redis for most of the idle time.
- Trim: producers cap a stream read by groups only at ``stream_hard_maxlen``; its workers
  trim it (at most every ``stream_trim_interval_seconds``) to about ``stream_maxlen``, never
  past the oldest entry some group has not finished, and report a group that holds it
  above the cap (``reef_stream_over_cap_entries``); see ``shared.stream_trim``.
- Lost entries: an entry gone before its group handled it is counted in
  ``reef_stream_entries_lost_total`` and logged (``worker.entries_lost``), never taken
  for a duplicate: a pending entry deleted from the stream (read back empty, or listed
  deleted by ``XAUTOCLAIM``; one deleted while its worker still handles it counts too,
  though that worker finishes it), and entries trimmed before they were delivered
  (``shared.stream_trim``).
- Acks run shielded from cancellation and are awaited before ``run`` returns.
- ``stop()`` (or SIGTERM/SIGINT under ``run_worker``) stops reading; the batch in hand is
  finished, so the worker exits within ``worker_block_ms`` plus the batch's handling time.

The Redis client must return bytes (``decode_responses=False``, RESP2: the defaults).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar, cast

from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.keys import Keys
from shared.messages import BadMessage, Message, decode
from shared.metrics import (
    OUTCOME_DEAD_LETTERED,
    OUTCOME_DUPLICATE,
    OUTCOME_FAILED,
    OUTCOME_PROCESSED,
    Health,
    serve_metrics,
    worker_metrics,
)
from shared.redis_client import connect
from shared.settings import Settings
from shared.stream_trim import Trim, Trimmer, create_group

log = logging.getLogger(__name__)

Handler = Callable[[Message, str], Awaitable[None]]
BatchHandler = Callable[[list[tuple[Message, str]]], Awaitable[list[Exception | None]]]
"""Handles a whole batch (e.g. with one pipelined round trip); returns, per entry, None
or the exception that entry failed with (settled like a per-entry handler's)."""
"""``await handler(message, entry_id)``; returning means its effects are durable."""
T = TypeVar("T")

SETTLE_ATTEMPTS = 3
"""Tries of an ack or dead-letter write when Redis is briefly unreachable (losing an ack
costs a redelivery, so it is worth a retry; after the last one the entry stays pending)."""
SETTLE_BACKOFF_SECONDS = 0.1
"""First pause between settle attempts; doubled each time."""
MAX_BACKOFF_SECONDS = 5.0
"""Longest pause of the loop while Redis is unreachable."""
REASON_MAX_CHARS = 1000
"""Dead-letter reasons are cut to this length (an exception text may be long)."""
SIGNALS = (signal.SIGTERM, signal.SIGINT)
LEASE_CHUNK = 500
"""Entry ids re-claimed per script call (a Lua call takes a bounded number of arguments)."""
LEASE_MIN_PERIOD_SECONDS = 0.01
"""Shortest pause of the lease task (only a tiny test ``worker_claim_idle_ms`` needs it)."""

# A message appended to a stream at most once: the marker keyed by its id (KEYS[1], kept
# ARGV[1] seconds) and the XADD (to KEYS[2], capped at ARGV[2], fields kind=ARGV[3],
# data=ARGV[4]) are one atomic step. The scorer publishes each scored turn with it, and a
# replay appends exported turns with it, so a turn is in a ``scored`` stream once.
APPEND_ONCE_LUA = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) == false then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'kind', ARGV[3], 'data', ARGV[4])
return 1
"""

# MULTI/EXEC cannot make the XADD depend on the XACK; this script does, so two workers
# holding the same (reclaimed) entry never write two dead letters for it.
DEAD_LETTER_LUA = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 4))
return 1
"""
"""KEYS: stream, dead-letter stream; ARGV: group, entry id, maxlen, field, value, ..."""

# The lease: re-claim the entries a worker holds, but only those still pending at it (one
# reclaimed by another worker meanwhile stays with that one: no tug of war).
RENEW_LUA = """
local claim = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
local held = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)[1]
  if p and p[2] == ARGV[2] then
    table.insert(claim, ARGV[i])
    table.insert(held, ARGV[i])
  end
end
if #held > 0 then
  table.insert(claim, 'JUSTID')
  redis.call(unpack(claim))
end
return held
"""
"""KEYS: stream; ARGV: group, consumer, entry id, ...; returns the ids still held here."""


class Reject(Exception):
    """Raised by a handler for an entry that can never succeed: dead-lettered at once."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One stream entry as delivered to this consumer."""

    id: str
    fields: dict[bytes, bytes]
    deliveries: int
    """How often the group delivered it, this delivery included (XPENDING)."""


def default_consumer_name() -> str:
    """``hostname-pid``: unique per process, stable for its lifetime."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def publish(
    redis: Redis, keys: Keys, stream_name: str, message: Message, maxlen: int
) -> str:
    """Append ``message`` to a stream, capped at about ``maxlen`` entries; returns the
    entry id. Pass ``settings.resolved_stream_hard_maxlen()`` for a stream read by consumer
    groups (their workers trim it to ``stream_maxlen``), ``settings.stream_maxlen`` else."""
    fields: dict[Any, Any] = message.to_fields()
    entry_id = await redis.xadd(keys.stream(stream_name), fields, maxlen=maxlen, approximate=True)
    return _text(entry_id)


def _succeeded(batch: list[tuple[Entry, Message]],
               tasks: Sequence[asyncio.Future[bool]]) -> list[tuple[Entry, Message | None]]:
    """The entries whose handling finished and asked for an ack."""
    return [(entry, message) for (entry, message), task in zip(batch, tasks, strict=True)
            if task.done() and not task.cancelled() and task.exception() is None
            and task.result()]


class StreamWorker:
    """Consumes one stream as one consumer of one group; see the module docstring."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        stream: str,
        group: str,
        consumer: str | None,
        handler: Handler | None,
        settings: Settings,
        registry: CollectorRegistry | None = None,
        dedupe: bool = True,
        batch_handler: BatchHandler | None = None,
    ) -> None:
        """``stream`` is the logical name (``turns``); ``consumer`` None means
        ``hostname-pid``; ``registry`` None means prometheus-client's default one.
        ``dedupe`` False skips the "handled" markers (an EXISTS per entry and a SET per
        ack) for handlers that are idempotent by themselves. ``batch_handler``, when
        given, is called instead of ``handler`` with every fresh entry of a batch."""
        if redis.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError("StreamWorker needs a Redis client with decode_responses=False")
        self.redis, self.keys, self.settings = redis, keys, settings
        self.stream, self.group, self.handler = stream, group, handler
        self.consumer = consumer or default_consumer_name()
        self.stream_key, self.dead_key = keys.stream(stream), keys.dead(stream)
        self.metrics = worker_metrics(registry)
        self.dedupe = dedupe
        self.batch_handler = batch_handler
        if (handler is None) == (batch_handler is None):
            raise ValueError("give exactly one of handler and batch_handler")
        self._stopping = asyncio.Event()
        self._slots = asyncio.Semaphore(settings.worker_concurrency)
        self._settling: set[asyncio.Future[Any]] = set()
        self._dead_letter_script = redis.register_script(DEAD_LETTER_LUA)
        self._renew_script = redis.register_script(RENEW_LUA)
        self._trimmer = Trimmer(redis, self.stream_key, settings.stream_maxlen)
        self._ready = False
        self._claim_cursor = "0-0"
        self._next_claim = 0.0
        self._next_trim = 0.0
        self._blocked_by = ""
        self._backoff = 0.0
        self._in_hand: dict[str, float] = {}
        """Entries delivered here and not yet settled -> when last claimed (monotonic)."""
        # A series from 0, so that the first loss shows as an increase.
        self.metrics.lost.labels(self.stream, self.group)

    # --- public API -------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        """True once ``stop()`` was called."""
        return self._stopping.is_set()

    def stop(self) -> None:
        """Stop reading; ``run`` returns once the batch in hand is settled.
        Call it from the event loop's thread (signal handlers installed by asyncio are)."""
        self._stopping.set()

    async def run(self) -> None:
        """Consume until ``stop()``. Redis outages are waited out, never raised."""
        log.info("worker.started", extra=self.log_fields())
        lease = asyncio.create_task(self._keep_claims(), name=f"lease:{self.stream}")
        lease.add_done_callback(self._lease_ended)
        try:
            while not self._stopping.is_set():
                await self._step_guarded()
            await self._forget_consumer()
        finally:
            lease.cancel()
            await asyncio.gather(lease, return_exceptions=True)
            await self._finish_settling()
            log.info("worker.stopped", extra=self.log_fields())

    async def ensure_group(self) -> None:
        """Create the stream and the group (reading from the start), unless they exist."""
        await create_group(self.redis, self.stream_key, self.group)

    def done_key(self, message: Message) -> str:
        """The key marking ``message`` as handled by this group."""
        return self.keys.handled(self.group, message.id)

    async def is_done(self, message: Message) -> bool:
        """Whether this group already finished ``message`` (by message id)."""
        return bool(await self.redis.exists(self.done_key(message)))

    def mark_done(self, pipe: Pipeline, message: Message, handling: str = "") -> None:
        """Queue the "handled" marker in a handler's own MULTI, next to its effects. The
        marker is the set of handlings that were acked (``consumer:entry:delivery``): an
        ack re-sent after a lost reply adds nothing, a second handling of the message adds
        a member (dedupe keeps one; the chaos suite counts them)."""
        key = self.done_key(message)
        pipe.sadd(key, handling or self.consumer)
        pipe.expire(key, self.settings.dedupe_ttl_seconds)

    async def refresh_gauges(self) -> None:
        """Update the pending, lag and dead-letter gauges (XPENDING, XINFO GROUPS, XLEN)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xpending(self.stream_key, self.group)
            pipe.xinfo_groups(self.stream_key)
            pipe.xlen(self.dead_key)
            summary, groups, dead = await pipe.execute()
        labels = (self.stream, self.group)
        self.metrics.pending.labels(*labels).set(summary["pending"])
        self.metrics.dead_letters.labels(self.stream).set(dead)
        for info in groups:
            if _text(info["name"]) == self.group and info.get("lag") is not None:
                self.metrics.lag.labels(*labels).set(info["lag"])

    # --- the loop ---------------------------------------------------------------------

    async def _step_guarded(self) -> None:
        """One step; a Redis outage pauses the loop (with backoff) instead of ending it."""
        try:
            await self._step()
            self._backoff = 0.0
        except (RedisConnectionError, RedisTimeoutError) as exc:
            self._backoff = min(MAX_BACKOFF_SECONDS, max(0.1, self._backoff * 2))
            log.warning("worker.redis_unavailable",
                        extra={**self.log_fields(), "error": str(exc), "retry_in": self._backoff})
            await self._sleep_unless_stopped(self._backoff)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # Redis lost the stream or the group (restarted without persistence, or deleted).
            log.warning("worker.group_missing", extra=self.log_fields())
            self._ready = False

    async def _step(self) -> None:
        if not self._ready:
            await self.ensure_group()
            await self._drain_own_pending()
            self._ready = True
        if time.monotonic() >= self._next_claim:
            await self._claim_idle()
        if time.monotonic() >= self._next_trim:
            self._report_trim(await self._trimmer.trim())
        if not self._stopping.is_set():
            new = await self._read(">", block=self.settings.worker_block_ms)
            await self._process_batch([Entry(i, f, 1) for i, f in new])

    async def _drain_own_pending(self) -> None:
        """Re-deliver what this consumer read before a restart and never acked."""
        start = "0"
        while not self._stopping.is_set():
            raw = await self._read(start, block=None)
            if not raw:
                return
            await self._process_batch(await self._with_deliveries(raw))
            start = raw[-1][0]

    async def _claim_idle(self) -> None:
        """Take over entries idle too long in any consumer (failed, or their worker died)."""
        reply = await self.redis.xautoclaim(
            self.stream_key, self.group, self.consumer, self.settings.worker_claim_idle_ms,
            self._claim_cursor, count=self.settings.worker_batch_size)
        # reply[2]: pending entries gone from the stream; Redis dropped them from the PEL.
        self._count_lost(self.group, len(reply[2]) if len(reply) > 2 else 0,
                         "deleted while pending")
        self._claim_cursor = _text(reply[0])
        more = self._claim_cursor != "0-0"
        interval = self.settings.worker_claim_idle_ms / 2000
        self._next_claim = time.monotonic() + (0.0 if more else interval)
        raw = [(_text(i), f) for i, f in reply[1]]
        if raw:
            self.metrics.reclaimed.labels(self.stream, self.group).inc(len(raw))
            log.info("worker.reclaimed", extra={**self.log_fields(), "entries": len(raw)})
            await self._process_batch(await self._with_deliveries(raw))
        await self.refresh_gauges()

    async def _read(self, start: str, block: int | None) -> list[tuple[str, dict[bytes, bytes]]]:
        reply: Any = await self.redis.xreadgroup(
            self.group, self.consumer, {self.stream_key: start},
            count=self.settings.worker_batch_size, block=block)
        if not reply:
            return []
        return [(_text(entry_id), fields) for entry_id, fields in reply[0][1]]

    async def _with_deliveries(self, raw: list[tuple[str, dict[bytes, bytes]]]) -> list[Entry]:
        """Attach delivery counts (XPENDING) to re-delivered entries; drop any that another
        consumer acked in the meantime."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry_id, _ in raw:
                pipe.xpending_range(self.stream_key, self.group, entry_id, entry_id, 1)
            details = await pipe.execute()
        return [Entry(entry_id, fields, int(info[0]["times_delivered"]))
                for (entry_id, fields), info in zip(raw, details, strict=True) if info]

    # --- the lease, the trim --------------------------------------------------------

    async def _keep_claims(self) -> None:
        """The lease: every sixth of ``worker_claim_idle_ms``, re-claim the entries held a
        third of it or longer, so an entry is never idle long enough to be reclaimed while
        this worker handles it. One task per worker; a dict of the entries in hand."""
        period = max(LEASE_MIN_PERIOD_SECONDS, self.settings.worker_claim_idle_ms / 6000)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            due = [entry_id for entry_id, since in self._in_hand.items()
                   if now - since >= 2 * period]
            for start in range(0, len(due), LEASE_CHUNK):
                await self._renew(due[start:start + LEASE_CHUNK], now)

    def _lease_ended(self, task: asyncio.Task[None]) -> None:
        """A lease task only ends cancelled; anything else is a bug worth a loud log (the
        entries in hand would then be reclaimed after the idle time, as without a lease)."""
        if not task.cancelled() and task.exception() is not None:
            log.error("worker.lease_failed", exc_info=task.exception(), extra=self.log_fields())

    async def _renew(self, entry_ids: list[str], now: float) -> None:
        try:
            held = {_text(i) for i in await self._renew_script(
                keys=[self.stream_key], args=[self.group, self.consumer, *entry_ids])}
        except (RedisError, OSError) as exc:  # the next round tries again
            log.warning("worker.lease_renew_failed",
                        extra={**self.log_fields(), "error": type(exc).__name__})
            return
        for entry_id in entry_ids:
            if entry_id in self._in_hand:  # still in hand; a lost one is not renewed again
                self._in_hand[entry_id] = now if entry_id in held else float("inf")
        if len(held) < len(entry_ids):
            log.warning("worker.lease_lost", extra={
                **self.log_fields(), "entries": len(entry_ids) - len(held)})

    def _report_trim(self, trim: Trim) -> None:
        """Metrics and logs of a trim; schedules the next one."""
        self._next_trim = time.monotonic() + (
            0.0 if trim.more else self.settings.stream_trim_interval_seconds)
        if trim.trimmed:
            self.metrics.trimmed.labels(self.stream).inc(trim.trimmed)
        for group in trim.groups:
            self.metrics.lost.labels(self.stream, group)  # a series from 0 (see __init__)
            self.metrics.over_cap.labels(self.stream, group).set(
                trim.over_cap if group == trim.holder else 0)
        for group, count in trim.lost.items():
            self._count_lost(group, count, "removed before delivery")
        blocked_by = trim.holder if trim.over_cap else ""
        if blocked_by != self._blocked_by:
            if blocked_by:
                log.warning("worker.trim_blocked", extra={
                    **self.log_fields(), "blocking_group": blocked_by,
                    "over_cap": trim.over_cap})
            else:
                log.info("worker.trim_resumed", extra=self.log_fields())
            self._blocked_by = blocked_by

    # --- a batch: decode -> dedupe -> handle -> settle ---------------------------------

    async def _process_batch(self, entries: list[Entry]) -> None:
        """decode -> dedupe -> handle -> settle; handlers run concurrently (up to
        ``worker_concurrency``), so entries of a batch finish in no particular order.
        Until then the entries are in hand: their claims are renewed (``_keep_claims``)."""
        since = time.monotonic()
        for entry in entries:
            self._in_hand[entry.id] = since
        try:
            await self._decode_and_handle(entries)
        finally:
            for entry in entries:
                self._in_hand.pop(entry.id, None)

    async def _decode_and_handle(self, entries: list[Entry]) -> None:
        decoded = [(entry, await self._decode(entry)) for entry in entries]
        fresh = await self._drop_duplicates([(e, m) for e, m in decoded if m is not None])
        if self.batch_handler is not None and fresh:
            await self._handle_batch(fresh, self.batch_handler)
            return
        tasks = [asyncio.ensure_future(self._handle_and_settle(e, m)) for e, m in fresh]
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        except asyncio.CancelledError:
            # Forced stop: what finished is still acked (by a task that run() awaits).
            self._start_settling(partial(self._ack_many, _succeeded(fresh, tasks),
                                         OUTCOME_PROCESSED))
            raise
        for task in tasks:
            if task.exception() is not None:
                raise cast(BaseException, task.exception())
        # One round trip acks the whole batch (an ack each cost ~0.14 ms of CPU).
        await self._settle(partial(self._ack_many, _succeeded(fresh, tasks),
                                   OUTCOME_PROCESSED))

    async def _decode(self, entry: Entry) -> Message | None:
        """The entry's message, or None once the entry was settled without one."""
        if not entry.fields:  # deleted from the stream while pending: lost, not a duplicate
            await self._settle(lambda: self._ack_lost(entry))
            return None
        try:
            message = decode(entry.fields)
        except BadMessage as exc:
            invalid = f"invalid: {exc}"
            await self._settle(lambda: self._dead_letter(entry, invalid))
            return None
        if entry.deliveries > self.settings.worker_max_deliveries:
            reason = (f"abandoned after {entry.deliveries - 1} deliveries "
                      "(its consumers stopped while handling it)")
            await self._settle(lambda: self._dead_letter(entry, reason))
            return None
        return message

    async def _drop_duplicates(
            self, batch: list[tuple[Entry, Message]]) -> list[tuple[Entry, Message]]:
        """Ack, without handling, entries whose message id this group already finished
        (one EXISTS per entry, pipelined) or that repeat a message id of this batch."""
        if not batch:
            return []
        if self.dedupe:
            async with self.redis.pipeline(transaction=False) as pipe:
                for _, message in batch:
                    pipe.exists(self.done_key(message))
                done = await pipe.execute()
        else:
            done = [0] * len(batch)
        fresh: list[tuple[Entry, Message]] = []
        duplicates: list[tuple[Entry, Message | None]] = []
        # By kind and id: a scored.v1 carries its turn's id, so a stray turn.v1 in the
        # same batch (rejected by the handler) must not make the scored entry a duplicate.
        seen: set[tuple[str, str]] = set()
        for (entry, message), was_done in zip(batch, done, strict=True):
            if was_done or (message.kind, message.id) in seen:
                duplicates.append((entry, None))
            else:
                seen.add((message.kind, message.id))
                fresh.append((entry, message))
        if duplicates:
            await self._settle(partial(self._ack_many, duplicates, OUTCOME_DUPLICATE))
        return fresh

    async def _handle_batch(self, fresh: list[tuple[Entry, Message]],
                            batch_handler: BatchHandler) -> None:
        started = time.perf_counter()
        errors = await batch_handler([(message, entry.id) for entry, message in fresh])
        share = (time.perf_counter() - started) / len(fresh)
        done: list[tuple[Entry, Message | None]] = []
        for (entry, message), error in zip(fresh, errors, strict=True):
            outcome = OUTCOME_PROCESSED if error is None else OUTCOME_FAILED
            self.metrics.handler_duration.labels(self.stream, self.group, outcome).observe(share)
            if error is None:
                done.append((entry, message))
            else:
                await self._settle_failed(entry, message, error)
        await self._settle(partial(self._ack_many, done, OUTCOME_PROCESSED))

    async def _handle_and_settle(self, entry: Entry, message: Message) -> bool:
        """Handle; True when the entry is to be acked with its batch."""
        async with self._slots:
            error = await self._handle(entry, message)
        if error is None:
            return True
        await self._settle_failed(entry, message, error)
        return False

    async def _handle(self, entry: Entry, message: Message) -> Exception | None:
        """Run the handler; returns what it raised, if anything."""
        started = time.perf_counter()
        error: Exception | None = None
        try:
            await cast(Handler, self.handler)(message, entry.id)
        except Exception as exc:  # noqa: BLE001 - any handler error is settled below
            error = exc
        outcome = OUTCOME_PROCESSED if error is None else OUTCOME_FAILED
        self.metrics.handler_duration.labels(self.stream, self.group, outcome).observe(
            time.perf_counter() - started)
        return error

    async def _settle_failed(self, entry: Entry, message: Message, error: Exception) -> None:
        if isinstance(error, Reject):
            await self._settle(lambda: self._dead_letter(entry, f"rejected: {error}"))
            return
        self._count(OUTCOME_FAILED)
        failure = f"{type(error).__name__}: {error}"
        if entry.deliveries >= self.settings.worker_max_deliveries:
            reason = f"failed {entry.deliveries} deliveries; last error: {failure}"
            await self._settle(lambda: self._dead_letter(entry, reason))
            return
        log.warning("worker.handler_failed", exc_info=error,
                    extra={**self.log_fields(), "entry": entry.id, "message_id": message.id,
                           "deliveries": entry.deliveries, "error": failure[:200]})

    # --- settling: shielded from cancellation, retried --------------------------------

    async def _settle(self, op: Callable[[], Awaitable[T]]) -> T | None:
        """Run an ack-like operation to completion even if the caller is cancelled."""
        return await asyncio.shield(self._start_settling(op))

    def _start_settling(self, op: Callable[[], Awaitable[T]]) -> asyncio.Future[T | None]:
        """Start an ack-like operation that ``run`` waits for before it returns."""
        task = asyncio.ensure_future(self._retry(op))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        return task

    async def _retry(self, op: Callable[[], Awaitable[T]]) -> T | None:
        for attempt in range(SETTLE_ATTEMPTS):
            try:
                return await op()
            except (RedisConnectionError, RedisTimeoutError) as exc:
                if attempt + 1 == SETTLE_ATTEMPTS:
                    # The entry stays pending: it is redelivered, then deduplicated.
                    log.warning("worker.settle_failed",
                                extra={**self.log_fields(), "error": str(exc)})
                    return None
                await asyncio.sleep(SETTLE_BACKOFF_SECONDS * 2**attempt)
        return None

    async def _ack_lost(self, entry: Entry) -> None:
        """Ack a pending entry whose content is gone; it counts as lost once (the XACK
        tells whether this worker was the one that removed it)."""
        if await self.redis.xack(self.stream_key, self.group, entry.id):
            self._count_lost(self.group, 1, "deleted while pending")

    async def _ack_many(self, done: list[tuple[Entry, Message | None]], outcome: str) -> None:
        """Ack entries (and mark their messages handled) in one transaction."""
        if not done:
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream_key, self.group, *(entry.id for entry, _ in done))
            if self.dedupe:
                for entry, message in done:
                    if message is not None:
                        self.mark_done(pipe, message,
                                       f"{self.consumer}:{entry.id}:{entry.deliveries}")
            await pipe.execute()
        self.metrics.entries.labels(self.stream, self.group, outcome).inc(len(done))

    async def _dead_letter(self, entry: Entry, reason: str) -> None:
        """Move the entry to the dead-letter stream and ack it, atomically, once."""
        extra = {b"dead_reason": reason[:REASON_MAX_CHARS], b"dead_id": entry.id,
                 b"dead_stream": self.stream, b"dead_group": self.group,
                 b"dead_consumer": self.consumer, b"dead_deliveries": str(entry.deliveries)}
        fields: dict[bytes, bytes | str] = {**entry.fields, **extra}
        args: list[bytes | str | int] = [self.group, entry.id, self.settings.stream_maxlen]
        for name, value in fields.items():
            args += [name, value]
        moved = await self._dead_letter_script(keys=[self.stream_key, self.dead_key], args=args)
        if moved:
            self._count(OUTCOME_DEAD_LETTERED)
            log.warning("worker.dead_lettered",
                        extra={**self.log_fields(), "entry": entry.id, "reason": reason[:200]})

    async def _finish_settling(self) -> None:
        while self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)

    # --- small helpers ----------------------------------------------------------------

    async def _forget_consumer(self) -> None:
        """On a clean stop, leave the group if nothing is pending here, so consumer names
        (hostname-pid) do not pile up across restarts."""
        try:
            mine = await self.redis.xpending_range(
                self.stream_key, self.group, "-", "+", 1, consumername=self.consumer)
            if not mine:
                await self.redis.xgroup_delconsumer(self.stream_key, self.group, self.consumer)
        except RedisError as exc:
            log.info("worker.consumer_kept", extra={**self.log_fields(), "error": str(exc)})

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        with suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    def _count(self, outcome: str) -> None:
        self.metrics.entries.labels(self.stream, self.group, outcome).inc()

    def _count_lost(self, group: str, count: int, cause: str) -> None:
        """Entries of ``group`` gone before it handled them (never a duplicate)."""
        if count <= 0:
            return
        self.metrics.lost.labels(self.stream, group).inc(count)
        log.warning("worker.entries_lost", extra={
            **self.log_fields(), "group": group, "entries": count, "cause": cause})

    def log_fields(self) -> dict[str, str]:
        return {"stream": self.stream, "group": self.group, "consumer": self.consumer}


@dataclass(frozen=True, slots=True)
class Consumer:
    """One stream a service consumes: the stream's name, the group and the handler."""

    stream: str
    group: str
    handler: Handler | None = None
    dedupe: bool = True
    """False when the handler is idempotent by itself (see ``StreamWorker``)."""
    batch_handler: BatchHandler | None = None


async def run_worker(
    settings: Settings,
    stream: str,
    group: str,
    handler: Handler,
    *,
    consumer: str | None = None,
    registry: CollectorRegistry | None = None,
) -> None:
    """``run_workers`` for a service that consumes one stream."""
    await run_workers(settings, [Consumer(stream, group, handler)], consumer=consumer,
                      registry=registry)


class ServiceFailed(RuntimeError):
    """A task of a service (a stream worker or a background task) raised: the service
    stopped its other tasks and exits non-zero, so compose or k8s restarts it."""


async def run_workers(
    settings: Settings,
    consumers: Sequence[Consumer],
    *,
    consumer: str | None = None,
    registry: CollectorRegistry | None = None,
    client: Redis | None = None,
    background: Sequence[Callable[[asyncio.Event], Coroutine[Any, Any, None]]] = (),
    health: Health | None = None,
) -> None:
    """A consumer service's main loop: connect, serve ``/metrics`` (if
    ``settings.metrics_port``), consume every stream until SIGTERM/SIGINT. The first signal
    stops reading and finishes the batches in hand; a second one cancels the handlers (their
    entries stay pending and are reclaimed) while acks already started still complete.

    ``background`` tasks (e.g. a periodic sweep, the trainer's step loop) get an event set
    at the first signal and must return soon after it; one may also return earlier.

    Supervision: when any task raises, the failure is logged with its traceback,
    ``health`` (``/healthz``) turns 503, every other task is stopped as on a signal, and
    ``ServiceFailed`` is raised, so the process exits non-zero instead of serving on with a
    dead part."""
    own_client = client is None
    redis = client if client is not None else connect(settings)
    keys = Keys(settings.namespace)
    health = health or Health()
    workers = [StreamWorker(redis, keys, c.stream, c.group, consumer, c.handler, settings,
                            registry, dedupe=c.dedupe, batch_handler=c.batch_handler)
               for c in consumers]
    stopping = asyncio.Event()
    server = serve_metrics(settings, registry, health=health)
    tasks = [asyncio.create_task(w.run(), name=f"worker:{w.stream}:{w.group}") for w in workers]
    tasks += [asyncio.create_task(job(stopping), name=f"background:{job.__qualname__}")
              for job in background]
    forced = False

    def stop_all() -> None:
        stopping.set()
        for worker in workers:
            worker.stop()

    def on_signal() -> None:
        nonlocal forced
        if stopping.is_set():
            forced = True
            for task in tasks:
                task.cancel()
        stop_all()

    loop = asyncio.get_running_loop()
    for sig in SIGNALS:
        loop.add_signal_handler(sig, on_signal)
    try:
        failure = await _supervise(tasks, health, stop_all, lambda: forced)
        if failure is not None:
            raise ServiceFailed(f"{failure[0]} failed: {failure[1]!r}") from failure[1]
        if forced:
            log.warning("worker.forced_stop", extra={"streams": [c.stream for c in consumers]})
    finally:
        for task in tasks:
            task.cancel()
        for sig in SIGNALS:
            loop.remove_signal_handler(sig)
        if server is not None:
            await asyncio.to_thread(server[0].shutdown)
            server[0].server_close()
        if own_client:
            await redis.aclose()


async def _supervise(tasks: list[asyncio.Task[None]], health: Health,
                     stop_all: Callable[[], None], forced: Callable[[], bool]
                     ) -> tuple[str, BaseException] | None:
    """Wait for every task; on the first one that raised (or was cancelled other than by a
    forced stop), log it, mark ``health`` failed and stop the rest. Returns the first
    failure (the task's name and its exception), or None."""
    failure: tuple[str, BaseException] | None = None
    pending: set[asyncio.Task[None]] = set(tasks)
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task.cancelled():
                if forced():
                    continue
                error: BaseException = asyncio.CancelledError(f"{task.get_name()} cancelled")
            elif task.exception() is None:
                continue
            else:
                error = cast(BaseException, task.exception())
            if failure is None:
                failure = (task.get_name(), error)
                log.error("worker.task_failed", exc_info=error,
                          extra={"task": task.get_name(), "error": type(error).__name__})
                health.fail(f"{task.get_name()}: {type(error).__name__}")
                stop_all()
    return failure
