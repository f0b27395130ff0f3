"""The scorer benchmark's cells, results, printed table and acceptance targets."""

from __future__ import annotations

import argparse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field

from bench.report import line
from shared.settings import Settings

MIN_IMPLICIT_PER_PROCESS = 2000.0
"""Implicit-only scoring, turns/s of one scorer process."""
MIN_JUDGE_PER_PROCESS = 100.0
"""With a 200 ms judge and prm_m=3, turns/s of one scorer process."""
SHOWN_SETTINGS = ("worker_batch_size", "worker_concurrency", "judge_concurrency",
                  "redis_max_connections", "judge_timeout_seconds", "judge_retries")
"""Defaults printed above the table: the knobs that bound a process's throughput."""


@dataclass(frozen=True)
class Cell:
    """One measurement: a reward mode, a number of scorer processes, settings."""

    mode: str
    """``implicit`` (no judge) or ``judge`` (``prm_m`` votes, implicit off)."""
    processes: int
    turns: int
    env: dict[str, str] = field(default_factory=dict)
    """Settings beyond the benchmark's base ones and the mode's own (printed)."""
    label: str = "defaults"


@dataclass(frozen=True)
class CellResult:
    """What one cell measured inside its window (first scored entry .. last)."""

    cell: Cell | None = None
    scored: int = 0
    """Entries appended to the scored stream inside the window."""
    seconds: float = 0.0
    scorer_cpu: float = 0.0
    """CPU seconds of all the cell's scorer processes inside the window."""
    redis_cpu: float = 0.0
    judge_cpu: float = 0.0
    other_cpus: float = 0.0
    """CPUs kept busy meanwhile by processes outside the benchmark."""
    timed_out: bool = False
    note: str = ""

    @classmethod
    def between(cls, start: Mapping[str, float], end: Mapping[str, float],
                timed_out: bool) -> CellResult:
        d = {k: end[k] - start[k] for k in start}
        seconds = max(d["t"], 1e-9)
        ours = d["scorer"] + d["redis"] + d["judge"] + d["own"]
        return cls(scored=int(d["count"]), seconds=seconds, scorer_cpu=d["scorer"],
                   redis_cpu=d["redis"], judge_cpu=d["judge"],
                   other_cpus=max(d["busy"] - ours, 0.0) / seconds, timed_out=timed_out)

    @classmethod
    def failed(cls, cell: Cell, why: str) -> CellResult:
        return cls(cell=cell, note=f"failed: {why[:80]}")

    @property
    def rate(self) -> float | None:
        """Turns/s of all the cell's processes together."""
        return self.scored / self.seconds if self.scored else None

    def per_1k(self, cpu: float) -> float | None:
        return cpu * 1000 / self.scored if self.scored else None


