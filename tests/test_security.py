"""Security: key scopes on every route, the metrics key, per-key rate limits, and the
redaction of turns before they leave for a judge, a miner LLM or Tinker.

Real parts: the gateway as a process with the official ``openai`` client, a private Redis,
the fake judge and the fake miner LLM as HTTP servers, the Tinker SDK's own types behind
the fake cloud of ``test_trainer_tinker``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter

from services.gateway.ratelimit import RateLimiter
from services.scorer.judge import Judge
from services.scorer.metrics import ScorerMetrics
from services.skill_miner.metrics import MinerMetrics
from services.skill_miner.service import SkillMiner
from shared.messages import ScoredV1, TokenLogprobs, TurnV1
from shared.metrics import serve_metrics
from shared.redact import Redactor, redact, sensitive_for_tinker
from shared.settings import Settings
from tests.conftest import RedisServer, free_port
from tests.fake_judge import FakeJudge
from tests.fake_llm import FakeLLM
from tests.fake_upstream import FakeUpstream
from tests.gateway_proc import API_KEY, METRICS_AUTH, OTHER_KEY, GatewayProcess

ADMIN_KEY = "admin-key-for-security-tests"
SECRETS = {
    "openai key": "sk-proj-Q8wErTy7UiOp4AsDf9GhJkL2",
    "aws key": "AKIAZ7QWERTYUIOPASDF",
    "github token": "ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8",
    "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXNlY3JldA",
    "bearer": "Bearer tok_live_9f8e7d6c5b4a3f2e1d0c",
    "private key": "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAsecretbits\n"
                   "-----END RSA PRIVATE KEY-----",
    "email": "jane.roe@example.com",
    "phone": "+44 20 7946 0958",
    "card": "4111 1111 1111 1111",
}
LEAKY = ("Deploy with key {openai key} and AWS {aws key}; my GitHub token is {github token}. "
         "Session {jwt}, header 'Authorization: {bearer}'. Mail me at {email} or call "
         "{phone}; card {card}.\n{private key}").format(**SECRETS)
"""A user message carrying every kind of secret and personal datum."""
NEEDLES = [v.split()[-1] if k == "bearer" else v for k, v in SECRETS.items()]
"""What must never arrive: each secret (a bearer token without its ``Bearer`` word)."""


def leaked(text: str) -> list[str]:
    return [needle for needle in NEEDLES if needle in text]


# --- the redaction patterns (no I/O) ------------------------------------------------------

def test_every_kind_is_redacted_and_ordinary_text_kept() -> None:
    text, found = redact(LEAKY)
    assert leaked(text) == []
    assert set(found) >= {"api_key", "aws_key", "jwt", "bearer", "private_key", "email",
                          "phone", "card"}
    plain = "Use API version 2024-10-21 with Python 3.11.4 on port 8080; 3 retries."
    assert redact(plain) == (plain, {})
    assert redact("redis://:hunter2hunter2@10.0.0.5:6379/0")[0] == (
        "redis://[REDACTED_CREDENTIALS]@[REDACTED_IP]:6379/0")


def test_extra_patterns_and_messages() -> None:
    redactor = Redactor([r"\bTCK-\d{4}\b"])
    messages, found = redactor.redact_messages([
        {"role": "user", "content": [{"type": "text", "text": "ticket TCK-1234"},
                                     {"type": "image_url", "image_url": {"url": "x"}}]},
        {"role": "assistant", "content": None, "tool_calls": []}])
    assert messages[0]["content"][0]["text"] == "ticket [REDACTED_CUSTOM]"
    assert messages[0]["content"][1]["type"] == "image_url" and found == {"custom": 1}
    with pytest.raises(ValueError, match="redact_patterns"):
        Settings(profile="dev", redact_patterns=["(unclosed"])


# --- scopes: every route needs its own key -------------------------------------------------

@pytest.fixture(scope="module")
def gateway(redis_server: RedisServer, upstream: FakeUpstream,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(redis_server.url, upstream.base_url, "sec",
                        tmp_path_factory.mktemp("sec-gw"), env={"REEF_ADMIN_KEY": ADMIN_KEY})
    gw.start()
    yield gw
    gw.stop()


OPEN_PATHS = frozenset({"/healthz", "/readyz", "/admin/dashboard",
                        "/admin/dashboard/static/{name}"})
"""Routes anyone may read: health, and the dashboard's static page (it holds no data and
asks for the admin key itself)."""
ROUTES = [("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("POST", "/v1/feedback"),
          ("GET", "/openapi.json"),
          ("GET", "/metrics"), ("GET", "/admin/tenants"), ("GET", "/admin/tenants/alpha/skills"),
          ("POST", "/admin/tenants/alpha/skills"), ("GET", "/admin/dashboard/data")]


def _routes(gateway: GatewayProcess) -> list[tuple[str, str]]:
    """The routes above plus every operation of the served schema (new routes included)."""
    routes = set(ROUTES)
    schema = httpx.get(gateway.url + "/openapi.json", timeout=5,
                       headers={"Authorization": f"Bearer {API_KEY}"})
    assert schema.status_code == 200, schema.text  # else new routes would go unchecked
    for path, ops in schema.json()["paths"].items():
        if path not in OPEN_PATHS:
            concrete = path.replace("{tenant}", "alpha").replace("{skill}", "x")
            for method in ops:
                if method in ("get", "post", "put", "patch", "delete"):
                    routes.add((method.upper(), concrete.replace("{", "").replace("}", "")))
    return sorted(routes)


def test_every_route_but_health_needs_a_key(gateway: GatewayProcess) -> None:
    for path in ("/healthz", "/readyz"):
        assert httpx.get(gateway.url + path).status_code == 200
    for method, path in _routes(gateway):
        for headers in ({}, {"Authorization": "Bearer not-a-key"}):
            resp = httpx.request(method, gateway.url + path, headers=headers, json={})
            assert resp.status_code in (401, 403), (method, path, headers, resp.status_code)
            assert set(resp.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(("key", "method", "path", "status"), [
    (API_KEY, "GET", "/admin/tenants", 403),          # an inference key is not an admin key
    (API_KEY, "GET", "/admin/tenants/alpha/skills", 403),
    (API_KEY, "GET", "/metrics", 401),                # nor a metrics key
    (ADMIN_KEY, "POST", "/v1/chat/completions", 401),  # the admin key is not an inference key
    (ADMIN_KEY, "GET", "/v1/models", 401),
    (ADMIN_KEY, "POST", "/v1/feedback", 401),
    (ADMIN_KEY, "GET", "/metrics", 401),
    ("metrics-test-key", "POST", "/v1/chat/completions", 401),
    ("metrics-test-key", "GET", "/admin/tenants", 401),
])
def test_scopes_are_separate(gateway: GatewayProcess, key: str, method: str, path: str,
                             status: int) -> None:
    body = {"model": "fake-text", "messages": [{"role": "user", "content": "hi"}]}
    resp = httpx.request(method, gateway.url + path, json=body,
                         headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == status, resp.text


def test_each_key_opens_its_own_scope(gateway: GatewayProcess) -> None:
    assert httpx.get(gateway.url + "/metrics", headers=METRICS_AUTH).status_code == 200
    assert httpx.get(gateway.url + "/admin/tenants",
                     headers={"Authorization": f"Bearer {ADMIN_KEY}"}).status_code == 200
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=API_KEY, max_retries=0)
    assert client.chat.completions.create(
        model="fake-text", messages=[{"role": "user", "content": "hi"}]).choices


async def test_the_policy_server_needs_the_gateways_upstream_key() -> None:
    """In process (no model is loaded: the check comes first)."""
    pytest.importorskip("torch")
    from services.policy.app import create_app

    app = create_app(Settings(profile="dev", upstream_api_key="sk-upstream-policy-key"))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://policy") as client:
        assert (await client.get("/healthz")).status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                                 ("POST", "/v1/load_lora_adapter")):
                resp = await client.request(method, path, headers=headers, json={})
                assert resp.status_code == 401, (method, path)
                assert resp.json()["error"]["code"] == "invalid_api_key"
        resp = await client.post("/v1/load_lora_adapter", json={},
                                 headers={"Authorization": "Bearer sk-upstream-policy-key"})
        assert resp.status_code == 503  # past the lock: the model is not loaded here


def test_the_policy_server_is_closed_by_default() -> None:
    """Outside the dev profile the policy server refuses to start without its key, and
    says which field is missing (in process, then as the real command)."""
    pytest.importorskip("torch")
    from services.policy.app import create_app
    from shared.settings import ConfigError

    prod = Settings(profile="prod", api_keys={"sk-a-client-key-91": "t"},
                    metrics_key="policy-metrics-key-3", policy_follow_weights=False)
    with pytest.raises(ConfigError, match=r"upstream_api_key \(REEF_UPSTREAM_API_KEY\)"):
        create_app(prod)
    env = {k: v for k, v in os.environ.items() if not k.startswith("REEF_")}
    env.update({"REEF_PROFILE": "prod", "REEF_API_KEYS": '{"sk-a-client-key-91": "t"}',
                "REEF_METRICS_KEY": "policy-metrics-key-3"})
    refused = subprocess.run([sys.executable, "-m", "services.policy"], env=env, timeout=120,
                             capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert refused.returncode == 2
    assert "upstream_api_key (REEF_UPSTREAM_API_KEY) is not set" in refused.stderr


# --- the metrics key --------------------------------------------------------------------

def test_a_worker_metrics_port_needs_the_metrics_key() -> None:
    registry = CollectorRegistry()
    Counter("reef_test_things_total", "Things.", registry=registry).inc()
    settings = Settings(profile="dev", metrics_port=free_port(), metrics_key="scrape-me-key")
    served = serve_metrics(settings, registry, addr="127.0.0.1")
    assert served is not None
    server, _ = served
    url = f"http://127.0.0.1:{settings.metrics_port}/metrics"
    try:
        refused = [httpx.get(url, headers=h) for h in (
            {}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic c2NyYXBlLW1l"})]
        assert [r.status_code for r in refused] == [401, 401, 401]
        assert refused[0].json()["error"]["code"] == "invalid_api_key"
        assert refused[0].headers["www-authenticate"] == "Bearer"
        assert httpx.get(url.replace("/metrics", "/healthz")).status_code == 200
        ok = httpx.get(url, headers={"Authorization": "Bearer scrape-me-key"})
        assert ok.status_code == 200 and "reef_test_things_total 1.0" in ok.text
    finally:
        server.shutdown()
        server.server_close()


def test_outside_dev_metrics_without_a_key_refuse_to_start(
        redis_server: RedisServer, upstream: FakeUpstream, tmp_path: Path) -> None:
    prod = {"profile": "prod", "api_keys": {API_KEY: "alpha"}}
    with pytest.raises(ValueError, match="metrics_key"):
        Settings(**prod, metrics_port=9999)
    with pytest.raises(ValueError, match=r"metrics_key .* placeholder"):
        Settings(**prod, metrics_port=9999, metrics_key="changeme")
    # A worker process and the gateway process exit with a message naming the setting.
    env = {**os.environ, "REEF_PROFILE": "prod", "REEF_API_KEYS": f'{{"{API_KEY}": "a"}}',
           "REEF_METRICS_PORT": str(free_port()), "REEF_REDIS_URL": redis_server.url}
    env.pop("REEF_METRICS_KEY", None)
    worker = subprocess.run([sys.executable, "-m", "services.scorer"], env=env,
                            capture_output=True, timeout=60)
    assert worker.returncode != 0 and b"REEF_METRICS_KEY" in worker.stderr
    gw = GatewayProcess(redis_server.url, upstream.base_url, "sec-nokey", tmp_path)
    del gw.env["REEF_METRICS_KEY"]
    with pytest.raises(RuntimeError, match="REEF_METRICS_KEY"):
        gw.start()
    gw.stop()


# --- rate limits --------------------------------------------------------------------------

def test_the_bucket_refills_and_says_when() -> None:
    now = [0.0]
    limiter = RateLimiter(Settings(profile="dev", rate_limit_rps=2, rate_limit_burst=3,
                                   tenant_rate_limits={"free": (0.5, 1), "vip": (0, 0)}),
                          clock=lambda: now[0])
    for _ in range(3):
        limiter.check("k1", "t")
    with pytest.raises(Exception) as refused:
        limiter.check("k1", "t")
    assert getattr(refused.value, "status", None) == 429
    assert refused.value.headers == {"Retry-After": "1", "retry-after-ms": "500"}  # type: ignore[attr-defined]
    limiter.check("k2", "t")  # another key has its own bucket
    now[0] = 0.5
    limiter.check("k1", "t")  # one token back after 1/rps seconds
    limiter.check("f", "free")
    with pytest.raises(Exception) as slow:
        limiter.check("f", "free")
    assert slow.value.headers["Retry-After"] == "2"  # type: ignore[attr-defined]
    for _ in range(100):
        limiter.check("v", "vip")  # a rate of 0: no limit for that tenant
    assert not RateLimiter(Settings(profile="dev")).enabled


def test_a_key_over_its_limit_gets_openai_rate_limit_errors(
        redis_server: RedisServer, upstream: FakeUpstream, tmp_path: Path) -> None:
    gw = GatewayProcess(redis_server.url, upstream.base_url, "sec-rl", tmp_path, env={
        "REEF_RATE_LIMIT_RPS": "0.2", "REEF_RATE_LIMIT_BURST": "2"})
    gw.start()
    try:
        alpha = openai.OpenAI(base_url=gw.url + "/v1", api_key=API_KEY, max_retries=0)
        beta = openai.OpenAI(base_url=gw.url + "/v1", api_key=OTHER_KEY, max_retries=0)
        messages: Any = [{"role": "user", "content": "hi"}]
        for _ in range(2):
            alpha.chat.completions.create(model="fake-text", messages=messages)
        with pytest.raises(openai.RateLimitError) as err:
            alpha.chat.completions.create(model="fake-text", messages=messages)
        assert err.value.status_code == 429
        assert 1 <= int(err.value.response.headers["retry-after"]) <= 5
        assert err.value.code == "rate_limit_exceeded" and err.value.type == "requests"
        with pytest.raises(openai.RateLimitError):
            alpha.models.list()  # every inference route counts against the key
        for _ in range(2):  # another key of another tenant is unaffected
            assert beta.chat.completions.create(model="fake-text", messages=messages).choices
    finally:
        gw.stop()


# --- redaction before a turn leaves ---------------------------------------------------------

def leaky_turn(tenant: str = "acme", turn_id: str = "leaky-0") -> TurnV1:
    return TurnV1(
        id=turn_id, tenant=tenant, session_id="s-leak", turn_index=0, request_model="m",
        upstream_model="m",
        messages=[{"role": "system", "content": "You are helpful."},
                  {"role": "user", "content": LEAKY}],
        response_message={"role": "assistant", "content": f"Noted, I will write to "
                                                          f"{SECRETS['email']}.",
                          "tool_calls": [{"id": "c1", "type": "function", "function": {
                              "name": "send", "arguments": orjson.dumps(
                                  {"to": SECRETS["phone"]}).decode()}}]},
        sampled=TokenLogprobs(token_ids=[20, 21, 2], logprobs=[-1.0, -1.0, -1.0],
                              prompt_token_ids=[1, 5, 9]))


@pytest.fixture(scope="module")
def judge_server() -> Iterator[FakeJudge]:
    fake = FakeJudge(free_port())
    fake.start()
    yield fake
    fake.stop()


@pytest.mark.parametrize("redact_outbound", [True, False])
async def test_the_judge_never_sees_secrets(judge_server: FakeJudge,
                                            redact_outbound: bool) -> None:
    judge_server.reset()
    settings = Settings(profile="dev", use_prm=True, prm_base_url=judge_server.base_url,
                        prm_model="judge", prm_m=2, teacher_hints=True, judge_retries=0,
                        azure_openai_endpoint="", azure_openai_deployment="",
                        redact_outbound=redact_outbound)
    judge_server.mode, judge_server.score = "fixed", -1  # a hint is asked for too
    async with Judge(settings, ScorerMetrics.create()) as judge:
        verdict = await judge.judge(leaky_turn(), [{"role": "user", "content":
                                                   f"No! Use {SECRETS['openai key']}"}])
    assert verdict.score == -1 and judge_server.hint_calls == 1
    seen = "\n".join(judge_server.prompts)
    assert judge_server.calls == 3 and seen
    if redact_outbound:
        assert leaked(seen) == [], leaked(seen)
        assert "[REDACTED_EMAIL]" in seen and "[REDACTED_API_KEY]" in seen
    else:  # the switch works: without it the fake does see them
        assert SECRETS["email"] in seen


@pytest.fixture(scope="module")
def llm_server() -> Iterator[FakeLLM]:
    fake = FakeLLM(free_port())
    fake.start()
    yield fake
    fake.stop()


async def test_the_miner_llm_never_sees_secrets(redis_server: RedisServer, namespace: str,
                                                llm_server: FakeLLM) -> None:
    llm_server.reset()
    settings = Settings(profile="dev", redis_url=redis_server.url, namespace=namespace,
                        enable_skill_evolution=True, miner_base_url=llm_server.base_url,
                        miner_model="miner", miner_retries=0, azure_openai_endpoint="",
                        azure_openai_deployment="")
    client = aioredis.from_url(redis_server.url)
    miner = SkillMiner(settings, client, MinerMetrics.create())
    await miner.start()
    try:
        turn = leaky_turn()
        earlier = turn.model_copy(update={"id": "leaky-earlier", "turn_index": 0})
        failing = turn.model_copy(update={"id": "leaky-failing", "turn_index": 1})
        await miner.on_scored(ScoredV1(id=earlier.id, turn=earlier, reward=0.5,
                                       components={"implicit": 0.5}), "1-0")
        await miner.on_scored(ScoredV1(
            id=failing.id, turn=failing, reward=-1.0, components={"implicit": -1.0},
            follow_up=[{"role": "user", "content": f"wrong, ask {SECRETS['email']}"}]),
            "1-1")
    finally:
        await miner.close()
        await client.aclose()
    assert llm_server.calls == 1
    seen = orjson.dumps(llm_server.requests).decode().replace("\\n", "\n")
    assert leaked(seen) == [] and "[REDACTED_EMAIL]" in seen


async def test_tinker_never_gets_a_turn_with_secrets(redis_server: RedisServer,
                                                     namespace: str, tmp_path: Path) -> None:
    pytest.importorskip("tinker")
    from services.trainer.metrics import TrainerMetrics
    from services.trainer.service import Trainer
    from services.trainer.tinker_backend import TinkerBackend
    from tests.test_trainer_tinker import MODEL, Cloud, FakeRestClient, FakeServiceClient

    cloud = Cloud()
    settings = Settings(profile="dev", backend="tinker", model_name=MODEL, data_dir=tmp_path,
                        redis_url=redis_server.url, namespace=namespace, batch_size=2,
                        gate_enabled=False, lora_rank=8)
    backend = TinkerBackend(settings, rest_client_factory=lambda s: FakeRestClient(cloud),
                            service_client_factory=lambda s: FakeServiceClient(cloud))
    metrics = TrainerMetrics.create()

    def clean(i: int, reward: float) -> ScoredV1:
        turn = leaky_turn(turn_id=f"clean-{i}").model_copy(update={
            "messages": [{"role": "user", "content": "Sort [3, 1, 2]."}],
            "response_message": {"role": "assistant", "content": "[1, 2, 3]"},
            "sampled": TokenLogprobs(token_ids=[30 + i, 2], logprobs=[-1.0, -1.0],
                                     prompt_token_ids=[1, 7, 8])})
        return ScoredV1(id=turn.id, turn=turn, reward=reward, trainable=True)

    secret = leaky_turn(turn_id="secret-0")

    client = aioredis.from_url(redis_server.url)
    trainer = Trainer(settings, client, backend, metrics)
    await trainer.on_scored(ScoredV1(id=secret.id, turn=secret, reward=1.0, trainable=True),
                            "1-0")
    for i, reward in enumerate((1.0, -1.0)):
        await trainer.on_scored(clean(i, reward), f"1-{i + 1}")
    stopping = asyncio.Event()
    task = asyncio.create_task(trainer.run(stopping))
    deadline = time.monotonic() + 20
    while trainer.ledger.version < 1:
        assert time.monotonic() < deadline and not task.done()
        await asyncio.sleep(0.05)
    stopping.set()
    await task
    await client.aclose()
    sent = [d for call, kw in cloud.calls if call == "forward_backward" for d in kw["data"]]
    tokens = [d.model_input.to_ints() for d in sent]
    assert sorted(tokens) == [[1, 7, 8, 30], [1, 7, 8, 31]]  # the two clean turns only
    assert metrics.registry.get_sample_value("reef_trainer_samples_total",
                                             {"fate": "sensitive"}) == 1.0
    assert sensitive_for_tinker(settings, secret.messages) is not None
    local = settings.model_copy(update={"backend": "local"})
    assert sensitive_for_tinker(local, secret.messages) is None  # never leaves: kept


# --- the dependency audit of make lint ---------------------------------------------------

@pytest.mark.parametrize(("report", "status", "says"), [
    ({"dependencies": [{"name": "jinja2", "version": "2.10", "vulns": [{"id": "GHSA-1"}]},
                       {"name": "ok", "version": "1", "vulns": []}]}, 1, "GHSA-1"),
    ({"dependencies": [{"name": "ok", "version": "1", "vulns": []}]}, 0,
     "1 of 1 packages audited, 0 with"),
    ({"dependencies": [{"name": "ok", "version": "1", "skip_reason": "Dependency not found "
                        "on PyPI and could not be audited: ok (1)"}]}, 0, "SKIPPED 1"),
    (None, 0, "SKIPPED - the vulnerability service could not be reached: requests"),
])
def test_the_audit_fails_on_a_vulnerability_and_says_when_it_skipped(
        tmp_path: Path, report: dict[str, Any] | None, status: int, says: str) -> None:
    report_path, log = tmp_path / "audit.json", tmp_path / "audit.log"
    log.write_text("requests.exceptions.ConnectionError: Failed to resolve 'api.osv.dev'\n")
    if report is not None:
        report_path.write_text(orjson.dumps(report).decode())
    script = Path(__file__).resolve().parent.parent / "deploy" / "audit.py"
    done = subprocess.run([sys.executable, str(script), str(report_path), str(log)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == status and says in done.stdout, done.stdout
