"""``POST /v1/feedback`` end to end: a gateway process, a real Redis, httpx and the official
openai client as clients."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
import redis

from shared.keys import FEEDBACK, Keys
from shared.messages import FeedbackV1, decode
from tests.conftest import RedisServer
from tests.fake_upstream import FakeUpstream
from tests.gateway_proc import API_KEY, OTHER_KEY, GatewayProcess

NAMESPACE = "fbtest"
KEYS = Keys(NAMESPACE)


SECOND_ALPHA_KEY = "sk-alpha-second-key-0b7e51"
"""Another inference key of tenant alpha (a teammate's agent)."""
ALPHA_ADMIN_KEY = "sk-alpha-admin-key-5c2d99"
"""Tenant alpha's admin key (``tenant_admin_keys``)."""


@pytest.fixture(scope="module")
def gateway(redis_server: RedisServer, upstream: FakeUpstream,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(redis_server.url, upstream.base_url, NAMESPACE,
                        tmp_path_factory.mktemp("gateway"), env={
                            "REEF_API_KEYS": json.dumps({API_KEY: "alpha", OTHER_KEY: "beta",
                                                         SECOND_ALPHA_KEY: "alpha"}),
                            "REEF_TENANT_ADMIN_KEYS": json.dumps({ALPHA_ADMIN_KEY: "alpha"})})
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture
def http(gateway: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=10,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        yield client


@pytest.fixture
def session_id() -> str:
    """A session of its own for each test, instead of wiping Redis between tests."""
    return "s-" + uuid.uuid4().hex[:12]


def start_session(gateway: GatewayProcess, session_id: str, turns: int = 1,
                  key: str = API_KEY) -> list[str]:
    """Chat ``turns`` turns in a session, so that feedback may name it; the answers' ids."""
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    return [client.chat.completions.create(
        model="fake-text", messages=[{"role": "user", "content": f"Question {i}"}],
        extra_headers={"X-Session-Id": session_id}).id for i in range(turns)]


def stored(redis_server: RedisServer, tenant: str, session_id: str) -> dict[str, Any]:
    """The feedback hash of a session, values parsed."""
    client = redis.Redis(port=redis_server.port, decode_responses=True)
    raw = client.hgetall(KEYS.feedback(tenant, session_id))
    return {str(k): orjson.loads(v) for k, v in raw.items()}


def events(redis_server: RedisServer) -> list[FeedbackV1]:
    """The feedback events the gateway appended."""
    found = [decode(f) for _, f in redis_server.client().xrange(KEYS.stream(FEEDBACK))]
    return [e for e in found if isinstance(e, FeedbackV1)]


def assert_error(resp: httpx.Response, status: int, param: str | None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert error["message"]
    return dict(error)


def test_thumbs_up_on_a_completion_the_client_received(
        gateway: GatewayProcess, redis_server: RedisServer, session_id: str) -> None:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=API_KEY, max_retries=0)
    completion = client.chat.completions.create(
        model="fake-text", messages=[{"role": "user", "content": "Hi"}],
        extra_headers={"X-Session-Id": session_id})
    before = time.time()
    answer = client.post("/feedback", cast_to=httpx.Response,
                         body={"session_id": session_id, "response_id": completion.id,
                               "rating": "up", "text": "Spot on."})
    assert answer.status_code == 200
    body = answer.json()
    target = f"turn:{completion.id}"
    assert body == {"object": "feedback", "id": body["id"], "session_id": session_id,
                    "target": target, "score": 1.0}
    assert body["id"].startswith("fb-")
    record = stored(redis_server, "alpha", session_id)
    assert list(record) == [target]
    assert record[target]["score"] == 1.0
    assert record[target]["text"] == "Spot on."
    assert record[target]["id"] == body["id"]
    assert before - 1 <= record[target]["created_at"] <= time.time() + 1
    ttl = redis_server.client().ttl(KEYS.feedback("alpha", session_id))
    assert 7 * 24 * 3600 - 60 < ttl <= 7 * 24 * 3600
    # The event the scorer acts on: no score or text in it, the turn resolved.
    [event] = [e for e in events(redis_server) if e.id == body["id"]]
    assert (event.tenant, event.session_id, event.target, event.turn_index) == (
        "alpha", session_id, target, 0)


def test_score_on_a_turn_index_with_the_session_from_the_header(
        gateway: GatewayProcess, http: httpx.Client, redis_server: RedisServer,
        session_id: str) -> None:
    start_session(gateway, session_id, turns=4)
    resp = http.post("/v1/feedback", json={"turn_index": 3, "score": -0.5,
                                           "client_version": "1.2"},  # unknown: ignored
                     headers={"X-Session-Id": session_id})
    assert resp.status_code == 200, resp.text
    assert resp.json()["target"] == "index:3"
    assert resp.json()["score"] == -0.5
    record = stored(redis_server, "alpha", session_id)
    assert record["index:3"]["score"] == -0.5
    assert record["index:3"]["text"] is None


def test_session_level_feedback_and_targets_side_by_side(
        gateway: GatewayProcess, http: httpx.Client, redis_server: RedisServer,
        session_id: str) -> None:
    [answer_id] = start_session(gateway, session_id)
    assert http.post("/v1/feedback", json={"session_id": session_id, "rating": "down"}
                     ).json()["target"] == "session"
    http.post("/v1/feedback", json={"session_id": session_id, "turn_index": 0, "score": 1})
    http.post("/v1/feedback", json={"session_id": session_id, "response_id": answer_id,
                                    "score": 0.25})
    record = stored(redis_server, "alpha", session_id)
    assert {k: v["score"] for k, v in record.items()} == {
        "session": -1.0, "index:0": 1.0, f"turn:{answer_id}": 0.25}


def test_later_feedback_on_the_same_target_wins(
        gateway: GatewayProcess, http: httpx.Client, redis_server: RedisServer,
        session_id: str) -> None:
    start_session(gateway, session_id, turns=2)
    first = http.post("/v1/feedback", json={"session_id": session_id, "turn_index": 1,
                                            "rating": "up"}).json()
    second = http.post("/v1/feedback", json={"session_id": session_id, "turn_index": 1,
                                             "rating": "down", "text": "Actually, no."}).json()
    assert first["id"] != second["id"]
    record = stored(redis_server, "alpha", session_id)
    assert list(record) == ["index:1"]
    assert record["index:1"] == {**record["index:1"], "score": -1.0, "text": "Actually, no.",
                                 "id": second["id"]}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer sk-wrong"},
                                     {"Authorization": "Basic abc"}])
def test_refused_without_a_valid_key(gateway: GatewayProcess, redis_server: RedisServer,
                                     session_id: str, headers: dict[str, str]) -> None:
    resp = httpx.post(gateway.url + "/v1/feedback", headers=headers,
                      json={"session_id": session_id, "rating": "up"})
    error = assert_error(resp, 401, None)
    assert error["code"] == "invalid_api_key"
    assert resp.headers["www-authenticate"] == "Bearer"
    for tenant in ("alpha", "beta", "dev"):
        assert stored(redis_server, tenant, session_id) == {}


def test_feedback_lands_under_the_callers_tenant_only(
        gateway: GatewayProcess, redis_server: RedisServer, session_id: str) -> None:
    # Each tenant has a session of this id: the same id from two tenants is two sessions.
    start_session(gateway, session_id, key=API_KEY)
    start_session(gateway, session_id, key=OTHER_KEY)
    resp = httpx.post(gateway.url + "/v1/feedback",
                      headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"session_id": session_id, "turn_index": 0, "rating": "up"})
    assert resp.status_code == 200
    resp = httpx.post(gateway.url + "/v1/feedback",
                      headers={"Authorization": f"Bearer {OTHER_KEY}"},
                      json={"session_id": session_id, "turn_index": 0, "rating": "down",
                            "tenant": "alpha"})  # a body cannot pick the tenant
    assert resp.status_code == 200
    assert stored(redis_server, "alpha", session_id)["index:0"]["score"] == 1.0
    assert stored(redis_server, "beta", session_id)["index:0"]["score"] == -1.0


