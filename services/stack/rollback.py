"""``reef rollback``: serve an earlier adapter version again.

The newest ``weights`` event of that version is published once more (a new event id);
every gateway applies events in stream order, so it loads the old adapter onto the
upstream and routes to it, like any new version. The trainer goes on training from its
own latest checkpoint: stop it (or turn the gate on) if the rollback is to stick.
"""

from __future__ import annotations

import argparse
from typing import Any, cast

import redis

from shared.keys import WEIGHTS, Keys
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
        if isinstance(event, WeightsEventV1) and event.adapter.startswith(adapter + "-v"):
            found[event.version] = event
    return found


def rollback(client: redis.Redis, settings: Settings, version: int) -> WeightsEventV1:
    """Publish ``version`` again; returns the new event."""
    keys = Keys(settings.namespace)
    known = versions(client, keys, settings.adapter_name)
    if version not in known:
        raise RollbackError(f"no version {version} of {settings.adapter_name!r} in the weights "
                            f"stream; known: {sorted(known)}")
    old = known[version]
    event = WeightsEventV1(tenant=old.tenant, adapter=old.adapter, version=old.version,
                           path=old.path, step=old.step,
                           metrics={**old.metrics, "rollback": 1.0})
    client.xadd(keys.stream(WEIGHTS), cast(Any, event.to_fields()),
                maxlen=settings.stream_maxlen, approximate=True)
    return event


def main(argv: list[str], settings: Settings) -> int:
    parser = argparse.ArgumentParser(prog="reef rollback", description=__doc__)
    parser.add_argument("version", type=int, help="the adapter version to serve again")
    args = parser.parse_args(argv)
    client = redis.Redis.from_url(settings.redis_url, **settings.redis_kwargs())
    try:
        event = rollback(client, settings, args.version)
    except RollbackError as exc:
        print(f"rollback failed: {exc}")
        return 1
    print(f"published {event.adapter} ({event.path}) as the live adapter")
    return 0
