"""Starting Reef's services as local processes: the serving path, and the learning loop.

The serving path is Redis (a private one when none is reachable), the embedded policy
server and the gateway. The learning loop adds the scorer and the trainer, with settings
sized for the embedded SmolLM2-135M on a 2-core CPU (:data:`LOOP_ENV`); any of them can
be overridden through ``env``.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from services.stack.procs import Stack, free_port, redis_reachable
from shared.settings import Settings

LOOP_ENV: dict[str, str] = {
    "REEF_MODE": "rl",
    "REEF_LOSS_FN": "tis",
    "REEF_TIS_CAP": "2",
    "REEF_LORA_RANK": "16",
    "REEF_LORA_ALPHA": "32",
    "REEF_LEARNING_RATE": "1e-3",
    "REEF_BATCH_SIZE": "16",
    "REEF_MAX_STALENESS": "2",
}
"""Trainer settings for SmolLM2-135M on 2 CPU cores: LoRA r=16 (alpha 32) on q/k/v/o, 16
samples per step, lr 1e-3 (the brief measured 5e-4 learning brevity in 25-30 steps and 2e-4
as too slow; ``bench --part learning`` at 1e-3 learns it in ~10 steps and stays on topic
over 32). Truncated importance sampling (weights capped at 2, the default loss) rather than
a clip around 1: answers are sampled below temperature 1 (at 1.0 this small model rambles
off topic), the policy server reports the logprobs of that tempered distribution and the
trainer's policy is untempered, so ratios start away from 1 (at 0.8: ~40% of tokens
outside 1 +- 0.2 on the first step). PPO would drop those tokens' gradient and CISPO's
clip would bias their weight; TIS keeps the right weight up to the cap."""

COMMON_ENV: dict[str, str] = {
    "REEF_PROFILE": "dev",
    # Spin-waiting OpenMP threads made one sampling call 10-20x slower on 2 shared cores.
    "OMP_WAIT_POLICY": "PASSIVE",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}
"""Environment of every service of the local stack."""

SKILLS_ENV: dict[str, str] = {
    "REEF_USE_SKILLS": "true",
    "REEF_ENABLE_SKILL_EVOLUTION": "true",
    "REEF_MINER_BACKEND": "corrections",
    "REEF_SKILL_AUTO_PROMOTE": "true",
}
"""The skill loop with no API key: the gateway injects skills, the skill-miner turns the
user's corrections into preference skills (no LLM) and promotes them at once."""

LOCAL_TENANT = "local"
"""The tenant of the local stack's one API key; the trainer trains its adapter
(``shared.keys.adapter_for(adapter_name, LOCAL_TENANT)``)."""

READY_TIMEOUT_SECONDS = 600.0
"""How long the policy server may take to come up (the first run converts the model)."""


STATE_FILE = "stack.json"
"""Where ``reef dev`` writes the running stack's ``StackInfo`` (in the data dir), for
``reef chat`` and ``reef openclaw``."""


@dataclass(frozen=True)
class StackInfo:
    """How to reach a running local stack (``dev`` writes it to a file for ``chat``)."""

    gateway_url: str
    api_key: str
    redis_url: str
    model: str
    namespace: str
    policy_url: str
    scorer_metrics_url: str = ""
    trainer_metrics_url: str = ""
    skill_miner_metrics_url: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_file(cls, path: Path) -> StackInfo:
        data = json.loads(path.read_text())
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def share_models(source_dir: Path, data_dir: Path) -> None:
    """Make ``data_dir`` use ``source_dir``'s converted models (converted once, ~1 min),
    so that a run can have a data dir of its own (fresh adapter, own logs)."""
    models = source_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    link = data_dir / "models"
    if not link.exists():
        link.symlink_to(models.resolve(), target_is_directory=True)


