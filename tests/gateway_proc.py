"""Start ``python -m services.gateway`` as a real process for tests."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import free_port
from tests.service_proc import ServiceProcess

API_KEY = "sk-test-key-alpha"
OTHER_KEY = "sk-test-key-beta"
METRICS_KEY = "metrics-test-key"
METRICS_AUTH = {"Authorization": f"Bearer {METRICS_KEY}"}


class GatewayProcess(ServiceProcess):
    """A gateway subprocess on a free port; ``env`` entries override the defaults."""

    def __init__(self, redis_url: str, upstream_url: str, namespace: str, data_dir: Path,
                 env: dict[str, str] | None = None) -> None:
        port = free_port()
        self.namespace = namespace
        super().__init__("services.gateway", {
            "REEF_PROFILE": "prod",
            "REEF_NAMESPACE": namespace,
            "REEF_REDIS_URL": redis_url,
            "REEF_UPSTREAM_BASE_URL": upstream_url,
            "REEF_UPSTREAM_API_KEY": "sk-upstream-secret",
            "REEF_METRICS_KEY": METRICS_KEY,
            "REEF_API_KEYS": f'{{"{API_KEY}": "alpha", "{OTHER_KEY}": "beta"}}',
            "REEF_GATEWAY_PORT": str(port),
            "REEF_UPSTREAM_TIMEOUT_SECONDS": "3",
            "REEF_UPSTREAM_RETRIES": "1",
            "REEF_MAX_BODY_BYTES": "65536",
            **(env or {}),
        }, data_dir, port, "/healthz")