TOO_LONG = "x" * 4001


@pytest.mark.parametrize(("body", "param"), [
    ({"rating": "up"}, "session_id"),
    ({"session_id": "", "rating": "up"}, "session_id"),
    ({"session_id": "s" * 257, "rating": "up"}, "session_id"),
    ({"session_id": 7, "rating": "up"}, "session_id"),
    ({"session_id": "s", "rating": "up", "score": 1.0}, "score"),
    ({"session_id": "s"}, "rating"),
    ({"session_id": "s", "score": 1.5}, "score"),
    ({"session_id": "s", "score": -1.01}, "score"),
    ({"session_id": "s", "score": "0.5"}, "score"),
    ({"session_id": "s", "score": True}, "score"),
    ({"session_id": "s", "rating": "meh"}, "rating"),
    ({"session_id": "s", "rating": "up", "text": TOO_LONG}, "text"),
    ({"session_id": "s", "rating": "up", "turn_index": -1}, "turn_index"),
    ({"session_id": "s", "rating": "up", "turn_index": "2"}, "turn_index"),
    ({"session_id": "s", "rating": "up", "turn_index": 1, "response_id": "c"}, "turn_index"),
    ({"session_id": "s", "rating": "up", "response_id": ""}, "response_id"),
])
def test_invalid_fields_are_named(http: httpx.Client, redis_server: RedisServer,
                                  body: dict[str, Any], param: str) -> None:
    error = assert_error(http.post("/v1/feedback", json=body), 400, param)
    assert error["type"] == "invalid_request_error"
    assert stored(redis_server, "alpha", "s") == {}


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b""])
def test_a_body_that_is_not_a_json_object_is_a_400(http: httpx.Client, raw: bytes) -> None:
    error = assert_error(http.post("/v1/feedback", content=raw,
                                   headers={"Content-Type": "application/json"}), 400, None)
    assert error["code"] == "invalid_json"


