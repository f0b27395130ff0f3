"""The one way services connect to Redis."""

from __future__ import annotations

import redis.asyncio as aioredis

from shared.settings import Settings


def connect(settings: Settings) -> aioredis.Redis:
    """An asyncio client on a blocking pool: when all ``redis_max_connections`` are busy,
    a command waits for one (up to ``socket_timeout``) instead of failing at once, which is
    what redis-py's default pool does past 100 concurrent commands."""
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=settings.redis_max_connections, timeout=5,
        socket_timeout=5, socket_connect_timeout=2, **settings.redis_kwargs())
    return aioredis.Redis(connection_pool=pool)
