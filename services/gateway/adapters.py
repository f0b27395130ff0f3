"""Hot swap: follow the ``weights`` stream, load each new adapter onto the upstream, route.

Every gateway replica reads the whole ``weights`` stream (no consumer group: each needs
every event). For a new adapter version it calls the upstream's vLLM-compatible
``POST /v1/load_lora_adapter`` (Reef's policy server and a real vLLM answer it alike),
and only once that succeeded does it route new requests to the new name. Requests
already sent keep the name they were sent with, so they finish on the weights they
started with; the previous adapter is unloaded after ``adapter_unload_grace_seconds``.
Nothing waits on any of this: a failed load keeps the live adapter and is counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, cast

import aiohttp
import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.gateway.errors import APIError
from services.gateway.metrics import GatewayMetrics
from services.gateway.upstream import Upstream
from shared.keys import WEIGHTS, Keys
from shared.messages import BadMessage, WeightsEventV1, decode
from shared.settings import Settings

log = logging.getLogger("reef.gateway.adapters")

ALL_TENANTS = "*"
"""The tenant of an adapter trained on every tenant's turns."""
BLOCK_MS = 2000
"""Block of each XREAD; below the client's socket timeout (5 s)."""


class AdapterRouter:
    """Which adapter serves each tenant, kept current from the ``weights`` stream."""

    def __init__(self, settings: Settings, redis: aioredis.Redis, upstream: Upstream,
                 metrics: GatewayMetrics) -> None:
        self._settings = settings
        self._redis = redis
        self._upstream = upstream
        self._metrics = metrics
        self._stream = Keys(settings.namespace).stream(WEIGHTS)
        self._routed = frozenset({settings.adapter_name, settings.model_name})
        self.live: dict[str, WeightsEventV1] = {}
        self._owners: dict[str, str] = {}
        """Adapter name -> the tenant it was trained for, for every adapter seen."""
        self._task: asyncio.Task[None] | None = None
        self._unloads: set[asyncio.Task[None]] = set()

    def route(self, tenant: str, model: str) -> str | None:
        """The adapter name to send instead of ``model``, or None to leave it; a 404 when
        ``model`` names another tenant's adapter (a client may name any model, and the
        upstream serves whatever adapter is loaded)."""
        if not self.visible(tenant, model):
            raise APIError(404, f"The model '{model}' does not exist or you do not have "
                                "access to it.", code="model_not_found", param="model")
        if model not in self._routed or not self.live:
            return None
        event = self.live.get(tenant) or self.live.get(ALL_TENANTS)
        return None if event is None else event.adapter

    def visible(self, tenant: str, model: str) -> bool:
        """Whether ``tenant`` may use ``model``: anything but another tenant's adapter."""
        owner = self._owners.get(model)
        return owner is None or owner in (tenant, ALL_TENANTS)

    def visible_models(self, raw: bytes, tenant: str) -> bytes:
        """An upstream's ``/models`` answer without the other tenants' adapters."""
        if not self._owners:
            return raw
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

    def start(self) -> None:
        self._task = asyncio.create_task(self._follow(), name="reef-adapters")

    async def close(self) -> None:
        for task in (self._task, *self._unloads):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (self._task, *self._unloads) if t is not None),
                             return_exceptions=True)

    async def _follow(self) -> None:
        last = await self._catch_up()
        while True:
            try:
                reply = await self._redis.xread({self._stream: last}, block=BLOCK_MS,
                                                count=100)
            except (RedisError, OSError):
                await asyncio.sleep(1.0)  # Redis away: serve what is live, retry
                continue
            for _, entries in cast(list[Any], reply or []):
                for entry_id, fields in entries:
                    last = entry_id
                    await self._apply(fields)

    async def _catch_up(self) -> bytes | str:
        """Load the newest adapter of each tenant; the id to follow the stream from."""
        while True:
            try:
                entries = cast(list[Any], await self._redis.xrevrange(self._stream, count=100))
                break
            except (RedisError, OSError):
                await asyncio.sleep(1.0)
        newest: dict[str, Any] = {}
        for _, fields in entries:  # newest first
            try:
                event = decode(fields)
            except BadMessage:
                continue
            if isinstance(event, WeightsEventV1):
                self._owners.setdefault(event.adapter, event.tenant)
                newest.setdefault(event.tenant, fields)
        for fields in newest.values():
            await self._apply(fields, following=False)
        return entries[0][0] if entries else "0-0"

    async def _apply(self, fields: dict[bytes, bytes], following: bool = True) -> None:
        try:
            event = decode(fields)
        except BadMessage as exc:  # skipped: a follower has no group to dead-letter in
            self._metrics.adapter_swaps.labels("bad_event").inc()
            log.error("gateway.bad_weights_event", extra={"error": str(exc)[:200]})
            return
        if not isinstance(event, WeightsEventV1):
            self._metrics.adapter_swaps.labels("bad_event").inc()
            log.error("gateway.bad_weights_event", extra={"error": f"kind {event.kind}"})
            return
        self._owners[event.adapter] = event.tenant
        current = self.live.get(event.tenant)
        # Events apply in stream order, so a rollback (an older version published again)
        # takes effect like any new version.
        if current is not None and current.id == event.id:
            return
        if not await self._load(event):
            return
        self.live[event.tenant] = event
        self._metrics.adapter_swaps.labels("ok").inc()
        self._metrics.live_version.set(event.version)
        if following and event.batch_at > 0:  # not a start-up catch-up of an old event
            self._metrics.weights_live_seconds.observe(max(0.0, time.time() - event.batch_at))
        log.info("gateway.adapter_live", extra={"adapter": event.adapter,
                                                "tenant": event.tenant})
        if current is not None and current.adapter != event.adapter:
            task = asyncio.create_task(self._unload_later(current.adapter))
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

    async def _unload_later(self, adapter: str) -> None:
        await asyncio.sleep(self._settings.adapter_unload_grace_seconds)
        if any(event.adapter == adapter for event in self.live.values()):
            return  # live again (a rollback to it): keep it
        try:
            resp = await self._upstream.request(
                "POST", "/unload_lora_adapter", orjson.dumps({"lora_name": adapter}))
            resp.release()
        except (APIError, aiohttp.ClientError, TimeoutError) as exc:  # costs only memory
            log.warning("gateway.adapter_unload_failed", extra={"adapter": adapter,
                                                                "error": type(exc).__name__})
