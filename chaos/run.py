"""One chaos run: start the stack, drive the load while faults are injected, drain,
account, stop. ``run(ChaosConfig(...))`` returns the report; ``python -m chaos`` prints it.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis

from chaos.account import Accounting, account, drain, scored_by_turn, turn_ids_by_response
from chaos.faults import KILLED, RESTARTED, ROLLBACK, Injector, plan
from chaos.feedback import (
    FeedbackAccounting,
    FeedbackResult,
    account_feedback,
    send_late_feedback,
)
from chaos.learning import Learning, StepMonitor, learning_report
from chaos.load import Load, LoadResult
from chaos.stack import API_KEY, MODEL, NAMESPACE, TENANT, TRAINED, Stack, StackConfig
from shared.keys import Keys


@dataclass(frozen=True)
class ChaosConfig:
    """A run's size and faults."""

    data_dir: Path
    turns: int = 5000
    faults_per_kind: int = 4
    """SIGKILLs per process kind (gateway, each scorer, skill-miner, trainer) and Redis
    restarts."""
    concurrency: int = 8
    """Sessions in flight at once."""
    rate: float = 40.0
    """Turns started per second (0: as fast as the gateway answers)."""
    stream_share: float = 0.5
    error_rate: float = 0.03
    timeout_rate: float = 0.02
    batch_size: int = 32
    drain_timeout: float = 180.0
    seed: int | None = None
    kinds: tuple[str, ...] = KILLED + RESTARTED + (ROLLBACK,)
    """The processes faults hit, and the rollback (default: every kind)."""
    poison_rate: float = 0.004
    """Share of answers with a token the chaos trainer refuses (a poisonous datum)."""
    transient_rate: float = 0.05
    """Share of the trainer's forward_backward calls failing transiently."""
    refuse_rate: float = 0.2
    """Share of the trainer's candidates the gate is made to refuse."""
    feedback_share: float = 0.03
    """Share of answered turns given explicit feedback, ``feedback_delay`` s later."""
    feedback_delay: float = 6.0


@dataclass
class ChaosReport:
    """What a run measured."""

    load: LoadResult
    accounting: Accounting
    faults: Counter[str]
    upstream_faults: dict[str, int]
    drained: bool
    wall_seconds: float
    phases: dict[str, float]
    """Seconds spent starting, loading, finishing the faults, draining, accounting."""
    trainer_backlog: int
    """Samples left in the trainer's buffer after the drain (fewer than a batch when its
    step loop kept up)."""
    data_dir: str
    learning: Learning
    feedback: FeedbackResult
    feedback_use: FeedbackAccounting

    @property
    def ok(self) -> bool:
        use, status = self.feedback_use, self.feedback.statuses
        return (self.drained and not self.accounting.lost and not self.accounting.duplicated
                and not self.learning.stalled_after and not use.unused and not use.used_twice
                and not status["404"] and not status["gave_up"])

    def render(self) -> str:
        a, load = self.accounting, self.load
        rows = [
            ("turns sent", load.sent), ("answered", len(load.answered)),
            ("  of them streamed", load.streamed), ("recorded", a.recorded),
            ("scored", a.scored), ("seen by the trainer", a.seen["trainer"]),
            ("trained", a.trained), ("seen by the skill-miner", a.seen["skill-miner"]),
            ("mined", a.mined), ("dead-lettered", a.dead_lettered),
            ("lost (target 0)", a.lost), ("duplicated (target 0)", a.duplicated)]
        lines = ["", "chaos run: every answered turn accounted for", ""]
        lines += [f"  {name:<26}{value:>8}" for name, value in rows]
        lines += ["", "faults injected:"]
        for name in sorted(self.faults):
            lines.append(f"  {name:<26}{self.faults[name]:>8}")
        for name in ("error_500", "timeout"):
            lines.append(f"  {'upstream_' + name:<26}{self.upstream_faults.get(name, 0):>8}")
        lines += self.learning.rows() + self._feedback_rows()
        lines += ["", f"client errors: {dict(load.errors) or 'none'}",
                  f"left in the trainer's buffer (less than a batch): {self.trainer_backlog}"]
        if a.dead_reasons:
            lines.append(f"dead-letter reasons: {dict(a.dead_reasons)}")
        if a.lost_where:
            lines.append(f"lost: {dict(a.lost_where)}")
        if a.duplicated_where:
            lines.append(f"duplicated: {dict(a.duplicated_where)}")
        lines += [f"  {example}" for example in a.examples]
        if not self.drained:
            lines.append("the pipeline did NOT drain before the timeout")
        phases = ", ".join(f"{k} {v:.0f} s" for k, v in self.phases.items())
        lines += [f"wall time {self.wall_seconds:.0f} s ({phases}); "
                  f"logs in {self.data_dir}/logs", "PASS" if self.ok else "FAIL"]
        return "\n".join(lines)

    def _feedback_rows(self) -> list[str]:
        use, status = self.feedback_use, self.feedback.statuses
        rows = [("feedback given (answered 200)", use.given),
                ("  used in the first score", use.in_first_score),
                ("  used late (one revision)", use.late),
                ("  unused (target 0)", use.unused), ("  used twice (target 0)", use.used_twice),
                ("  answered 404 (target 0)", status["404"]),
                ("  resent (gateway down)", status["retries"])]
        return ["", "late feedback:"] + [f"  {n:<34}{v:>8}" for n, v in rows] + [
            f"  {example}" for example in use.examples]

    def to_json(self) -> dict[str, Any]:
        a = self.accounting
        return {"sent": self.load.sent, "answered": len(self.load.answered),
                "streamed": self.load.streamed, "client_errors": dict(self.load.errors),
                "load_seconds": self.load.seconds,
                "accounting": {k: dict(v) if isinstance(v, Counter) else v
                               for k, v in vars(a).items()},
                "faults": dict(self.faults), "upstream_faults": self.upstream_faults,
                "drained": self.drained, "wall_seconds": self.wall_seconds,
                "phases": self.phases,
                "trainer_backlog": self.trainer_backlog,
                "learning": asdict(self.learning),
                "feedback": {"statuses": dict(self.feedback.statuses),
                             **asdict(self.feedback_use)}, "ok": self.ok}


