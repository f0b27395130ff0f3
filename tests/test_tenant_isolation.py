"""Two tenants (two API keys) try to cross every boundary, end to end: the gateway and a
scorer run as processes on a real Redis, the agent is the official ``openai`` client.

Boundaries covered here: sessions (the same ``X-Session-Id`` from two tenants is two
sessions), turns (recorded with their tenant; the scorer scores each from its own
tenant's next message), feedback (a tenant cannot name another's answer: a 404) and
adapters (a tenant's adapter never answers another tenant, not even when asked by name,
and is not listed to it). Covered elsewhere, not repeated: skills
(``test_skill_injection.test_one_tenants_skills_never_reach_another_tenant``: the
upstream sees the prompt; ``test_skill_store.test_tenants_are_isolated``), the admin API
(``test_skills_admin.test_auth`` / ``test_tenant_isolation``, ``test_security``: an
inference key gets 403 on every admin route; a tenant's own admin key is tested here) and
feedback storage
(``test_feedback.test_feedback_lands_under_the_callers_tenant_only``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import redis

from shared.keys import TURNS, WEIGHTS, Keys
from shared.messages import TurnV1, WeightsEventV1, decode
from tests.conftest import RedisServer
from tests.fake_upstream import FakeUpstream
from tests.gateway_proc import API_KEY, OTHER_KEY, GatewayProcess
from tests.service_proc import ServiceProcess, scorer_process
from tests.test_scorer import wait_scored

NS = "isolation"
SESSION = "shared-session"
ADMIN_KEY = "operator-admin-key-7f3e"
ALPHA_ADMIN_KEY = "alpha-admin-key-2b9d"
"""Opens tenant alpha's admin routes only (``tenant_admin_keys``)."""
ALPHA_ADAPTER = "reef-alpha-v1"
"""Tenant alpha's own adapter (a trainer with ``train_tenant=alpha`` publishes it)."""


def wait_for(condition: Any, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def recorded(client: redis.Redis) -> list[TurnV1]:
    out = []
    for _, fields in client.xrange(Keys(NS).stream(TURNS)):
        msg = decode(fields)
        assert isinstance(msg, TurnV1)
        out.append(msg)
    return out


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, upstream: FakeUpstream,
          tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[GatewayProcess, ServiceProcess]]:
    event = WeightsEventV1(tenant="alpha", adapter=ALPHA_ADAPTER, version=1,
                           path="/ckpt/alpha/v1", step=1)
    redis_server.client().xadd(Keys(NS).stream(WEIGHTS), event.to_fields())  # type: ignore[arg-type]
    data_dir = tmp_path_factory.mktemp("isolation")
    gateway = GatewayProcess(redis_server.url, upstream.base_url, NS, data_dir, env={
        "REEF_ADAPTER_NAME": "reef", "REEF_ADMIN_KEY": ADMIN_KEY,
        "REEF_TENANT_ADMIN_KEYS": f'{{"{ALPHA_ADMIN_KEY}": "alpha"}}'})
    scorer = scorer_process(redis_server.url, NS, data_dir)
    gateway.start()
    scorer.start()
    yield gateway, scorer
    gateway.stop()
    scorer.stop()


