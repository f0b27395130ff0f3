"""Schemathesis against the gateway's own OpenAPI document: a real gateway process in front
of the fake upstream, every operation fuzzed with valid and invalid input. No answer may
be a 5xx, every 4xx must be in OpenAI's error shape, and every answer must match the
document (which makes the document's description of the raw chat route checked too)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    CheckContext,
    not_a_server_error,
    response_schema_conformance,
)

from shared.keys import FINALISED, SCORED, TURNS, Keys
from tests.conftest import RedisServer
from tests.fake_llm import FakeLLM
from tests.fake_upstream import FakeUpstream
from tests.gateway_proc import API_KEY, GatewayProcess
from tests.service_proc import scorer_process
from tests.test_skill_miner import llm_server, miner_process

__all__ = ["llm_server"]  # a fixture, imported for this module's tests
ADMIN_KEY = "sk-admin-schemathesis"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
"""The schema is for the API's clients: served with an inference (or admin) key only."""
MAX_EXAMPLES = int(os.environ.get("REEF_FUZZ_EXAMPLES", "25"))
"""Per operation and generation mode; 25 keeps the module near 20 s on 2 cores. A longer
hunt: ``REEF_FUZZ_EXAMPLES=500 REEF_FUZZ_SEED=random pytest tests/test_schemathesis.py``."""
DETERMINISTIC = os.environ.get("REEF_FUZZ_SEED") != "random"
"""CI replays the same examples each run; a random hunt explores new ones."""
ERROR_FIELDS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def gateway(redis_server: RedisServer, upstream: FakeUpstream,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(redis_server.url, upstream.base_url, "fuzz",
                        tmp_path_factory.mktemp("gateway"),
                        # A loaded CI machine must not turn a slow fake answer into a 504;
                        # fuzzed feedback names sessions that never existed: 404 at once.
                        env={"REEF_ADMIN_KEY": ADMIN_KEY, "REEF_UPSTREAM_TIMEOUT_SECONDS": "30",
                             "REEF_FEEDBACK_NOT_FOUND_WAIT_SECONDS": "0"})
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def api_schema(gateway: GatewayProcess) -> Any:
    schema = schemathesis.openapi.from_url(gateway.url + "/openapi.json", headers=AUTH)
    schema.config.update(base_url=gateway.url)
    schema.config.generation.update(
        modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=MAX_EXAMPLES,
        database="none", deterministic=DETERMINISTIC)
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


def openai_error_shape(ctx: CheckContext, response: Any, case: Any) -> bool | None:
    """Every 4xx answer has OpenAI's error body."""
    if not 400 <= response.status_code < 500:
        return None
    assert_openai_error(response.status_code, response.content)
    return True


def assert_openai_error(status: int, body: bytes) -> None:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise AssertionError(f"{status} answer is not JSON: {body[:300]!r}") from None
    assert isinstance(parsed, dict) and set(parsed) == {"error"}, body[:300]
    error = parsed["error"]
    assert isinstance(error, dict) and set(error) == ERROR_FIELDS, body[:300]
    assert isinstance(error["message"], str) and error["message"], body[:300]
    assert isinstance(error["type"], str) and error["type"], body[:300]
    assert error["param"] is None or isinstance(error["param"], str), body[:300]
    assert error["code"] is None or isinstance(error["code"], str), body[:300]


def test_schema_describes_the_raw_chat_route(gateway: GatewayProcess) -> None:
    assert httpx.get(gateway.url + "/openapi.json", timeout=5).status_code == 401
    assert httpx.get(gateway.url + "/openapi.json", timeout=5,
                     headers={"Authorization": f"Bearer {ADMIN_KEY}"}).status_code == 200
    doc = httpx.get(gateway.url + "/openapi.json", headers=AUTH, timeout=5).json()
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    body = doc["components"]["schemas"]["ChatCompletionRequest"]
    assert set(body["required"]) == {"model", "messages"}
    assert body["properties"]["n"]["maximum"] == 16
    assert chat["responses"]["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Error"}
    feedback = doc["paths"]["/v1/feedback"]["post"]
    assert feedback["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/FeedbackRequest"}
    assert "Feedback" in feedback["responses"]["200"]["content"]["application/json"][
        "schema"]["$ref"]
    assert all("422" not in op["responses"] for item in doc["paths"].values()
               for op in item.values())


@schema.parametrize()
@settings(deadline=None, database=None, max_examples=MAX_EXAMPLES,
          derandomize=DETERMINISTIC, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_gateway_api(case: Any) -> None:
    key = ADMIN_KEY if case.path.startswith("/admin") else API_KEY
    case.headers = {**(case.headers or {}), "Authorization": f"Bearer {key}"}
    case.call_and_validate(checks=[not_a_server_error, response_schema_conformance],
                           additional_checks=[openai_error_shape],
                           timeout=10)


def test_workers_take_every_turn_the_fuzzed_gateway_recorded(
        gateway: GatewayProcess, redis_server: RedisServer, llm_server: FakeLLM,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """What the gateway accepted from the fuzzer (odd content parts, names, tool calls,
    vendor fields) is recorded; the scorer must score every such turn and the skill-miner
    take every scored one, without a handler failing on it."""
    client, keys = redis_server.client(), Keys(gateway.namespace)
    recorded = client.xlen(keys.stream(TURNS))
    if recorded == 0:
        pytest.skip("runs on the turns test_gateway_api recorded (run the module)")
    scorer = scorer_process(redis_server.url, gateway.namespace,
                            tmp_path_factory.mktemp("scorer"),
                            env={"REEF_SESSION_IDLE_SECONDS": "0.3"})
    scorer.start()
    try:
        deadline = time.monotonic() + 30
        while client.xlen(keys.stream(SCORED)) < recorded:
            dead = client.xlen(keys.dead(TURNS)) + client.xlen(keys.dead(FINALISED))
            assert dead == 0, client.xrange(keys.dead(TURNS)) + client.xrange(
                keys.dead(FINALISED))
            assert time.monotonic() < deadline, (client.xlen(keys.stream(SCORED)), recorded)
            time.sleep(0.1)
        assert scorer.metric("reef_worker_entries_total") >= 2 * recorded
        assert "handler_failed" not in scorer.log_path.read_text()
    finally:
        scorer.stop()
    # ... and the skill-miner must take every one of them from the scored stream.
    miner = miner_process(redis_server, gateway.namespace, tmp_path_factory.mktemp("miner"),
                          llm_server)
    miner.start()
    try:
        deadline = time.monotonic() + 30
        while miner.metric("reef_worker_entries_total") < recorded:
            assert time.monotonic() < deadline, miner.metric("reef_worker_entries_total")
            time.sleep(0.1)
        assert client.xlen(keys.dead(SCORED)) == 0, client.xrange(keys.dead(SCORED))
        assert "handler_failed" not in miner.log_path.read_text()
    finally:
        miner.stop()
