"""Scorer benchmark: turns/s per scorer process, implicit-only and with a 200 ms judge,
and the scaling from 1 to 2 processes, in one run.

Each cell gets a fresh private ``redis-server`` (no persistence) and a fresh namespace.
Its turns (sessions of 10, the last with ``session_done``, see ``scorer_load``) are
encoded first; then the scorer processes (``python -m services.scorer``) start, the
benchmark waits until each has answered ``/metrics`` and joined both consumer groups,
and only then are the turns XADDed in pipelined chunks. The clock runs from the first
entry seen in ``<ns>:stream:scored`` until XLEN reaches the number of turns, so process
start-up is excluded; the rate counts only the entries scored inside that window. CPU
is read from ``/proc`` at both ends of the window. The fake judge (``judge_server``)
runs in its own process and is shared by the judge cells.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import redis

from bench import scorer_load, scorer_report, systems
from bench.procs import (
    Child,
    StartError,
    free_port,
    http_ok,
    running,
    system_busy_seconds,
    tcp_open,
)
from bench.scorer_report import Cell, CellResult
from shared.keys import FINALISED, GROUP_JUDGE, GROUP_SCORER, SCORED, TURNS, Keys

POLL_SECONDS = 0.01
"""How often XLEN of the scored stream is read while a cell runs."""
JUDGE_MODEL = "bench-judge"
BASE_ENV = {"REEF_PROFILE": "dev", "REEF_WORKER_BLOCK_MS": "500"}
"""Every scorer gets these (block time only shortens shutdown; it is no throughput knob)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scorer part")
    group.add_argument("--scorer-turns", type=int, default=20_000,
                       help="turns per implicit-only cell")
    group.add_argument("--scorer-judge-turns", type=int, default=3_000,
                       help="turns per judge cell")
    group.add_argument("--scorer-processes", default="1,2",
                       help="scorer process counts to measure (comma-separated)")
    group.add_argument("--scorer-modes", default="implicit,judge",
                       help="reward modes to measure: implicit, judge (comma-separated)")
    group.add_argument("--judge-latency", type=float, default=0.2, help="seconds per judge call")
    group.add_argument("--prm-m", type=int, default=3, help="judge votes per turn")
    group.add_argument("--scorer-set", action="append", default=[], metavar="REEF_X=V",
                       help="a setting for every scorer (repeatable); printed in the table")
    group.add_argument("--scorer-tuned", default="REEF_WORKER_BATCH_SIZE=128,"
                       "REEF_WORKER_CONCURRENCY=128",
                       help="settings of the extra 'tuned' judge rows ('' skips them)")
    group.add_argument("--scorer-timeout", type=float, default=300.0,
                       help="longest a cell may run before it is cut (s)")


def cells(args: argparse.Namespace) -> list[Cell]:
    common = dict(_pairs(args.scorer_set))
    base = "custom" if common else "defaults"
    tuned = dict(_pairs(filter(None, args.scorer_tuned.split(","))))
    counts = [int(n) for n in args.scorer_processes.split(",")]
    modes = set(args.scorer_modes.split(","))
    if modes - {"implicit", "judge"}:
        raise SystemExit(f"--scorer-modes: unknown {', '.join(sorted(modes))}")
    out = [Cell("implicit", n, args.scorer_turns, common, base) for n in counts
           if "implicit" in modes]
    if "judge" not in modes:
        return out
    out += [Cell("judge", n, args.scorer_judge_turns, common, base) for n in counts]
    if tuned:
        out += [Cell("judge", n, args.scorer_judge_turns, {**common, **tuned}, "tuned")
                for n in counts]
    return out


def _pairs(items: object) -> Iterator[tuple[str, str]]:
    for item in items:  # type: ignore[attr-defined]
        name, sep, value = str(item).partition("=")
        if not sep or not name.startswith("REEF_"):
            raise SystemExit(f"scorer setting {item!r}: expected REEF_NAME=VALUE")
        yield name.strip(), value.strip()


