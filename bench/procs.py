"""Child processes for the benchmark: start in their own process group, pinned to CPUs,
wait until ready, always stop (SIGTERM to the group, then SIGKILL)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class StartError(RuntimeError):
    """A child process exited or never became ready; the message ends with its log tail."""


def system_busy_seconds() -> float:
    """CPU seconds all CPUs of the machine spent busy since boot (``/proc/stat``)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / _CLOCK_TICKS


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of its children already waited for (wrk runs)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class CpuPlan:
    """Which CPUs the load side (wrk, fake upstream, Redis) and the proxy under test use.

    With two or more CPUs the proxy gets one CPU to itself, so its throughput is its own
    and not a share of what wrk leaves over; ``None`` means no pinning (all share)."""

    load: frozenset[int] | None
    proxy: frozenset[int] | None

    @classmethod
    def make(cls, pin: bool) -> CpuPlan:
        cpus = sorted(os.sched_getaffinity(0))
        if not pin or len(cpus) < 2:
            return cls(None, None)
        proxy = frozenset({cpus[1]})
        return cls(frozenset(cpus) - proxy, proxy)

    def describe(self) -> str:
        if self.load is None or self.proxy is None:
            return f"not pinned: everything shares {len(os.sched_getaffinity(0))} CPU(s)"
        return (f"load side (wrk, fake upstream, redis) on CPU {_cpus(self.load)}; "
                f"proxy under test on CPU {_cpus(self.proxy)}")


def _cpus(cpus: frozenset[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def pin_prefix(cpus: frozenset[int] | None) -> list[str]:
    """A ``taskset`` prefix for a command line (empty when not pinning)."""
    return [] if cpus is None else ["taskset", "-c", _cpus(cpus)]


@dataclass
class Child:
    """One started process group and where its output goes."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    extra: dict[str, str] = field(default_factory=dict)

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def cpu_seconds(self) -> float:
        """User + system CPU time of every live process in the child's session."""
        total = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[3]) == self.proc.pid:  # field 6 of stat: session id
                total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / _CLOCK_TICKS


def stop(child: Child, grace: float = 10.0) -> None:
    """SIGTERM the child's process group, SIGKILL it after ``grace`` seconds."""
    if child.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(grace)
    # Whatever is left of the group (a forked worker, say) goes too.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.proc.wait(5)


@contextlib.contextmanager
def running(name: str, argv: Sequence[str], log_dir: Path, ready: Callable[[], bool],
            cpus: frozenset[int] | None = None, env: dict[str, str] | None = None,
            cwd: Path | None = None, timeout: float = 60.0) -> Iterator[Child]:
    """Start ``argv`` in a new session, wait for ``ready()``, yield it, always stop it."""
    log = log_dir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([*pin_prefix(cpus), *argv], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                start_new_session=True)
    child = Child(name, proc, log)
    try:
        _wait_ready(child, ready, timeout)
        yield child
    finally:
        stop(child)


def _wait_ready(child: Child, ready: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise StartError(f"{child.name} exited with {child.proc.returncode}; log "
                             f"{child.log}:\n{child.log_tail()}")
        if ready():
            return
        time.sleep(0.2)
    raise StartError(f"{child.name} not ready after {timeout:.0f} s; log {child.log}:\n"
                     f"{child.log_tail()}")


def http_ok(url: str) -> Callable[[], bool]:
    """A readiness probe: GET ``url`` answers 200."""
    def probe() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False
    return probe


def tcp_open(port: int) -> Callable[[], bool]:
    """A readiness probe: something accepts connections on 127.0.0.1:``port``."""
    def probe() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False
    return probe
