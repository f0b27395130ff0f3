"""Soak: a fixed request rate through the gateway, streaming, for minutes, while the RSS
of every process of the stack is sampled.

The stack is the chaos suite's, without faults and without the trainer: a private Redis
(AOF), the fake upstream, the gateway, two scorers, the skill-miner with its fake LLM
(``chaos.stack``). The load is the chaos load with every turn streamed (``chaos.load``:
the official ``openai`` client, sessions of 1-4 turns with Reef's session headers).

Prints, per process, RSS at start, after the warm-up and at the end, and the growth after
the warm-up (the median of the last samples minus the median of the samples around the end
of the warm-up, so one sample's noise does not decide); the error count; latency p50/p99.
Writes ``soak.json``. Exits non-zero (via ``run``'s result) when a Reef service grew more
than ``--soak-max-growth-mb`` after the warm-up, or when any request failed.

Run: ``.venv/bin/python -m bench --part soak [--seconds 600] [--soak-rate 20]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chaos.load import Load, LoadResult
from chaos.stack import API_KEY, MODEL, Stack, StackConfig

SERVICES = ("gateway", "scorer-1", "scorer-2", "skill-miner")
"""Reef's own processes: the growth bound applies to these."""
SUPPORT = ("redis", "upstream", "llm")
"""Processes of the harness, sampled and shown for information only (Redis holds the
streams, which grow with every turn by design)."""
DEFAULT_SECONDS = 600.0
SAMPLE_WINDOW = 3
"""Samples whose median stands for "after the warm-up" and for "at the end"."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("soak (--part soak; --seconds is its length, "
                                      f"default {DEFAULT_SECONDS:g})")
    group.add_argument("--soak-rate", type=float, default=20.0,
                       help="requests started per second")
    group.add_argument("--soak-warmup", type=float, default=None,
                       help="seconds before the growth is measured (default: 20%% of the "
                            "run, at most 60)")
    group.add_argument("--soak-interval", type=float, default=5.0,
                       help="seconds between RSS samples")
    group.add_argument("--soak-max-growth-mb", type=float, default=20.0,
                       help="largest RSS growth after the warm-up allowed per Reef service")


@dataclass
class Samples:
    """RSS samples (MB) per process, and when they were taken (seconds into the load)."""

    times: list[float] = field(default_factory=list)
    rss: dict[str, list[float]] = field(default_factory=dict)


def rss_mb(pid: int) -> float | None:
    """A process's resident set size in MB (``VmRSS``), or None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def sample(stack: Stack, samples: Samples, interval: float, started: float,
                 done: asyncio.Event) -> None:
    """Sample every process's RSS every ``interval`` seconds until ``done``."""
    while True:
        samples.times.append(time.monotonic() - started)
        for name, pid in stack.pids().items():
            value = rss_mb(pid)
            if value is not None:
                samples.rss.setdefault(name, []).append(value)
        try:
            await asyncio.wait_for(done.wait(), interval)
            return
        except TimeoutError:
            continue


async def drive(stack: Stack, seconds: float, rate: float, interval: float
                ) -> tuple[LoadResult, Samples]:
    turns = max(1, int(seconds * rate))
    load = Load(stack.gateway_url + "/v1", API_KEY, MODEL, turns, concurrency=32, rate=rate,
                stream_share=1.0, seed=7)
    samples, done = Samples(), asyncio.Event()
    sampler = asyncio.create_task(sample(stack, samples, interval, time.monotonic(), done))
    try:
        result = await load.run()
    finally:
        done.set()
        await sampler
    return result, samples


