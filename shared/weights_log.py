"""Following the ``weights`` stream: every published adapter, per tenant, in stream order.

Gateways and policy replicas each read the whole stream (no consumer group: every one of
them needs every event). :class:`WeightsLog` keeps what was published per tenant, newest
first, one entry per adapter name: a rollback (an earlier version published again) moves
that version to the front, as stream order says. :func:`follow` catches up from the end of
the stream and then blocks for new entries, surviving Redis going away.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.messages import BadMessage, WeightsEventV1, decode

log = logging.getLogger(__name__)

BLOCK_MS = 2000
"""Block of each XREAD; below the clients' socket timeout (5 s)."""
CATCH_UP_ENTRIES = 100
"""Entries read back at start (newest first): the recent history of every tenant."""
KEPT_PER_TENANT = 16
"""Adapters remembered per tenant (older ones are never routed to again)."""

OnEvent = Callable[[WeightsEventV1, bool], Awaitable[None]]
"""Called with each event and whether it arrived while following (False: catch-up)."""
OnBad = Callable[[str], None]
"""Called with the reason an entry was skipped."""


class WeightsLog:
    """Published adapters per tenant, newest first."""

    def __init__(self) -> None:
        self._tenants: dict[str, list[WeightsEventV1]] = {}
        self.owners: dict[str, str] = {}
        """Adapter -> the tenant it was published for (read it, never write it)."""
        self._seen: set[str] = set()

    def apply(self, event: WeightsEventV1) -> bool:
        """Add ``event`` (already seen: False). Its adapter moves to the front of its
        tenant's list."""
        if event.id in self._seen:
            return False
        self._seen.add(event.id)
        self.owners[event.adapter] = event.tenant
        history = [e for e in self._tenants.get(event.tenant, ()) if e.adapter != event.adapter]
        self._tenants[event.tenant] = [event, *history][:KEPT_PER_TENANT]
        return True

    def tenants(self) -> list[str]:
        return list(self._tenants)

    def candidates(self, tenant: str) -> list[WeightsEventV1]:
        """``tenant``'s adapters, newest first."""
        return list(self._tenants.get(tenant, ()))

    def newest(self, tenant: str) -> WeightsEventV1 | None:
        history = self._tenants.get(tenant)
        return history[0] if history else None

    def owner(self, adapter: str) -> str | None:
        """The tenant an adapter was published for (None: never seen)."""
        return self.owners.get(adapter)

    def event_for(self, adapter: str) -> WeightsEventV1 | None:
        """The newest event naming ``adapter`` still remembered."""
        tenant = self.owners.get(adapter)
        for event in self._tenants.get(tenant or "", ()):
            if event.adapter == adapter:
                return event
        return None


def _decoded(fields: dict[bytes, bytes], on_bad: OnBad) -> WeightsEventV1 | None:
    try:
        event = decode(fields)
    except BadMessage as exc:  # skipped: a follower has no group to dead-letter in
        on_bad(str(exc)[:200])
        return None
    if not isinstance(event, WeightsEventV1):
        on_bad(f"kind {event.kind}")
        return None
    return event


async def catch_up(redis: aioredis.Redis, stream: str, on_event: OnEvent, on_bad: OnBad
                   ) -> bytes | str:
    """Hand the stream's recent entries to ``on_event`` (oldest first); the id to follow
    the stream from. Waits for Redis as long as it takes."""
    while True:
        try:
            entries = cast(list[Any], await redis.xrevrange(stream, count=CATCH_UP_ENTRIES))
            break
        except (RedisError, OSError):
            await asyncio.sleep(1.0)
    for _, fields in reversed(entries):
        event = _decoded(fields, on_bad)
        if event is not None:
            await on_event(event, False)
    return entries[0][0] if entries else "0-0"


async def follow(redis: aioredis.Redis, stream: str, last: bytes | str, on_event: OnEvent,
                 on_bad: OnBad) -> None:
    """Hand every entry after ``last`` to ``on_event``, as they come; never returns."""
    while True:
        try:
            reply = await redis.xread({stream: last}, block=BLOCK_MS, count=100)
        except (RedisError, OSError):
            await asyncio.sleep(1.0)  # Redis away: what is loaded stays; retry
            continue
        for _, entries in cast(list[Any], reply or []):
            for entry_id, fields in entries:
                last = entry_id
                event = _decoded(fields, on_bad)
                if event is not None:
                    await on_event(event, True)
