"""Reef's benchmarks, one run: the gateway, scorer, trainer, hot-swap and skills parts.

Gateway: direct vs thin forwarder vs Reef's gateway vs LiteLLM.

Every system forwards to the same zero-latency fake upstream and all run at once, each in
its own process; wrk drives one at a time, cell by cell (1 connection for added latency,
N connections for throughput, N streaming), so the systems of one cell are measured back to
back. The table ends with ratios measured side by side and the acceptance targets (printed
as PASS/FAIL; the exit status does not depend on them).

Scorer: turns/s per scorer process, implicit-only and with a 200 ms judge, 1 and 2
processes (see ``bench/scorer.py``).

Trainer: one local LoRA step (``LocalBackend``) vs a plain peft loop on the same batch,
s/step and peak RSS, each in its own process, steps alternating (``bench/trainer_step.py``).

Hot swap: gateway latency percentiles while ``weights`` events make it load and switch
adapters vs idle, interleaved windows (``bench/hot_swap.py``).

Skills: retrieval latency p50/p99 at 100, 1,000 and 10,000 skills, with and without the
query embedding, and BM25 (``bench/skills.py``).

Learning: the whole local loop (policy, gateway, scorer, trainer) taught by a scripted
user; mean reward per round over 30+ steps, a table and a PNG plot (``bench/learning.py``;
10-30 minutes on 2 cores).

Soak: 10 minutes at a fixed rate through the gateway, streaming, with the stack running;
RSS per service at start, after the warm-up and at the end, errors, latency p50/p99; exits
non-zero past the growth bound or on any error (``bench/soak.py``).

Run: ``.venv/bin/python -m bench [--part all|gateway|scorer|trainer|hotswap|skills|learning|soak]
[--seconds 10] [--systems direct,thin,gateway,litellm]``. Logs and ``results.json`` go to
``var/bench/run-<time>/``. Traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
import urllib.request
from collections import Counter, defaultdict
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from types import FrameType

from bench import hot_swap, learning, report, scorer, skills, soak, systems, trainer_step
from bench.loadgen import API_KEY, LoadGenError, WrkResult, ensure_wrk, run_wrk
from bench.procs import Child, CpuPlan, StartError, own_cpu_seconds, system_busy_seconds
from bench.report import Results, Row

SYSTEMS = ("direct", "thin", "gateway", "litellm")
REQUEST = {"model": "bench-model", "max_tokens": 32, "temperature": 0.7, "messages": [
    {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
    {"role": "user", "content": "Say hello to the benchmark in one short sentence."}]}
TURNS_STREAM = "reef:stream:turns"
PARTS = ("all", "gateway", "scorer", "trainer", "hotswap", "skills", "learning", "soak")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=PARTS, default="all",
                        help="which benchmark to run (default: all of them)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="per measured row (default 10); with --part soak, the soak's "
                             f"length (default {soak.DEFAULT_SECONDS:g})")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured, before each row")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat every cell; the best round is shown (for busy machines)")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"comma-separated subset of {','.join(SYSTEMS)}")
    parser.add_argument("--no-stream", action="store_true", help="skip the streaming rows")
    parser.add_argument("--pin", action="store_true",
                        help="pin the proxy to one CPU and the load side to the others "
                             "(default: all share the CPUs; pinning loses when other work "
                             "runs on the machine)")
    scorer.add_arguments(parser)
    trainer_step.add_arguments(parser)
    hot_swap.add_arguments(parser)
    skills.add_arguments(parser)
    learning.add_arguments(parser)
    soak.add_arguments(parser)
    args = parser.parse_args()
    args.soak_seconds = (args.seconds if args.part == "soak" and args.seconds is not None
                         else soak.DEFAULT_SECONDS)
    args.seconds = 10.0 if args.seconds is None else args.seconds
    unknown = set(args.systems.split(",")) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")
    return args


class Bench:
    """One benchmark run: settings, CPU plan, the systems started, the samples measured."""

    def __init__(self, args: argparse.Namespace, wrk: str, log_dir: Path) -> None:
        self.args = args
        self.wrk = wrk
        self.log_dir = log_dir
        self.plan = CpuPlan.make(pin=args.pin)
        self.bodies = {"json": log_dir / "body.json", "stream": log_dir / "body-stream.json"}
        self.bodies["json"].write_text(json.dumps(REQUEST))
        self.bodies["stream"].write_text(json.dumps({**REQUEST, "stream": True}))
        self.targets: dict[str, systems.Target] = {}
        self.skipped: dict[str, str] = {}
        self.samples: dict[tuple[str, str, int], list[Row]] = defaultdict(list)
        self.answered: Counter[str] = Counter()
        """Successful requests sent to each system, checks and warm-ups included."""
        self.children: list[Child] = []
        """Live processes of the benchmark (upstream, Redis, proxies), for CPU accounting."""
        self.redis: Child | None = None
        self.redis_url = ""

    def cells(self) -> list[tuple[str, int]]:
        cells = [("json", 1), ("json", self.args.connections)]
        if not self.args.no_stream:
            cells.append(("stream", self.args.connections))
        return cells

    def add(self, name: str, target: systems.Target) -> None:
        """Check that ``target`` answers both body kinds, then include it in the rounds."""
        for mode in {mode for mode, _ in self.cells()}:
            check_answer(target.chat_url, self.bodies[mode].read_bytes(), mode)
            self.answered[name] += 1
        self.targets[name] = target
        if target.child not in self.children:
            self.children.append(target.child)

    def run_rounds(self) -> None:
        """Each cell runs on every system back to back, so neighbours share conditions."""
        for round_no in range(1, self.args.rounds + 1):
            for mode, conns in self.cells():
                for name, target in self.targets.items():
                    print(f"  round {round_no}: {mode} x{conns} {name} ...", flush=True)
                    self.samples[(name, mode, conns)].append(
                        self.measure(name, target, mode, conns))

    def measure(self, name: str, target: systems.Target, mode: str, conns: int) -> Row:
        if self.args.warmup > 0:
            self.answered[name] += _ok(self.wrk_run(target, mode, conns, self.args.warmup))
        redis = self.redis if name == "gateway" else None
        before = (target.child.cpu_seconds(), redis.cpu_seconds() if redis else 0.0,
                  self.our_cpu(), system_busy_seconds())
        result = self.wrk_run(target, mode, conns, self.args.seconds)
        after = (target.child.cpu_seconds(), redis.cpu_seconds() if redis else 0.0,
                 self.our_cpu(), system_busy_seconds())
        cpu, redis_cpu, ours, busy = (a - b for a, b in zip(after, before, strict=True))
        self.answered[name] += _ok(result)
        count = max(result.requests, 1)
        notes = [f"{result.bad_status} non-2xx!"] if result.bad_status else []
        if redis:
            notes.append(f"redis {redis_cpu * 1000 / count:.3f} cpu ms/req")
        return Row(name, mode, conns, result, cpu * 1000 / count,
                   max(busy - ours, 0.0) / result.seconds, "; ".join(notes))

    def our_cpu(self) -> float:
        return own_cpu_seconds() + sum(child.cpu_seconds() for child in self.children)

    def wrk_run(self, target: systems.Target, mode: str, conns: int, seconds: float
                ) -> WrkResult:
        return run_wrk(self.wrk, target.chat_url, self.bodies[mode], conns, seconds,
                       self.plan.load, session_prefix=f"bench-{mode}-")

    def skip(self, name: str, why: str) -> None:
        print(f"  {name}: skipped: {why}", flush=True)
        self.skipped[name] = why

    def rows(self) -> list[Row]:
        """Per system and cell, the best of the rounds (other load only ever slows a run)."""
        rows = []
        for name in self.args.systems.split(","):
            for mode, conns in self.cells():
                samples = self.samples.get((name, mode, conns))
                if samples:
                    rows.append(max(samples, key=lambda row: row.result.rps if row.result
                                    else 0.0))
                else:
                    why = self.skipped.get(name, "not run")
                    rows.append(Row(name, mode, conns, None, note=f"skipped: {why[:60]}"))
        return rows


def _ok(result: WrkResult) -> int:
    return result.requests - result.bad_status


class CheckError(RuntimeError):
    """A system under test did not answer a chat completion correctly."""


def check_answer(url: str, body: bytes, mode: str) -> None:
    """One request before measuring: a fast 401 or 500 must never pass for a fast proxy."""
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}",
        "X-Session-Id": "bench-check"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, text = response.status, response.read().decode(errors="replace")
    except OSError as exc:
        raise CheckError(f"check request failed: {exc}") from exc
    expected = "data:" if mode == "stream" else '"choices"'
    if status != 200 or expected not in text:
        raise CheckError(f"check request: HTTP {status}, body {text[:200]!r}")


def start_system(bench: Bench, stack: ExitStack, name: str, upstream: systems.Target) -> None:
    """Start ``name`` (its processes stop when ``stack`` closes) and add it to the rounds."""
    if name == "gateway" and not systems.GATEWAY_MAIN.exists():
        bench.skip(name, f"{systems.GATEWAY_MAIN.relative_to(systems.ROOT)} does not exist yet")
        return
    cpus, logs, up = bench.plan.proxy, bench.log_dir, upstream.base_url
    try:
        if name == "direct":
            target = upstream
        elif name == "thin":
            target = stack.enter_context(systems.thin_forwarder(logs, cpus, up))
        elif name == "litellm":
            target = stack.enter_context(systems.litellm_proxy(logs, cpus, up))
        else:
            bench.redis_url, bench.redis = stack.enter_context(
                systems.redis_server(logs, bench.plan.load))
            bench.children.append(bench.redis)
            target = stack.enter_context(systems.reef_gateway(logs, cpus, up, bench.redis_url))
        print(f"  {name}: up at {target.base_url}", flush=True)
        bench.add(name, target)
    except (StartError, CheckError) as exc:
        bench.skip(name, str(exc).splitlines()[0])
        print(str(exc)[-1500:], flush=True)


def turns_recorded(redis_url: str, settle: float = 10.0) -> int:
    """XLEN of the turns stream once it stops growing (recording is asynchronous)."""
    import redis  # the project's venv has it; only the gateway needs it

    client = redis.Redis.from_url(redis_url)
    try:
        last, deadline = -1, time.monotonic() + settle
        length = int(client.xlen(TURNS_STREAM))
        while length != last and time.monotonic() < deadline:
            time.sleep(1.0)
            last, length = length, int(client.xlen(TURNS_STREAM))
        return length
    finally:
        client.close()


def main() -> None:
    args = parse_args()
    # SIGTERM unwinds like Ctrl-C, so every child process group is stopped.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    log_dir = systems.ROOT / "var" / "bench" / time.strftime("run-%Y%m%d-%H%M%S")
    log_dir.mkdir(parents=True, exist_ok=True)
    if args.part in ("all", "gateway"):
        run_gateway(args, log_dir)
    if args.part in ("all", "scorer"):
        scorer.run(args, log_dir / "scorer")
    if args.part in ("all", "trainer"):
        trainer_step.run(args, log_dir / "trainer")
    if args.part in ("all", "hotswap"):
        hot_swap.run(args, log_dir / "hotswap")
    if args.part in ("all", "skills"):
        skills.run(args, log_dir / "skills")
    if args.part in ("all", "learning"):
        learning.run(args, log_dir / "learning")
    if args.part in ("all", "soak") and not soak.run(args, log_dir / "soak"):
        raise SystemExit(1)  # an error, or a service's memory grew past the bound


def run_gateway(args: argparse.Namespace, log_dir: Path) -> None:
    bench = Bench(args, ensure_wrk(), log_dir)
    print(f"reef gateway benchmark: {args.seconds:g} s per row (+{args.warmup:g} s warm-up), "
          f"{args.rounds} round(s), {args.connections} connections; {bench.plan.describe()}; "
          f"load average {os.getloadavg()[0]:.2f}; logs in {log_dir}", flush=True)
    turns_line = ""
    with ExitStack() as stack:
        upstream = stack.enter_context(systems.fake_upstream(log_dir, bench.plan.load))
        bench.children.append(upstream.child)
        for name in args.systems.split(","):
            start_system(bench, stack, name, upstream)
        try:
            bench.run_rounds()
        except LoadGenError as exc:
            print(f"wrk failed, the table is partial: {exc}", flush=True)
        if "gateway" in bench.targets:
            turns_line = (f"gateway recording: XLEN {TURNS_STREAM} = "
                          f"{turns_recorded(bench.redis_url):,} for "
                          f"{bench.answered['gateway']:,} answered requests")
    results = Results(bench.rows())
    report.print_table(results)
    if turns_line:
        print(f"\n{turns_line}")
    report.print_noise(results, os.cpu_count() or 1)
    report.print_ratios(results, args.connections)
    (log_dir / "results.json").write_text(json.dumps(
        [{**asdict(row), "rps": row.result.rps if row.result else None}
         for rows in bench.samples.values() for row in rows], indent=2))


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted: every process the benchmark started was stopped")
        raise SystemExit(130) from None
