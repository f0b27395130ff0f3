"""Prometheus and the Grafana dashboards under deploy/, against a stack that really runs.

``promtool`` checks deploy/prometheus (config and alert rules). Then the gateway (in front
of the fake upstream), a scorer (with the fake judge), a skill-miner (with the fake LLM) and
a trainer (local backend, the embedded SmolLM2) run as processes on free ports; traffic
goes through the gateway with the official ``openai`` client; a real ``prometheus``
(Debian's package, ``make install-test-system``) scrapes them every second with the scrape
jobs of deploy/prometheus/prometheus.yml (its DNS discovery swapped for the local ports)
and evaluates deploy/prometheus/alerts.yml. Every target must be up, every rule must
evaluate, and every query of every panel of every dashboard must return data.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
import yaml

from shared.keys import TURNS, Keys
from shared.settings import Settings
from tests.conftest import RedisServer, free_port
from tests.fake_judge import FakeJudge
from tests.fake_llm import FakeLLM
from tests.fake_upstream import FakeUpstream
from tests.gateway_proc import API_KEY, GatewayProcess
from tests.service_proc import ServiceProcess
from tests.test_policy import policy_data_dir

_FIXTURES = (policy_data_dir,)

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
JOBS = {"gateway", "scorer", "skill-miner", "trainer", "policy", "jobs", "prometheus"}

METRICS_KEY = "obs-metrics-key-5f2a9c"
"""Set on every service when Reef has the ``metrics_key`` setting (then /metrics needs it)."""
HAS_METRICS_KEY = "metrics_key" in Settings.model_fields
RATE_INTERVAL = "1m"
"""What ``$__rate_interval`` stands for here (Grafana computes it from the scrape interval)."""

SKILL = {"name": "check-file-paths", "category": "coding",
         "description": "Check that a file path exists before editing the file.",
         "body": "When the user asks to edit a file, confirm the file path exists first. "
                 "Questions go to owner@example.com."}
"""The fake miner LLM's proposal; the e-mail address is redacted by the miner."""


def need(exe: str) -> str:
    path = shutil.which(exe)
    if path is None:
        pytest.fail(f"{exe} is not installed "
                    "(make install-test-system installs Debian's prometheus)")
    return path


def metrics_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {METRICS_KEY}"} if HAS_METRICS_KEY else {}


def wait_for(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


class Proc(ServiceProcess):
    """A service process started in two halves (spawn all, then wait for each), whose
    readiness probe sends the metrics key."""

    def spawn(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", self.module], env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.module} exited: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + self.ready_path, headers=metrics_headers(),
                             timeout=0.5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.module} did not become ready: "
                           f"{self.log_path.read_text()[-3000:]}")


