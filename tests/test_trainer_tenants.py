"""One adapter per tenant: trainer processes split the tenants, each adapter learns only
from its tenant's turns and is published for its tenant alone, and no turn is lost
between them (before: every trainer joined the one group ``trainer`` and acked the other
tenants' turns it skipped, so with two trainers one tenant's adapter got nothing)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.keys import SCORED, Keys, adapter_for, trainer_group
from shared.settings import Settings
from tests.conftest import RedisServer, free_port
from tests.service_proc import ServiceProcess
from tests.test_trainer_service import scored_turn, tiny_model, weights_events

__all__ = ["tiny_model"]  # a fixture, imported for this module's tests


def turn_of(tenant: str, i: int, reward: float) -> dict[bytes | str, bytes | str]:
    message = scored_turn(i, reward)
    turn = message.turn.model_copy(update={"tenant": tenant, "id": f"{tenant}-{i:04d}"})
    return message.model_copy(update={"turn": turn, "id": turn.id}).to_fields()


def trainer(redis_server: RedisServer, namespace: str, model: Path, data_dir: Path,
            tenants: list[str], batch_size: int) -> ServiceProcess:
    env = {"REEF_PROFILE": "dev", "REEF_NAMESPACE": namespace,
           "REEF_REDIS_URL": redis_server.url, "REEF_MODEL_NAME": str(model),
           "REEF_BATCH_SIZE": str(batch_size), "REEF_LORA_RANK": "4",
           "REEF_WORKER_BLOCK_MS": "200", "REEF_GATE_ENABLED": "false",
           "REEF_TRAIN_TENANTS": json.dumps(tenants)}
    port = free_port()
    return ServiceProcess("services.trainer", {**env, "REEF_METRICS_PORT": str(port)},
                          data_dir, port, "/metrics")


def test_two_trainers_split_the_tenants_and_lose_nothing(
        redis_server: RedisServer, namespace: str, tiny_model: Path, tmp_path: Path) -> None:
    client = redis_server.client()
    keys = Keys(namespace)
    for i in range(20):
        for tenant in ("a", "b"):
            client.xadd(keys.stream(SCORED), turn_of(tenant, i, 1.0 if i % 2 else -1.0))
    first = trainer(redis_server, namespace, tiny_model, tmp_path / "one", ["a"], 1000)
    second = trainer(redis_server, namespace, tiny_model, tmp_path / "two", ["b"], 1000)
    first.start(timeout=60)
    second.start(timeout=60)
    try:
        deadline = time.monotonic() + 60
        while any(client.hlen(keys.trainer(adapter_for("reef", t), "buffer")) < 20
                  for t in ("a", "b")):
            assert time.monotonic() < deadline, "a tenant's turns did not reach its trainer"
            time.sleep(0.1)
        for tenant in ("a", "b"):
            buffered = client.hkeys(keys.trainer(adapter_for("reef", tenant), "buffer"))
            assert sorted(buffered) == [f"{tenant}-{i:04d}".encode() for i in range(20)]
            group = trainer_group(adapter_for("reef", tenant))
            assert {g["name"].decode() for g in client.xinfo_groups(keys.stream(SCORED))
                    } >= {group}
    finally:
        first.stop()
        second.stop()


def test_each_tenant_gets_its_own_adapter_and_a_second_claim_is_refused(
        redis_server: RedisServer, namespace: str, tiny_model: Path, tmp_path: Path) -> None:
    client = redis_server.client()
    keys = Keys(namespace)
    for i in range(4):
        for tenant in ("a", "Team B"):
            client.xadd(keys.stream(SCORED), turn_of(tenant, i, 1.0 if i % 2 else -1.0))
    both = trainer(redis_server, namespace, tiny_model, tmp_path / "both", ["a", "Team B"], 4)
    both.start(timeout=60)
    try:
        deadline = time.monotonic() + 60
        while len(weights_events(client, namespace)) < 2:
            assert time.monotonic() < deadline, "no adapter published for both tenants"
            time.sleep(0.1)
        events = {e.tenant: e for e in weights_events(client, namespace)}
        assert events["a"].adapter == "reef-a-v1" and events["a"].id == "reef-a-v1"
        team_b = adapter_for("reef", "Team B")
        assert team_b.startswith("reef-team-b-") and events["Team B"].adapter == team_b + "-v1"
        assert client.exists(keys.trainer(team_b, "state"))
        # Another trainer process for tenant a: refused while this one lives.
        log = tmp_path / "refused.log"
        rival = trainer(redis_server, namespace, tiny_model, tmp_path / "rival", ["a"], 4)
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "services.trainer"],
                                    env=rival.env, stdout=out, stderr=subprocess.STDOUT)
        assert proc.wait(60) != 0
        assert "adapter 'reef-a' is trained by another trainer" in log.read_text()
    finally:
        both.stop()


def test_by_default_every_tenant_of_the_keys_gets_an_adapter() -> None:
    settings = Settings(profile="dev", api_keys={"k1": "acme", "k2": "beta", "k3": "acme"})
    assert settings.trained_tenants() == ["acme", "beta"]
    assert Settings(profile="dev").trained_tenants() == ["dev"]
    assert Settings(profile="dev", train_tenants=["beta"]).trained_tenants() == ["beta"]
    assert Settings(profile="dev", shared_adapter=True).trained_tenants() == [None]


@pytest.mark.parametrize(("tenant", "adapter"), [
    ("acme", "reef-acme"), ("a-b", "reef-a-b"), ("Acme", "reef-acme-"), ("a.b", "reef-a-b-")])
def test_adapter_names_are_tenant_qualified_and_never_shared(tenant: str, adapter: str) -> None:
    assert adapter_for("reef", tenant).startswith(adapter)
    assert len({adapter_for("reef", t) for t in ("a-b", "a.b", "A-B", "a b")}) == 4
