"""docker-compose.yml, .env.example and deploy/Dockerfile, checked without a Docker engine.

Debian's ``docker-compose`` (v1, ``make install-test-system``) renders the file offline with a
temporary ``.env``; the tests read the rendered services. Each Reef service's environment
is then given to the real image entrypoint (``deploy/entrypoint.sh``) and to Reef's own
``Settings``: what compose passes must be a configuration the services accept, and the
placeholders of ``.env.example`` one they refuse.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.settings import Settings
from tests.conftest import free_port

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
PROMETHEUS = REPO / "deploy" / "prometheus" / "prometheus.yml"

REEF_SERVICES = {"gateway", "scorer", "skill-miner", "trainer", "policy", "jobs"}
WORKERS = {"scorer": "9101", "skill-miner": "9103", "trainer": "9102", "jobs": "9104"}
"""Stream consumers and their metrics ports."""
ALL_SERVICES = REEF_SERVICES | {"redis", "prometheus", "grafana"}

TEST_ENV = {
    "REDIS_PASSWORD": "redis-pw-7f3a9c1e5b",
    "REEF_API_KEYS": '{"sk-compose-test-4d2e8a": "team-a"}',
    "REEF_ADMIN_KEY": "admin-key-91b7c3d5e2",
    "REEF_METRICS_KEY": "metrics-key-2c8e6f0a4d",
    "REEF_UPSTREAM_API_KEY": "upstream-key-8b3f1c7e2a",
    "GRAFANA_ADMIN_PASSWORD": "grafana-pw-5e1d7b",
}
"""Real-looking secrets for the temporary .env (the example's placeholders are refused)."""


def docker_compose() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is not installed (make install-test-system installs it)")
    return exe


def env_example() -> dict[str, str]:
    """The variables of .env.example (comments and blank lines skipped)."""
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value
    return values


def render(tmp_path: Path, env: dict[str, str]) -> dict[str, Any]:
    """``docker-compose config`` with ``env`` as the .env file, parsed."""
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    result = subprocess.run(
        [docker_compose(), "--env-file", str(env_file), "-f", str(COMPOSE), "config"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return render(tmp_path_factory.mktemp("compose"), {**env_example(), **TEST_ENV})


def seconds(duration: str) -> float:
    """A compose duration (``1m30s``, ``45s``, ``500ms``) in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def settings_in_container(environment: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """Build Reef's Settings from ``environment`` as the image would: through
    deploy/entrypoint.sh, in a fresh interpreter, with no .env or reef.toml around."""
    env = {k: str(v) for k, v in environment.items()}
    env["PATH"] = os.environ["PATH"]
    env["PYTHONPATH"] = str(REPO)
    code = "from shared.settings import Settings; Settings()"
    return subprocess.run(["sh", str(REPO / "deploy" / "entrypoint.sh"), sys.executable, "-c",
                           code], cwd=Path("/"), env=env, capture_output=True, text=True,
                          timeout=60)


# --- the rendered file ------------------------------------------------------------------------

def test_compose_file_has_every_service(rendered: dict[str, Any]) -> None:
    assert set(rendered["services"]) == ALL_SERVICES


def test_scorer_scales_no_container_names_no_host_ports(rendered: dict[str, Any]) -> None:
    services = rendered["services"]
    for name in WORKERS:
        assert "container_name" not in services[name], name
        assert "ports" not in services[name], name
    # No fixed names anywhere: two Reefs (or a scaled service) never collide.
    assert not [n for n, s in services.items() if "container_name" in s]
    # Only the gateway, Prometheus and Grafana are published, on loopback.
    published = {n: s["ports"] for n, s in services.items() if "ports" in s}
    assert set(published) == {"gateway", "prometheus", "grafana"}
    for ports in published.values():
        assert all(str(p).startswith("127.0.0.1:") for p in ports), ports


def test_every_service_has_a_health_check(rendered: dict[str, Any]) -> None:
    for name, service in rendered["services"].items():
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), name
    for name in REEF_SERVICES:
        test = rendered["services"][name]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "/app/deploy/healthcheck.py"], name
    for name, port in WORKERS.items():
        assert rendered["services"][name]["healthcheck"]["test"][3] == (
            f"http://127.0.0.1:{port}/metrics")


def test_redis_is_durable_and_password_protected(rendered: dict[str, Any]) -> None:
    redis = rendered["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--requirepass" in command
    assert redis["environment"]["REDIS_PASSWORD"] == TEST_ENV["REDIS_PASSWORD"]
    # The secret is expanded at run time, not written into the command line.
    assert TEST_ENV["REDIS_PASSWORD"] not in command
    for name in REEF_SERVICES:
        env = rendered["services"][name]["environment"]
        assert env["REEF_REDIS_PASSWORD"] == TEST_ENV["REDIS_PASSWORD"], name
        assert env["REEF_REDIS_URL"] == "redis://redis:6379/0", name


def test_volumes_are_named(rendered: dict[str, Any]) -> None:
    declared = set(rendered["volumes"])
    used: set[str] = set()
    for name, service in rendered["services"].items():
        for volume in service.get("volumes", []):
            source, _target, *mode = volume.split(":") if isinstance(volume, str) else (
                volume["source"], volume["target"])
            if source.startswith("/"):
                # Bind mounts: only the read-only config under deploy/.
                assert Path(source).is_relative_to(REPO / "deploy"), (name, volume)
                assert mode == ["ro"], (name, volume)
            else:
                assert source in declared, (name, volume)
                used.add(source)
    assert used == declared
    for name in ("redis", "trainer", "policy", "gateway", "prometheus", "grafana"):
        assert rendered["services"][name].get("volumes"), name
    # The trainer writes adapters where the policy server loads them from.
    def named(service: str) -> set[str]:
        return {v.split(":")[0] for v in rendered["services"][service]["volumes"]}
    assert "reef-data" in named("trainer") & named("policy")


def test_stop_grace_period_exceeds_the_worker_block_timeout(rendered: dict[str, Any]) -> None:
    for name in REEF_SERVICES:
        service = rendered["services"][name]
        block_ms = int(service["environment"].get("REEF_WORKER_BLOCK_MS",
                                                  Settings.model_fields["worker_block_ms"].default))
        grace = seconds(service["stop_grace_period"])
        assert grace > block_ms / 1000, (name, grace, block_ms)
        # Docker's default is 10 s; the batch in hand needs more than the block time.
        assert grace >= 2 * block_ms / 1000 + 10, (name, grace)


def test_workers_expose_metrics_with_the_metrics_key(rendered: dict[str, Any]) -> None:
    services = rendered["services"]
    for name, port in WORKERS.items():
        env = services[name]["environment"]
        assert env["REEF_METRICS_PORT"] == port, name
        assert port in [str(p) for p in services[name]["expose"]], name
    for name in REEF_SERVICES:
        assert services[name]["environment"]["REEF_METRICS_KEY"] == TEST_ENV["REEF_METRICS_KEY"]
    assert services["prometheus"]["environment"]["REEF_METRICS_KEY"] == (
        TEST_ENV["REEF_METRICS_KEY"])


def test_prometheus_scrapes_each_worker_on_its_compose_port(rendered: dict[str, Any]) -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for name, port in {**WORKERS, "gateway": "8000"}.items():
        job = jobs[name]
        [sd] = job["dns_sd_configs"]
        assert (sd["names"], str(sd["port"]), sd["type"]) == ([name], port, "A"), name
        assert job["authorization"]["type"] == "Bearer"
        # The file the prometheus service writes from REEF_METRICS_KEY before it starts.
        assert job["authorization"]["credentials_file"] in " ".join(
            rendered["services"]["prometheus"]["command"])


def test_grafana_is_provisioned(rendered: dict[str, Any]) -> None:
    grafana = rendered["services"]["grafana"]
    mounts = {v.split(":")[1]: Path(v.split(":")[0]) for v in grafana["volumes"]}
    provisioning = mounts["/etc/grafana/provisioning"]
    assert (provisioning / "datasources" / "prometheus.yml").is_file()
    provider = yaml.safe_load((provisioning / "dashboards" / "reef.yml").read_text())
    dashboards = mounts[provider["providers"][0]["options"]["path"]]
    assert sorted(p.name for p in dashboards.glob("*.json")) == [
        "reef-learning.json", "reef-pipeline.json", "reef-serving.json", "reef-skills.json"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (dashboards / Path(home).name).is_file()
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


# --- .env.example -----------------------------------------------------------------------------

def test_every_compose_variable_is_in_env_example() -> None:
    text = COMPOSE.read_text()
    used = set(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", text))
    listed = set(env_example())
    assert used - listed == set(), "missing from .env.example"
    assert listed - used == set(), "in .env.example but not used by docker-compose.yml"


def test_compose_refuses_to_render_without_the_secrets(tmp_path: Path) -> None:
    env = {k: v for k, v in env_example().items() if k != "REEF_METRICS_KEY"}
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    result = subprocess.run(
        [docker_compose(), "--env-file", str(env_file), "-f", str(COMPOSE), "config"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    assert result.returncode != 0
    assert "set REEF_METRICS_KEY in .env" in result.stderr


def test_services_accept_what_compose_passes(rendered: dict[str, Any]) -> None:
    """Every Reef service's environment (optional settings left empty in .env included)
    builds Settings in the prod profile once the entrypoint has dropped the empty ones."""
    empty = set()
    for name in sorted(REEF_SERVICES):
        environment = rendered["services"][name]["environment"]
        assert environment["REEF_PROFILE"] == "prod"
        empty |= {k for k, v in environment.items() if v == ""}
        result = settings_in_container(environment)
        assert result.returncode == 0, (name, result.stderr[-2000:])
    # Without the entrypoint these would be refused ("" is a placeholder secret).
    assert {"REEF_PRM_API_KEY", "TINKER_API_KEY"} <= empty


def test_the_policy_server_gets_the_key_the_gateway_sends(rendered: dict[str, Any],
                                                          tmp_path: Path) -> None:
    """The policy server is closed: it requires the gateway's upstream key, which .env
    must set (compose refuses to render without it)."""
    services = rendered["services"]
    key = TEST_ENV["REEF_UPSTREAM_API_KEY"]
    assert services["policy"]["environment"]["REEF_UPSTREAM_API_KEY"] == key
    assert services["gateway"]["environment"]["REEF_UPSTREAM_API_KEY"] == key
    assert "ports" not in services["policy"]  # reachable on the compose network only
    env = {k: v for k, v in {**env_example(), **TEST_ENV}.items()
           if k != "REEF_UPSTREAM_API_KEY"}
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    result = subprocess.run(
        [docker_compose(), "--env-file", str(env_file), "-f", str(COMPOSE), "config"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    assert result.returncode != 0
    assert "set REEF_UPSTREAM_API_KEY in .env" in result.stderr


def test_services_refuse_the_example_placeholders(tmp_path: Path) -> None:
    rendered = render(tmp_path, env_example())
    result = settings_in_container(rendered["services"]["gateway"]["environment"])
    assert result.returncode != 0
    assert "placeholder" in result.stderr


def test_entrypoint_drops_only_empty_reef_variables(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "REEF_EMPTY": "", "REEF_SET": "x",
           "AZURE_OPENAI_API_KEY": "", "TINKER_API_KEY": "", "OTHER_EMPTY": ""}
    result = subprocess.run(["sh", str(REPO / "deploy" / "entrypoint.sh"), "env"],
                            env=env, capture_output=True, text=True, timeout=10, check=True)
    names = {line.partition("=")[0] for line in result.stdout.splitlines()}
    assert {"REEF_SET", "OTHER_EMPTY"} <= names
    assert not names & {"REEF_EMPTY", "AZURE_OPENAI_API_KEY", "TINKER_API_KEY"}


# --- the Dockerfile -----------------------------------------------------------------------------

def dockerfile_stages() -> dict[str, list[str]]:
    """Instructions per stage (continuation lines joined, comments dropped)."""
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    text = re.sub(r"\\\n", " ", "\n".join(
        line for line in DOCKERFILE.read_text().splitlines()
        if not line.lstrip().startswith("#")))
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        if words[0].upper() == "FROM":
            current = stages.setdefault(words[-1] if "AS" in
                                        [w.upper() for w in words] else words[1], [])
        current.append(line.strip())
    return stages


def test_dockerfile_targets_run_as_non_root_and_light_has_no_torch(
        rendered: dict[str, Any]) -> None:
    stages = dockerfile_stages()
    targets = {s["build"]["target"] for n, s in rendered["services"].items() if "build" in s}
    assert targets == {"light", "torch"}
    for name in ("scorer", "skill-miner", "gateway"):
        assert rendered["services"][name]["build"]["target"] == "light", name
    for name in ("trainer", "policy"):
        assert rendered["services"][name]["build"]["target"] == "torch", name
    for target in targets:
        users = [line.split()[1] for line in stages[target] if line.upper().startswith("USER ")]
        assert users and users[-1] not in ("root", "0"), target
        # Multi-stage: the runtime copies a built virtual environment, it builds nothing.
        assert any(line.startswith("COPY --from=build-") for line in stages[target]), target
        assert not any(line.upper().startswith("RUN PIP") for line in stages[target]), target
    light_build = " ".join(stages["build-light"])
    assert "torch" not in light_build and "pip install ." in light_build
    torch_build = " ".join(stages["build-torch"])
    assert "--index-url https://download.pytorch.org/whl/cpu torch==" in torch_build
    assert "'.[policy,tinker]'" in torch_build
    runtime = " ".join(stages["runtime"])
    assert "useradd --uid 10001" in runtime
    assert 'ENTRYPOINT ["/app/deploy/entrypoint.sh"]' in runtime


def test_dockerfile_extras_exist_in_pyproject() -> None:
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert {"policy", "tinker"} <= set(extras)
    # The light image's dependencies (the core) carry no torch.
    core = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [d for d in core if d.startswith(("torch", "transformers"))]


# --- the health check script -------------------------------------------------------------------

class _Protected(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        ok = self.headers.get("Authorization") == "Bearer k-123"
        self.send_response(200 if ok else 401)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def protected_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Protected)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/metrics"
    server.shutdown()
    server.server_close()


def test_healthcheck_sends_the_metrics_key(protected_url: str) -> None:
    script = str(REPO / "deploy" / "healthcheck.py")

    def check(env: dict[str, str], url: str = protected_url) -> int:
        return subprocess.run([sys.executable, script, url], timeout=20,
                              env={"PATH": os.environ["PATH"], **env}).returncode

    assert check({"REEF_METRICS_KEY": "k-123"}) == 0
    assert check({}) == 1
    assert check({"REEF_METRICS_KEY": "wrong"}) == 1
    assert check({"REEF_METRICS_KEY": "k-123"}, f"http://127.0.0.1:{free_port()}/") == 1
