"""Start ``python -m services.gateway`` as a real process for tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import free_port

API_KEY = "sk-test-key-alpha"
OTHER_KEY = "sk-test-key-beta"


class GatewayProcess:
    """A gateway subprocess on a free port; ``env`` entries override the defaults."""

    def __init__(self, redis_url: str, upstream_url: str, namespace: str, data_dir: Path,
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.namespace = namespace
        self.data_dir = data_dir
        self.env = {
            **os.environ,
            "REEF_PROFILE": "prod",
            "REEF_NAMESPACE": namespace,
            "REEF_REDIS_URL": redis_url,
            "REEF_UPSTREAM_BASE_URL": upstream_url,
            "REEF_UPSTREAM_API_KEY": "sk-upstream-secret",
            "REEF_API_KEYS": f'{{"{API_KEY}": "alpha", "{OTHER_KEY}": "beta"}}',
            "REEF_GATEWAY_PORT": str(self.port),
            "REEF_DATA_DIR": str(data_dir),
            "REEF_UPSTREAM_TIMEOUT_SECONDS": "3",
            "REEF_UPSTREAM_RETRIES": "1",
            "REEF_MAX_BODY_BYTES": "65536",
            **(env or {}),
        }
        self.log_path = data_dir / f"gateway-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "services.gateway"],
                                         env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=0.5).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("gateway did not become healthy")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None

    def metric(self, name: str) -> float:
        """The value of an unlabelled metric on the gateway's ``/metrics``."""
        text = httpx.get(self.url + "/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0
