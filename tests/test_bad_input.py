"""Bad input to a real gateway process: each case gets a 4xx in OpenAI's error shape naming
what is wrong, reaches neither the upstream nor the ``turns`` stream, and leaves the
gateway serving the next good request. (The basic 400s are in ``test_gateway``.)"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from shared.keys import TURNS, Keys
from shared.messages import decode
from tests.conftest import RedisServer
from tests.fake_upstream import FakeUpstream
from tests.gateway_proc import API_KEY, GatewayProcess

NAMESPACE = "badin"
LIMIT = 256 * 1024
"""``REEF_MAX_BODY_BYTES`` here: room for 100k nested arrays (200 KB)."""
MAX_CHOICES = 8
MAX_OUTPUT_TOKENS = 4096
USER = {"role": "user", "content": "Hi"}


@pytest.fixture(scope="module")
def gateway(redis_server: RedisServer, upstream: FakeUpstream,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(redis_server.url, upstream.base_url, NAMESPACE,
                        tmp_path_factory.mktemp("gateway"),
                        env={"REEF_MAX_BODY_BYTES": str(LIMIT),
                             "REEF_MAX_CHOICES": str(MAX_CHOICES),
                             "REEF_MAX_OUTPUT_TOKENS": str(MAX_OUTPUT_TOKENS)})
    gw.start()
    yield gw
    gw.stop()


@dataclass
class Probe:
    """Sends one bad request, then checks its error and that nothing came of it."""

    gateway: GatewayProcess
    upstream: FakeUpstream
    redis: RedisServer

    def post(self, content: bytes | Iterator[bytes], headers: dict[str, str] | None = None,
             path: str = "/v1/chat/completions") -> tuple[httpx.Response, str]:
        session = "bad-" + uuid.uuid4().hex[:12]
        hdrs = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json",
                "X-Session-Id": session, **(headers or {})}
        hdrs = {k: v for k, v in hdrs.items() if v}
        resp = httpx.post(self.gateway.url + path, content=content, headers=hdrs, timeout=10)
        return resp, session

    def rejects(self, content: bytes | Iterator[bytes], status: int, param: str | None,
                *words: str, code: str | None = None,
                headers: dict[str, str] | None = None,
                path: str = "/v1/chat/completions") -> dict[str, Any]:
        """Assert the whole contract of a rejected request; return its error object."""
        seen = len(self.upstream.requests)
        resp, session = self.post(content, headers, path)
        assert resp.status_code == status, resp.text[:500]
        assert resp.headers["content-type"] == "application/json"
        body = resp.json()
        assert set(body) == {"error"}
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["type"] == "invalid_request_error"
        assert err["param"] == param, err
        for word in words:
            assert word in err["message"], err["message"]
        if code is not None:
            assert err["code"] == code
        self.serves_a_good_request()
        assert len(self.upstream.requests) == seen + 1, "the bad request reached the upstream"
        assert not self.turns_of(session), "the bad request was recorded"
        return err

    def serves_a_good_request(self) -> None:
        assert self.gateway.proc is not None and self.gateway.proc.poll() is None
        session = "good-" + uuid.uuid4().hex[:12]
        resp = httpx.post(self.gateway.url + "/v1/chat/completions",
                          headers={"Authorization": f"Bearer {API_KEY}",
                                   "X-Session-Id": session},
                          json={"model": "fake-text", "messages": [USER]}, timeout=10)
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"]
        # Turns are recorded in order: once the good one is in, a bad one would be too.
        deadline = time.monotonic() + 5
        while not self.turns_of(session):
            assert time.monotonic() < deadline, "the good request was not recorded"
            time.sleep(0.02)

    def turns_of(self, session: str) -> list[Any]:
        entries = self.redis.client().xrange(Keys(NAMESPACE).stream(TURNS))
        return [m for m in (decode(f) for _, f in entries)
                if getattr(m, "session_id", None) == session]


@pytest.fixture
def probe(gateway: GatewayProcess, upstream: FakeUpstream, redis_server: RedisServer) -> Probe:
    return Probe(gateway, upstream, redis_server)


def chat(**fields: Any) -> bytes:
    return json.dumps({"model": "fake-text", "messages": [USER], **fields}).encode()


def with_message(message: Any) -> bytes:
    return chat(messages=[USER, message])


# --- size, encoding, nesting ---------------------------------------------------------

def test_oversized_body_with_content_length(probe: Probe) -> None:
    body = chat(messages=[{"role": "user", "content": "x" * (LIMIT + 10_000)}])
    probe.rejects(body, 413, None, str(LIMIT), code="request_too_large")


def test_declared_length_over_the_limit_is_refused_before_the_body(
        gateway: GatewayProcess, probe: Probe) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            piece = sock.recv(65536)  # the 413 comes though not a byte of body was sent
            if not piece:
                break
            answer += piece
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer[:300]
    assert json.loads(body)["error"]["code"] == "request_too_large"
    probe.serves_a_good_request()


def test_oversized_chunked_body_without_content_length(probe: Probe) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "fake-text", "messages": [{"role": "user", "content": "'
        for _ in range(LIMIT // 8192 + 2):
            yield b"y" * 8192
        yield b'"}]}'

    probe.rejects(chunks(), 413, None, str(LIMIT), code="request_too_large")


def test_chunked_body_under_the_limit_is_served(probe: Probe) -> None:
    resp, _ = probe.post(iter([chat()[:10], chat()[10:]]))
    assert resp.status_code == 200, resp.text


def test_invalid_utf8(probe: Probe) -> None:
    body = b'{"model": "fake-text", "messages": [{"role": "user", "content": "caf\xe9 \xff"}]}'
    probe.rejects(body, 400, None, "UTF-8", code="invalid_json")


def test_100k_nested_arrays(probe: Probe) -> None:
    depth = 100_000
    body = b'{"model": "fake-text", "messages": [USER], "x": ' + b"[" * depth + b"]" * depth
    body = body.replace(b"USER", json.dumps(USER).encode()) + b"}"
    assert len(body) < LIMIT
    probe.rejects(body, 400, None, "parse", code="invalid_json")


def test_nesting_the_parser_takes_but_a_turn_could_not_be_written_with(probe: Probe) -> None:
    # 300 levels parse (orjson reads 1,024) but would not serialise (254): refused up
    # front rather than failing after the answer, when the turn is recorded.
    deep: Any = "bottom"
    for _ in range(300):
        deep = [deep]
    probe.rejects(chat(vendor_field=deep), 400, None, "nested more than 64 levels",
                  code="invalid_json")


def test_deep_nesting_in_a_message(probe: Probe) -> None:
    deep: Any = {"type": "text", "text": "x"}
    for _ in range(80):
        deep = {"inner": deep}
    probe.rejects(with_message({"role": "user", "content": [deep]}), 400, None, "nested")


# --- limits --------------------------------------------------------------------------

def test_huge_n(probe: Probe) -> None:
    probe.rejects(chat(n=1_000_000), 400, "n", f"at most {MAX_CHOICES}")


def test_huge_max_tokens(probe: Probe) -> None:
    probe.rejects(chat(max_tokens=10**12), 400, "max_tokens", f"at most {MAX_OUTPUT_TOKENS}")


def test_huge_max_completion_tokens(probe: Probe) -> None:
    probe.rejects(chat(max_completion_tokens=MAX_OUTPUT_TOKENS + 1), 400,
                  "max_completion_tokens", f"at most {MAX_OUTPUT_TOKENS}")


def test_max_tokens_beyond_64_bits(probe: Probe) -> None:
    body = chat().replace(b'"model"', b'"max_tokens": 123456789012345678901234567890, "model"')
    probe.rejects(body, 400, "max_tokens", "positive integer")


def test_limits_themselves_are_served(probe: Probe, upstream: FakeUpstream) -> None:
    resp, _ = probe.post(chat(n=MAX_CHOICES, max_tokens=MAX_OUTPUT_TOKENS))
    assert resp.status_code == 200, resp.text
    assert upstream.requests[-1]["n"] == MAX_CHOICES


# --- messages ------------------------------------------------------------------------

def test_unknown_role(probe: Probe) -> None:
    probe.rejects(with_message({"role": "narrator", "content": "x"}), 400, "messages[1].role",
                  "'narrator'", "assistant")


def test_role_of_the_wrong_type(probe: Probe) -> None:
    # An object as role was a 500 (unhashable in the set of roles), found by schemathesis.
    probe.rejects(with_message({"role": {"name": "user"}, "content": "x"}), 400,
                  "messages[1].role")


def test_missing_role(probe: Probe) -> None:
    probe.rejects(with_message({"content": "x"}), 400, "messages[1].role", "None")


def test_empty_messages(probe: Probe) -> None:
    probe.rejects(chat(messages=[]), 400, "messages", "non-empty")


def test_messages_not_a_list(probe: Probe) -> None:
    probe.rejects(chat(messages={"role": "user", "content": "x"}), 400, "messages", "array")


def test_message_not_an_object(probe: Probe) -> None:
    probe.rejects(chat(messages=["Hi"]), 400, "messages[0]", "object")


@pytest.mark.parametrize("content", [42, True, {"text": "x"}])
def test_content_of_the_wrong_type(probe: Probe, content: Any) -> None:
    probe.rejects(with_message({"role": "user", "content": content}), 400,
                  "messages[1].content", "string or an array", type(content).__name__)


def test_content_parts_that_are_not_typed_objects(probe: Probe) -> None:
    probe.rejects(with_message({"role": "user", "content": ["just text"]}), 400,
                  "messages[1].content[0]", "'type'")
    probe.rejects(with_message({"role": "user", "content": [{"text": "no type"}]}), 400,
                  "messages[1].content[0]")




def test_content_parts_and_null_assistant_content_are_served(probe: Probe) -> None:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{}"}}
    resp, _ = probe.post(chat(messages=[
        {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]))
    assert resp.status_code == 200, resp.text


# --- tool calls ----------------------------------------------------------------------

def _assistant(tool_calls: Any) -> bytes:
    return with_message({"role": "assistant", "content": None, "tool_calls": tool_calls})


def test_tool_calls_not_a_list(probe: Probe) -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    probe.rejects(_assistant(call), 400, "messages[1].tool_calls", "array")


def test_tool_call_not_an_object(probe: Probe) -> None:
    probe.rejects(_assistant(["get_weather"]), 400, "messages[1].tool_calls[0]", "object")


def test_tool_call_without_function(probe: Probe) -> None:
    probe.rejects(_assistant([{"id": "c", "type": "function"}]), 400,
                  "messages[1].tool_calls[0].function", "'name' and 'arguments'")


def test_tool_call_missing_function_name(probe: Probe) -> None:
    probe.rejects(_assistant([{"id": "c", "type": "function",
                               "function": {"arguments": "{}"}}]),
                  400, "messages[1].tool_calls[0].function.name", "non-empty string")


def test_tool_call_arguments_not_a_string(probe: Probe) -> None:
    probe.rejects(_assistant([{"id": "c", "type": "function",
                               "function": {"name": "f", "arguments": {"city": "Paris"}}}]),
                  400, "messages[1].tool_calls[0].function.arguments", "JSON text", "dict")


def test_tool_call_id_not_a_string(probe: Probe) -> None:
    probe.rejects(_assistant([{"id": 7, "type": "function",
                               "function": {"name": "f", "arguments": "{}"}}]),
                  400, "messages[1].tool_calls[0].id", "string")


def test_tool_message_without_tool_call_id(probe: Probe) -> None:
    probe.rejects(with_message({"role": "tool", "content": "sunny"}), 400,
                  "messages[1].tool_call_id", "tool call it answers")


def test_tools_not_a_list(probe: Probe) -> None:
    probe.rejects(chat(tools={"type": "function"}), 400, "tools", "array")


# --- the body as a whole -------------------------------------------------------------

@pytest.mark.parametrize("raw", [b'"a string"', b"null", b"42", b"[]"])
def test_body_that_is_not_an_object(probe: Probe, raw: bytes) -> None:
    probe.rejects(raw, 400, None, "JSON object", code="invalid_json")


def test_empty_body(probe: Probe) -> None:
    probe.rejects(b"", 400, None, "empty", code="invalid_json")


def test_missing_model(probe: Probe) -> None:
    probe.rejects(json.dumps({"messages": [USER]}).encode(), 400, "model", "Missing")


@pytest.mark.parametrize("session_id", ["a\r\nSet-Cookie: x=1", "nul\x00", "x" * 257, 42])
def test_unusable_session_id_in_the_body(probe: Probe, session_id: Any) -> None:
    # The session id is echoed in X-Reef-Session-Id: a control character there made the
    # gateway drop the connection after the upstream had answered (found by schemathesis).
    probe.rejects(chat(session_id=session_id), 400, "session_id", "session id",
                  headers={"X-Session-Id": ""})


def test_stream_options_not_an_object(probe: Probe) -> None:
    probe.rejects(chat(stream=True, stream_options=True), 400, "stream_options", "object")


def test_missing_content_type_is_read_as_json(probe: Probe) -> None:
    # Many HTTP libraries send no Content-Type with a raw body: the body is still JSON.
    resp, session = probe.post(chat(), headers={"Content-Type": ""})
    assert resp.status_code == 200, resp.text
    probe.serves_a_good_request()
    assert probe.turns_of(session)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_non_json_content_type(probe: Probe, content_type: str) -> None:
    probe.rejects(chat(), 415, None, "application/json", content_type.split(";")[0],
                  code="unsupported_media_type", headers={"Content-Type": content_type})


def test_json_with_charset_and_vendor_json_types_are_served(probe: Probe) -> None:
    for content_type in ("application/json; charset=utf-8", "application/vnd.api+json"):
        resp, _ = probe.post(chat(), headers={"Content-Type": content_type})
        assert resp.status_code == 200, (content_type, resp.text)


# --- the feedback route shares the reader --------------------------------------------

def test_feedback_deeply_nested_and_invalid_utf8(probe: Probe) -> None:
    deep = b'{"session_id": "s", "rating": "up", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    probe.rejects(deep, 400, None, "parse", path="/v1/feedback")
    probe.rejects(b'{"session_id": "s\xff", "rating": "up"}', 400, None, "UTF-8",
                  path="/v1/feedback")
