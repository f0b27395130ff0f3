"""The adapter registry: which adapters each policy replica holds, and which ones each
gateway routes to, in Redis, each entry expiring unless its owner refreshes it.

Policy replicas write what they hold (and what failed to load); gateways read it and route
a tenant to its newest adapter only once *every* live replica holds it (:func:`routable`),
keeping the previous one until then. Gateways write the adapters they route to or still
have requests on; replicas keep those loaded, so an adapter is unloaded only when nothing
routes to it. Both sides refresh their entry every ``adapter_registry_interval_seconds``;
an entry expires ``adapter_registry_ttl_seconds`` after its last refresh (a crashed
replica stops holding anything back). Keys: ``Keys.policy_replica`` and
``Keys.gateway_router``, with a set of ids each to find them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
import redis.asyncio as aioredis

from shared.keys import Keys
from shared.messages import WeightsEventV1


@dataclass(frozen=True)
class ReplicaEntry:
    """What one policy replica holds."""

    replica_id: str
    base: str
    """The base model's served name (what a gateway sends when no adapter is live)."""
    adapters: frozenset[str] = frozenset()
    failed: dict[str, str] = field(default_factory=dict)
    """Adapter -> why its last load failed (it is being retried)."""
    ready: bool = True

    def to_json(self) -> bytes:
        return orjson.dumps({"id": self.replica_id, "base": self.base,
                             "adapters": sorted(self.adapters), "failed": self.failed,
                             "ready": self.ready})

    @classmethod
    def from_json(cls, raw: bytes) -> ReplicaEntry | None:
        """The entry, or None when ``raw`` is not one (never raises)."""
        try:
            data = orjson.loads(raw)
            return cls(str(data["id"]), str(data["base"]),
                       frozenset(str(a) for a in data["adapters"]),
                       {str(k): str(v) for k, v in dict(data.get("failed") or {}).items()},
                       bool(data.get("ready", True)))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            return None


_FORGET_LUA = """
local index = KEYS[#KEYS]
for i, member in ipairs(ARGV) do
  if redis.call('EXISTS', KEYS[i]) == 0 then redis.call('SREM', index, member) end
end
return 0
"""
"""Drop the ids of expired entries from their set; KEYS: the entries, then the set."""


def routable(candidates: Sequence[WeightsEventV1], replicas: Sequence[ReplicaEntry]
             ) -> WeightsEventV1 | None:
    """The newest of ``candidates`` (newest first) that every replica holds; None when
    there is no replica or no such adapter."""
    if not replicas:
        return None
    for event in candidates:
        if all(event.adapter in r.adapters for r in replicas):
            return event
    return None


class Registry:
    """Reads and writes registry entries (each write refreshes the entry's expiry)."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, ttl_seconds: float) -> None:
        self._redis = redis
        self._keys = keys
        self._ttl_ms = max(1, int(ttl_seconds * 1000))
        self._forget = redis.register_script(_FORGET_LUA)

    async def put_replica(self, entry: ReplicaEntry) -> None:
        await self._put(self._keys.policy_replicas(),
                        self._keys.policy_replica(entry.replica_id), entry.replica_id,
                        entry.to_json())

    async def drop_replica(self, replica_id: str) -> None:
        await self._drop(self._keys.policy_replicas(), self._keys.policy_replica(replica_id),
                         replica_id)

    async def replicas(self) -> list[ReplicaEntry]:
        """Every live replica's entry."""
        raws = await self._read(self._keys.policy_replicas(), self._keys.policy_replica)
        return [e for e in (ReplicaEntry.from_json(r) for r in raws) if e is not None]

    async def put_gateway(self, gateway_id: str, adapters: Iterable[str]) -> None:
        await self._put(self._keys.gateway_routers(), self._keys.gateway_router(gateway_id),
                        gateway_id, orjson.dumps({"adapters": sorted(set(adapters))}))

    async def drop_gateway(self, gateway_id: str) -> None:
        await self._drop(self._keys.gateway_routers(), self._keys.gateway_router(gateway_id),
                         gateway_id)

    async def gateway_adapters(self) -> set[str]:
        """Every adapter some live gateway routes to or has requests on."""
        used: set[str] = set()
        for raw in await self._read(self._keys.gateway_routers(), self._keys.gateway_router):
            try:
                used.update(str(a) for a in orjson.loads(raw)["adapters"])
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue
        return used

    async def _put(self, index: str, key: str, member: str, value: bytes) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(key, value, px=self._ttl_ms)
            pipe.sadd(index, member)
            await pipe.execute()

    async def _drop(self, index: str, key: str, member: str) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.delete(key)
            pipe.srem(index, member)
            await pipe.execute()

    async def _read(self, index: str, key_of: Any) -> list[bytes]:
        members = sorted(cast(set[bytes], await self._redis.smembers(index)))
        if not members:
            return []
        ids = [m.decode(errors="replace") for m in members]
        keys = [key_of(i) for i in ids]
        values = cast(list[bytes | None], await self._redis.mget(keys))
        gone = [(k, m) for k, m, v in zip(keys, members, values, strict=True) if v is None]
        if gone:  # expired entries: forget their ids, unless written again meanwhile
            await self._forget(keys=[*(k for k, _ in gone), index],
                               args=[m for _, m in gone])
        return [v for v in values if v is not None]