def test_an_oversized_body_is_a_413(http: httpx.Client) -> None:
    body = {"session_id": "s", "rating": "up", "padding": "x" * 70_000}
    assert_error(http.post("/v1/feedback", json=body), 413, None)


# --- feedback naming nothing: 404 -------------------------------------------------------

def assert_not_found(resp: httpx.Response, param: str) -> None:
    error = assert_error(resp, 404, param)
    assert error["code"] == "not_found" and error["type"] == "not_found_error"


def test_feedback_on_a_session_that_does_not_exist_is_a_404(
        gateway: GatewayProcess, http: httpx.Client, redis_server: RedisServer,
        session_id: str) -> None:
    started = time.monotonic()
    assert_not_found(http.post("/v1/feedback", json={"session_id": session_id,
                                                     "rating": "up"}), "session_id")
    assert time.monotonic() - started < 5  # a bounded wait for a turn being recorded
    assert_not_found(http.post("/v1/feedback", json={"turn_index": 0, "rating": "up"},
                               headers={"X-Session-Id": session_id}), "session_id")
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as err:  # what the official client raises
        client.post("/feedback", cast_to=httpx.Response,
                    body={"session_id": session_id, "rating": "down"})
    assert err.value.code == "not_found"
    assert stored(redis_server, "alpha", session_id) == {}
    assert [e for e in events(redis_server) if e.session_id == session_id] == []


