"""Per-API-key rate limits: an in-process token bucket per key, per gateway replica.

Each key's bucket holds up to ``burst`` requests and refills at ``rps`` per second; a
request takes one token or is refused with a 429 in OpenAI's shape (``code``
``rate_limit_exceeded``, ``type`` ``requests``, as OpenAI answers a requests-per-minute
limit) and ``Retry-After`` (whole seconds, rounded up) plus ``retry-after-ms`` (which the
official ``openai`` client prefers). The check is a dict lookup and a little arithmetic,
no I/O: it runs on the chat route's hot path.

The buckets live in each replica's memory, so behind a load balancer spreading a key's
requests over N replicas the key gets up to N times its configured rate; a restart
refills them. A shared limit would cost a Redis round trip per request.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.gateway.errors import APIError
from shared.settings import Settings

MAX_BUCKETS = 100_000
"""Buckets kept at most; beyond it full (idle) buckets are forgotten. Only keys that
authenticated get a bucket, so this bounds memory in the dev profile's open mode only."""


@dataclass(frozen=True, slots=True)
class Limit:
    rps: float
    """Tokens added per second; 0 means unlimited."""
    burst: int
    """The bucket's size."""


class RateLimiter:
    """Token buckets keyed by the caller's key hash; ``check`` raises a 429 ``APIError``."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self._default = _limit(settings.rate_limit_rps, settings.rate_limit_burst)
        self._tenants = {tenant: _limit(rps, burst)
                         for tenant, (rps, burst) in settings.tenant_rate_limits.items()}
        self._clock = clock
        self._buckets: dict[str, list[float]] = {}
        """key hash -> [tokens, time of the last refill]."""
        self.enabled = self._default.rps > 0 or any(lim.rps > 0 for lim in self._tenants.values())

    def check(self, key_hash: str, tenant: str) -> None:
        """Take one token from the key's bucket, or raise the 429."""
        limit = self._tenants.get(tenant, self._default)
        if limit.rps <= 0:
            return
        now = self._clock()
        bucket = self._buckets.get(key_hash)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._forget_idle(now)
            bucket = self._buckets[key_hash] = [float(limit.burst), now]
        tokens = min(float(limit.burst), bucket[0] + (now - bucket[1]) * limit.rps)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return
        bucket[0] = tokens
        raise rate_limited((1.0 - tokens) / limit.rps, limit)

    def _forget_idle(self, now: float) -> None:
        """Drop the buckets that would be full by now (forgetting them changes nothing)."""
        rps = max([self._default.rps, *(lim.rps for lim in self._tenants.values())])
        burst = max([self._default.burst, *(lim.burst for lim in self._tenants.values())])
        idle = burst / rps
        for key in [k for k, (_, last) in self._buckets.items() if now - last >= idle]:
            del self._buckets[key]
        if len(self._buckets) >= MAX_BUCKETS:  # all busy: forget the oldest half
            oldest = sorted(self._buckets, key=lambda k: self._buckets[k][1])
            for key in oldest[: len(oldest) // 2]:
                del self._buckets[key]


def rate_limited(wait_seconds: float, limit: Limit) -> APIError:
    """The 429 for a request that may be retried in ``wait_seconds``."""
    seconds = max(1, math.ceil(wait_seconds))
    return APIError(
        429, f"Rate limit reached for this API key: {limit.rps:g} requests per second "
             f"(burst {limit.burst}). Please try again in {seconds}s.",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(seconds),
                 "retry-after-ms": str(max(1, math.ceil(wait_seconds * 1000)))})


def _limit(rps: float, burst: int) -> Limit:
    if rps <= 0:
        return Limit(0.0, 0)
    return Limit(float(rps), burst if burst > 0 else max(1, math.ceil(rps)))
