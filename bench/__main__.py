"""Gateway benchmark: direct vs thin forwarder vs Reef's gateway vs LiteLLM, one run.

Every system forwards to the same zero-latency fake upstream; wrk drives each in turn
(1 connection for added latency, N connections for throughput, and a streaming row), and
the table ends with ratios measured side by side and the acceptance targets.

Run: ``.venv/bin/python -m bench [--seconds 10] [--systems direct,thin,gateway,litellm]``.
Logs and ``results.json`` go to ``var/bench/run-<time>/``. Traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path
from types import FrameType

from bench import report, systems
from bench.loadgen import API_KEY, LoadGenError, WrkResult, ensure_wrk, run_wrk
from bench.procs import Child, CpuPlan, StartError, own_cpu_seconds, system_busy_seconds
from bench.report import Results, Row

SYSTEMS = ("direct", "thin", "gateway", "litellm")
REQUEST = {"model": "bench-model", "max_tokens": 32, "temperature": 0.7, "messages": [
    {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
    {"role": "user", "content": "Say hello to the benchmark in one short sentence."}]}
TURNS_STREAM = "reef:stream:turns"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per measured row")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured, before each row")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"comma-separated subset of {','.join(SYSTEMS)}")
    parser.add_argument("--no-stream", action="store_true", help="skip the streaming rows")
    parser.add_argument("--pin", action="store_true",
                        help="pin the proxy to one CPU and the load side to the others "
                             "(default: all share the CPUs; pinning loses when other work "
                             "runs on the machine)")
    args = parser.parse_args()
    unknown = set(args.systems.split(",")) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")
    return args


class Bench:
    """One benchmark run: its settings, CPU plan, log folder and collected rows."""

    def __init__(self, args: argparse.Namespace, wrk: str, log_dir: Path) -> None:
        self.args = args
        self.wrk = wrk
        self.log_dir = log_dir
        self.plan = CpuPlan.make(pin=args.pin)
        self.rows: list[Row] = []
        self.bodies = {"json": log_dir / "body.json", "stream": log_dir / "body-stream.json"}
        self.bodies["json"].write_text(json.dumps(REQUEST))
        self.bodies["stream"].write_text(json.dumps({**REQUEST, "stream": True}))
        self.answered = 0
        """Successful requests sent to the current system, warm-ups included."""
        self.redis_url = ""
        self.children: list[Child] = []
        """Live processes of the benchmark (upstream, Redis, proxy), for CPU accounting."""
        self.turns_line = ""

    def cells(self) -> list[tuple[str, int]]:
        cells = [("json", 1), ("json", self.args.connections)]
        if not self.args.no_stream:
            cells.append(("stream", self.args.connections))
        return cells

    def measure(self, name: str, target: systems.Target) -> None:
        """Check one answer, then run every cell against ``target``."""
        for mode in {mode for mode, _ in self.cells()}:
            check_answer(target.chat_url, self.bodies[mode].read_bytes(), mode)
            self.answered += 1
        for mode, conns in self.cells():
            print(f"  {name} {mode} x{conns} ...", flush=True)
            if self.args.warmup > 0:
                self.answered += _ok(self.wrk_run(target, mode, conns, self.args.warmup))
            cpu_before, ours_before, busy_before = (
                target.child.cpu_seconds(), self.our_cpu(), system_busy_seconds())
            result = self.wrk_run(target, mode, conns, self.args.seconds)
            cpu = target.child.cpu_seconds() - cpu_before
            other = system_busy_seconds() - busy_before - (self.our_cpu() - ours_before)
            self.answered += _ok(result)
            per_request = cpu * 1000 / result.requests if result.requests else None
            note = f"{result.bad_status} non-2xx!" if result.bad_status else ""
            self.rows.append(Row(name, mode, conns, result, per_request,
                                 max(other, 0.0) / result.seconds, note))

    def our_cpu(self) -> float:
        return own_cpu_seconds() + sum(child.cpu_seconds() for child in self.children)

    def wrk_run(self, target: systems.Target, mode: str, conns: int, seconds: float
                ) -> WrkResult:
        return run_wrk(self.wrk, target.chat_url, self.bodies[mode], conns, seconds,
                       self.plan.load, session_prefix=f"bench-{mode}-")

    def skip(self, name: str, why: str) -> None:
        print(f"  {name}: skipped: {why}", flush=True)
        for mode, conns in self.cells():
            self.rows.append(Row(name, mode, conns, None, note=f"skipped: {why[:60]}"))


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


@contextmanager
def started(bench: Bench, name: str, upstream: systems.Target) -> Iterator[systems.Target]:
    """The system ``name`` running against ``upstream`` (direct: the upstream itself)."""
    if name == "direct":
        yield upstream
        return
    with ExitStack() as stack:
        cpus, logs = bench.plan.proxy, bench.log_dir
        if name == "thin":
            target = stack.enter_context(systems.thin_forwarder(logs, cpus, upstream.base_url))
        elif name == "litellm":
            target = stack.enter_context(systems.litellm_proxy(logs, cpus, upstream.base_url))
        else:
            redis_url, redis_child = stack.enter_context(
                systems.redis_server(logs, bench.plan.load))
            bench.redis_url = redis_url
            bench.children.append(redis_child)
            target = stack.enter_context(
                systems.reef_gateway(logs, cpus, upstream.base_url, redis_url))
        bench.children.append(target.child)
        yield target


def run_system(bench: Bench, name: str, upstream: systems.Target) -> None:
    if name == "gateway" and not systems.GATEWAY_MAIN.exists():
        bench.skip(name, f"{systems.GATEWAY_MAIN.relative_to(systems.ROOT)} does not exist yet")
        return
    bench.answered = 0
    bench.children = [upstream.child]
    try:
        with started(bench, name, upstream) as target:
            bench.measure(name, target)
            if name == "gateway":
                report_turns(bench)
    except (StartError, CheckError, LoadGenError) as exc:
        bench.skip(name, str(exc).splitlines()[0])
        print(str(exc)[-1500:], flush=True)


def report_turns(bench: Bench, settle: float = 10.0) -> None:
    """Prove recording was on: XLEN of the turns stream once it stops growing."""
    import redis  # the project's venv has it; only this row needs it

    client = redis.Redis.from_url(bench.redis_url)
    try:
        last, deadline = -1, time.monotonic() + settle
        length = int(client.xlen(TURNS_STREAM))
        while length != last and time.monotonic() < deadline:
            time.sleep(1.0)
            last, length = length, int(client.xlen(TURNS_STREAM))
    finally:
        client.close()
    bench.turns_line = (f"gateway recording: XLEN {TURNS_STREAM} = {length:,} for "
                        f"{bench.answered:,} answered requests")
    print(f"  {bench.turns_line}", flush=True)


def main() -> None:
    args = parse_args()
    # SIGTERM unwinds like Ctrl-C, so every child process group is stopped.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    log_dir = systems.ROOT / "var" / "bench" / time.strftime("run-%Y%m%d-%H%M%S")
    log_dir.mkdir(parents=True, exist_ok=True)
    bench = Bench(args, ensure_wrk(), log_dir)
    print(f"reef gateway benchmark: {args.seconds:g} s per row (+{args.warmup:g} s warm-up), "
          f"{args.connections} connections; {bench.plan.describe()}; "
          f"load average {os.getloadavg()[0]:.2f}; logs in {log_dir}", flush=True)
    with systems.fake_upstream(log_dir, bench.plan.load) as upstream:
        for name in args.systems.split(","):
            run_system(bench, name, upstream)
    results = Results(bench.rows)
    report.print_table(results)
    if bench.turns_line:
        print(f"\n{bench.turns_line}")
    report.print_noise(results, os.cpu_count() or 1)
    report.print_ratios(results, args.connections)
    (log_dir / "results.json").write_text(json.dumps(
        [{**asdict(row), "rps": row.result.rps if row.result else None} for row in bench.rows],
        indent=2))


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
