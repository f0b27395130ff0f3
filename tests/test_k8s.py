"""deploy/k8s (Kustomize), validated offline.

Every manifest parses; the kustomization lists exactly the files there are; every
Deployment has resources, probes and a non-root security context; the names the manifests
share (ConfigMap, Secret, Services, ports, volumes) resolve; KEDA's ScaledObject scales the
scorer Deployment on the streams and consumer groups the scorer really reads (from
shared/keys.py); each Deployment's environment is a configuration Reef's Settings accept.
When ``kubectl`` (Debian's kubernetes-client) or ``kustomize`` is installed, the
kustomization is also built.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.keys import FINALISED, GROUP_JUDGE, GROUP_SCORER, TURNS, Keys
from shared.settings import Settings

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
REEF_DEPLOYMENTS = {"gateway", "scorer", "skill-miner", "trainer", "policy", "jobs"}
SECRET = "reef-secrets"


def manifests() -> dict[str, list[dict[str, Any]]]:
    """Documents per file (the kustomization excluded)."""
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            out[path.name] = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def objects(kind: str | None = None) -> list[dict[str, Any]]:
    return [d for docs in manifests().values() for d in docs
            if kind is None or d["kind"] == kind]


def by_name(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in objects(kind)}


def kustomization() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return config


def containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    spec = deployment["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def config_data() -> dict[str, str]:
    data: dict[str, str] = by_name("ConfigMap")["reef-config"]["data"]
    return data


def test_every_file_parses_and_the_kustomization_lists_each_once() -> None:
    files = manifests()
    assert files and all(files.values())
    for name, docs in files.items():
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= set(doc), name
    resources = kustomization()["resources"]
    assert len(resources) == len(set(resources))
    assert set(resources) == set(files)
    # Everything lands in one namespace, the one the ScaledObject's Redis address names.
    assert kustomization()["namespace"] == by_name("Namespace")["reef"]["metadata"]["name"]


def test_every_reef_service_and_redis_has_a_deployment() -> None:
    assert set(by_name("Deployment")) == REEF_DEPLOYMENTS | {"redis"}
    images = {i["name"] for i in kustomization()["images"]}
    for deployment in objects("Deployment"):
        for container in containers(deployment):
            assert container["image"].split(":")[0] in images | {"redis"}


def test_deployments_have_resources_probes_and_run_as_non_root() -> None:
    for deployment in objects("Deployment"):
        name = deployment["metadata"]["name"]
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
        for container in containers(deployment):
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][part]), (name, part)
            assert container.get("readinessProbe") and container.get("livenessProbe"), name
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            assert container.get("securityContext", {}).get("runAsUser", 1) != 0, name


def test_reef_containers_keep_the_image_entrypoint_and_the_worker_timing() -> None:
    block_seconds = int(config_data()["REEF_WORKER_BLOCK_MS"]) / 1000
    for name in REEF_DEPLOYMENTS:
        deployment = by_name("Deployment")[name]
        [container] = containers(deployment)
        # `command` would replace deploy/entrypoint.sh (which drops empty REEF_ variables).
        assert "command" not in container, name
        assert container["args"][:2] == ["python", "-m"], name
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > block_seconds, name


def test_metrics_ports_probes_and_services_agree() -> None:
    services = objects("Service")
    deployments = by_name("Deployment")
    for service in services:
        selected = [d for d in deployments.values() if service["spec"]["selector"].items()
                    <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(selected) == 1, service["metadata"]["name"]
        ports = {p["name"] for c in containers(selected[0]) for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, service["metadata"]["name"]
    for name in ("scorer", "skill-miner", "trainer", "jobs"):
        [container] = containers(deployments[name])
        env = {e["name"]: e.get("value") for e in container["env"]}
        port = int(env["REEF_METRICS_PORT"])
        assert [p["containerPort"] for p in container["ports"]] == [port]
        probe = container["livenessProbe"]["exec"]["command"]
        assert probe == ["python", "/app/deploy/healthcheck.py",
                         f"http://127.0.0.1:{port}/metrics"]
        assert "REEF_METRICS_KEY" in env  # the probe sends it
        if name != "jobs":  # /healthz turns 503 once a task of the service failed
            ready = container["readinessProbe"]["exec"]["command"]
            assert ready[-1] == f"http://127.0.0.1:{port}/healthz", name
        # A headless Service: Prometheus resolves every replica.
        [metrics] = [s for s in services if s["spec"]["selector"]["app.kubernetes.io/name"]
                     == name]
        assert metrics["spec"]["clusterIP"] == "None"


def test_config_secret_and_volume_references_resolve() -> None:
    configmaps = set(by_name("ConfigMap"))
    claims = set(by_name("PersistentVolumeClaim"))
    secret_keys: set[str] = set()
    for deployment in objects("Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
        for container in containers(deployment):
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in configmaps
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == SECRET
                    secret_keys.add(ref["key"])
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes
    assert {"redis-password", "api-keys", "admin-key", "metrics-key",
            "upstream-api-key"} <= secret_keys
    # Trainer writes adapters where the policy server reads them: one shared claim.
    def claim(name: str) -> str:
        pod = by_name("Deployment")[name]["spec"]["template"]["spec"]
        [volume] = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
        return str(volume["persistentVolumeClaim"]["claimName"])
    assert claim("trainer") == claim("policy")
    shared = by_name("PersistentVolumeClaim")[claim("trainer")]
    assert shared["spec"]["accessModes"] == ["ReadWriteMany"]
    redis_args = " ".join(containers(by_name("Deployment")["redis"])[0]["args"])
    assert "--appendonly yes" in redis_args and "--requirepass" in redis_args


def test_scaled_object_scales_the_scorer_on_its_streams_and_groups() -> None:
    [scaled] = objects("ScaledObject")
    target = scaled["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "scorer")
    assert target["name"] in by_name("Deployment")
    assert scaled["spec"]["minReplicaCount"] >= 1  # the idle-session sweep needs one
    keys = Keys(config_data()["REEF_NAMESPACE"])
    triggers = scaled["spec"]["triggers"]
    assert {t["type"] for t in triggers} == {"redis-streams"}
    wanted = {(keys.stream(TURNS), GROUP_SCORER), (keys.stream(FINALISED), GROUP_JUDGE)}
    assert {(t["metadata"]["stream"], t["metadata"]["consumerGroup"]) for t in triggers} == wanted
    auths = by_name("TriggerAuthentication")
    redis_service = by_name("Service")["redis"]
    namespace = kustomization()["namespace"]
    for trigger in triggers:
        meta = trigger["metadata"]
        assert int(meta["lagCount"]) > 0
        host, port = meta["address"].rsplit(":", 1)
        assert host.split(".")[:2] == ["redis", namespace]
        assert int(port) in [p["port"] for p in redis_service["spec"]["ports"]]
        [secret] = auths[trigger["authenticationRef"]["name"]]["spec"]["secretTargetRef"]
        assert (secret["parameter"], secret["name"], secret["key"]) == (
            "password", SECRET, "redis-password")
    # The scorer really consumes these streams in these groups.
    source = (Path(__file__).resolve().parent.parent / "services" / "scorer"
              / "__main__.py").read_text()
    assert "Consumer(TURNS, GROUP_SCORER" in source
    assert "Consumer(FINALISED, GROUP_JUDGE" in source


def test_each_deployment_environment_is_accepted_by_settings(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """ConfigMap + literal env + the Secret's required keys build Settings (prod)."""
    secret_values = {"redis-password": "k8s-redis-pw-3e9d", "api-keys": '{"sk-k8s-7a1c": "t"}',
                     "admin-key": "k8s-admin-5b2f", "metrics-key": "k8s-metrics-8c4e",
                     "upstream-api-key": "k8s-upstream-6d0b"}
    monkeypatch.chdir(tmp_path)  # no .env or reef.toml of the checkout
    for name in sorted(REEF_DEPLOYMENTS):
        [container] = containers(by_name("Deployment")[name])
        env = dict(config_data())
        for item in container["env"]:
            ref = item.get("valueFrom", {}).get("secretKeyRef")
            if ref is None:
                env[item["name"]] = item["value"]
            elif not ref.get("optional"):
                env[item["name"]] = secret_values[ref["key"]]
        with monkeypatch.context() as patch:
            for key in [k for k in os.environ if k.startswith("REEF_")]:
                patch.delenv(key)
            for key, value in env.items():
                patch.setenv(key, value)
            settings = Settings()
        assert settings.profile == "prod"
        assert settings.redis_password is not None
        assert settings.redis_password.get_secret_value() == secret_values["redis-password"]


