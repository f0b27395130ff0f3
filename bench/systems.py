"""The systems the benchmark starts: the fake upstream, Redis, and the proxies under test
(the thin forwarder, Reef's gateway, LiteLLM's proxy), each in its own process on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.loadgen import API_KEY
from bench.procs import Child, StartError, free_port, http_ok, running, tcp_open

ROOT = Path(__file__).resolve().parent.parent
"""The repository root (the gateway runs from here, as ``python -m services.gateway``)."""
LITELLM_VERSION = "1.108.7"
"""The LiteLLM proxy we compare against (the newest whose proxy extras install here)."""
LITELLM_VENV = ROOT / "var" / "bench" / "litellm-venv"
"""LiteLLM's own virtualenv: it never goes into the project's."""
GATEWAY_MAIN = ROOT / "services" / "gateway" / "__main__.py"


@dataclass(frozen=True)
class Target:
    """A running HTTP server and the URL of its chat-completions endpoint."""

    name: str
    base_url: str
    """``http://127.0.0.1:<port>/v1``."""
    child: Child

    @property
    def chat_url(self) -> str:
        return self.base_url + "/chat/completions"


@contextmanager
def fake_upstream(log_dir: Path, cpus: frozenset[int] | None) -> Iterator[Target]:
    port = free_port()
    argv = [sys.executable, "-m", "bench.fake_upstream", "--port", str(port)]
    base = f"http://127.0.0.1:{port}/v1"
    with running("upstream", argv, log_dir, http_ok(base + "/models"), cpus, cwd=ROOT) as child:
        yield Target("direct", base, child)


@contextmanager
def redis_server(log_dir: Path, cpus: frozenset[int] | None) -> Iterator[tuple[str, Child]]:
    """A private, non-persistent Redis; yields its URL and process."""
    port = free_port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(log_dir)]
    with running("redis", argv, log_dir, tcp_open(port), cpus) as child:
        yield f"redis://127.0.0.1:{port}/0", child


@contextmanager
def thin_forwarder(log_dir: Path, cpus: frozenset[int] | None, upstream: str
                   ) -> Iterator[Target]:
    port = free_port()
    argv = [sys.executable, "-m", "bench.thin_forwarder", "--port", str(port),
            "--upstream", upstream]
    probe = http_ok(f"http://127.0.0.1:{port}/healthz")
    with running("thin", argv, log_dir, probe, cpus, cwd=ROOT) as child:
        yield Target("thin", f"http://127.0.0.1:{port}/v1", child)


@contextmanager
def reef_gateway(log_dir: Path, cpus: frozenset[int] | None, upstream: str, redis_url: str,
                 extra_env: dict[str, str] | None = None) -> Iterator[Target]:
    """Reef's gateway with auth, session tracking and recording to Redis; ``extra_env``
    adds or overrides ``REEF_*`` settings."""
    port = free_port()
    data_dir = log_dir / "gateway-data"
    data_dir.mkdir(exist_ok=True)
    env = {**os.environ, "REEF_PROFILE": "dev", "REEF_GATEWAY_HOST": "127.0.0.1",
           "REEF_GATEWAY_PORT": str(port), "REEF_UPSTREAM_BASE_URL": upstream,
           "REEF_REDIS_URL": redis_url, "REEF_API_KEYS": json.dumps({API_KEY: "bench"}),
           "REEF_DATA_DIR": str(data_dir), **(extra_env or {})}
    argv = [sys.executable, "-m", "services.gateway"]
    probe = http_ok(f"http://127.0.0.1:{port}/healthz")
    with running("gateway", argv, log_dir, probe, cpus, env=env, cwd=ROOT) as child:
        yield Target("gateway", f"http://127.0.0.1:{port}/v1", child)


def ensure_litellm() -> Path:
    """The ``litellm`` executable of its own venv, installed (pinned) when missing."""
    exe = LITELLM_VENV / "bin" / "litellm"
    python = LITELLM_VENV / "bin" / "python"
    if exe.exists() and _installed_litellm(python) == LITELLM_VERSION:
        return exe
    print(f"installing litellm[proxy]=={LITELLM_VERSION} into {LITELLM_VENV} "
          "(once; a few minutes) ...", flush=True)
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q",
                        f"litellm[proxy]=={LITELLM_VERSION}"], check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise StartError(f"could not install litellm[proxy]=={LITELLM_VERSION}: {exc}") from exc
    return exe


def _installed_litellm(python: Path) -> str:
    done = subprocess.run([str(python), "-c", "import importlib.metadata as m;"
                           "print(m.version('litellm'))"],
                          capture_output=True, text=True, check=False)
    return done.stdout.strip()


@contextmanager
def litellm_proxy(log_dir: Path, cpus: frozenset[int] | None, upstream: str
                  ) -> Iterator[Target]:
    """LiteLLM's proxy, one worker, master key on, the fake upstream as an OpenAI model."""
    exe = ensure_litellm()
    port = free_port()
    config = log_dir / "litellm_config.yaml"
    # JSON is YAML: no YAML library needed to write LiteLLM's config.
    config.write_text(json.dumps({
        "model_list": [{"model_name": "bench-model", "litellm_params": {
            "model": "openai/bench-model", "api_base": upstream, "api_key": "sk-upstream"}}],
        "general_settings": {"master_key": API_KEY},
    }, indent=2))
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
    argv = [str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
            "--num_workers", "1"]
    probe = http_ok(f"http://127.0.0.1:{port}/health/liveliness")
    with running("litellm", argv, log_dir, probe, cpus, env=env, cwd=log_dir,
                 timeout=180) as child:
        yield Target("litellm", f"http://127.0.0.1:{port}/v1", child)
