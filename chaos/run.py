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
from typing import Any, cast

import redis

from chaos.account import (
    Accounting,
    account,
    count_cross_tenant,
    drain,
    scored_by_turn,
    turn_ids_by_response,
)
from chaos.faults import KILLED, RESTARTED, ROLLBACK, Injector, plan
from chaos.feedback import (
    FeedbackAccounting,
    FeedbackResult,
    account_feedback,
    send_late_feedback,
)
from chaos.learning import Learning, StepMonitor, learning_report
from chaos.load import Load, LoadResult
from chaos.stack import MODEL, NAMESPACE, TENANT, TENANTS, Stack, StackConfig
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
    learning: dict[str, Learning]
    """By tenant."""
    feedback: FeedbackResult
    feedback_use: FeedbackAccounting

    @property
    def ok(self) -> bool:
        use, status, acc = self.feedback_use, self.feedback.statuses, self.accounting
        return (self.drained and not acc.lost and not acc.duplicated and not acc.cross_tenant
                and not any(t.stalled_after for t in self.learning.values())
                and not use.unused and not use.used_twice
                and not status["404"] and not status["gave_up"])

    def render(self) -> str:
        a, load = self.accounting, self.load
        rows = [
            ("turns sent", load.sent), ("answered", len(load.answered)),
            ("  of them streamed", load.streamed), ("recorded", a.recorded),
            ("scored", a.scored), ("seen by the trainer", a.seen["trainer"]),
            ("trained", a.trained), ("seen by the skill-miner", a.seen["skill-miner"]),
            ("mined", a.mined), ("dead-lettered", a.dead_lettered),
            ("lost (target 0)", a.lost), ("duplicated (target 0)", a.duplicated),
            ("other tenant's adapter (0)", a.cross_tenant)]
        lines = ["", "chaos run: every answered turn accounted for", ""]
        lines += [f"  {name:<26}{value:>8}" for name, value in rows]
        lines += ["", "faults injected:"]
        for name in sorted(self.faults):
            lines.append(f"  {name:<26}{self.faults[name]:>8}")
        for name in ("error_500", "timeout", "poison"):
            lines.append(f"  {'upstream_' + name:<26}{self.upstream_faults.get(name, 0):>8}")
        for tenant, learning in self.learning.items():
            lines += learning.rows(f"the learning half, tenant {tenant}:")
        lines += self._feedback_rows()
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
                "learning": {t: asdict(x) for t, x in self.learning.items()},
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
        monitors = {t.name: StepMonitor(stack.redis_url, keys, t.adapter) for t in TENANTS}
        for monitor in monitors.values():
            monitor.start()
        loads = _loads(stack, config)
        faults = plan(config.faults_per_kind, config.kinds, rng)
        injector = Injector(stack, faults, lambda: sum(ld.result.sent for ld in loads)
                            / config.turns, rng)
        injector.start()
        results, feedback = asyncio.run(_drive(loads, stack, config))
        phases["load"] = max(r.seconds for r in results)
        mark = time.monotonic()
        injector.join()
        stack.wait_ready()
        phases["faults after the load"] = time.monotonic() - mark
        client = redis.Redis.from_url(stack.redis_url)
        try:
            spool = config.data_dir / "gateway" / "spool" / "turns.jsonl"
            mark = time.monotonic()
            drained = drain(client, keys, spool, config.drain_timeout,
                            tuple(t.adapter for t in TENANTS))
            phases["drain"] = time.monotonic() - mark
            for monitor in monitors.values():
                monitor.stop()
            mark = time.monotonic()
            accounting = _account(client, keys, results)
            feedback_use = account_feedback(feedback.sent, turn_ids_by_response(client, keys),
                                            scored_by_turn(client, keys))
            learning = {t.name: learning_report(
                client, keys, t.adapter, monitors[t.name].samples, injector.times,
                stack.log_dir / f"{t.trainer}.log",
                injector.rolled_back_to if t.name == TENANT else None) for t in TENANTS}
            phases["accounting"] = time.monotonic() - mark
            backlog = sum(int(client.hlen(keys.trainer(t.adapter, "buffer"))) for t in TENANTS)
        finally:
            client.close()
        upstream = _upstream_stats(stack)
    finally:
        stack.close()
    return ChaosReport(_merged(results), accounting, injector.counts, upstream, drained,
                       time.monotonic() - started, phases, backlog, str(config.data_dir),
                       learning, feedback, feedback_use)


def _loads(stack: Stack, config: ChaosConfig) -> list[Load]:
    """One load per tenant, with its key, sharing the turns, sessions and rate."""
    n = len(TENANTS)
    return [Load(stack.gateway_url + "/v1", t.api_key, MODEL, config.turns // n
                 + (i < config.turns % n), max(1, config.concurrency // n), config.rate / n,
                 config.stream_share, None if config.seed is None else config.seed + i)
            for i, t in enumerate(TENANTS)]


async def _drive(loads: list[Load], stack: Stack, config: ChaosConfig
                 ) -> tuple[list[LoadResult], FeedbackResult]:
    """The loads, and late feedback on some of their turns while they run."""
    feedback = [send_late_feedback(stack.gateway_url, t.api_key, load.result,
                                   config.feedback_share, config.feedback_delay, config.seed)
                for t, load in zip(TENANTS, loads, strict=True)]
    done = await asyncio.gather(*(load.run() for load in loads), *feedback)
    results = cast(list[LoadResult], list(done[:len(loads)]))
    merged = FeedbackResult()
    for part in cast(list[FeedbackResult], done[len(loads):]):
        merged.sent.update(part.sent)
        merged.statuses.update(part.statuses)
    return results, merged


def _account(client: redis.Redis, keys: Keys, results: list[LoadResult]) -> Accounting:
    """Every tenant's turns accounted for against its own adapter; none in another's."""
    total = Accounting()
    for tenant, result in zip(TENANTS, results, strict=True):
        answered = list(result.answered)
        acc = account(client, keys, tenant.adapter, tenant.name, answered)
        others = [t.adapter for t in TENANTS if t != tenant]
        count_cross_tenant(client, keys, acc, answered, others)
        total.add(acc)
    return total


def _merged(results: list[LoadResult]) -> LoadResult:
    """The tenants' loads as one."""
    merged = LoadResult()
    for result in results:
        merged.sent += result.sent
        merged.answered.update(result.answered)
        merged.errors.update(result.errors)
        merged.latencies += result.latencies
        merged.seconds = max(merged.seconds, result.seconds)
    return merged


def _upstream_stats(stack: Stack) -> dict[str, int]:
    port = stack.procs["upstream"].argv[stack.procs["upstream"].argv.index("--port") + 1]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as response:
        stats: dict[str, int] = json.loads(response.read())
    return stats
