"""Hot swap across policy replicas (issue 12 item 3), end to end.

Two real policy servers (``python -m services.policy``, prod profile, their key required)
on a tiny random Llama with a byte-level tokenizer, both following the ``weights`` stream
of a private Redis; a round-robin balancer in front of them; two real gateways behind it
(``upstream_kind`` detected: ``reef``); the official ``openai`` client under load. What
must hold: every request is answered by the adapter its gateway asked for (never the base
model in its place, never another version), nothing errs, each published version ends up
served, a version is routed to only once every live replica holds it, a failed load is
retried and keeps the replica unready meanwhile, and the previous version stays loaded as
long as a gateway routes to it. Timing is the benchmark's business (``bench/hot_swap.py``,
upstream ``replicas``), never asserted here.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import redis

from shared.keys import TURNS, WEIGHTS, Keys
from shared.messages import TurnV1, WeightsEventV1, decode
from tests.conftest import RedisServer, free_port
from tests.gateway_proc import API_KEY, OTHER_KEY, GatewayProcess
from tests.round_robin import RoundRobin
from tests.service_proc import ServiceProcess
from tests.tiny_policy import POLICY_KEY, make_tiny_policy_model

NS = "replicas"
INTERVAL = "0.2"
"""adapter_registry_interval_seconds of every process here."""
MESSAGES: Any = [{"role": "user", "content": "Name a colour."}]


@dataclass
class Cluster:
    client: redis.Redis
    data_dir: Path
    model: str
    """The base model's served name."""
    replicas: list[ServiceProcess]
    balancer: RoundRobin
    gateways: list[GatewayProcess]
    version: int = 0
    adapters: list[Path] = field(default_factory=list)

    def publish(self, path: str | Path | None = None) -> str:
        """The next version's weights event (adapters taken in turn); its adapter name."""
        self.version += 1
        name = f"reef-v{self.version}"
        if path is None:
            path = self.adapters[(self.version - 1) % len(self.adapters)]
        event = WeightsEventV1(tenant="*", adapter=name, version=self.version, path=str(path),
                               step=self.version, batch_at=time.time())
        self.client.xadd(Keys(NS).stream(WEIGHTS), event.to_fields())  # type: ignore[arg-type]
        return name

    def ask(self, gateway: int = 0, key: str = API_KEY) -> str:
        """One answer through a gateway; the model that answered."""
        chat = openai.OpenAI(base_url=self.gateways[gateway].url + "/v1", api_key=key,
                             max_retries=0, timeout=60)
        answer = chat.chat.completions.create(
            model="reef", messages=MESSAGES, max_tokens=4, temperature=0.7, seed=3,
            extra_headers={"X-Session-Id": f"probe-{time.monotonic_ns()}"})
        return str(answer.model)

    def loaded(self, replica: int) -> set[str]:
        url = self.replicas[replica].url + "/v1/models"
        cards = httpx.get(url, headers={"Authorization": f"Bearer {POLICY_KEY}"}).json()
        return {c["id"] for c in cards["data"]} - {self.model}

    def wait_served(self, adapter: str, timeout: float = 30) -> None:
        """Until both gateways answer with ``adapter``."""
        deadline = time.monotonic() + timeout
        while not all(self._answers(g, adapter) for g in range(len(self.gateways))):
            assert time.monotonic() < deadline, f"{adapter} never served"
            time.sleep(0.1)

    def _answers(self, gateway: int, adapter: str) -> bool:
        try:
            return self.ask(gateway) == adapter
        except openai.NotFoundError:  # a gateway just started: its routes are not read yet
            return False