def value(proc: ServiceProcess, name: str, **labels: str) -> float:
    """Sum of a metric's samples on ``proc``'s /metrics whose labels include ``labels``."""
    text = httpx.get(proc.url + "/metrics", headers=metrics_headers(), timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")) and all(
                f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def worker(module: str, redis_url: str, namespace: str, data_dir: Path,
           env: dict[str, str]) -> Proc:
    port = free_port()
    base = {"REEF_PROFILE": "dev", "REEF_NAMESPACE": namespace, "REEF_REDIS_URL": redis_url,
            "REEF_METRICS_PORT": str(port), "REEF_WORKER_BLOCK_MS": "200",
            "REEF_WORKER_CLAIM_IDLE_MS": "1000", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    if HAS_METRICS_KEY:
        base["REEF_METRICS_KEY"] = METRICS_KEY
    return Proc(module, {**base, **env}, data_dir, port, "/metrics")


# --- promtool -------------------------------------------------------------------------------

def test_promtool_checks_config_and_rules(tmp_path: Path) -> None:
    promtool = need("promtool")
    syntax = subprocess.run([promtool, "check", "config", "--syntax-only",
                             str(PROMETHEUS_CONFIG)], capture_output=True, text=True, timeout=60)
    assert syntax.returncode == 0, syntax.stdout + syntax.stderr
    # The full check also opens the rule files and the credentials file: give it one
    # where the container would have it.
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    key_file = tmp_path / "metrics_key"
    key_file.write_text("k")
    for job in config["scrape_configs"]:
        if "authorization" in job:
            job["authorization"]["credentials_file"] = str(key_file)
    config["rule_files"] = [str(ALERTS)]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    full = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert full.returncode == 0, full.stdout + full.stderr
    assert "SUCCESS: 1 rule files found" in full.stdout + full.stderr
    rules = subprocess.run([promtool, "check", "rules", str(ALERTS)],
                           capture_output=True, text=True, timeout=60)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    names = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    assert {"ReefStreamLagGrowing", "ReefDeadLetters", "ReefJudgeErrorRate",
            "ReefTrainerStalled", "ReefRewardDropping"} <= names
    # The rules' own unit tests (series in, alerts out): deploy/prometheus/alerts.test.yml.
    tested = subprocess.run([promtool, "test", "rules", str(ALERTS.with_suffix(".test.yml"))],
                            capture_output=True, text=True, timeout=60)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_scorer_exports_what_the_mean_reward_needs() -> None:
    """``reef_scorer_reward`` has negative buckets, so prometheus-client exports no
    ``_sum`` for it; the dashboards and alerts take the mean from the signed magnitudes."""
    from prometheus_client import generate_latest

    from services.scorer.metrics import ScorerMetrics

    metrics = ScorerMetrics.create()
    text = generate_latest(metrics.registry).decode()
    assert 'reef_scorer_reward_magnitude_total{sign="negative"} 0.0' in text
    for reward in (0.5, -1.0, 0.25, 0.0):
        metrics.observe_reward(reward)
    text = generate_latest(metrics.registry).decode()
    assert "reef_scorer_reward_sum" not in text
    sample = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
              for line in text.splitlines() if line.startswith("reef_scorer_reward")}
    mean = (sample['reef_scorer_reward_magnitude_total{sign="positive"}']
            - sample['reef_scorer_reward_magnitude_total{sign="negative"}']) / sample[
        "reef_scorer_reward_count"]
    assert mean == pytest.approx((0.5 - 1.0 + 0.25 + 0.0) / 4)


def test_dashboards_are_grafana_json_on_the_provisioned_datasource() -> None:
    assert [p.stem for p in DASHBOARDS] == ["reef-learning", "reef-pipeline", "reef-serving",
                                            "reef-skills"]
    provisioned = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources"
                                  / "prometheus.yml").read_text())["datasources"][0]["uid"]
    uids = set()
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        uids.add(board["uid"])
        [variable] = board["templating"]["list"]
        assert variable["type"] == "datasource"
        assert variable["current"]["value"] == provisioned
        ids = [p["id"] for p in panels(board)]
        assert len(ids) == len(set(ids)) >= 6, path.name
        for panel in panels(board):
            assert panel["datasource"]["uid"] == "${datasource}"
            assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
    assert len(uids) == len(DASHBOARDS)


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels inside collapsed rows


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, PromQL) for every target of every panel."""
    out = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in panels(board):
            for target in panel.get("targets", []):
                expr = target["expr"].replace("$__rate_interval", RATE_INTERVAL)
                out.append((board["title"], panel["title"], expr))
    return out


# --- the stack -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def judge() -> Iterator[FakeJudge]:
    server = FakeJudge(free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def miner_llm() -> Iterator[FakeLLM]:
    server = FakeLLM(free_port())
    server.start()
    yield server
    server.stop()


def model_cache(policy_data_dir: Path) -> Path:
    """A data dir holding the converted SmolLM2: the checkout's ``var`` when a local run
    already converted it there, else the session's (converted once, shared with the
    policy tests)."""
    for root in (os.environ.get("REEF_TEST_DATA_DIR"), str(REPO / "var")):
        if root and (Path(root) / "models" / "SmolLM2-135M-Instruct" / "config.json").is_file():
            return Path(root)
    return policy_data_dir


class Stack:
    def __init__(self, gateway: GatewayProcess, scorer: Proc, miner: Proc, trainer: Proc,
                 policy: Proc, jobs: Proc, client: redis.Redis, namespace: str) -> None:
        self.gateway, self.scorer, self.miner, self.trainer = gateway, scorer, miner, trainer
        self.policy, self.jobs = policy, jobs
        self.client, self.namespace = client, namespace

    @property
    def workers(self) -> dict[str, ServiceProcess]:
        return {"gateway": self.gateway, "scorer": self.scorer, "skill-miner": self.miner,
                "trainer": self.trainer, "policy": self.policy, "jobs": self.jobs}


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, upstream: FakeUpstream, judge: FakeJudge,
          miner_llm: FakeLLM, policy_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Stack]:
    from services.stack.launch import share_models

    namespace = "obs"
    root = tmp_path_factory.mktemp("stack")
    trainer_dir = root / "trainer"
    share_models(model_cache(policy_data_dir), trainer_dir)
    judge.mode = "flaky"  # every other judge call fails: the judge error panels get data
    miner_llm.default = {"diagnosis": "The assistant edited a file that does not exist.",
                         "skills": [SKILL]}
    trainer = worker("services.trainer", redis_server.url, namespace, trainer_dir, {
        "REEF_MODE": "rl", "REEF_BACKEND": "local", "REEF_BATCH_SIZE": "2",
        "REEF_LORA_RANK": "4", "REEF_LORA_ALPHA": "8", "REEF_GATE_ENABLED": "false",
        "REEF_LEARNING_RATE": "1e-4", "REEF_POLICY_THREADS": "1",
        "REEF_TRAIN_TENANTS": '["alpha"]'})  # the tenant of the traffic below
    scorer = worker("services.scorer", redis_server.url, namespace, root / "scorer", {
        "REEF_SWEEP_INTERVAL_SECONDS": "0.2", "REEF_USE_PRM": "true",
        "REEF_PRM_BASE_URL": judge.base_url, "REEF_PRM_MODEL": "judge-model",
        "REEF_PRM_M": "3", "REEF_JUDGE_RETRIES": "0", "REEF_JUDGE_TIMEOUT_SECONDS": "5",
        "REEF_AZURE_OPENAI_ENDPOINT": "", "REEF_AZURE_OPENAI_DEPLOYMENT": ""})
    miner = worker("services.skill_miner", redis_server.url, namespace, root / "miner", {
        "REEF_ENABLE_SKILL_EVOLUTION": "true", "REEF_MINER_BASE_URL": miner_llm.base_url,
        "REEF_MINER_MODEL": "miner-model", "REEF_MINER_TIMEOUT_SECONDS": "5",
        "REEF_SKILL_AUTO_PROMOTE": "true", "REEF_RETRIEVAL_MODE": "bm25",
        "REEF_AZURE_OPENAI_ENDPOINT": "", "REEF_AZURE_OPENAI_DEPLOYMENT": ""})
    gateway_env = {"REEF_USE_SKILLS": "true", "REEF_RETRIEVAL_MODE": "bm25",
                   "REEF_SKILL_MIN_BM25": "0.01", "REEF_REQUEST_LOGPROBS": "true",
                   "REEF_REQUEST_TOKEN_IDS": "true", "REEF_ADMIN_KEY": "obs-admin-key-8d1f",
                   "REEF_UPSTREAM_RETRIES": "0"}
    if HAS_METRICS_KEY:
        gateway_env["REEF_METRICS_KEY"] = METRICS_KEY
    gateway = GatewayProcess(redis_server.url, upstream.base_url, namespace, root / "gateway",
                             gateway_env)
    # The policy server is only scraped here (the gateway talks to the fake upstream).
    policy_port = free_port()
    share_models(model_cache(policy_data_dir), root / "policy")
    policy = Proc("services.policy", {
        **trainer.env, "REEF_POLICY_PORT": str(policy_port), "REEF_POLICY_THREADS": "1",
        "REEF_DATA_DIR": str(root / "policy")}, root / "policy", policy_port, "/readyz")
    jobs = worker("services.jobs", redis_server.url, namespace, root / "jobs", {})
    procs: list[Proc] = [trainer, policy, scorer, miner, jobs]
    try:
        for proc in procs:  # the trainer first: it loads the model meanwhile
            proc.spawn()
        gateway.start(timeout=60)
        for proc in (scorer, miner, jobs, policy):
            proc.wait_ready(120)
        yield Stack(gateway, scorer, miner, trainer, policy, jobs, redis_server.client(),
                    namespace)
    finally:
        stop_all([gateway, *procs])


def stop_all(procs: list[ServiceProcess]) -> None:
    """SIGTERM to every process at once (each finishes its batch in hand), then wait."""
    running = [p for p in procs if p.proc is not None]
    for proc in running:
        assert proc.proc is not None
        proc.proc.terminate()
    for proc in running:
        assert proc.proc is not None
        try:
            proc.proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.proc.kill()
            proc.proc.wait()
        proc.proc = None


def chat(client: openai.OpenAI, session: str, text: str, model: str = "fake-text") -> str:
    response = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}],
        extra_headers={"X-Session-Id": session})
    return response.choices[0].message.content or ""


def drive_traffic(stack: Stack) -> None:
    """Conversations whose follow-ups give rewards of both signs (so the trainer steps and
    the miner mines), streamed and failing requests, and an invalid stream entry."""
    client = openai.OpenAI(base_url=stack.gateway.url + "/v1", api_key=API_KEY, max_retries=0)
    for i in range(2):
        session = f"s{i}"
        chat(client, session, "Please edit config.yaml to add a cache setting.")
        chat(client, session, "That's wrong, there is no config.yaml, it doesn't work.")
        chat(client, session, "Thank you, that is perfect now!")
    stream = client.chat.completions.create(
        model="fake-text", messages=[{"role": "user", "content": "Stream a hello."}],
        stream=True, extra_headers={"X-Session-Id": "streamed"})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    with pytest.raises(openai.InternalServerError):
        chat(client, "broken", "Anything.", model="fake-500")
    with pytest.raises(openai.BadRequestError):
        chat(client, "broken", "Anything.", model="fake-400")
    # 504 after the gateway's upstream timeout (3 s here): an upstream error, by kind.
    with pytest.raises(openai.InternalServerError):
        chat(client, "broken", "Anything.", model="fake-hang")
    # An entry that is no message at all: the scorer dead-letters it.
    stack.client.xadd(Keys(stack.namespace).stream(TURNS), {"kind": "garbage.v0"})


def prometheus_config(stack: Stack, prom_port: int, key_file: Path) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with its DNS discovery replaced by this stack's
    ports, scraping every second."""
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert {job["job_name"] for job in config["scrape_configs"]} == JOBS
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(ALERTS)]
    ports = {name: proc.port for name, proc in stack.workers.items()}
    ports["prometheus"] = prom_port
    for job in config["scrape_configs"]:
        job.pop("dns_sd_configs", None)
        job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[job['job_name']]}"]}]
        if "authorization" in job:
            if HAS_METRICS_KEY:
                job["authorization"]["credentials_file"] = str(key_file)
            else:
                del job["authorization"]
    return config


