"""``reef rollback``: serve an earlier adapter version again, and train on from it.

The newest ``weights`` event of that version is published once more (a new event id);
every gateway applies events in stream order, so it loads the old adapter onto the
upstream and routes to it, like any new version. In the same transaction a rollback
request is written to the trainer's state hash: the trainer (now, or when it next
starts) makes that version live, goes back to its checkpoint (weights and optimizer) and
trains on from there; a step it was finishing meanwhile is dropped, not published. Only
a version whose checkpoint the trainer still keeps can be rolled back to (retention
keeps the newest ``checkpoint_keep_published`` gate-passed versions, and every version
rolled back to).
"""

from __future__ import annotations

import argparse
import time
from typing import Any, cast

import orjson
import redis

from shared.keys import WEIGHTS, Keys, adapter_for
from shared.messages import BadMessage, WeightsEventV1, decode
from shared.settings import Settings


class RollbackError(RuntimeError):
    """No event of the requested version exists."""


def versions(client: redis.Redis, keys: Keys, adapter: str) -> dict[int, WeightsEventV1]:
    """The newest event of every version of ``adapter`` still in the stream."""
    found: dict[int, WeightsEventV1] = {}
    for _, fields in cast(list[Any], client.xrange(keys.stream(WEIGHTS))):
        try:
            event = decode(fields)
        except BadMessage:
            continue
        if isinstance(event, WeightsEventV1) and event.adapter == f"{adapter}-v{event.version}":
            found[event.version] = event
    return found


def adapter_of(settings: Settings, tenant: str | None) -> str:
    """The adapter a rollback is for; a ``RollbackError`` when the tenant is ambiguous."""
    if settings.shared_adapter:
        return settings.adapter_name
    if tenant is None:
        tenants = settings.trained_tenants()
        if len(tenants) != 1 or tenants[0] is None:
            raise RollbackError("name the tenant whose adapter to roll back (--tenant); "
                                f"trained tenants: {tenants}")
        tenant = tenants[0]
    return adapter_for(settings.adapter_name, tenant)


def kept_versions(client: redis.Redis, keys: Keys, adapter: str) -> set[int] | None:
    """The gate-passed versions whose checkpoints the trainer keeps; None when the
    trainer recorded none (it has not started yet)."""
    raw = cast(bytes | None, client.hget(keys.trainer(adapter, "state"), "kept"))
    if not raw:
        return None
    return {int(v) for v, info in orjson.loads(raw).items() if info.get("published")}


def rollback(client: redis.Redis, settings: Settings, version: int,
             tenant: str | None = None) -> WeightsEventV1:
    """Publish ``version`` of ``tenant``'s adapter again and ask its trainer to go back to
    it; returns the event. ``tenant`` None: the shared adapter (``shared_adapter``), or
    the one tenant the settings train."""
    keys = Keys(settings.namespace)
    adapter = adapter_of(settings, tenant)
    known = versions(client, keys, adapter)
    if version not in known:
        raise RollbackError(f"no version {version} of {adapter!r} in the weights "
                            f"stream; known: {sorted(known)}")
    kept = kept_versions(client, keys, adapter)
    if kept is not None and version not in kept:
        raise RollbackError(f"the checkpoint of version {version} of {adapter!r} is no "
                            f"longer kept; versions that can be rolled back to: "
                            f"{sorted(kept & set(known))}")
    old = known[version]
    event = WeightsEventV1(tenant=old.tenant, adapter=old.adapter, version=old.version,
                           path=old.path, step=old.step,
                           metrics={**old.metrics, "rollback": 1.0})
    with client.pipeline(transaction=True) as pipe:
        pipe.xadd(keys.stream(WEIGHTS), cast(Any, event.to_fields()),
                  maxlen=settings.stream_maxlen, approximate=True)
        pipe.hset(keys.trainer(adapter, "state"), "rollback",
                  orjson.dumps({"version": version, "at": time.time()}))
        pipe.execute()
    return event


def main(argv: list[str], settings: Settings) -> int:
    parser = argparse.ArgumentParser(prog="reef rollback", description=__doc__)
    parser.add_argument("version", type=int, help="the adapter version to serve again")
    parser.add_argument("--tenant", help="whose adapter (default: the one tenant trained)")
    args = parser.parse_args(argv)
    client = redis.Redis.from_url(settings.redis_url, **settings.redis_kwargs())
    try:
        event = rollback(client, settings, args.version, args.tenant)
    except RollbackError as exc:
        print(f"rollback failed: {exc}")
        return 1
    print(f"published {event.adapter} ({event.path}) as the live adapter")
    return 0
