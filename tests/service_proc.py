"""Run a Reef service (``python -m services.<name>``) as a real process for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import free_port


class ServiceProcess:
    """A service subprocess; ready when ``ready_path`` answers 200 on ``port``."""

    def __init__(self, module: str, env: dict[str, str], data_dir: Path, port: int,
                 ready_path: str) -> None:
        self.module = module
        self.port = port
        self.ready_path = ready_path
        self.data_dir = data_dir
        self.env = {**os.environ, "REEF_DATA_DIR": str(data_dir), **env}
        self.log_path = data_dir / f"{module.rsplit('.', 1)[-1]}-{port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", self.module], env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.module} exited: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=0.5).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.module} did not become ready")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def metric(self, name: str) -> float:
        """The sum of a metric's samples on the service's ``/metrics``."""
        key = self.env.get("REEF_METRICS_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        text = httpx.get(self.url + "/metrics", headers=headers, timeout=5).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total


def scorer_process(redis_url: str, namespace: str, data_dir: Path,
                   env: dict[str, str] | None = None) -> ServiceProcess:
    """A scorer with a /metrics port (its readiness probe) and quick worker timings."""
    port = free_port()
    return ServiceProcess("services.scorer", {
        "REEF_PROFILE": "dev", "REEF_NAMESPACE": namespace, "REEF_REDIS_URL": redis_url,
        "REEF_METRICS_PORT": str(port), "REEF_WORKER_BLOCK_MS": "200",
        "REEF_WORKER_CLAIM_IDLE_MS": "1000", "REEF_SWEEP_INTERVAL_SECONDS": "0.2",
        **(env or {})}, data_dir, port, "/metrics")
