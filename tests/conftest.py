"""Fixtures shared by the whole suite: a private redis-server per test module and settings."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.fake_upstream import FakeUpstream

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private ``redis-server`` that a test can kill and restart on the same port."""

    def __init__(self, workdir: Path, appendonly: bool = True) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed (make install / .ci/run installs it)")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always",
             "--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port, socket_timeout=0.2).ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


@pytest.fixture
def namespace() -> str:
    """A namespace of its own for each test, instead of wiping Redis between tests."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    """A fake OpenAI-compatible upstream over real HTTP, one per test module."""
    server = FakeUpstream(free_port())
    server.start()
    yield server
    server.stop()


E2E_MODULES = frozenset({"test_learning_e2e.py"})
"""Tests that drive the whole learning loop on the real model: minutes of CPU each. They
run with ``REEF_E2E=1`` (``make test-e2e``); ``make test`` reports them as skipped."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("REEF_E2E") == "1":
        return
    skip = pytest.mark.skip(reason="whole-loop learning test: run with REEF_E2E=1 "
                                   "(make test-e2e)")
    for item in items:
        if item.path.name in E2E_MODULES:
            item.add_marker(skip)
