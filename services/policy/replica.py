"""One policy replica among several: it follows the ``weights`` stream itself, loads every
published adapter, keeps those something may still route to, and says so in Redis.

Every replica reads the whole stream (no consumer group). What it keeps loaded, re-decided
every ``adapter_registry_interval_seconds`` and at once on a new event
(:func:`wanted_adapters`), is, per tenant: the newest adapter published; the newest one
that *every* live replica holds (what gateways route to: ``shared.adapter_registry``); and
every adapter a live gateway says it routes to or has requests on. A load that fails is
retried with a doubling backoff (1 s up to 30 s) for as long as the adapter is wanted; while
the newest adapter of some tenant failed here, ``/readyz`` answers 503 and
``reef_policy_adapters_failing`` counts it.

Unloading is a handshake, so that no gateway can start routing to an adapter a replica is
dropping: the replica first registers itself *without* the adapter, then reads the
gateways' entries again, and unloads only if still nobody wants it and no request is on it
here (``Adapter.in_use``); a gateway, for its part, registers a new route before it checks
that every replica still holds the adapter, and switches only then. Either the replica sees
the gateway's entry, or the gateway sees the replica without the adapter.

A replica registers only once it has caught up (loaded what was wanted at start), and its
entry expires ``adapter_registry_ttl_seconds`` after it stops refreshing it, so a crashed
replica does not hold new versions back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.policy.lora import Adapter
from services.policy.metrics import PolicyMetrics
from services.policy.registry import AdapterNotFoundError, Adapters
from shared.adapter_registry import Registry, ReplicaEntry, routable
from shared.keys import WEIGHTS, Keys
from shared.messages import WeightsEventV1
from shared.settings import Settings
from shared.weights_log import WeightsLog, catch_up, follow

log = logging.getLogger(__name__)

RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 30.0

LoadAdapter = Callable[[str, str], Awaitable[Adapter]]
"""Loads ``(name, path)``: the server's own load (path confinement included)."""


@dataclass
class Failure:
    """The last failed load of an adapter, and when to try again."""

    error: str
    attempts: int
    next_try: float
    """``time.monotonic()`` of the next attempt."""


def wanted_adapters(weights: WeightsLog, replicas: Sequence[ReplicaEntry],
                    used: set[str]) -> dict[str, WeightsEventV1]:
    """Adapter name -> event, for every adapter this replica must hold (module docstring)."""
    wanted: dict[str, WeightsEventV1] = {}
    for tenant in weights.tenants():
        candidates = weights.candidates(tenant)
        if not candidates:
            continue
        wanted.setdefault(candidates[0].adapter, candidates[0])
        route = routable(candidates, replicas)
        if route is not None:
            wanted.setdefault(route.adapter, route)
        for event in candidates:
            if event.adapter in used:
                wanted.setdefault(event.adapter, event)
    return wanted


def replica_id(settings: Settings) -> str:
    """This replica's registry name: ``policy_replica_id`` or ``<hostname>-<pid>``."""
    return settings.policy_replica_id or f"{socket.gethostname()}-{os.getpid()}"