def ensure_redis(settings: Settings, stack: Stack) -> str:
    """The configured Redis when it answers, else a private ``redis-server``'s URL."""
    if redis_reachable(settings.redis_url):
        print(f"redis    : using {settings.redis_url}", flush=True)
        return settings.redis_url
    url = stack.start_redis()
    print(f"redis    : started a private redis-server at {url}", flush=True)
    return url


def start_stack(settings: Settings, stack: Stack, *, learning: bool = False,
                skills: bool = False, env: dict[str, str] | None = None) -> StackInfo:
    """Redis, policy server and gateway; with ``learning`` also the scorer and the
    trainer, with ``skills`` (and ``learning``) also the skill-miner (:data:`SKILLS_ENV`).
    ``env`` is added to every service's environment (after :data:`LOOP_ENV`)."""
    redis_url = ensure_redis(settings, stack)
    common = {**COMMON_ENV, "REEF_REDIS_URL": redis_url, "REEF_DATA_DIR": str(settings.data_dir),
              "REEF_NAMESPACE": settings.namespace, "REEF_MODEL_NAME": settings.model_name,
              "REEF_ADAPTER_NAME": settings.adapter_name,
              "REEF_TRAIN_TENANTS": json.dumps([LOCAL_TENANT]),
              **(LOOP_ENV if learning else {}), **(SKILLS_ENV if skills else {}),
              **(env or {})}
    policy_url = start_policy(stack, common)
    key = "sk-reef-local-" + secrets.token_hex(8)
    gateway_url = start_gateway(stack, common, policy_url, key)
    info = StackInfo(gateway_url=gateway_url, api_key=key, redis_url=redis_url,
                     model=settings.model_name, namespace=settings.namespace,
                     policy_url=policy_url)
    if learning:
        info = StackInfo(**{**asdict(info), **start_learners(stack, common, skills=skills)})
    print(f"gateway  : {gateway_url}/v1  (API key {key})", flush=True)
    return info


def start_policy(stack: Stack, common: dict[str, str]) -> str:
    port = free_port()
    print("policy   : starting the embedded model (the first run converts it, ~1 min) ...",
          flush=True)
    stack.start_service("policy", {**common, "REEF_POLICY_PORT": str(port)})
    url = f"http://127.0.0.1:{port}"
    stack.wait_http("policy", url + "/readyz", timeout=READY_TIMEOUT_SECONDS)
    return url


def start_gateway(stack: Stack, common: dict[str, str], policy_url: str, key: str) -> str:
    port = free_port()
    stack.start_service("gateway", {
        **common, "REEF_GATEWAY_PORT": str(port), "REEF_UPSTREAM_BASE_URL": policy_url + "/v1",
        "REEF_API_KEYS": json.dumps({key: LOCAL_TENANT}),
        "REEF_REQUEST_LOGPROBS": "true", "REEF_REQUEST_TOKEN_IDS": "true",
        # The previous adapter only needs to outlive the requests that started on it.
        "REEF_ADAPTER_UNLOAD_GRACE_SECONDS": common.get(
            "REEF_ADAPTER_UNLOAD_GRACE_SECONDS", "20")})
    url = f"http://127.0.0.1:{port}"
    stack.wait_http("gateway", url + "/healthz", timeout=60)
    return url


def start_learners(stack: Stack, common: dict[str, str], *, skills: bool = False
                   ) -> dict[str, str]:
    """The scorer and the trainer (and with ``skills`` the skill-miner), each with a
    ``/metrics`` port; their metrics URLs."""
    urls = {}
    names = ("scorer", "trainer", "skill_miner") if skills else ("scorer", "trainer")
    for name in names:
        port = free_port()
        stack.start_service(name, {**common, "REEF_METRICS_PORT": str(port),
                                   "REEF_WORKER_BLOCK_MS": "500"})
        urls[f"{name}_metrics_url"] = f"http://127.0.0.1:{port}/metrics"
    for name in names:
        stack.wait_http(name, urls[f"{name}_metrics_url"], timeout=120)
        print(f"{name:<9}: running (metrics {urls[f'{name}_metrics_url']})", flush=True)
    return urls