def run(config: ChaosConfig) -> ChaosReport:
    """Start the stack, load it under faults, drain, account; always stops the stack."""
    started = time.monotonic()
    rng = random.Random(config.seed)
    stack = Stack(StackConfig(config.data_dir, config.error_rate, config.timeout_rate,
                              batch_size=config.batch_size, seed=config.seed,
                              poison_rate=config.poison_rate,
                              transient_rate=config.transient_rate,
                              refuse_rate=config.refuse_rate))
    stack.build()
    keys = Keys(NAMESPACE)
    try:
        stack.start(wait_workers=False)
        phases = {"start": time.monotonic() - started}
        monitor = StepMonitor(stack.redis_url, keys, TRAINED)
        monitor.start()
        load = Load(stack.gateway_url + "/v1", API_KEY, MODEL, config.turns, config.concurrency,
                    config.rate, config.stream_share, config.seed)
        faults = plan(config.faults_per_kind, config.kinds, rng)
        injector = Injector(stack, faults, lambda: load.result.sent / config.turns, rng)
        injector.start()
        result, feedback = asyncio.run(_drive(load, stack, config))
        phases["load"] = result.seconds
        mark = time.monotonic()
        injector.join()
        stack.wait_ready()
        phases["faults after the load"] = time.monotonic() - mark
        client = redis.Redis.from_url(stack.redis_url)
        try:
            spool = config.data_dir / "gateway" / "spool" / "turns.jsonl"
            mark = time.monotonic()
            drained = drain(client, keys, spool, config.drain_timeout, (TRAINED,))
            phases["drain"] = time.monotonic() - mark
            monitor.stop()
            mark = time.monotonic()
            accounting = account(client, keys, TRAINED, TENANT, list(result.answered))
            feedback_use = account_feedback(feedback.sent, turn_ids_by_response(client, keys),
                                            scored_by_turn(client, keys))
            learning = learning_report(client, keys, TRAINED, monitor.samples, injector.times,
                                       stack.log_dir / "trainer.log", injector.rolled_back_to)
            phases["accounting"] = time.monotonic() - mark
            backlog = int(client.hlen(keys.trainer(TRAINED, "buffer")))
        finally:
            client.close()
        upstream = _upstream_stats(stack)
    finally:
        stack.close()
    return ChaosReport(result, accounting, injector.counts, upstream, drained,
                       time.monotonic() - started, phases, backlog, str(config.data_dir),
                       learning, feedback, feedback_use)


async def _drive(load: Load, stack: Stack, config: ChaosConfig
                 ) -> tuple[LoadResult, FeedbackResult]:
    """The load, and late feedback on some of its turns while it runs."""
    result, feedback = await asyncio.gather(
        load.run(), send_late_feedback(stack.gateway_url, API_KEY, load.result,
                                       config.feedback_share, config.feedback_delay,
                                       config.seed))
    return result, feedback


def _upstream_stats(stack: Stack) -> dict[str, int]:
    port = stack.procs["upstream"].argv[stack.procs["upstream"].argv.index("--port") + 1]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as response:
        stats: dict[str, int] = json.loads(response.read())
    return stats
