"""Hot swap: which adapter serves each tenant, kept current in the background.

Every gateway replica reads the whole ``weights`` stream (no consumer group: each needs
every event) into a :class:`shared.weights_log.WeightsLog`. How a published adapter gets
onto the upstream depends on what the upstream is (``upstream_kind``; ``auto`` asks the
upstream once at start: Reef's policy server marks every answer with
``x-reef-policy-version``):

- ``reef`` (:mod:`services.gateway.routes_registry`): the policy replicas follow the stream
  themselves and register what they hold in Redis; this gateway routes a tenant to its
  newest adapter once every live replica holds it, and keeps the previous one until then.
- ``vllm`` (:mod:`services.gateway.routes_direct`): the gateway loads each new adapter
  itself through vLLM's ``/v1/load_lora_adapter``, retrying a failed load with backoff,
  and routes to it once loaded.

The request path only reads the in-memory table (``route``) and counts the requests on
each adapter (``hold``/``release``): no Redis round trip. Requests already sent keep the
name they were sent with, so they finish on the weights they started with.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Literal

import aiohttp
import orjson
import redis.asyncio as aioredis

from services.gateway.errors import APIError
from services.gateway.metrics import GatewayMetrics
from services.gateway.routes_direct import DirectLoads
from services.gateway.routes_registry import RegistryRoutes
from services.gateway.upstream import Upstream
from shared.keys import SHARED_TENANT, WEIGHTS, Keys
from shared.messages import WeightsEventV1
from shared.settings import Settings
from shared.weights_log import WeightsLog, catch_up, follow

log = logging.getLogger("reef.gateway.adapters")

POLICY_VERSION_HEADER = "x-reef-policy-version"
"""Marks every answer of Reef's policy server (``upstream_kind = "auto"`` looks for it)."""
UpstreamKind = Literal["reef", "vllm"]


class AdapterRouter:
    """Which adapter serves each tenant (``live``), and the requests on each adapter."""

    def __init__(self, settings: Settings, redis: aioredis.Redis, upstream: Upstream,
                 metrics: GatewayMetrics) -> None:
        self._settings = settings
        self._redis = redis
        self._upstream = upstream
        self._metrics = metrics
        self._stream = Keys(settings.namespace).stream(WEIGHTS)
        self._routed = frozenset({settings.adapter_name, settings.model_name})
        self.weights = WeightsLog()
        self._owners = self.weights.owners
        self.live: dict[str, WeightsEventV1] = {}
        """Tenant -> the adapter its requests are routed to."""
        self.holds: dict[str, int] = {}
        """Adapter -> requests this gateway sent to it that have not ended."""
        self.base_name: str | None = None
        """Sent instead of the adapter alias while a tenant has no live adapter (``reef``:
        the replicas' base model name, ``model_name`` until one registered: the policy
        server answers any other name 404); None (``vllm``) leaves the name as it is."""
        self.kind: UpstreamKind | None = None
        self._fresh: set[str] = set()
        """Events that arrived while following (not at start): their swap is timed."""
        self._direct = DirectLoads(self, upstream, metrics, settings)
        self._registry = RegistryRoutes(self, redis, metrics, settings)
        self._tasks: list[asyncio.Task[None]] = []

    # --- the request path -------------------------------------------------------------

    def route(self, tenant: str, model: str) -> str | None:
        """The adapter name to send instead of ``model``, or None to leave it; a 404 when
        ``model`` names another tenant's adapter (a client may name any model, and the
        upstream serves whatever adapter is loaded)."""
        owner = self._owners.get(model)
        if owner is not None and owner != tenant and owner != SHARED_TENANT:
            raise APIError(404, f"The model '{model}' does not exist or you do not have "
                                "access to it.", code="model_not_found", param="model")
        if model not in self._routed:
            return None
        event = self.live.get(tenant) or self.live.get(SHARED_TENANT)
        return self.base_name if event is None else event.adapter

    def hold(self, adapter: str) -> None:
        """Count a request sent to ``adapter`` (until :meth:`release`)."""
        self.holds[adapter] = self.holds.get(adapter, 0) + 1

    def release(self, adapter: str) -> None:
        """The request counted by :meth:`hold` ended."""
        left = self.holds.get(adapter, 0) - 1
        if left > 0:
            self.holds[adapter] = left
        else:
            self.holds.pop(adapter, None)

    def visible(self, tenant: str, model: str) -> bool:
        """Whether ``tenant`` may use ``model``: anything but another tenant's adapter."""
        owner = self.weights.owner(model)
        return owner is None or owner in (tenant, SHARED_TENANT)

    def visible_models(self, raw: bytes, tenant: str) -> bytes:
        """An upstream's ``/models`` answer without the other tenants' adapters."""
        try:
            listing = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return raw
        data = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(data, list):
            return raw
        listing["data"] = [m for m in data if not isinstance(m, dict)
                           or self.visible(tenant, str(m.get("id")))]
        return orjson.dumps(listing)

    # --- the background ---------------------------------------------------------------

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._run(), name="reef-adapters"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._direct.close()
        await self._registry.close()

    async def _run(self) -> None:
        self.kind = await self._detect()
        log.info("gateway.upstream_kind", extra={"kind": self.kind})
        if self.kind == "reef":  # until a replica's registry entry names its base model
            self.base_name = self.base_name or self._settings.model_name
        last = await catch_up(self._redis, self._stream, self._on_event, self._on_bad)
        if self.kind == "vllm":
            for tenant in self.weights.tenants():
                newest = self.weights.newest(tenant)
                if newest is not None:
                    await self._direct.apply(newest)
        else:
            self._tasks.append(asyncio.create_task(self._registry.run(),
                                                   name="reef-adapter-registry"))
        await follow(self._redis, self._stream, last, self._on_event, self._on_bad)

    async def _detect(self) -> UpstreamKind:
        """``upstream_kind``, or for ``auto`` what the upstream's ``/models`` answer says;
        waits for an answer as long as it takes."""
        if self._settings.upstream_kind != "auto":
            return self._settings.upstream_kind
        delay = 0.5
        while True:
            try:
                resp = await self._upstream.request("GET", "/models")
                resp.release()
            except (APIError, aiohttp.ClientError, TimeoutError):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            return "reef" if POLICY_VERSION_HEADER in resp.headers else "vllm"

    async def _on_event(self, event: WeightsEventV1, following: bool) -> None:
        if not self.weights.apply(event):
            return
        if following:
            self._fresh.add(event.id)
            if self.kind == "vllm":
                await self._direct.apply(event)
            else:
                self._registry.wake()

    def _on_bad(self, reason: str) -> None:
        self._metrics.adapter_swaps.labels("bad_event").inc()
        log.error("gateway.bad_weights_event", extra={"error": reason})

    def switch(self, event: WeightsEventV1) -> WeightsEventV1 | None:
        """Route ``event``'s tenant to it from now on; the adapter it replaces."""
        previous = self.live.get(event.tenant)
        self.live[event.tenant] = event
        self._metrics.adapter_swaps.labels("ok").inc()
        self._metrics.live_version.set(event.version)
        if event.id in self._fresh and event.batch_at > 0:  # not a start-up catch-up
            self._metrics.weights_live_seconds.observe(max(0.0, time.time() - event.batch_at))
        self._fresh.discard(event.id)
        log.info("gateway.adapter_live", extra={"adapter": event.adapter,
                                                "tenant": event.tenant})
        return previous
