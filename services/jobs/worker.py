"""The jobs worker: rq's non-forking ``SimpleWorker`` with Prometheus metrics.

Reef's jobs are short and run one at a time in the worker's own process (no fork per
job: rq measured 78 jobs/s forking, ~450 with ``SimpleWorker`` here). Each run is counted
by job and outcome; a run that raised counts ``failed`` even when rq will retry it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from rq import SimpleWorker
from rq.exceptions import DeserializationError
from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue

JOB_NAMES = frozenset({"export_dataset", "replay_dataset", "remine_session"})
"""Label values of ``job``; any other function is counted as ``other``."""
JOB_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


@dataclass(frozen=True)
class JobMetrics:
    """The jobs worker's metrics (prefix ``reef_jobs_``), on one registry."""

    registry: CollectorRegistry
    runs: Counter
    seconds: Histogram

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> JobMetrics:
        reg = registry or CollectorRegistry()
        return cls(
            registry=reg,
            runs=Counter("reef_jobs_runs_total", "Job runs by job and outcome (succeeded, "
                         "failed; a failed run may be retried).", ["job", "outcome"],
                         registry=reg),
            seconds=Histogram("reef_jobs_run_seconds", "One job run, by job.", ["job"],
                              buckets=JOB_BUCKETS, registry=reg))


def job_label(job: Job) -> str:
    """The metric label of a job: its function's name when it is one of Reef's."""
    try:
        name = (job.func_name or "").rsplit(".", 1)[-1]
    except DeserializationError:
        return "other"
    return name if name in JOB_NAMES else "other"


class JobWorker(SimpleWorker):
    """A ``SimpleWorker`` that counts and times every job run in ``metrics``."""

    def __init__(self, *args: object, metrics: JobMetrics, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.metrics = metrics

    def perform_job(self, job: Job, queue: Queue, execution: Execution) -> bool:
        started = time.perf_counter()
        succeeded = bool(super().perform_job(job, queue, execution))
        label = job_label(job)
        self.metrics.seconds.labels(label).observe(time.perf_counter() - started)
        self.metrics.runs.labels(label, "succeeded" if succeeded else "failed").inc()
        return succeeded
