"""The learning half under chaos: does the trainer keep stepping after every fault?

A monitor thread samples the trainer's committed step (its state hash in Redis) while
the run goes on. After the drain, every fault (a SIGKILL of any process, a Redis
restart, the rollback) must be followed by at least one committed step; the report also
counts what the trainer did with the faults aimed at it: gate refusals (forced or not),
quarantined batches (poisonous datums), transient failures retried, from Redis and the
trainer's log.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import redis

from shared.keys import WEIGHTS, Keys

SAMPLE_SECONDS = 0.25
"""How often the monitor reads the trainer's committed step."""


class StepMonitor:
    """Samples (Unix time, committed step) in a thread until ``stop``."""

    def __init__(self, redis_url: str, keys: Keys, adapter: str) -> None:
        self.samples: list[tuple[float, int]] = []
        self._client = redis.Redis.from_url(redis_url)
        self._key = keys.trainer(adapter, "state")
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-steps", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()
        self._client.close()

    def _run(self) -> None:
        while not self._stopping.wait(SAMPLE_SECONDS):
            try:
                step = self._client.hget(self._key, "step")
            except (redis.RedisError, OSError):
                continue  # Redis restarting
            self.samples.append((time.time(), int(cast(bytes, step) or 0)))


@dataclass
class Learning:
    """What the trainer did during the run."""

    steps: int = 0
    """Candidates committed (published or refused)."""
    published: int = 0
    refused: int = 0
    quarantined_batches: int = 0
    quarantined_turns: int = 0
    transient_retries: int = 0
    step_errors: int = 0
    rolled_back_to: int | None = None
    faults: int = 0
    faults_followed_by_step: int = 0
    stalled_after: list[str] = field(default_factory=list)
    """Faults after which the trainer committed no step (target: none)."""

    def rows(self, title: str = "the learning half:") -> list[str]:
        rows = [("steps committed", self.steps), ("  published", self.published),
                ("  refused by the gate", self.refused),
                ("batches quarantined", self.quarantined_batches),
                ("  their turns", self.quarantined_turns),
                ("transient step failures retried", self.transient_retries),
                ("step errors (poisonous datums)", self.step_errors),
                ("rolled back to version", self.rolled_back_to or "-"),
                ("faults followed by a step", f"{self.faults_followed_by_step}/{self.faults}")]
        lines = ["", title] + [f"  {n:<34}{v!s:>8}" for n, v in rows]
        if self.stalled_after:
            lines.append(f"  NO STEP after: {', '.join(self.stalled_after)}")
        return lines


def learning_report(client: redis.Redis, keys: Keys, adapter: str,
                    samples: list[tuple[float, int]], faults: list[tuple[float, str]],
                    trainer_log: Path, rolled_back_to: int | None) -> Learning:
    state = cast(dict[bytes, bytes], client.hgetall(keys.trainer(adapter, "state")))
    report = Learning(steps=int(state.get(b"step", b"0")), rolled_back_to=rolled_back_to)
    report.published = len({e["version"] for e in _weights(client, keys)
                            if e["adapter"] == f"{adapter}-v{e['version']}"
                            and not e.get("metrics", {}).get("rollback")})
    report.refused = report.steps - report.published
    for _, fields in cast(list[Any], client.xrange(keys.trainer(adapter, "quarantine"))):
        report.quarantined_batches += 1
        report.quarantined_turns += len(json.loads(fields[b"turn_ids"]))
    log = trainer_log.read_text(errors="replace") if trainer_log.is_file() else ""
    failures = [line for line in log.splitlines() if "trainer.step_failed" in line]
    report.transient_retries = sum('"transient"' in line for line in failures)
    report.step_errors = len(failures) - report.transient_retries
    report.faults = len(faults)
    for at, name in faults:
        before = max((step for t, step in samples if t <= at), default=0)
        if any(t > at and step > before for t, step in samples):
            report.faults_followed_by_step += 1
        else:
            when = time.strftime("%H:%M:%S", time.localtime(at))
            report.stalled_after.append(f"{name} at {when}")
    return report


def _weights(client: redis.Redis, keys: Keys) -> list[dict[str, Any]]:
    return [json.loads(fields[b"data"]) for _, fields in
            cast(list[Any], client.xrange(keys.stream(WEIGHTS)))]
