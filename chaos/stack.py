"""The whole pipeline as restartable processes, for the chaos run and the soak.

redis-server (private, AOF with ``appendfsync always``), the faulty fake upstream, the
miner's fake LLM, the gateway, two scorers, a skill-miner and a trainer, each started the
way a deployment starts it (``python -m services.<name>`` with ``REEF_*`` settings; the
trainer as ``python -m chaos.trainer``: the real service on a backend that fails on
purpose). The trainer's gate is on; its regression check is off (``gate_tolerance``
1000: the random rewards of the load teach nothing), its shift check on, which the
forced refusals trip.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from chaos.procs import Proc, ProcError, free_port, http_ok, python_proc, redis_proc, tcp_open
from shared.keys import adapter_for

API_KEY = "chaos-key"
TENANT = "chaos"
NAMESPACE = "chaos"
ADAPTER = "chaos"
TRAINED = adapter_for(ADAPTER, TENANT)
"""The first tenant's adapter (``chaos-chaos``)."""
MODEL = "chaos-model"


@dataclass(frozen=True)
class Tenant:
    """A tenant of the run: its API key, and the trainer process that trains its adapter."""

    name: str
    api_key: str
    trainer: str

    @property
    def adapter(self) -> str:
        return adapter_for(ADAPTER, self.name)


TENANTS = (Tenant(TENANT, API_KEY, "trainer"), Tenant("chaos-b", "chaos-key-b", "trainer-b"))
"""Two tenants, each with a trainer process of its own: every turn of one must be trained
into its own adapter only."""
WORKERS = ("scorer-1", "scorer-2", "skill-miner", *(t.trainer for t in TENANTS))
"""The stream workers, by process name."""


@dataclass(frozen=True)
class StackConfig:
    """What differs between runs of the stack."""

    data_dir: Path
    error_rate: float = 0.03
    """Share of upstream requests answered 500."""
    timeout_rate: float = 0.02
    """Share of upstream requests held past the gateway's upstream timeout."""
    upstream_timeout: float = 1.5
    """The gateway's upstream timeout (seconds); the upstream hangs twice as long."""
    batch_size: int = 32
    """The trainer's batch size."""
    with_trainer: bool = True
    tenants: tuple[Tenant, ...] = TENANTS
    """The tenants (the first one's key drives a single-tenant load); one trainer each."""
    seed: int | None = None
    poison_rate: float = 0.0
    """Share of upstream answers holding the token the chaos trainer refuses to train
    (``chaos.trainer``: their batches are quarantined)."""
    transient_rate: float = 0.0
    """Share of the trainer's forward_backward calls failing transiently."""
    refuse_rate: float = 0.0
    """Share of the trainer's candidates the gate is made to refuse."""


