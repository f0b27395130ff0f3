"""Starting and stopping Reef's services as local child processes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis


class StackError(RuntimeError):
    """A service of the local stack could not be started."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_reachable(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=0.5,
                                         socket_connect_timeout=0.5).ping())
    except (redis.RedisError, OSError):
        return False


@dataclass
class Stack:
    """The child processes of one local run; ``close()`` ends them all."""

    data_dir: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def log_path(self, name: str) -> Path:
        return self.data_dir / "logs" / f"{name}.log"

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        """Start a child process whose output goes to ``<data_dir>/logs/<name>.log``."""
        path = self.log_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as log:
            self.procs[name] = subprocess.Popen(argv, env={**os.environ, **env}, stdout=log,
                                                stderr=subprocess.STDOUT,
                                                start_new_session=True)

    def start_redis(self) -> str:
        """A private redis-server (append-only file on) under the data dir; its URL."""
        exe = shutil.which("redis-server")
        if exe is None:
            raise StackError("no Redis is reachable and redis-server is not installed "
                             "(apt-get install redis-server, or set REEF_REDIS_URL)")
        port = free_port()
        workdir = self.data_dir / "redis"
        workdir.mkdir(parents=True, exist_ok=True)
        self.spawn("redis", [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "yes", "--dir", str(workdir)], {})
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        while not redis_reachable(url):
            if time.monotonic() > deadline:
                raise StackError("the private redis-server did not start")
            time.sleep(0.05)
        return url

    def start_service(self, name: str, env: dict[str, str]) -> None:
        """``python -m services.<name>``."""
        self.spawn(name, [sys.executable, "-m", f"services.{name}"], env)

    def wait_http(self, name: str, url: str, timeout: float) -> None:
        """Wait until ``url`` answers 200, or fail with the tail of the service's log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.procs[name]
            if proc.poll() is not None:
                raise StackError(f"{name} exited ({proc.returncode}); "
                                 f"log tail:\n{self._tail(name)}")
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise StackError(f"{name} not ready after {timeout:.0f}s; log tail:\n{self._tail(name)}")

    def _tail(self, name: str) -> str:
        try:
            return "\n".join(self.log_path(name).read_text(errors="replace").splitlines()[-15:])
        except FileNotFoundError:
            return "(no log)"

    def close(self) -> None:
        """SIGTERM every child (services stop gracefully), SIGKILL after 10 s."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()