def test_feedback_on_an_answer_or_turn_not_in_the_session_is_a_404(
        gateway: GatewayProcess, http: httpx.Client, redis_server: RedisServer,
        session_id: str) -> None:
    [answer_id] = start_session(gateway, session_id)
    [elsewhere] = start_session(gateway, session_id + "-other")
    for response_id in ("chatcmpl-never-answered", elsewhere):
        assert_not_found(http.post("/v1/feedback", json={
            "session_id": session_id, "response_id": response_id, "rating": "up"}),
            "response_id")
    assert_not_found(http.post("/v1/feedback", json={
        "session_id": session_id, "turn_index": 1, "rating": "up"}), "turn_index")
    assert stored(redis_server, "alpha", session_id) == {}
    resp = http.post("/v1/feedback", json={"session_id": session_id, "response_id": answer_id,
                                           "rating": "up"})
    assert resp.status_code == 200, resp.text


def test_feedback_on_another_tenants_session_is_a_404(
        gateway: GatewayProcess, redis_server: RedisServer, session_id: str) -> None:
    [answer_id] = start_session(gateway, session_id, key=API_KEY)  # alpha's session
    for body in ({"session_id": session_id, "rating": "down"},
                 {"session_id": session_id, "response_id": answer_id, "rating": "down"}):
        resp = httpx.post(gateway.url + "/v1/feedback", json=body,
                          headers={"Authorization": f"Bearer {OTHER_KEY}"})
        assert_not_found(resp, "session_id")
    assert stored(redis_server, "beta", session_id) == {}
    assert stored(redis_server, "alpha", session_id) == {}


def test_session_keys_expire_with_the_session(
        gateway: GatewayProcess, redis_server: RedisServer, session_id: str) -> None:
    [answer_id] = start_session(gateway, session_id)
    client, window = redis_server.client(), 7 * 24 * 3600
    for key in (KEYS.turn_index("alpha", session_id),
                KEYS.session_responses("alpha", session_id)):
        assert window - 60 < client.ttl(key) <= window, key
    assert client.hget(KEYS.session_responses("alpha", session_id), answer_id) == b"0"


# Last in the module: the gateway's pool keeps connections from before the restart, and
# each one fails once (a 503 the client retries) when next used.
def test_feedback_is_taken_only_from_the_sessions_own_key_or_the_tenants_admin(
        gateway: GatewayProcess, redis_server: RedisServer, session_id: str) -> None:
    """Before: any key of the tenant could rate any session of it, and so steer the
    rewards another agent's adapter learns from."""
    (answer,) = start_session(gateway, session_id)  # made by API_KEY
    body = {"session_id": session_id, "response_id": answer, "rating": "down"}

    def post(key: str) -> httpx.Response:
        return httpx.post(gateway.url + "/v1/feedback", json=body, timeout=10,
                          headers={"Authorization": f"Bearer {key}"})

    error = assert_error(post(SECOND_ALPHA_KEY), 403, "session_id")
    assert error["code"] == "permission_denied"
    assert "turn:" + answer not in stored(redis_server, "alpha", session_id)
    assert post(API_KEY).status_code == 200
    body["rating"] = "up"
    assert post(ALPHA_ADMIN_KEY).status_code == 200  # the tenant's admin may
    assert stored(redis_server, "alpha", session_id)["turn:" + answer]["score"] == 1.0
    assert post(OTHER_KEY).status_code == 404  # another tenant: no such session


def test_redis_down_is_a_503_and_feedback_works_again_after(
        gateway: GatewayProcess, http: httpx.Client, redis_server: RedisServer,
        session_id: str) -> None:
    start_session(gateway, session_id)
    redis_server.kill()
    try:
        started = time.monotonic()
        resp = http.post("/v1/feedback", json={"session_id": session_id, "rating": "up"})
        assert time.monotonic() - started < 5
        error = assert_error(resp, 503, None)
        assert "Redis" in error["message"]
        assert error["code"] == "service_unavailable"
        assert resp.headers["retry-after"] == "1"
    finally:
        redis_server.start()
    resp = http.post("/v1/feedback", json={"session_id": session_id, "rating": "down"})
    assert resp.status_code == 200, resp.text
    assert stored(redis_server, "alpha", session_id)["session"]["score"] == -1.0
