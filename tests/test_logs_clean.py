"""No secret and no personal data ever reaches a log file.

The gateway, a scorer (with an LLM judge) and the skill-miner (with its LLM) run as real
processes at DEBUG level, writing their JSON logs to files. Requests carry known secrets
and personal data everywhere they can: the inference key, the admin key and an unknown
key in ``Authorization``, an e-mail address as the session id, a token, an e-mail, a phone
and a card number in the messages and in feedback; the services hold the upstream key,
the judge's and the miner's keys, the metrics key and the Redis password (in the URL).
Errors are triggered too: unknown keys, keys of the wrong scope, an upstream 500 and
unparseable answers, bad JSON, a judge answering 500 every other call, and stream entries
that fail validation. Then every log file is searched for every secret: none may appear.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from shared.keys import SCORED, TURNS, Keys
from tests.conftest import free_port
from tests.fake_judge import FakeJudge
from tests.fake_llm import FakeLLM
from tests.fake_upstream import FakeUpstream
from tests.service_proc import ServiceProcess

NAMESPACE = "logsclean"
API_KEY = "sk-logs-inference-Z9Y8X7W6V5U4T3S2"
ADMIN_KEY = "adm-logs-Q1W2E3R4T5Y6U7I8O9P0"
METRICS_KEY = "met-logs-A1S2D3F4G5H6J7K8L9"
UPSTREAM_KEY = "sk-upstream-logs-M1N2B3V4C5X6Z7L8"
JUDGE_KEY = "sk-judge-logs-P0O9I8U7Y6T5R4E3"
MINER_KEY = "sk-miner-logs-K1J2H3G4F5D6S7A8"
REDIS_PASSWORD = "redis-pw-Hx7Kq2Vb9Lm4"
UNKNOWN_KEY = "sk-unknown-logs-W3E4R5T6Y7U8I9O0"
EMAIL = "jane.roe.logs@example.com"
PHONE = "+1 415 555 0199"
CARD = "4242 4242 4242 4242"
TOKEN = "ghp_LogsTokenAbCdEfGhIjKlMnOpQrStUvWx12"
SESSION_EMAIL = "owner.session@example.org"
SECRETS = [API_KEY, ADMIN_KEY, METRICS_KEY, UPSTREAM_KEY, JUDGE_KEY, MINER_KEY,
           REDIS_PASSWORD, UNKNOWN_KEY, EMAIL, PHONE, CARD, TOKEN, SESSION_EMAIL]
LEAKY = f"My token is {TOKEN}; mail {EMAIL}, call {PHONE}, card {CARD}."


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server that requires a password (given in the URL)."""
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis-pw")
    exe = shutil.which("redis-server")
    assert exe is not None, "redis-server is not installed"
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--requirepass", REDIS_PASSWORD,
                             "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, password=REDIS_PASSWORD, socket_timeout=0.2)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)
    yield f"redis://:{REDIS_PASSWORD}@127.0.0.1:{port}/0"
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[FakeJudge, FakeLLM]]:
    judge = FakeJudge(free_port(), bearer=JUDGE_KEY)
    llm = FakeLLM(free_port())
    judge.start()
    llm.start()
    yield judge, llm
    judge.stop()
    llm.stop()


def services(redis_url: str, upstream: FakeUpstream, judge: FakeJudge, llm: FakeLLM,
             data_dir: Path) -> dict[str, ServiceProcess]:
    common = {
        "REEF_PROFILE": "prod", "REEF_LOG_LEVEL": "DEBUG", "REEF_NAMESPACE": NAMESPACE,
        "REEF_REDIS_URL": redis_url, "REEF_API_KEYS": f'{{"{API_KEY}": "acme"}}',
        "REEF_ADMIN_KEY": ADMIN_KEY, "REEF_METRICS_KEY": METRICS_KEY,
        "REEF_UPSTREAM_API_KEY": UPSTREAM_KEY, "REEF_WORKER_BLOCK_MS": "200",
        "REEF_WORKER_CLAIM_IDLE_MS": "500", "REEF_WORKER_MAX_DELIVERIES": "2",
        "REEF_SESSION_IDLE_SECONDS": "1", "REEF_SWEEP_INTERVAL_SECONDS": "0.2",
        "REEF_AZURE_OPENAI_ENDPOINT": "", "REEF_AZURE_OPENAI_DEPLOYMENT": ""}
    gw_port, scorer_port, miner_port = free_port(), free_port(), free_port()
    return {
        "gateway": ServiceProcess("services.gateway", {
            **common, "REEF_GATEWAY_PORT": str(gw_port),
            "REEF_UPSTREAM_BASE_URL": upstream.base_url, "REEF_UPSTREAM_RETRIES": "0",
            "REEF_UPSTREAM_TIMEOUT_SECONDS": "3"}, data_dir, gw_port, "/healthz"),
        "scorer": ServiceProcess("services.scorer", {
            **common, "REEF_METRICS_PORT": str(scorer_port), "REEF_USE_PRM": "true",
            "REEF_PRM_BASE_URL": judge.base_url, "REEF_PRM_MODEL": "judge",
            "REEF_PRM_API_KEY": JUDGE_KEY, "REEF_PRM_M": "2", "REEF_JUDGE_RETRIES": "0",
            "REEF_TEACHER_HINTS": "true"}, data_dir, scorer_port, "/healthz"),
        "miner": ServiceProcess("services.skill_miner", {
            **common, "REEF_METRICS_PORT": str(miner_port),
            "REEF_ENABLE_SKILL_EVOLUTION": "true", "REEF_MINER_BASE_URL": llm.base_url,
            "REEF_MINER_MODEL": "miner", "REEF_MINER_API_KEY": MINER_KEY,
            "REEF_MINER_RETRIES": "0", "REEF_RETRIEVAL_MODE": "bm25"},
            data_dir, miner_port, "/healthz"),
    }