def run(args: argparse.Namespace, log_dir: Path) -> list[CellResult]:
    """Every cell, one after the other; prints the table and the targets."""
    plan = cells(args)
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"\nreef scorer benchmark: {len(plan)} cells; judge latency "
          f"{args.judge_latency:g} s, prm_m={args.prm_m}; {os.cpu_count()} CPU(s); load average "
          f"{os.getloadavg()[0]:.2f}; logs in {log_dir}", flush=True)
    results: list[CellResult] = []
    with ExitStack() as stack:
        judge: Child | None = None
        judge_url = ""
        if any(c.mode == "judge" for c in plan):
            judge_url, judge = stack.enter_context(judge_server(log_dir, args.judge_latency))
        for cell in plan:
            print(f"  scorer: {cell.mode} x{cell.processes} ({cell.label}), "
                  f"{cell.turns:,} turns ...", flush=True)
            try:
                results.append(run_cell(cell, log_dir, args, judge_url, judge))
            except (StartError, redis.RedisError) as exc:
                print(f"    failed: {str(exc)[-1500:]}", flush=True)
                results.append(CellResult.failed(cell, str(exc).splitlines()[0]))
    scorer_report.print_table(results, BASE_ENV, args)
    scorer_report.print_noise(results, os.cpu_count() or 1)
    scorer_report.print_targets(results)
    (log_dir / "results.json").write_text(json.dumps(
        [{**asdict(r), "turns_per_second": r.rate} for r in results], indent=2))
    return results


@contextmanager
def judge_server(log_dir: Path, latency: float) -> Iterator[tuple[str, Child]]:
    port = free_port()
    argv = [sys.executable, "-m", "bench.judge_server", "--port", str(port),
            "--latency", str(latency)]
    with running("judge", argv, log_dir, tcp_open(port), cwd=systems.ROOT,
                 env=_clean_env()) as child:
        yield f"http://127.0.0.1:{port}/v1", child


def run_cell(cell: Cell, log_dir: Path, args: argparse.Namespace, judge_url: str,
             judge: Child | None) -> CellResult:
    """Start Redis and the scorers, load the turns, time them through."""
    ns = f"bench-{cell.mode}-{cell.processes}-{uuid.uuid4().hex[:6]}"
    cell_dir = log_dir / ns
    cell_dir.mkdir(parents=True)
    entries = scorer_load.encode(cell.turns, prefix=f"{ns}-s")
    with ExitStack() as stack:
        url, redis_child = stack.enter_context(systems.redis_server(cell_dir, None))
        client = redis.Redis.from_url(url)
        stack.callback(client.close)
        env = scorer_env(cell, ns, url, args, judge_url)
        scorers = [stack.enter_context(scorer(cell_dir, i, env)) for i in range(cell.processes)]
        wait_joined(client, ns, cell.processes)
        started = time.monotonic()
        scorer_load.publish(client, ns, entries)
        load_seconds = time.monotonic() - started
        result = measure(client, ns, len(entries), [c for c, _ in scorers], redis_child,
                         judge, args.scorer_timeout)
        notes = check(client, ns, len(entries), [port for _, port in scorers], cell)
        notes.insert(0, f"load {load_seconds:.1f} s")
        return replace(result, cell=cell, note="; ".join(notes))


def scorer_env(cell: Cell, ns: str, redis_url: str, args: argparse.Namespace,
               judge_url: str) -> dict[str, str]:
    env = {**BASE_ENV, "REEF_NAMESPACE": ns, "REEF_REDIS_URL": redis_url}
    if cell.mode == "judge":
        env |= {"REEF_USE_PRM": "true", "REEF_PRM_BASE_URL": judge_url,
                "REEF_PRM_MODEL": JUDGE_MODEL, "REEF_PRM_M": str(args.prm_m),
                "REEF_USE_IMPLICIT": "false"}
    return env | cell.env


