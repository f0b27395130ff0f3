"""Hot swap on an upstream that is not Reef's policy server (``upstream_kind = "vllm"``).

Such an upstream (a real vLLM) has no Redis: the gateway loads each tenant's newest adapter
itself with vLLM's ``POST /v1/load_lora_adapter`` and routes the tenant to it once the
upstream said yes. A load that fails is retried with a doubling backoff (1 s up to 30 s)
for as long as the adapter is still its tenant's newest; meanwhile the tenant keeps its
live adapter, and ``reef_gateway_adapter_swaps_total{outcome="load_failed"}`` counts each
failure. The adapter a swap replaces is unloaded once no request of this gateway is on it
and ``adapter_unload_grace_seconds`` have passed (other gateways sharing the upstream may
still route to it until they swapped too).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import aiohttp
import orjson

from services.gateway.errors import APIError
from services.gateway.metrics import GatewayMetrics
from services.gateway.upstream import Upstream
from shared.messages import WeightsEventV1
from shared.settings import Settings

if TYPE_CHECKING:
    from services.gateway.adapters import AdapterRouter

log = logging.getLogger("reef.gateway.adapters")

RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 30.0
DRAIN_POLL_SECONDS = 0.1


class DirectLoads:
    """Loads, retries and unloads adapters on a vLLM-like upstream for one router."""

    def __init__(self, router: AdapterRouter, upstream: Upstream, metrics: GatewayMetrics,
                 settings: Settings) -> None:
        self._router = router
        self._upstream = upstream
        self._metrics = metrics
        self._grace = settings.adapter_unload_grace_seconds
        self._retries: dict[str, asyncio.Task[None]] = {}
        """Tenant -> the task retrying its newest adapter's load."""
        self._unloads: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        tasks = [*self._retries.values(), *self._unloads]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def apply(self, event: WeightsEventV1) -> None:
        """Make ``event`` live for its tenant if it is the newest: load, then switch; a
        failed load is retried in the background."""
        if not self._wanted(event):
            return
        if await self._load(event):
            self._go_live(event)
            return
        retry = self._retries.pop(event.tenant, None)
        if retry is not None:
            retry.cancel()
        self._retries[event.tenant] = asyncio.create_task(self._retry(event))

    def _wanted(self, event: WeightsEventV1) -> bool:
        """Still its tenant's newest, and not live yet."""
        live = self._router.live.get(event.tenant)
        newest = self._router.weights.newest(event.tenant)
        return (newest is not None and newest.id == event.id
                and (live is None or live.id != event.id))

    async def _retry(self, event: WeightsEventV1) -> None:
        delay = RETRY_FIRST_SECONDS
        while True:
            await asyncio.sleep(delay)
            if not self._wanted(event):
                return
            if await self._load(event):
                self._go_live(event)
                return
            delay = min(delay * 2, RETRY_MAX_SECONDS)

    def _go_live(self, event: WeightsEventV1) -> None:
        previous = self._router.switch(event)
        if previous is not None and previous.adapter != event.adapter:
            task = asyncio.create_task(self._unload_when_idle(previous.adapter))
            self._unloads.add(task)
            task.add_done_callback(self._unloads.discard)

    async def _load(self, event: WeightsEventV1) -> bool:
        body = orjson.dumps({"lora_name": event.adapter, "lora_path": event.path})
        try:
            resp = await self._upstream.request("POST", "/load_lora_adapter", body)
            text = await resp.read()
            resp.release()
        except (APIError, aiohttp.ClientError, TimeoutError) as exc:  # keep the live one
            log.warning("gateway.adapter_load_failed", extra={"adapter": event.adapter,
                                                              "error": type(exc).__name__})
            self._metrics.adapter_swaps.labels("load_failed").inc()
            return False
        if resp.status < 300 or b"already" in text.lower():
            return True
        log.warning("gateway.adapter_load_refused", extra={"adapter": event.adapter,
                                                           "status": resp.status})
        self._metrics.adapter_swaps.labels("load_failed").inc()
        return False

    async def _unload_when_idle(self, adapter: str) -> None:
        await asyncio.sleep(self._grace)
        while self._router.holds.get(adapter):
            await asyncio.sleep(DRAIN_POLL_SECONDS)
        if any(event.adapter == adapter for event in self._router.live.values()):
            return  # live again (a rollback to it): keep it
        try:
            resp = await self._upstream.request(
                "POST", "/unload_lora_adapter", orjson.dumps({"lora_name": adapter}))
            resp.release()
        except (APIError, aiohttp.ClientError, TimeoutError) as exc:  # costs only memory
            log.warning("gateway.adapter_unload_failed", extra={"adapter": adapter,
                                                                "error": type(exc).__name__})