@pytest.fixture(scope="module")
def prometheus(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    exe = need("prometheus")
    folder = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    key_file = folder / "metrics_key"
    key_file.write_text(METRICS_KEY)
    (folder / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config(stack, port,
                                                                            key_file)))
    log = (folder / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [exe, f"--config.file={folder / 'prometheus.yml'}",
         f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(url, proc), "prometheus to start", 30)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def _ready(url: str, proc: subprocess.Popen[bytes]) -> bool:
    if proc.poll() is not None:
        raise RuntimeError("prometheus exited")
    try:
        return httpx.get(url + "/-/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    reply = httpx.get(prometheus + "/api/v1/query", params={"query": expr}, timeout=10).json()
    assert reply["status"] == "success", (expr, reply)
    result: list[dict[str, Any]] = reply["data"]["result"]
    return result


def test_prometheus_scrapes_the_stack_and_every_panel_has_data(
        stack: Stack, prometheus: str) -> None:
    drive_traffic(stack)
    # The learning loop runs on: scores, a mined skill, a training step and a hot swap.
    stack.trainer.wait_ready(120)
    wait_for(lambda: value(stack.miner, "reef_skill_miner_proposals_total",
                           outcome="accepted") >= 1, "a mined skill")
    wait_for(lambda: value(stack.trainer, "reef_trainer_steps_total",
                           adapter="reef-alpha") >= 1, "a training step",
             timeout=120)
    wait_for(lambda: value(stack.gateway, "reef_gateway_adapter_swaps_total", outcome="ok") >= 1,
             "the gateway to load the new adapter")
    # A question the mined skill answers: retrieved and injected.
    client = openai.OpenAI(base_url=stack.gateway.url + "/v1", api_key=API_KEY, max_retries=0)
    wait_for(lambda: (chat(client, "later", "How do I edit the file path in my config?")
                      and value(stack.gateway, "reef_gateway_skills_injected_sum") >= 1),
             "a skill injection", timeout=30)

    # Every target is up, with the jobs of deploy/prometheus/prometheus.yml.
    def targets_up() -> bool:
        active = httpx.get(prometheus + "/api/v1/targets", timeout=5).json()["data"][
            "activeTargets"]
        return ({t["labels"]["job"] for t in active} == JOBS
                and all(t["health"] == "up" for t in active))
    wait_for(targets_up, "every target up", 20)

    # Every query of every dashboard returns data (scrapes are a second apart; rates need
    # two samples after the last event).
    queries = dashboard_queries()
    assert len(queries) >= 40
    empty: list[tuple[str, str, str]] = []

    def all_have_data() -> bool:
        empty[:] = [q for q in queries if not query(prometheus, q[2])]
        return not empty
    try:
        wait_for(all_have_data, "every panel query to return data", 30)
    except AssertionError:
        raise AssertionError(f"queries without data: {empty}") from None

    # The alert rules evaluate, and those the traffic should trip have tripped.
    def rules() -> list[dict[str, Any]]:
        groups = httpx.get(prometheus + "/api/v1/rules", timeout=5).json()["data"]["groups"]
        return [rule for group in groups for rule in group["rules"]]
    wait_for(lambda: bool(rules()) and all(r.get("lastEvaluation", "").startswith("2")
                                            and r["health"] == "ok" for r in rules()),
             "every alert rule evaluated", 20)
    alerts = httpx.get(prometheus + "/api/v1/alerts", timeout=5).json()["data"]["alerts"]
    states = {(a["labels"]["alertname"], a["labels"].get("stream")): a["state"] for a in alerts}
    assert states.get(("ReefDeadLetters", TURNS)) == "firing", states
    # The dead-letter gauge counts what sits in turns:dead.
    [sample] = query(prometheus, f'max(reef_worker_dead_letter_entries{{stream="{TURNS}"}})')
    assert float(sample["value"][1]) == 1
