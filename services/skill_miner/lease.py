"""Keeping a stream entry claimed while a long step (an LLM call) runs.

The stream worker re-delivers an entry once it has been pending ``worker_claim_idle_ms``
without an ack - also to the consumer still handling it. A miner LLM call may take longer
than that (``miner_timeout_seconds`` per attempt, and retries), so while one runs the entry
is claimed again every third of the idle time (``XCLAIM ... JUSTID``: the idle time restarts
and the delivery count does not grow). The entry is only re-delivered when this process
stops renewing it: when it died.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger("reef.skill_miner")


@dataclass(frozen=True, slots=True)
class Lease:
    """Where this process's entries are pending: the stream, the group, the consumer."""

    redis: aioredis.Redis
    stream_key: str
    group: str
    consumer: str
    claim_idle_ms: int

    @asynccontextmanager
    async def held(self, entry_id: str) -> AsyncIterator[None]:
        """Keep ``entry_id`` claimed by this consumer for the duration of the block."""
        task = asyncio.create_task(self._renew(entry_id))
        try:
            yield
        finally:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task

    async def _renew(self, entry_id: str) -> None:
        interval = max(0.05, self.claim_idle_ms / 3000)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.redis.xclaim(self.stream_key, self.group, self.consumer, 0,
                                        [entry_id], justid=True)
            except (RedisError, OSError) as exc:
                log.warning("skill_miner.lease_renew_failed", extra={"error": type(exc).__name__})
