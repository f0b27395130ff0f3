"""One trainer per adapter: a trainer process claims each adapter it trains in Redis.

The claim (``Keys.trainer(adapter, "owner")``) holds the owner's id (``hostname-pid``)
with a TTL of :data:`CLAIM_TTL_SECONDS`, renewed every :data:`RENEW_SECONDS` while the
process lives. A second trainer that finds an adapter claimed by another process waits
up to one TTL (the owner may have just died: its claim then lapses) and, if the claim is
still held, refuses to start, naming the adapter and its owner. A clean stop releases
the claims at once. A trainer that finds its claim taken over (it could not renew it
through a long Redis outage) stops with ``ClaimLost``, so two never train one adapter.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from contextlib import suppress

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.keys import Keys
from shared.settings import ConfigError

log = logging.getLogger("reef.trainer")

CLAIM_TTL_SECONDS = 10
"""How long a claim outlives its owner's last renewal."""
RENEW_SECONDS = 3.0
"""How often a live owner renews its claims."""
POLL_SECONDS = 0.5
"""How often a waiting trainer looks at a claim held by another."""

_CLAIM_LUA = """
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] then return owner end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return false
"""
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class ClaimLost(RuntimeError):
    """Another trainer took an adapter over (this one's claim lapsed): stop training it."""


class AdapterClaims:
    """The claims of one trainer process on its adapters."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, adapters: Sequence[str],
                 owner: str) -> None:
        self._redis = redis
        self._keys = [keys.trainer(adapter, "owner") for adapter in adapters]
        self._adapters = list(adapters)
        self.owner = owner
        self._claim = redis.register_script(_CLAIM_LUA)
        self._release = redis.register_script(_RELEASE_LUA)

    async def acquire(self, wait_seconds: float = CLAIM_TTL_SECONDS + 2) -> None:
        """Claim every adapter, waiting out a claim of a process that died; a
        ``ConfigError`` when another live trainer holds one."""
        deadline = time.monotonic() + wait_seconds
        for adapter, key in zip(self._adapters, self._keys, strict=True):
            while (holder := await self._claim(keys=[key],
                                               args=[self.owner, CLAIM_TTL_SECONDS])):
                if time.monotonic() >= deadline:
                    raise ConfigError(
                        f"adapter {adapter!r} is trained by another trainer "
                        f"({holder.decode(errors='replace')}): give this one other tenants "
                        "(REEF_TRAIN_TENANTS) or stop the other")
                await asyncio.sleep(POLL_SECONDS)

    async def keep(self, stopping: asyncio.Event) -> None:
        """Renew the claims until ``stopping``, then release them (a background task)."""
        while True:
            with suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), RENEW_SECONDS)
            if stopping.is_set():
                break
            try:
                for adapter, key in zip(self._adapters, self._keys, strict=True):
                    if await self._claim(keys=[key], args=[self.owner, CLAIM_TTL_SECONDS]):
                        raise ClaimLost(f"adapter {adapter!r} was claimed by another trainer "
                                        "while this one could not renew its claim")
            except (RedisError, OSError) as exc:  # Redis away: renew on the next round
                log.warning("trainer.claim_renew_failed", extra={"error": type(exc).__name__})
        await self.release()

    async def release(self) -> None:
        """Give the claims up (only those this process holds)."""
        try:
            for key in self._keys:
                await self._release(keys=[key], args=[self.owner])
        except (RedisError, OSError) as exc:
            log.warning("trainer.claim_release_failed", extra={"error": type(exc).__name__})
