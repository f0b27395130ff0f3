"""Reef's rq queue: its name, how jobs are enqueued, how long results are kept.

Jobs and their results are serialized as JSON (rq's ``JSONSerializer``), never pickled:
job functions take and return JSON-able values only. One queue per namespace
(``<namespace>-jobs``), so two Reefs sharing a Redis do not run each other's jobs; rq's own
tooling sees it (``rq info --url redis://... <namespace>-jobs``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis
from rq import Queue, Retry
from rq.job import Job
from rq.serializers import JSONSerializer

from shared.settings import Settings

QUEUE_SUFFIX = "-jobs"
"""A namespace's queue is ``<namespace>-jobs`` (``reef-jobs`` by default)."""
RESULT_TTL_SECONDS = 7 * 24 * 3600
"""How long a finished job's result (its summary dict) is kept."""
FAILURE_TTL_SECONDS = 30 * 24 * 3600
"""How long a failed job stays in rq's failed registry, with its error."""
DEFAULT_TIMEOUT_SECONDS = 3600
"""Longest a job may run before rq stops it (an export of a very long stream)."""
RETRY_MAX = 3
"""Retries of a job that raised, before it lands in the failed registry."""
RETRY_INTERVALS_SECONDS = (10, 30, 60)
"""Waits before the first, second and third retry (the worker's scheduler requeues)."""
SERIALIZER = JSONSerializer
"""No pickle: job arguments and results are JSON."""


def queue_name(namespace: str) -> str:
    """The rq queue of a namespace."""
    return namespace + QUEUE_SUFFIX


def sync_redis(settings: Settings) -> redis.Redis:
    """A blocking Redis client from the settings (rq and the job functions use it)."""
    return redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5,
                                socket_timeout=30, **settings.redis_kwargs())


def default_retry() -> Retry:
    """``RETRY_MAX`` retries, ``RETRY_INTERVALS_SECONDS`` apart."""
    return Retry(max=RETRY_MAX, interval=list(RETRY_INTERVALS_SECONDS))


def job_queue(settings: Settings, connection: redis.Redis | None = None) -> Queue:
    """The namespace's queue on ``connection`` (default: a new client from the settings)."""
    return Queue(queue_name(settings.namespace),
                 connection=connection if connection is not None else sync_redis(settings),
                 default_timeout=DEFAULT_TIMEOUT_SECONDS, serializer=SERIALIZER)


def enqueue(settings: Settings, func: Callable[..., Any], *args: Any,
            job_timeout: int = DEFAULT_TIMEOUT_SECONDS, retry: Retry | None = None,
            connection: redis.Redis | None = None, **kwargs: Any) -> Job:
    """Enqueue ``func(*args, **kwargs)`` on the namespace's queue; ``retry`` defaults to
    :func:`default_retry`. Returns the job (``job.id`` to look it up later)."""
    return job_queue(settings, connection).enqueue_call(
        func, args=args, kwargs=kwargs, timeout=job_timeout, retry=retry or default_retry(),
        result_ttl=RESULT_TTL_SECONDS, failure_ttl=FAILURE_TTL_SECONDS)


def fetch_job(job_id: str, connection: redis.Redis) -> Job:
    """A job by id (``rq.exceptions.NoSuchJobError`` when unknown or expired)."""
    return Job.fetch(job_id, connection=connection, serializer=SERIALIZER)
