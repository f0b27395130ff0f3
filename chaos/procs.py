"""The processes of a chaos run: each can be started, SIGKILLed and started again.

Every process runs in a session of its own (so a kill reaches only it) and appends its
output to ``<data_dir>/logs/<name>.log`` across restarts. Readiness is a probe: an HTTP
GET answering 200, or a Redis PING.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import redis

# The readiness probes are the benchmark harness's (re-exported for chaos.stack).
from bench.procs import http_ok as http_ok
from bench.procs import tcp_open as tcp_open

ROOT = Path(__file__).resolve().parent.parent
"""The repository root: services run from here (``python -m services.<name>``)."""


class ProcError(RuntimeError):
    """A process exited or never became ready; the message ends with its log tail."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_ok(url: str) -> Callable[[], bool]:
    """A probe: the Redis at ``url`` answers PING (and has loaded its data)."""
    def probe() -> bool:
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()
    return probe


class Proc:
    """One restartable child process."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path,
                 ready: Callable[[], bool], ready_timeout: float = 90.0) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log = log_dir / f"{name}.log"
        self.ready = ready
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def start(self) -> None:
        """Start the process (do not wait for it)."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, env={**os.environ, **self.env}, cwd=ROOT,
                                         stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.starts += 1

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise ProcError(f"{self.name} exited; log {self.log}:\n{self.tail()}")
            if self.ready():
                return
            time.sleep(0.1)
        raise ProcError(f"{self.name} not ready after {self.ready_timeout:.0f} s; "
                        f"log {self.log}:\n{self.tail()}")

    def kill(self) -> None:
        """SIGKILL, as a crash would, and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
        self.kill()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


def redis_proc(port: int, data_dir: Path, log_dir: Path) -> Proc:
    """A private redis-server with the append-only file on and ``appendfsync always``:
    a write Redis acknowledged is on disk, so a SIGKILL of Redis loses nothing it
    acknowledged (``everysec`` may lose up to ~2 s of acknowledged writes when its
    background fsync lags, which would count as lost turns here)."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise ProcError("redis-server is not installed (apt-get install redis-server)")
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes", "--appendfsync", "always", "--dir", str(data_dir)]
    return Proc("redis", argv, {}, log_dir, redis_ok(f"redis://127.0.0.1:{port}/0"))


def python_proc(name: str, module: str, args: list[str], env: dict[str, str], log_dir: Path,
                ready: Callable[[], bool], ready_timeout: float = 90.0) -> Proc:
    """``python -m <module> <args>`` with this interpreter."""
    return Proc(name, [sys.executable, "-m", module, *args], env, log_dir, ready,
                ready_timeout)
