"""``python -m services.jobs``: one jobs worker on the namespace's queue, until SIGTERM.

rq's ``SimpleWorker`` (no fork per job) with its scheduler, which puts a failed job back
on the queue when its retry interval has passed. SIGTERM (or Ctrl-C) is a warm shutdown:
the job in hand finishes, then the worker exits. Logs are Reef's JSON lines; ``/metrics``
is served on ``metrics_port`` (behind ``metrics_key``) when set.
"""

from __future__ import annotations

import logging

from services.jobs.queue import SERIALIZER, job_queue, sync_redis
from services.jobs.worker import JobMetrics, JobWorker
from shared.logs import setup_logging
from shared.metrics import serve_metrics
from shared.settings import Settings

log = logging.getLogger("reef.jobs")


def main() -> None:
    settings = Settings()
    setup_logging(settings.log_level)
    metrics = JobMetrics.create()
    server = serve_metrics(settings, metrics.registry)
    connection = sync_redis(settings)
    queue = job_queue(settings, connection)
    worker = JobWorker([queue], connection=connection, serializer=SERIALIZER, metrics=metrics)
    log.info("jobs.worker_started", extra={"queue": queue.name, "worker": worker.name})
    try:
        worker.work(with_scheduler=True, logging_level=settings.log_level.upper())
    finally:
        if server is not None:
            server[0].shutdown()
            server[0].server_close()
        connection.close()
    log.info("jobs.worker_stopped", extra={"queue": queue.name})


if __name__ == "__main__":
    main()