def exercise(gateway: str) -> None:
    """Requests full of secrets, successful and failing."""
    client = openai.OpenAI(base_url=gateway + "/v1", api_key=API_KEY, max_retries=0)
    session = {"X-Session-Id": SESSION_EMAIL}
    client.chat.completions.create(model="fake-text", extra_headers=session,
                                   messages=[{"role": "user", "content": LEAKY}])
    stream = client.chat.completions.create(
        model="fake-text", stream=True, extra_headers={**session, "X-Session-Done": "true"},
        messages=[{"role": "user", "content": LEAKY},
                  {"role": "assistant", "content": f"Noted: {EMAIL}"},
                  {"role": "user", "content": f"That's wrong, use {TOKEN} ({PHONE})."}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    for model in ("fake-500", "fake-garbage", "fake-400"):
        with pytest.raises(openai.APIError):
            client.chat.completions.create(model=model, extra_headers=session,
                                           messages=[{"role": "user", "content": LEAKY}])
    for key in (UNKNOWN_KEY, ADMIN_KEY, METRICS_KEY):
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=gateway + "/v1", api_key=key, max_retries=0).models.list()
    bearer = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    bad_json = ('{"model": "fake-text", "messages": [{"role": "user", "content": "'
                + LEAKY + '"}').encode()
    assert httpx.post(gateway + "/v1/chat/completions", content=bad_json,
                      headers=bearer).status_code == 400
    assert httpx.post(gateway + "/v1/feedback", headers={**bearer, **session}, json={
        "rating": "down", "turn_index": 0, "text": LEAKY}).status_code == 200
    assert httpx.post(gateway + "/v1/feedback", headers=bearer,
                      content=bad_json).status_code == 400
    assert httpx.get(gateway + "/admin/tenants", headers=bearer).status_code == 403
    assert httpx.get(gateway + "/admin/tenants/acme/skills",
                     headers={"Authorization": f"Bearer {UNKNOWN_KEY}"}).status_code == 401
    assert httpx.get(gateway + "/metrics",
                     headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 401
    assert httpx.get(gateway + "/metrics",
                     headers={"Authorization": f"Bearer {METRICS_KEY}"}).status_code == 200


def poison_streams(client: redis.Redis) -> None:
    """Entries that fail validation, their fields full of secrets."""
    keys = Keys(NAMESPACE)
    for stream in (TURNS, SCORED):
        client.xadd(keys.stream(stream), {"kind": f"turn.v1 {REDIS_PASSWORD}", "data": LEAKY})
        client.xadd(keys.stream(stream), {"kind": f"turn.v1 {TOKEN}", "data": LEAKY})
        client.xadd(keys.stream(stream), {"kind": "turn.v1", "data": "{" + LEAKY})
        client.xadd(keys.stream(stream), {"kind": "scored.v1", "id": EMAIL,
                                          "data": '{"id": "' + EMAIL + '", "turn": "' +
                                                  LEAKY + '"}'})


def wait_for(condition: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_no_secret_or_personal_datum_in_any_log(
        redis_url: str, upstream: FakeUpstream, fakes: tuple[FakeJudge, FakeLLM],
        tmp_path: Path) -> None:
    judge, llm = fakes
    judge.mode = "flaky"  # every other judge call answers 500
    llm.script = [{"diagnosis": f"The user {EMAIL} was ignored.", "skills": [{
        "name": "check-tokens", "category": "tools",
        "description": f"When a user pastes a token like {TOKEN}.",
        "body": f"Do not echo it; contact {EMAIL} or {PHONE}."}]}, "not json at all"]
    procs = services(redis_url, upstream, judge, llm, tmp_path)
    client = redis.Redis.from_url(redis_url)
    try:
        for proc in procs.values():
            proc.start(timeout=60)
        exercise(procs["gateway"].url)
        poison_streams(client)
        wait_for(lambda: llm.calls >= 1, "the miner's LLM call")
        wait_for(lambda: client.xlen(Keys(NAMESPACE).dead(TURNS)) >= 4
                 and client.xlen(Keys(NAMESPACE).dead(SCORED)) >= 4, "dead letters")
        assert judge.calls >= 2
    finally:
        for proc in procs.values():
            proc.stop()
        client.close()
    logs = sorted(tmp_path.rglob("*.log"))
    assert {p.name.split("-")[0] for p in logs} == {"gateway", "scorer", "skill_miner"}
    text = {p.name: p.read_text(errors="replace") for p in logs}
    for name, content in text.items():
        assert content.count("\n") >= 3, f"{name} logged almost nothing: {content!r}"
    leaks = {(name, secret) for name, content in text.items() for secret in SECRETS
             if secret in content}
    assert not leaks, leaks
    assert "worker.dead_lettered" in text[procs["scorer"].log_path.name]