def summarise(samples: Samples, warmup: float, bound: float) -> list[dict[str, Any]]:
    """A row per process: RSS at start, after the warm-up, at the end; growth; verdict."""
    after = next((i for i, t in enumerate(samples.times) if t >= warmup),
                 len(samples.times) - 1)
    rows = []
    for name in (*SERVICES, *SUPPORT):
        values = samples.rss.get(name)
        if not values:
            continue
        warm = statistics.median(values[after:after + SAMPLE_WINDOW] or values[-1:])
        end = statistics.median(values[-SAMPLE_WINDOW:])
        growth = end - warm
        bounded = name in SERVICES
        rows.append({"process": name, "start_mb": round(values[0], 1),
                     "warm_mb": round(warm, 1), "end_mb": round(end, 1),
                     "max_mb": round(max(values), 1), "growth_mb": round(growth, 1),
                     "bound_mb": bound if bounded else None,
                     "ok": growth <= bound if bounded else None})
    return rows


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def render(rows: list[dict[str, Any]], result: LoadResult, seconds: float, rate: float,
           warmup: float, latency: dict[str, float]) -> str:
    errors = result.sent - len(result.answered)
    lines = [f"soak: {seconds:g} s at {rate:g} req/s, streaming; warm-up {warmup:g} s", "",
             f"{'process':<13}{'start MB':>10}{'warm MB':>10}{'end MB':>10}{'max MB':>10}"
             f"{'growth MB':>11}  bound"]
    for r in rows:
        verdict = "" if r["ok"] is None else (
            f"< {r['bound_mb']:g} MB " + ("PASS" if r["ok"] else "FAIL"))
        lines.append(f"{r['process']:<13}{r['start_mb']:>10.1f}{r['warm_mb']:>10.1f}"
                     f"{r['end_mb']:>10.1f}{r['max_mb']:>10.1f}{r['growth_mb']:>+11.1f}  "
                     f"{verdict}")
    kinds = f" {dict(result.errors)}" if result.errors else ""
    lines += ["", f"requests sent {result.sent}, answered {len(result.answered)}, errors "
                  f"{errors}{kinds} (target 0) " + ("PASS" if errors == 0 else "FAIL"),
              f"achieved {len(result.answered) / max(result.seconds, 1e-9):.1f} req/s; "
              f"latency to the whole answer p50 {latency['p50_ms']:.1f} ms, "
              f"p99 {latency['p99_ms']:.1f} ms (after the warm-up)"]
    return "\n".join(lines)


def run(args: argparse.Namespace, out_dir: Path) -> bool:
    """The soak; True when no request failed and every Reef service stayed in bound."""
    seconds = float(args.soak_seconds)
    warmup = args.soak_warmup if args.soak_warmup is not None else min(60.0, seconds * 0.2)
    out_dir.mkdir(parents=True, exist_ok=True)
    stack = Stack(StackConfig(out_dir / "stack", error_rate=0.0, timeout_rate=0.0,
                              with_trainer=False))
    stack.build()
    print(f"soak: starting the stack; logs in {stack.log_dir}", flush=True)
    try:
        stack.start()
        result, samples = asyncio.run(drive(stack, seconds, args.soak_rate,
                                            args.soak_interval))
    finally:
        stack.close()
    t0 = min((t for t, _ in result.latencies), default=0.0)
    after = [lat for t, lat in result.latencies if t - t0 >= warmup] or \
        [lat for _, lat in result.latencies]
    latency = {"p50_ms": percentile(after, 0.50) * 1000, "p99_ms": percentile(after, 0.99) * 1000}
    rows = summarise(samples, warmup, args.soak_max_growth_mb)
    print(render(rows, result, seconds, args.soak_rate, warmup, latency), flush=True)
    errors = result.sent - len(result.answered)
    ok = errors == 0 and all(r["ok"] is not False for r in rows)
    summary = {"seconds": seconds, "rate": args.soak_rate, "warmup_seconds": warmup,
               "sent": result.sent, "answered": len(result.answered), "errors": errors,
               "error_kinds": dict(result.errors), "load_seconds": result.seconds,
               "latency": latency, "rss": rows, "sample_times": samples.times,
               "rss_samples": samples.rss, "ok": ok}
    (out_dir / "soak.json").write_text(json.dumps(summary, indent=2))
    print(f"soak: {'PASS' if ok else 'FAIL'}; summary in {out_dir / 'soak.json'}", flush=True)
    return ok