def replica_process(redis_url: str, data_dir: Path, model_dir: Path, name: str
                    ) -> ServiceProcess:
    port = free_port()
    return ServiceProcess("services.policy", {
        "REEF_PROFILE": "prod", "REEF_API_KEYS": '{"sk-unused-client-key": "t"}',
        "REEF_UPSTREAM_API_KEY": POLICY_KEY, "REEF_METRICS_KEY": "replica-metrics-key",
        "REEF_REDIS_URL": redis_url, "REEF_NAMESPACE": NS, "REEF_MODEL_NAME": str(model_dir),
        "REEF_POLICY_HOST": "127.0.0.1", "REEF_POLICY_PORT": str(port),
        "REEF_POLICY_THREADS": "1", "REEF_POLICY_REPLICA_ID": name,
        "REEF_ADAPTER_REGISTRY_INTERVAL_SECONDS": INTERVAL, "REEF_LOG_LEVEL": "INFO",
        "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}, data_dir, port, "/readyz")


@pytest.fixture(scope="module")
def cluster(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Cluster]:
    data_dir = tmp_path_factory.mktemp("replicas-data")
    model_dir, adapters = make_tiny_policy_model(data_dir)
    replicas = [replica_process(redis_server.url, data_dir, model_dir, n) for n in "ab"]
    balancer = RoundRobin(free_port(), [r.url for r in replicas])
    gateways = [GatewayProcess(redis_server.url, balancer.url + "/v1", NS,
                               tmp_path_factory.mktemp(f"gw{i}"), env={
                                   "REEF_UPSTREAM_API_KEY": POLICY_KEY,
                                   "REEF_MODEL_NAME": str(model_dir),
                                   "REEF_ADAPTER_NAME": "reef",
                                   "REEF_REQUEST_LOGPROBS": "true",
                                   "REEF_REQUEST_TOKEN_IDS": "true",
                                   "REEF_UPSTREAM_TIMEOUT_SECONDS": "60",
                                   "REEF_ADAPTER_REGISTRY_INTERVAL_SECONDS": INTERVAL})
                for i in range(2)]
    started: list[ServiceProcess] = []
    try:
        for replica in replicas:
            replica.start(timeout=120)
            started.append(replica)
        balancer.start()
        for gateway in gateways:
            gateway.start()
            started.append(gateway)
        yield Cluster(redis_server.client(), data_dir, model_dir.name, replicas, balancer,
                      gateways, adapters=adapters)
    finally:
        for proc in started:
            proc.stop()
        balancer.stop()


def turns(client: redis.Redis) -> list[TurnV1]:
    found = []
    for _, fields in client.xrange(Keys(NS).stream(TURNS)):
        turn = decode(fields)
        assert isinstance(turn, TurnV1)
        found.append(turn)
    return found


class Load:
    """Threads asking both gateways (both tenants) until stopped; answers and errors."""

    def __init__(self, cluster: Cluster, threads: int = 4) -> None:
        self.cluster = cluster
        self.answers: list[str] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _run(self, index: int) -> None:
        key = (API_KEY, OTHER_KEY)[index % 2]
        while not self._stop.is_set():
            try:
                self.answers.append(self.cluster.ask(index % 2, key))
            except openai.OpenAIError as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")


def test_under_load_every_answer_comes_from_the_version_asked_for(cluster: Cluster) -> None:
    cluster.wait_served(cluster.model)  # nothing published: the base model
    first = cluster.publish()
    cluster.wait_served(first)
    with Load(cluster) as load:
        published = []
        for _ in range(3):  # swaps under load, faster than a load and a drain
            time.sleep(1.5)
            published.append(cluster.publish())
        cluster.wait_served(published[-1])
        time.sleep(1.0)
    assert load.errors == []
    assert published[-1] in load.answers and len(load.answers) > 20
    assert set(load.answers) <= {first, *published}
    recorded = turns(cluster.client)
    assert len(recorded) >= len(load.answers)
    for turn in recorded:  # the weights that answered are the weights asked for
        assert turn.policy_version in (turn.upstream_model, "base"), turn.id
        if turn.policy_version == "base":
            assert turn.upstream_model == cluster.model
    assert all(cluster.balancer.sent[r.url] > 10 for r in cluster.replicas)
    sampled = recorded[-1].sampled
    assert sampled is not None and sampled.logprobs_kind == "processed"
    assert (sampled.temperature, sampled.top_p, sampled.top_k, sampled.seed,
            sampled.greedy) == (0.7, 1.0, 0, 3, False)
    assert len(sampled.logprobs) == len(sampled.token_ids) == 4
    # Old versions are unloaded once nothing routes to them; the live one stays.
    deadline = time.monotonic() + 15
    while any(cluster.loaded(i) != {published[-1]} for i in range(2)):
        assert time.monotonic() < deadline, [cluster.loaded(i) for i in range(2)]
        time.sleep(0.2)


def write_fake(cluster: Cluster, kind: str, name: str, value: dict[str, Any]) -> None:
    """A registry entry of a replica or gateway that does not exist (60 s to live)."""
    keys = Keys(NS)
    index, key = ((keys.policy_replicas(), keys.policy_replica(name)) if kind == "replica"
                  else (keys.gateway_routers(), keys.gateway_router(name)))
    cluster.client.set(key, orjson.dumps(value), px=60_000)
    cluster.client.sadd(index, name)


def drop_fake(cluster: Cluster, kind: str, name: str) -> None:
    keys = Keys(NS)
    cluster.client.delete(keys.policy_replica(name) if kind == "replica"
                          else keys.gateway_router(name))


def test_a_version_is_routed_to_only_once_every_live_replica_holds_it(
        cluster: Cluster) -> None:
    current = cluster.publish()
    cluster.wait_served(current)
    replica = {"id": "c", "base": cluster.model, "adapters": [current], "failed": {}}
    write_fake(cluster, "replica", "c", replica)  # a third replica, slow to load
    newer = cluster.publish()
    deadline = time.monotonic() + 15
    while any(newer not in cluster.loaded(i) for i in range(2)):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(1.0)  # several registry rounds: still routed to the current version
    assert {cluster.ask(g) for g in (0, 1) for _ in range(3)} == {current}
    write_fake(cluster, "replica", "c", {**replica, "adapters": [current, newer]})
    cluster.wait_served(newer, timeout=10)
    drop_fake(cluster, "replica", "c")


def test_the_previous_version_stays_loaded_while_a_gateway_routes_to_it(
        cluster: Cluster) -> None:
    old = cluster.publish()
    cluster.wait_served(old)
    write_fake(cluster, "gateway", "slow-gateway", {"adapters": [old]})
    new = cluster.publish()
    cluster.wait_served(new)
    time.sleep(1.0)
    assert all(old in cluster.loaded(i) for i in range(2))  # the slow gateway still uses it
    drop_fake(cluster, "gateway", "slow-gateway")
    deadline = time.monotonic() + 10
    while any(old in cluster.loaded(i) for i in range(2)):
        assert time.monotonic() < deadline
        time.sleep(0.1)


def metric(proc: ServiceProcess, name: str) -> float:
    text = httpx.get(proc.url + "/metrics",
                     headers={"Authorization": "Bearer replica-metrics-key"}).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def test_a_failed_load_is_retried_surfaced_and_keeps_replicas_unready(
        cluster: Cluster) -> None:
    current = cluster.publish()
    cluster.wait_served(current)
    late = cluster.data_dir / "adapters" / f"late-{cluster.version + 1}"
    failing = cluster.publish(late)  # its files are not written yet
    deadline = time.monotonic() + 15
    while any(httpx.get(r.url + "/readyz").status_code != 503 for r in cluster.replicas):
        assert time.monotonic() < deadline, "a replica stayed ready"
        time.sleep(0.1)
    body = httpx.get(cluster.replicas[0].url + "/readyz").json()
    assert body["status"] == "adapter_failed" and failing in body["failed"]
    assert all(metric(r, "reef_policy_adapters_failing") == 1 for r in cluster.replicas)
    assert cluster.ask() == current  # the gateways keep the version every replica holds
    shutil.copytree(cluster.adapters[0], late)  # the checkpoint arrives: the retry loads it
    cluster.wait_served(failing, timeout=40)
    assert all(httpx.get(r.url + "/readyz").status_code == 200 for r in cluster.replicas)
    assert all(metric(r, "reef_policy_adapters_failing") == 0 for r in cluster.replicas)
    # A path outside the data directory is refused like any failed load, and a newer
    # version supersedes it (no longer retried, ready again).
    cluster.publish("/etc")
    while httpx.get(cluster.replicas[1].url + "/readyz").status_code != 503:
        assert time.monotonic() < deadline + 60
        time.sleep(0.1)
    assert "lora_path" in str(httpx.get(cluster.replicas[1].url + "/readyz").json())
    cluster.wait_served(cluster.publish(), timeout=20)
    assert all(httpx.get(r.url + "/readyz").status_code == 200 for r in cluster.replicas)
