"""The gateway end to end: the official openai client -> gateway process -> fake upstream,
with turns checked in a real Redis."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from shared.keys import TURNS, Keys
from shared.messages import TurnV1, decode
from tests.conftest import RedisServer, free_port
from tests.fake_upstream import TEXT_PIECES, TOOL_CALL, FakeUpstream
from tests.gateway_proc import API_KEY, METRICS_AUTH, OTHER_KEY, GatewayProcess

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def gateway(redis_server: RedisServer, upstream: FakeUpstream,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(redis_server.url, upstream.base_url, "gwtest",
                        tmp_path_factory.mktemp("gateway"),
                        env={"REEF_REQUEST_LOGPROBS": "true", "REEF_REQUEST_TOKEN_IDS": "true"})
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture
def client(gateway: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=API_KEY, max_retries=0)


def turns(redis_server: RedisServer, namespace: str = "gwtest") -> list[TurnV1]:
    entries = redis_server.client().xrange(Keys(namespace).stream(TURNS))
    out = []
    for _, fields in entries:
        msg = decode(fields)
        assert isinstance(msg, TurnV1)
        out.append(msg)
    return out


def wait_turn(redis_server: RedisServer, session_id: str, count: int = 1,
              timeout: float = 5.0, namespace: str = "gwtest") -> list[TurnV1]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [t for t in turns(redis_server, namespace) if t.session_id == session_id]
        if len(found) >= count:
            return found
        time.sleep(0.02)
    raise AssertionError(f"{count} turn(s) of session {session_id} not recorded")


def test_non_streaming_answer_is_recorded_as_the_client_saw_it(
        client: openai.OpenAI, redis_server: RedisServer, upstream: FakeUpstream) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    resp = client.chat.completions.create(model="fake-text", messages=messages,  # type: ignore[arg-type]
                                          extra_headers={"X-Session-Id": "s-plain"})
    assert resp.choices[0].message.content == "".join(TEXT_PIECES)
    # Reef asked the upstream for logprobs and token ids; the client did not, so sees none.
    assert upstream.requests[-1]["logprobs"] is True
    assert resp.choices[0].logprobs is None
    assert "token_ids" not in (resp.choices[0].model_extra or {})
    (turn,) = wait_turn(redis_server, "s-plain")
    assert turn.tenant == "alpha" and turn.turn_index == 0 and turn.turn_type == "main"
    assert turn.messages == messages
    assert turn.response_message["content"] == resp.choices[0].message.content
    assert turn.finish_reason == "stop" and not turn.stream and turn.completed
    assert turn.usage is not None and turn.usage.total_tokens == 13
    assert turn.sampled is not None
    assert turn.sampled.token_ids == [100, 101, 102, 103, 104, 105]
    assert turn.sampled.logprobs == [-0.5] * 6 and turn.sampled.prompt_token_ids == [1, 2, 3]


def test_streamed_tool_call_round_trips_and_is_recorded(
        client: openai.OpenAI, redis_server: RedisServer) -> None:
    stream = client.chat.completions.create(
        model="fake-tools", messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=TOOLS, stream=True, extra_headers={"X-Session-Id": "s-tools"})  # type: ignore[arg-type]
    name, args, call_id, finish = "", "", None, None
    for chunk in stream:
        for choice in chunk.choices:
            assert choice.index == 0
            finish = choice.finish_reason or finish
            for call in choice.delta.tool_calls or ():
                assert call.index == 0
                call_id = call.id or call_id
                name += (call.function.name or "") if call.function else ""
                args += (call.function.arguments or "") if call.function else ""
    assert (call_id, name, args) == (TOOL_CALL["id"], "get_weather",
                                     TOOL_CALL["function"]["arguments"])
    assert finish == "tool_calls"
    (turn,) = wait_turn(redis_server, "s-tools")
    assert turn.stream and turn.finish_reason == "tool_calls"
    assert turn.response_message["tool_calls"] == [TOOL_CALL]
    assert turn.request_params["tools"] == TOOLS
    assert turn.usage is not None  # Reef asked for the usage chunk ...


def test_stream_usage_chunk_only_when_asked(client: openai.OpenAI) -> None:
    # ... and removed it from the stream because the client did not ask.
    chunks = list(client.chat.completions.create(
        model="fake-text", messages=[{"role": "user", "content": "Hi"}], stream=True))
    assert all(c.usage is None for c in chunks)
    assert all(c.choices[0].logprobs is None for c in chunks if c.choices)
    chunks = list(client.chat.completions.create(
        model="fake-text", messages=[{"role": "user", "content": "Hi"}], stream=True,
        stream_options={"include_usage": True}, logprobs=True))
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 13
    assert chunks[1].choices[0].logprobs is not None


def test_stream_arrives_incrementally(client: openai.OpenAI, redis_server: RedisServer) -> None:
    started = time.monotonic()
    arrivals = []
    text = ""
    for chunk in client.chat.completions.create(
            model="fake-slow", messages=[{"role": "user", "content": "Hi"}], stream=True,
            extra_headers={"X-Session-Id": "s-slow"}):
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - started)
            text += chunk.choices[0].delta.content
    # The upstream spaces its 6 pieces 0.3 s apart: the first reaches the client long
    # before the last one was even produced.
    assert len(arrivals) == len(TEXT_PIECES)
    assert arrivals[-1] - arrivals[0] > 1.0
    (turn,) = wait_turn(redis_server, "s-slow")
    assert turn.response_message["content"] == text


def test_reasoning_content_and_unknown_fields_pass_through(
        client: openai.OpenAI, upstream: FakeUpstream, redis_server: RedisServer) -> None:
    resp = client.chat.completions.create(
        model="fake-reasoning", messages=[{"role": "user", "content": "Hi"}],
        extra_body={"top_k": 5, "vendor_thing": {"nested": [1, 2]}, "session_id": "s-body",
                    "turn_type": "side"})
    assert (resp.choices[0].message.model_extra or {})["reasoning_content"] == "Think first."
    sent = upstream.requests[-1]
    assert sent["top_k"] == 5 and sent["vendor_thing"] == {"nested": [1, 2]}
    assert "session_id" not in sent and "turn_type" not in sent
    (turn,) = wait_turn(redis_server, "s-body")
    assert turn.turn_type == "side"
    assert turn.response_message["reasoning_content"] == "Think first."


def test_sessions_count_turns_and_default_per_key_and_user(
        gateway: GatewayProcess, redis_server: RedisServer) -> None:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=API_KEY)
    for i in range(3):
        client.chat.completions.create(
            model="fake-text", messages=[{"role": "user", "content": f"q{i}"}],
            extra_headers={"X-Session-Id": "s-count",
                           "X-Session-Done": "true" if i == 2 else "false"})
    recorded = wait_turn(redis_server, "s-count", 3)
    assert [t.turn_index for t in recorded] == [0, 1, 2]
    assert [t.session_done for t in recorded] == [False, False, True]

    def session_of(key: str, user: str | None) -> str:
        extra = {"user": user} if user else {}
        r = httpx.post(gateway.url + "/v1/chat/completions",
                       headers={"Authorization": f"Bearer {key}"},
                       json={"model": "fake-text", "messages": [{"role": "user", "content": "x"}],
                             **extra})
        assert r.status_code == 200
        return r.headers["x-reef-session-id"]

    assert session_of(API_KEY, "ann") == session_of(API_KEY, "ann")
    assert len({session_of(API_KEY, "ann"), session_of(API_KEY, "bob"),
                session_of(OTHER_KEY, "ann"), session_of(API_KEY, None)}) == 4


def _post(gateway: GatewayProcess, content: bytes, key: str | None = API_KEY,
          headers: dict[str, str] | None = None) -> httpx.Response:
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    if key:
        hdrs["Authorization"] = f"Bearer {key}"
    return httpx.post(gateway.url + "/v1/chat/completions", content=content, headers=hdrs,
                      timeout=10)


def _assert_openai_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    return err


def _body(**fields: object) -> bytes:
    base = {"model": "fake-text", "messages": [{"role": "user", "content": "Hi"}]}
    return json.dumps({**base, **fields}).encode()


def test_client_errors_in_openai_shape(gateway: GatewayProcess) -> None:
    _assert_openai_error(_post(gateway, b"{oops"), 400)
    _assert_openai_error(_post(gateway, b"[1, 2]"), 400)
    _assert_openai_error(_post(gateway, b'{"model": "fake-text"}'), 400, "messages")
    _assert_openai_error(_post(gateway, _body(messages=[{"role": "wizard", "content": "x"}])),
                         400, "messages[0].role")
    _assert_openai_error(_post(gateway, _body(model=7)), 400, "model")
    _assert_openai_error(_post(gateway, _body(n=0)), 400, "n")
    _assert_openai_error(_post(gateway, _body(stream="yes")), 400, "stream")
    _assert_openai_error(_post(gateway, _body(), headers={"X-Turn-Type": "cron"}), 400)
    big = _body(messages=[{"role": "user", "content": "x" * 70_000}])
    _assert_openai_error(_post(gateway, big), 413)
    err = _assert_openai_error(_post(gateway, _body(), key=None), 401)
    assert err["code"] == "invalid_api_key"
    _assert_openai_error(_post(gateway, _body(), key="sk-wrong"), 401)
    _assert_openai_error(httpx.get(gateway.url + "/v1/nothing"), 404)


def test_openai_client_raises_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="fake-400",
                                       messages=[{"role": "user", "content": "Hi"}])
    assert bad.value.status_code == 400 and "bad temperature" in str(bad.value)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=str(client.base_url), api_key="sk-nope",
                      max_retries=0).models.list()


def test_upstream_failures(gateway: GatewayProcess) -> None:
    err = _assert_openai_error(_post(gateway, _body(model="fake-400")), 400, "temperature")
    assert err["message"] == "bad temperature"  # passed through, not turned into a 502
    _assert_openai_error(_post(gateway, _body(model="fake-500")), 500)
    _assert_openai_error(_post(gateway, _body(model="fake-garbage")), 502)
    started = time.monotonic()
    err = _assert_openai_error(_post(gateway, _body(model="fake-hang")), 504)
    assert err["code"] == "upstream_timeout" and time.monotonic() - started < 8


def test_unreachable_upstream_is_502_after_retries(
        redis_server: RedisServer, tmp_path: Path) -> None:
    gw = GatewayProcess(redis_server.url, f"http://127.0.0.1:{free_port()}/v1", "gwdead",
                        tmp_path)
    gw.start()
    try:
        err = _assert_openai_error(_post(gw, _body()), 502)
        assert err["code"] == "upstream_unreachable"
    finally:
        gw.stop()


def test_client_disconnect_cancels_upstream(
        gateway: GatewayProcess, upstream: FakeUpstream, redis_server: RedisServer) -> None:
    before = upstream.disconnects
    with httpx.stream("POST", gateway.url + "/v1/chat/completions",
                      headers={"Authorization": f"Bearer {API_KEY}", "X-Session-Id": "s-gone"},
                      content=_body(model="fake-slow", stream=True), timeout=10) as resp:
        for line in resp.iter_lines():
            if "Hello" in line:
                break
    deadline = time.monotonic() + 5
    while upstream.disconnects == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert upstream.disconnects == before + 1
    (turn,) = wait_turn(redis_server, "s-gone")
    assert not turn.completed and turn.response_message["content"].startswith("Hello")


def test_models_health_ready_metrics(client: openai.OpenAI, gateway: GatewayProcess) -> None:
    assert [m.id for m in client.models.list()] == ["fake-text"]
    assert httpx.get(gateway.url + "/healthz").status_code == 200
    ready = httpx.get(gateway.url + "/readyz").json()
    assert ready["redis"] is True and ready["spooling"] is False
    text = httpx.get(gateway.url + "/metrics", headers=METRICS_AUTH).text
    assert "reef_gateway_requests_total" in text and "reef_gateway_turns_recorded_total" in text


def test_turns_spool_while_redis_is_down_and_replay_in_order(
        gateway: GatewayProcess, redis_server: RedisServer, client: openai.OpenAI) -> None:
    client.chat.completions.create(model="fake-text",
                                   messages=[{"role": "user", "content": "before"}],
                                   extra_headers={"X-Session-Id": "s-spool"})
    wait_turn(redis_server, "s-spool", 1)
    redis_server.kill()
    try:
        for i in range(5):
            resp = client.chat.completions.create(
                model="fake-text", messages=[{"role": "user", "content": f"down {i}"}],
                extra_headers={"X-Session-Id": "s-spool"})
            assert resp.choices[0].message.content  # the agent notices nothing
        deadline = time.monotonic() + 10
        while gateway.metric("reef_gateway_turns_spooled_total") < 5:
            assert time.monotonic() < deadline, "turns were not spooled"
            time.sleep(0.05)
        assert httpx.get(gateway.url + "/readyz").json()["spooling"] is True
    finally:
        redis_server.start()
    recorded = wait_turn(redis_server, "s-spool", 6, timeout=15)
    assert [t.messages[-1]["content"] for t in recorded] == ["before"] + [
        f"down {i}" for i in range(5)]
    assert [t.turn_index for t in recorded] == list(range(6))
    assert len({t.id for t in recorded}) == 6