def test_two_tenants_cannot_cross(stack: tuple[GatewayProcess, ServiceProcess],
                                  redis_server: RedisServer, upstream: FakeUpstream) -> None:
    gateway, _ = stack
    alpha = openai.OpenAI(base_url=gateway.url + "/v1", api_key=API_KEY, max_retries=0)
    beta = openai.OpenAI(base_url=gateway.url + "/v1", api_key=OTHER_KEY, max_retries=0)
    wait_for(lambda: ALPHA_ADAPTER in upstream.adapters, "alpha's adapter loaded")

    def ask(client: openai.OpenAI, text: str, history: list[Any], done: bool = False,
            model: str = "reef") -> tuple[str, str]:
        """Send a turn; (the answer's id, the model the upstream was asked for)."""
        reply = client.chat.completions.create(
            model=model, messages=[*history, {"role": "user", "content": text}],
            extra_headers={"X-Session-Id": SESSION, "X-Session-Done": str(done).lower()})
        history += [{"role": "user", "content": text},
                    {"role": "assistant", "content": reply.choices[0].message.content}]
        return reply.id, str(upstream.requests[-1]["model"])

    # Adapters: alpha's requests go to alpha's adapter, beta's never do.
    alpha_history: list[Any] = []
    beta_history: list[Any] = []
    alpha_answer, alpha_model = ask(alpha, "How do I sort a list in place?", alpha_history)
    _, beta_model = ask(beta, "How do I sort a list in place?", beta_history)
    assert (alpha_model, beta_model) == (ALPHA_ADAPTER, "reef")
    with pytest.raises(openai.NotFoundError) as err:  # asking for it by name
        beta.chat.completions.create(model=ALPHA_ADAPTER,
                                     messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "model_not_found"
    assert upstream.requests[-1]["model"] == "reef"  # the refused request never went out
    assert ALPHA_ADAPTER in [m.id for m in alpha.models.list()]
    assert ALPHA_ADAPTER not in [m.id for m in beta.models.list()]

    # Sessions: the same session id from two tenants is two sessions, each from turn 0.
    wait_for(lambda: len(recorded(redis_server.client())) == 2, "two turns recorded")
    turns = {t.tenant: t for t in recorded(redis_server.client())}
    assert set(turns) == {"alpha", "beta"}
    assert [turns[t].turn_index for t in ("alpha", "beta")] == [0, 0]
    assert turns["alpha"].session_id == turns["beta"].session_id == SESSION

    # Feedback: beta names alpha's answer in the session id both use: beta's session has
    # no such answer (a 404), and nothing lands anywhere.
    with pytest.raises(openai.NotFoundError) as missing:
        beta.post("/feedback", cast_to=object, body={
            "session_id": SESSION, "response_id": alpha_answer, "rating": "up"})
    assert missing.value.code == "not_found"

    # Each tenant's next message scores its own turn only: alpha corrects, beta thanks.
    ask(alpha, "That's wrong, not what I asked: I wanted it in place.", alpha_history, True)
    ask(beta, "Thank you, that is exactly what I needed!", beta_history, True)
    found = wait_scored(redis_server.client(), NS, 4)
    first = {s.turn.tenant: s for s in found if s.turn.turn_index == 0}
    assert set(first) == {"alpha", "beta"}
    alpha_scored, beta_scored = first["alpha"], first["beta"]
    follow = {t: " ".join(str(m.get("content")) for m in s.follow_up) for t, s in first.items()}
    assert "wrong" in follow["alpha"] and "Thank" not in follow["alpha"]
    assert "Thank" in follow["beta"] and "wrong" not in follow["beta"]
    assert "explicit" not in alpha_scored.components  # beta's "up" did not reach it
    assert alpha_scored.reward is not None and alpha_scored.reward < 0
    assert beta_scored.reward is not None and beta_scored.reward > 0


def test_a_shared_adapter_serves_every_tenant_and_a_tenants_own_wins(
        stack: tuple[GatewayProcess, ServiceProcess], redis_server: RedisServer,
        upstream: FakeUpstream) -> None:
    """An adapter trained on every tenant's turns (``train_tenant`` empty, tenant ``*``)
    answers the tenants without one of their own; for isolation of the weights too, run
    one trainer per tenant (``train_tenant``)."""
    gateway, _ = stack
    event = WeightsEventV1(tenant="*", adapter="reef-v7", version=7, path="/ckpt/all/v7")
    redis_server.client().xadd(Keys(NS).stream(WEIGHTS), event.to_fields())  # type: ignore[arg-type]
    wait_for(lambda: "reef-v7" in upstream.adapters, "the shared adapter loaded")

    def served(key: str) -> str:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
        client.chat.completions.create(model="reef", extra_headers={"X-Session-Id": "s-all"},
                                       messages=[{"role": "user", "content": "hi"}])
        return str(upstream.requests[-1]["model"])

    wait_for(lambda: served(OTHER_KEY) == "reef-v7", "beta served by the shared adapter")
    assert served(API_KEY) == ALPHA_ADAPTER


def test_a_tenants_admin_key_opens_that_tenants_routes_only(
        stack: tuple[GatewayProcess, ServiceProcess]) -> None:
    gateway, _ = stack
    skill = {"name": "check-paths", "description": "Before editing a file.",
             "body": "Confirm the path exists first."}

    def call(key: str, method: str, path: str, body: Any = None) -> int:
        return httpx.request(method, gateway.url + path, json=body,
                             headers={"Authorization": f"Bearer {key}"}).status_code

    assert call(ALPHA_ADMIN_KEY, "POST", "/admin/tenants/alpha/skills", skill) == 201
    assert call(ALPHA_ADMIN_KEY, "GET", "/admin/tenants/alpha/skills/check-paths") == 200
    for method, path in (("GET", "/admin/tenants/beta/skills"), ("GET", "/admin/tenants"),
                         ("POST", "/admin/tenants/beta/skills"),
                         ("GET", "/admin/dashboard/data")):
        assert call(ALPHA_ADMIN_KEY, method, path, skill) == 403, path
    assert call(ADMIN_KEY, "GET", "/admin/tenants/beta/skills") == 200  # the operator's key
    assert call(OTHER_KEY, "GET", "/admin/tenants/beta/skills") == 403  # an inference key
    assert call(ALPHA_ADMIN_KEY, "POST", "/v1/chat/completions", {
        "model": "fake-text", "messages": [{"role": "user", "content": "hi"}]}) == 401