def scrape(port: int, name: str, label: str = "") -> float:
    """The sum of a metric's samples (those whose labels include ``label``) on a scorer's
    ``/metrics``; 0 when unreachable."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return 0.0
    total = 0.0
    for row in text.splitlines():
        if (row.startswith(name + " ") or row.startswith(name + "{")) and label in row:
            total += float(row.rsplit(" ", 1)[1])
    return total


def print_table(results: list[CellResult], base_env: Mapping[str, str],
                args: argparse.Namespace) -> None:
    defaults = ", ".join(f"{n}={Settings.model_fields[n].default}" for n in SHOWN_SETTINGS)
    print(f"\nscorer settings: defaults ({defaults}); every cell sets "
          f"{_env(base_env)}; judge cells set REEF_USE_PRM=true, REEF_PRM_M={args.prm_m}, "
          f"REEF_USE_IMPLICIT=false; judge latency {args.judge_latency * 1000:.0f} ms")
    for label, env in sorted({(r.cell.label, _env(r.cell.env)) for r in results if r.cell}):
        print(f"  {label}: {env or 'nothing else'}")
    print("  clock: first scored entry .. XLEN(scored) = turns (start-up excluded); "
          "cpu s/1k = CPU seconds per 1,000 turns")
    print(f"\n{'mode':<9}{'procs':>5}  {'settings':<9}{'turns':>7}{'seconds':>8}{'turns/s':>9}"
          f"{'/proc':>8}{'scorer':>8}{'turns/':>8}{'redis':>7}{'redis':>7}{'judge':>7}"
          f"{'other':>7}  note")
    print(f"{'':<9}{'':>5}  {'':<9}{'':>7}{'':>8}{'':>9}{'':>8}{'cpu s/1k':>8}{'cpu-s':>8}"
          f"{'s/1k':>7}{'cpus':>7}{'cpus':>7}{'cpus':>7}")
    for r in results:
        if r.cell is None:
            continue
        c = r.cell
        head = f"{c.mode:<9}{c.processes:>5}  {c.label:<9}{c.turns:>7,}"
        if r.rate is None:
            print(f"{head}{'-':>8}{'-':>9}{'-':>8}{'-':>8}{'-':>8}{'-':>7}{'-':>7}{'-':>7}"
                  f"{'-':>7}  {r.note}")
            continue
        cut = "timed out! " if r.timed_out else ""
        print(f"{head}{r.seconds:>8.2f}{r.rate:>9,.0f}{r.rate / c.processes:>8,.0f}"
              f"{r.per_1k(r.scorer_cpu) or 0:>8.3f}{r.scored / max(r.scorer_cpu, 1e-9):>8,.0f}"
              f"{r.per_1k(r.redis_cpu) or 0:>7.3f}{r.redis_cpu / r.seconds:>7.2f}"
              f"{r.judge_cpu / r.seconds:>7.2f}{r.other_cpus:>7.2f}  {cut}{r.note}")


def _env(env: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(env.items()))


def _find(results: list[CellResult], mode: str, processes: int, label: str
          ) -> CellResult | None:
    for r in results:
        if r.cell and (r.cell.mode, r.cell.processes, r.cell.label) == (mode, processes, label):
            return r
    return None


def print_targets(results: list[CellResult]) -> None:
    """Per-process rates against the issue's targets, and the scaling ratios."""
    print("\nscorer targets and scaling (same run, same machine)")
    labels = sorted({r.cell.label for r in results if r.cell and r.cell.mode == "judge"})
    rows = [("implicit", label, MIN_IMPLICIT_PER_PROCESS) for label in
            sorted({r.cell.label for r in results if r.cell and r.cell.mode == "implicit"})]
    rows += [("judge", label, MIN_JUDGE_PER_PROCESS) for label in labels]
    for mode, label, goal in rows:
        one, two = _find(results, mode, 1, label), _find(results, mode, 2, label)
        rate1 = one.rate if one else None
        rate2 = two.rate if two else None
        tag = f"{mode} {label}"
        line(f"{tag}: turns/s, 1 process", rate1, "{:,.0f}", ">=", goal)
        line(f"{tag}: turns/s per process, 2", rate2 / 2 if rate2 else None, "{:,.0f}", ">=",
             goal)
        line(f"{tag}: scaling 2 / 1 processes", rate2 / rate1 if rate1 and rate2 else None,
             "{:.2f}x")
        if one and one.scorer_cpu:
            line(f"{tag}: turns per scorer CPU-s", one.scored / one.scorer_cpu, "{:,.0f}")


def print_noise(results: list[CellResult], cpus: int) -> None:
    """Warn when the machine, not the scorer, may have set the pace."""
    others = [r.other_cpus for r in results if r.rate is not None]
    if others and max(others) > 0.2:
        print(f"\nWARNING: other processes kept up to {max(others):.1f} of {cpus} CPUs busy "
              "during measured cells ('other cpus'): turns/s are depressed; 'turns/cpu-s' "
              "(turns per CPU-second of the scorer) hardly moves with other load.")
    busiest = max((r.cell.processes + r.redis_cpu / r.seconds + r.judge_cpu / r.seconds
                   for r in results if r.cell and r.rate is not None), default=0.0)
    if busiest > cpus - 0.5:
        print(f"NOTE: with {cpus} CPU(s), the 2-process cells share CPUs with Redis, the "
              "judge and the benchmark itself: scaling below 2x is the machine's, not "
              "necessarily the scorer's.")