class Replica:
    """Follows ``weights`` for one policy server (see the module docstring)."""

    def __init__(self, settings: Settings, redis: aioredis.Redis, adapters: Adapters,
                 load: LoadAdapter, metrics: PolicyMetrics) -> None:
        self.id = replica_id(settings)
        self.weights = WeightsLog()
        self.caught_up = False
        self.failures: dict[str, Failure] = {}
        self._adapters = adapters
        self._load = load
        self._metrics = metrics
        self._redis = redis
        self._stream = Keys(settings.namespace).stream(WEIGHTS)
        self._registry = Registry(redis, Keys(settings.namespace),
                                  settings.adapter_registry_ttl_seconds)
        self._interval = settings.adapter_registry_interval_seconds
        self._followed: set[str] = set()
        """Adapters this follower loaded (it unloads only those)."""
        self._leaving: frozenset[str] = frozenset()
        self._wake = asyncio.Event()

    def failing(self) -> dict[str, str]:
        """The newest adapter of each tenant whose load failed here: name -> error."""
        newest = (self.weights.newest(t) for t in self.weights.tenants())
        return {e.adapter: self.failures[e.adapter].error for e in newest
                if e is not None and e.adapter in self.failures}

    @property
    def ready(self) -> bool:
        """Caught up, and no tenant's newest adapter failing."""
        return self.caught_up and not self.failing()

    async def run(self) -> None:
        """Catch up, register, then follow and reconcile until cancelled."""
        last = await catch_up(self._redis, self._stream, self._on_event, self._on_bad)
        while not await self._reconcile():
            await asyncio.sleep(self._interval)  # Redis away: nothing known yet
        self.caught_up = True
        log.info("policy.replica_caught_up replica=%s adapters=%d", self.id,
                 len(self._adapters))
        tasks = [asyncio.create_task(follow(self._redis, self._stream, last, self._on_event,
                                            self._on_bad)),
                 asyncio.create_task(self._heartbeat())]
        try:
            while True:
                with contextlib.suppress(TimeoutError):  # the interval's tick
                    await asyncio.wait_for(self._wake.wait(), self._interval)
                self._wake.clear()
                await self._reconcile()
        finally:
            for task in tasks:
                task.cancel()

    async def _heartbeat(self) -> None:
        """Refresh the registry entry every interval, also while a slow load (Tinker) runs:
        an entry left to expire would make gateways count this replica out."""
        while True:
            await self._register()
            await asyncio.sleep(self._interval)

    async def close(self) -> None:
        """Leave the registry (a clean stop; a crash lets the entry expire)."""
        if self.caught_up:
            try:
                await self._registry.drop_replica(self.id)
            except (RedisError, OSError):
                log.warning("policy.replica_unregister_failed replica=%s", self.id)

    async def _on_event(self, event: WeightsEventV1, following: bool) -> None:
        if self.weights.apply(event):
            self._wake.set()

    def _on_bad(self, reason: str) -> None:
        log.error("policy.bad_weights_event error=%s", reason)

    async def _reconcile(self) -> bool:
        """Load what is wanted and missing, unload what nobody wants; False when the
        registry could not be read (nothing changed then)."""
        try:
            wanted = await self._wanted()
        except (RedisError, OSError):
            return False
        self._adapters.pinned = frozenset(wanted)
        for name in [n for n in self.failures if n not in wanted]:
            del self.failures[name]  # superseded: no longer retried
        loaded_any = False
        for event in wanted.values():
            if event.adapter not in self._adapters and self._due(event.adapter):
                loaded_any |= await self._load_one(event)
        if loaded_any:
            await self._register()
        self._metrics.adapters_failing.set(len(self.failing()))
        try:
            await self._unload_unwanted(wanted)
        except (RedisError, OSError):
            self._leaving = frozenset()
        return True

    async def _wanted(self) -> dict[str, WeightsEventV1]:
        replicas = await self._registry.replicas()
        used = await self._registry.gateway_adapters()
        return wanted_adapters(self.weights, replicas, used)

    def _due(self, adapter: str) -> bool:
        failure = self.failures.get(adapter)
        return failure is None or time.monotonic() >= failure.next_try

    async def _load_one(self, event: WeightsEventV1) -> bool:
        try:
            await self._load(event.adapter, event.path)
        # Any failure of a load (a bad path or file, a Tinker error) is retried and
        # surfaced, never fatal to the replica.
        except Exception as exc:  # noqa: BLE001
            self._failed(event, exc)
            return False
        self.failures.pop(event.adapter, None)
        self._followed.add(event.adapter)
        self._metrics.adapter_changes.labels("follow", "ok").inc()
        return True

    def _failed(self, event: WeightsEventV1, exc: Exception) -> None:
        previous = self.failures.get(event.adapter)
        attempts = previous.attempts + 1 if previous else 1
        delay = min(RETRY_FIRST_SECONDS * 2 ** (attempts - 1), RETRY_MAX_SECONDS)
        error = f"{type(exc).__name__}: {exc}"[:300]
        self.failures[event.adapter] = Failure(error, attempts, time.monotonic() + delay)
        self._metrics.adapter_changes.labels("follow", "failed").inc()
        log.warning("policy.adapter_load_failed adapter=%s tenant=%s attempt=%d "
                    "retry_in=%.0f error=%s", event.adapter, event.tenant, attempts, delay,
                    error)

    async def _unload_unwanted(self, wanted: dict[str, WeightsEventV1]) -> None:
        """The handshake of the module docstring."""
        leaving = self._unwanted(wanted)
        if not leaving:
            return
        self._leaving = leaving
        if not await self._register():  # gateways must see this replica without them
            self._leaving = frozenset()
            return
        still_unwanted = self._unwanted(await self._wanted())
        for name in leaving & still_unwanted:
            with contextlib.suppress(AdapterNotFoundError):  # unloaded by a request
                self._adapters.unload(name)
            self._followed.discard(name)
            self._metrics.adapter_changes.labels("follow_unload", "ok").inc()
        self._leaving = frozenset()
        await self._register()

    def _unwanted(self, wanted: dict[str, WeightsEventV1]) -> frozenset[str]:
        return frozenset(name for name in self._followed if name not in wanted
                         and (a := self._adapters.get(name)) is not None and a.in_use == 0)

    async def _register(self) -> bool:
        """Write this replica's registry entry; False when Redis did not take it."""
        held = frozenset(a.name for a in self._adapters) - self._leaving
        entry = ReplicaEntry(self.id, self._adapters.base_name, held,
                             {n: f.error[:120] for n, f in self.failures.items()}, self.ready)
        try:
            await self._registry.put_replica(entry)
        except (RedisError, OSError):
            log.warning("policy.replica_register_failed replica=%s", self.id)
            return False
        return True