def secret_env(deployment: str, name: str) -> dict[str, Any] | None:
    """The secretKeyRef of an environment variable of a Deployment's container."""
    [container] = containers(by_name("Deployment")[deployment])
    for env in container.get("env", []):
        if env["name"] == name:
            ref: dict[str, Any] | None = env.get("valueFrom", {}).get("secretKeyRef")
            return ref
    return None


def test_the_policy_server_is_closed_to_all_but_gateways_and_trainers() -> None:
    """Its key comes from the Secret (required, the same the gateways send), and a
    NetworkPolicy admits only gateway and trainer pods, on its API port."""
    for name in ("policy", "gateway"):
        ref = secret_env(name, "REEF_UPSTREAM_API_KEY")
        assert ref is not None, name
        assert (ref["name"], ref["key"], ref.get("optional", False)) == (
            SECRET, "upstream-api-key", False), name
    deployments = by_name("Deployment")

    def pods(name: str) -> dict[str, str]:
        labels: dict[str, str] = deployments[name]["spec"]["template"]["metadata"]["labels"]
        return labels

    [policy] = [p for p in objects("NetworkPolicy")
                if p["spec"]["podSelector"]["matchLabels"].items() <= pods("policy").items()]
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    [rule] = spec["ingress"]
    admitted = {name for name in deployments
                if any(peer["podSelector"]["matchLabels"].items() <= pods(name).items()
                       for peer in rule["from"])}
    assert admitted == {"gateway", "trainer"}
    assert all(set(peer) == {"podSelector"} for peer in rule["from"])  # no wider peers
    [container] = containers(deployments["policy"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert [(p["protocol"], p["port"]) for p in rule["ports"]] == [("TCP", "http")]
    assert "http" in ports
    # No other NetworkPolicy opens the policy pods to anyone else.
    others = [p for p in objects("NetworkPolicy")
              if p["metadata"]["name"] != policy["metadata"]["name"]]
    assert not [p for p in others
                if p["spec"]["podSelector"].get("matchLabels", {}).items()
                <= pods("policy").items()]


def test_kustomize_build() -> None:
    kubectl, kustomize = shutil.which("kubectl"), shutil.which("kustomize")
    if kustomize:
        command = [kustomize, "build", str(K8S)]
    elif kubectl:
        command = [kubectl, "kustomize", str(K8S)]
    else:
        pytest.skip("neither kustomize nor kubectl is installed (Debian: kubernetes-client)")
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    built = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert len(built) == len(objects())
    for doc in built:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == kustomization()["namespace"], doc["kind"]
    images = {c["image"] for d in built if d["kind"] == "Deployment"
              for c in d["spec"]["template"]["spec"]["containers"]}
    assert images == {"redis:7.0", "reef-light:latest", "reef-torch:latest"}
