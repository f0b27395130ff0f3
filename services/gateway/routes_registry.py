"""Hot swap on Reef's policy server (``upstream_kind = "reef"``): route by the registry.

The policy replicas load published adapters themselves and register what they hold
(``shared.adapter_registry``). Every ``adapter_registry_interval_seconds``, and at once
when a ``weights`` event arrives, this gateway reads the replicas' entries and routes each
tenant to its newest adapter that *every* live replica holds; until a new one is held by
all, the tenant stays on the one it has. A request can therefore only reach a replica that
holds the adapter it names.

The gateway also registers the adapters it routes to or still has requests on (the
``holds``), and the replicas keep those loaded: the previous version of a tenant is
unloaded only once nothing routes to it. A new route is registered *before* the gateway
checks, in a fresh read, that every replica still holds the adapter, and only then used:
with the replicas' own handshake (``services/policy/replica.py``) no replica can drop an
adapter a gateway has just started to route to.

Nothing here is on the request path: ``route`` reads the table this task keeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.gateway.metrics import GatewayMetrics
from shared.adapter_registry import Registry, ReplicaEntry, routable
from shared.keys import Keys
from shared.messages import WeightsEventV1
from shared.settings import Settings

if TYPE_CHECKING:
    from services.gateway.adapters import AdapterRouter

log = logging.getLogger("reef.gateway.adapters")


class RegistryRoutes:
    """Keeps one router's table from the registry, and registers what it routes to."""

    def __init__(self, router: AdapterRouter, redis: aioredis.Redis, metrics: GatewayMetrics,
                 settings: Settings) -> None:
        self._router = router
        self._metrics = metrics
        self._registry = Registry(redis, Keys(settings.namespace),
                                  settings.adapter_registry_ttl_seconds)
        self._interval = settings.adapter_registry_interval_seconds
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._wake = asyncio.Event()
        self._registered = False

    def wake(self) -> None:
        """Look at the registry now (a new adapter was published)."""
        self._wake.set()

    async def close(self) -> None:
        if self._registered:
            with contextlib.suppress(RedisError, OSError):  # the entry expires anyway
                await self._registry.drop_gateway(self.id)

    async def run(self) -> None:
        """Refresh the routes until cancelled; Redis away leaves them as they are."""
        while True:
            try:
                await self.refresh()
            except (RedisError, OSError) as exc:
                log.warning("gateway.registry_unreadable", extra={"error": type(exc).__name__})
            with contextlib.suppress(TimeoutError):  # the interval's tick
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()

    async def refresh(self) -> None:
        """One round: read the replicas, switch the tenants whose newest adapter every
        replica now holds (registered first), register what this gateway uses."""
        replicas = await self._registry.replicas()
        self._observe(replicas)
        proposed = self._proposals(replicas)
        if proposed:
            await self._register(extra=(e.adapter for e in proposed))
            confirmed = self._proposals(await self._registry.replicas())
            for event in proposed:
                if any(c.id == event.id for c in confirmed):
                    self._router.switch(event)
        await self._register()

    def _proposals(self, replicas: list[ReplicaEntry]) -> list[WeightsEventV1]:
        """Per tenant, the adapter every replica holds, where it is not the live one."""
        out = []
        for tenant in self._router.weights.tenants():
            event = routable(self._router.weights.candidates(tenant), replicas)
            live = self._router.live.get(tenant)
            if event is not None and (live is None or live.id != event.id):
                out.append(event)
        return out

    def _observe(self, replicas: list[ReplicaEntry]) -> None:
        if replicas:
            self._router.base_name = replicas[0].base
        self._metrics.policy_replicas.set(len(replicas))
        waiting = 0
        for tenant in self._router.weights.tenants():
            newest, live = self._router.weights.newest(tenant), self._router.live.get(tenant)
            waiting += newest is not None and (live is None or live.id != newest.id)
        self._metrics.adapters_waiting.set(waiting)

    async def _register(self, extra: Iterable[str] = ()) -> None:
        used = {e.adapter for e in self._router.live.values()}
        used.update(self._router.holds)
        used.update(extra)
        await self._registry.put_gateway(self.id, used)
        self._registered = True
