"""The load generator: ``wrk`` with ``wrk_post.lua``, results read from its ``done()`` line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.procs import pin_prefix

LUA_SCRIPT = Path(__file__).with_name("wrk_post.lua")
API_KEY = "sk-bench-key"
"""The key every proxy under test is configured to accept."""
SESSIONS_PER_THREAD = 16
"""Distinct ``X-Session-Id`` values each wrk thread cycles over."""

_MARK = "BENCH_JSON "


class LoadGenError(RuntimeError):
    """wrk is missing or produced no result line."""


@dataclass(frozen=True)
class WrkResult:
    """One wrk run: throughput and latency percentiles (microseconds)."""

    requests: int
    seconds: float
    errors: int
    """Socket errors, timeouts and non-2xx answers."""
    bad_status: int
    p50_us: int
    p99_us: int
    mean_us: float

    @property
    def rps(self) -> float:
        """Successful (2xx) answers per second."""
        return (self.requests - self.bad_status) / self.seconds if self.seconds else 0.0

    @property
    def error_rate(self) -> float:
        return self.errors / max(self.requests, 1)


def ensure_wrk() -> str:
    """The path of ``wrk``; installs the Debian package when missing and we are root."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise LoadGenError("wrk is not installed: run `apt-get update && apt-get install -y wrk`")
    print("wrk missing: apt-get update && apt-get install -y wrk ...", flush=True)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    found = shutil.which("wrk")
    if not found:
        raise LoadGenError("apt-get install wrk did not provide a wrk binary")
    return found


def run_wrk(wrk: str, url: str, body_file: Path, connections: int, seconds: float,
            cpus: frozenset[int] | None, session_prefix: str = "bench-") -> WrkResult:
    """POST ``body_file`` to ``url`` over ``connections`` keep-alive connections."""
    threads = max(1, min(connections, len(cpus) if cpus else 1))
    argv = [*pin_prefix(cpus), wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s",
            "--timeout", "10s", "-s", str(LUA_SCRIPT), url, "--",
            str(body_file), API_KEY, session_prefix, str(SESSIONS_PER_THREAD)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60,
                          check=False)
    for line in done.stdout.splitlines():
        if line.startswith(_MARK):
            return _parse(json.loads(line[len(_MARK):]))
    raise LoadGenError(f"wrk gave no result (rc {done.returncode}): "
                       f"{done.stdout[-800:]}{done.stderr[-800:]}")


def _parse(raw: dict[str, float]) -> WrkResult:
    errors = int(raw["connect"] + raw["read"] + raw["write"] + raw["status"] + raw["timeout"])
    return WrkResult(requests=int(raw["requests"]), seconds=raw["duration_us"] / 1e6,
                     errors=errors, bad_status=int(raw["status"]),
                     p50_us=int(raw["p50_us"]), p99_us=int(raw["p99_us"]),
                     mean_us=float(raw["mean_us"]))
