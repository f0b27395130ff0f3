"""A stream worker in a process of its own, for tests that SIGKILL it or send it SIGTERM.

Usage: ``python -m tests.worker_proc MODE STREAM GROUP CONSUMER``; settings come from the
``REEF_*`` environment. The handler appends each message id to ``<namespace>:test:started``
and then, by MODE:

- ``hang``: never returns (the test kills the process mid-batch);
- ``slow``: sleeps ``WORKER_PROC_SLOW_SECONDS`` (default 0.5), then appends the id to
  ``<namespace>:test:finished`` and returns.
"""

from __future__ import annotations

import asyncio
import os
import sys

from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from shared.messages import Message
from shared.settings import Settings
from shared.worker import run_worker


def started_key(namespace: str) -> str:
    return f"{namespace}:test:started"


def finished_key(namespace: str) -> str:
    return f"{namespace}:test:finished"


async def main(mode: str, stream: str, group: str, consumer: str) -> None:
    settings = Settings()
    probe = Redis.from_url(settings.redis_url)
    slow = float(os.environ.get("WORKER_PROC_SLOW_SECONDS", "0.5"))

    async def handler(message: Message, entry_id: str) -> None:
        await probe.rpush(started_key(settings.namespace), message.id)
        if mode == "hang":
            await asyncio.Event().wait()
        await asyncio.sleep(slow)
        await probe.rpush(finished_key(settings.namespace), message.id)

    try:
        await run_worker(settings, stream, group, handler, consumer=consumer,
                         registry=CollectorRegistry())
    finally:
        await probe.aclose()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
