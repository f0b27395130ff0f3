"""``reef jobs``: Reef's rq jobs from the command line (``services/jobs``).

    reef jobs export --tenant T --out DIR [--since ID] [--until ID]
    reef jobs replay FILE [--tenant T]            # into --namespace (a fresh one, say)
    reef jobs remine --tenant T --session S
    reef jobs status JOB_ID

By default a job is enqueued on the queue of the environment's namespace
(``<namespace>-jobs``) for its worker (``python -m services.jobs``) and its id printed;
``--wait`` then waits for its result. ``--now`` runs it here instead, no worker needed.
Results are printed as JSON. Settings come from the environment (``REEF_REDIS_URL``,
``REEF_REDIS_PASSWORD``, ``REEF_NAMESPACE`` ...); ``--namespace`` names the namespace a
job acts on (default: the environment's). Paths are as the process running the job sees
them (the worker's export volume, unless ``--now``). Exit status: 0 done (or enqueued),
1 the job failed, 2 bad usage, bad settings or Redis unreachable.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import redis
from pydantic import ValidationError
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from services.jobs import tasks
from services.jobs.queue import enqueue, fetch_job, sync_redis
from shared.settings import ConfigError, Settings

WAIT_POLL_SECONDS = 0.2
ENDED = (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--namespace", help="the Reef namespace (default: $REEF_NAMESPACE)")
    run = common.add_mutually_exclusive_group()
    run.add_argument("--now", action="store_true", help="run here, no worker needed")
    run.add_argument("--wait", action="store_true", help="enqueue, then wait for the result")
    common.add_argument("--timeout", type=float, default=3600.0,
                        help="--wait: seconds to wait for the result")
    parser = argparse.ArgumentParser(prog="reef jobs", description="Run Reef's jobs.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", parents=[common],
                       help="a tenant's scored turns as JSONL and a Hugging Face dataset")
    p.add_argument("--tenant", required=True)
    p.add_argument("--out", required=True, help="directory (as the worker sees it)")
    p.add_argument("--since", default="-", help="first stream id (default: the oldest)")
    p.add_argument("--until", default="+", help="last stream id (default: the newest)")
    p = sub.add_parser("replay", parents=[common],
                       help="put an exported file's scored turns into a namespace's stream")
    p.add_argument("file", help="scored.jsonl (or hf/data/*.jsonl) of an export")
    p.add_argument("--tenant", help="replay only this tenant's turns")
    p = sub.add_parser("remine", parents=[common],
                       help="mine a session's failing turns for skills again")
    p.add_argument("--tenant", required=True)
    p.add_argument("--session", required=True)
    p = sub.add_parser("status", help="a job's status and result")
    p.add_argument("job_id")
    return parser


def _call(args: argparse.Namespace, namespace: str) -> tuple[Callable[..., Any], list[Any]]:
    """The job function and its arguments for a command."""
    if args.command == "export":
        return tasks.export_dataset, [namespace, args.tenant, args.out, args.since, args.until]
    if args.command == "replay":
        return tasks.replay_dataset, [args.file, namespace, args.tenant]
    return tasks.remine_session, [namespace, args.tenant, args.session]


def _print(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _report(job: Job) -> int:
    status = job.get_status()
    out: dict[str, Any] = {"job_id": job.id, "status": JobStatus(status).value}
    if status == JobStatus.FINISHED:
        out["result"] = job.return_value()
    elif status == JobStatus.FAILED:
        result = job.latest_result()
        out["error"] = (result.exc_string or "").strip().splitlines()[-1:] if result else []
    _print(out)
    return 1 if status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED) else 0


def _wait(job: Job, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while job.get_status() not in ENDED:
        if time.monotonic() > deadline:
            print(f"job {job.id} has not ended after {timeout:g} s", file=sys.stderr)
            return 1
        time.sleep(WAIT_POLL_SECONDS)
    return _report(job)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Carry out a parsed command; returns the exit status."""
    connection = sync_redis(settings)
    try:
        if args.command == "status":
            return _report(fetch_job(args.job_id, connection))
        namespace = args.namespace or settings.namespace
        func, call_args = _call(args, namespace)
        if args.now:
            _print(func(*call_args))
            return 0
        # The queue is the environment's Reef's (where its worker listens), whatever
        # namespace the job acts on.
        job = enqueue(settings, func, *call_args, connection=connection)
        print(job.id, flush=True)
        return _wait(job, args.timeout) if args.wait else 0
    finally:
        connection.close()


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings()
    except (ConfigError, ValidationError) as exc:
        print(f"reef jobs: settings refused: {exc}", file=sys.stderr)
        return 2
    try:
        return run(args, settings)
    except NoSuchJobError:
        print(f"reef jobs: no job {args.job_id} (unknown, or its result expired)",
              file=sys.stderr)
        return 2
    except redis.ConnectionError as exc:
        print(f"reef jobs: Redis unreachable ({exc})", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"reef jobs: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