def _clean_env() -> dict[str, str]:
    """The environment without the caller's ``REEF_*`` settings: the table states every
    setting that differs from the defaults."""
    return {k: v for k, v in os.environ.items() if not k.startswith("REEF_")}


@contextmanager
def scorer(cell_dir: Path, index: int, env: dict[str, str]) -> Iterator[tuple[Child, int]]:
    port = free_port()
    data_dir = cell_dir / f"scorer{index}"
    data_dir.mkdir()
    full = {**_clean_env(), **env, "REEF_METRICS_PORT": str(port),
            "REEF_DATA_DIR": str(data_dir)}
    argv = [sys.executable, "-m", "services.scorer"]
    probe = http_ok(f"http://127.0.0.1:{port}/metrics")
    with running(f"scorer{index}", argv, cell_dir, probe, env=full, cwd=systems.ROOT) as child:
        yield child, port


def wait_joined(client: redis.Redis, ns: str, processes: int, timeout: float = 30.0) -> None:
    """Until every scorer has read from both streams once (so all start together)."""
    keys = Keys(ns)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        joined = [_consumers(client, keys.stream(TURNS), GROUP_SCORER),
                  _consumers(client, keys.stream(FINALISED), GROUP_JUDGE)]
        if min(joined) >= processes:
            return
        time.sleep(0.05)
    raise StartError(f"scorers did not join their consumer groups within {timeout:.0f} s")


def _consumers(client: redis.Redis, stream: str, group: str) -> int:
    try:
        groups = client.xinfo_groups(stream)
    except redis.ResponseError:  # no such stream yet
        return 0
    return next((int(g["consumers"]) for g in groups if g["name"].decode() == group), 0)


def measure(client: redis.Redis, ns: str, total: int, scorers: list[Child], redis_child: Child,
            judge: Child | None, timeout: float) -> CellResult:
    """From the first scored entry until ``total``: rate and CPU inside that window."""
    key = Keys(ns).stream(SCORED)
    deadline = time.monotonic() + timeout
    count = int(client.xlen(key))
    while count == 0 and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
        count = int(client.xlen(key))
    start = _snapshot(count, scorers, redis_child, judge)
    while count < total and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
        count = int(client.xlen(key))
    end = _snapshot(count, scorers, redis_child, judge)
    return CellResult.between(start, end, timed_out=count < total)


def _snapshot(count: int, scorers: list[Child], redis_child: Child, judge: Child | None
              ) -> dict[str, float]:
    return {"t": time.monotonic(), "count": count,
            "scorer": sum(c.cpu_seconds() for c in scorers),
            "redis": redis_child.cpu_seconds(),
            "judge": judge.cpu_seconds() if judge else 0.0,
            "busy": system_busy_seconds(), "own": _own_cpu()}


def _own_cpu() -> float:
    times = os.times()
    return times.user + times.system


def check(client: redis.Redis, ns: str, total: int, ports: list[int], cell: Cell) -> list[str]:
    """What went wrong, if anything: extra entries, dead letters, judge errors."""
    keys, notes = Keys(ns), []
    time.sleep(0.3)  # a duplicate would show up right after the last entry
    scored = int(client.xlen(keys.stream(SCORED)))
    if scored != total:
        notes.append(f"{scored:,} scored of {total:,}!")
    dead = sum(int(client.xlen(keys.dead(s))) for s in (TURNS, FINALISED))
    if dead:
        notes.append(f"{dead} dead-lettered!")
    unscored = sum(scorer_report.scrape(port, "reef_scorer_turns_scored_total",
                                        'outcome="unscored"') for port in ports)
    if cell.mode == "judge":
        errors = sum(scorer_report.scrape(port, "reef_scorer_judge_errors_total")
                     for port in ports)
        notes.append(f"judge errors {errors:.0f}, unscored {unscored:.0f}")
    return notes