@dataclass
class Stack:
    """The processes of one run, by name."""

    config: StackConfig
    redis_url: str = ""
    gateway_url: str = ""
    procs: dict[str, Proc] = field(default_factory=dict)

    @property
    def log_dir(self) -> Path:
        return self.config.data_dir / "logs"

    def build(self) -> None:
        """Create every process (nothing is started)."""
        c, logs = self.config, self.log_dir
        redis_port, upstream_port, llm_port, gw_port = (free_port() for _ in range(4))
        self.redis_url = f"redis://127.0.0.1:{redis_port}/0"
        self.gateway_url = f"http://127.0.0.1:{gw_port}"
        self.procs["redis"] = redis_proc(redis_port, c.data_dir / "redis", logs)
        self.procs["upstream"] = python_proc(
            "upstream", "chaos.upstream",
            ["--port", str(upstream_port), "--error-rate", str(c.error_rate),
             "--timeout-rate", str(c.timeout_rate), "--hang-seconds",
             str(c.upstream_timeout * 2), "--poison-rate", str(c.poison_rate),
             *(["--seed", str(c.seed)] if c.seed is not None else [])],
            {}, logs, http_ok(f"http://127.0.0.1:{upstream_port}/stats"))
        self.procs["llm"] = python_proc("llm", "chaos.llm_server", ["--port", str(llm_port)],
                                        {}, logs, tcp_open(llm_port))
        base = self._common_env()
        self.procs["gateway"] = python_proc("gateway", "services.gateway", [], {
            **base, "REEF_GATEWAY_HOST": "127.0.0.1", "REEF_GATEWAY_PORT": str(gw_port),
            "REEF_API_KEYS": json.dumps({t.api_key: t.name for t in c.tenants}),
            "REEF_DATA_DIR": str(c.data_dir / "gateway"),
            "REEF_UPSTREAM_BASE_URL": f"http://127.0.0.1:{upstream_port}/v1",
            "REEF_UPSTREAM_TIMEOUT_SECONDS": str(c.upstream_timeout),
            "REEF_REQUEST_LOGPROBS": "true", "REEF_REQUEST_TOKEN_IDS": "true",
        }, logs, http_ok(f"{self.gateway_url}/healthz"))
        for name in ("scorer-1", "scorer-2"):
            self._worker(name, "services.scorer", {**base, "REEF_USE_PRM": "false"})
        self._worker("skill-miner", "services.skill_miner", {
            **base, "REEF_ENABLE_SKILL_EVOLUTION": "true", "REEF_RETRIEVAL_MODE": "bm25",
            "REEF_MINER_BASE_URL": f"http://127.0.0.1:{llm_port}/v1",
            "REEF_MINER_MODEL": "fake-miner"})
        if c.with_trainer:
            for tenant in c.tenants:
                self._trainer(tenant, base)

    def _trainer(self, tenant: Tenant, base: dict[str, str]) -> None:
        """The tenant's trainer: ``chaos.trainer``, faults as configured."""
        c = self.config
        self._worker(tenant.trainer, "chaos.trainer", {
            **base, "REEF_MODE": "rl", "REEF_BACKEND": "local",
            "REEF_MODEL_NAME": str(self.tiny_model_dir()),
            "REEF_ADAPTER_NAME": ADAPTER, "REEF_TRAIN_TENANTS": json.dumps([tenant.name]),
            "REEF_GATE_ENABLED": "true",
            "REEF_GATE_MAX_SHIFT": "1.0", "REEF_GATE_TOLERANCE": "1000",
            "REEF_TRAINER_RETRY_BACKOFF_SECONDS": "0.2",
            "CHAOS_TRANSIENT_RATE": str(c.transient_rate),
            "CHAOS_REFUSE_RATE": str(c.refuse_rate),
            **({"CHAOS_SEED": str(c.seed)} if c.seed is not None else {}),
            "REEF_BATCH_SIZE": str(c.batch_size), "REEF_LORA_RANK": "4",
            "REEF_LORA_ALPHA": "8", "REEF_MAX_STALENESS": "1000000",
            "REEF_MAX_STEPS": "1000000", "OMP_NUM_THREADS": "1",
            "REEF_DATA_DIR": str(c.data_dir / tenant.trainer)}, ready_timeout=180)

    def tiny_model_dir(self) -> Path:
        return self.config.data_dir.parent / "tiny-llama"

    def _common_env(self) -> dict[str, str]:
        return {"REEF_PROFILE": "dev", "REEF_NAMESPACE": NAMESPACE,
                "REEF_REDIS_URL": self.redis_url, "REEF_LOG_LEVEL": "WARNING",
                "REEF_DATA_DIR": str(self.config.data_dir / "services"),
                "REEF_WORKER_BLOCK_MS": "200", "REEF_WORKER_CLAIM_IDLE_MS": "3000",
                "REEF_SWEEP_INTERVAL_SECONDS": "0.5", "REEF_SESSION_IDLE_SECONDS": "3",
                "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1"}

    def _worker(self, name: str, module: str, env: dict[str, str],
                ready_timeout: float = 90.0) -> None:
        port = free_port()
        self.procs[name] = python_proc(name, module, [], {**env, "REEF_METRICS_PORT": str(port)},
                                       self.log_dir, http_ok(f"http://127.0.0.1:{port}/metrics"),
                                       ready_timeout)

    def start(self, wait_workers: bool = True) -> None:
        """Start every process (Redis first), then wait until each is ready (the stream
        workers only with ``wait_workers``: a load can start before they consume). The
        trainer's tiny model is built meanwhile, when missing, and the trainer after it."""
        tiny = self.tiny_model_dir()
        builder = None
        if self.config.with_trainer and not (tiny / "config.json").is_file():
            builder = subprocess.Popen([sys.executable, "-m", "chaos.tiny_model", str(tiny)],
                                       stdout=subprocess.DEVNULL)
        self.procs["redis"].start()
        self.procs["redis"].wait_ready()
        trainers = [t.trainer for t in self.config.tenants if t.trainer in self.procs]
        for name, proc in self.procs.items():
            if name != "redis" and name not in trainers:
                proc.start()
        if builder is not None and builder.wait() != 0:
            raise ProcError("building the trainer's tiny model failed")
        for name in trainers:
            self.procs[name].start()
        for name, proc in self.procs.items():
            if wait_workers or name not in WORKERS:
                proc.wait_ready()

    def wait_ready(self) -> None:
        """Wait until every process is ready."""
        for proc in self.procs.values():
            proc.wait_ready()

    def restart(self, name: str, wait: bool = True) -> None:
        """SIGKILL one process and start it again (and wait until it is ready)."""
        proc = self.procs[name]
        proc.kill()
        proc.start()
        if wait:
            proc.wait_ready()

    def close(self) -> None:
        """Stop the services first (gracefully), Redis last."""
        for name, proc in reversed(list(self.procs.items())):
            if name != "redis":
                proc.stop()
        if "redis" in self.procs:
            self.procs["redis"].stop()

    def pids(self) -> dict[str, int]:
        """The live processes' ids, by name."""
        return {name: p.pid for name, p in self.procs.items() if p.alive() and p.pid}

