"""A zero-latency OpenAI-compatible upstream for the gateway benchmark.

A raw asyncio HTTP/1.1 server (uvloop when installed), because any framework would make the
upstream, not the proxy under test, the bottleneck. It answers:

- ``POST /v1/chat/completions`` with a canned ``chat.completion`` (or, when the body asks for
  ``"stream": true``, a canned SSE stream of ``chat.completion.chunk`` events, chunked);
- ``GET /v1/models`` with one model; anything else with 404.

Keep-alive and pipelining are supported; request bodies need ``Content-Length``.

Run: ``python -m bench.fake_upstream --port 8101``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from typing import cast

MODEL = "bench-model"
"""The one model the fake upstream serves."""

_STREAM_TRUE = re.compile(rb'"stream"\s*:\s*true')
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)


def _completion_body() -> bytes:
    return json.dumps({
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": MODEL,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": "Hello! This is a canned answer."},
            "logprobs": None,
            "finish_reason": "stop",
        }],
        "usage": {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20},
    }, separators=(",", ":")).encode()


def _chunk(delta: dict[str, str], finish: str | None) -> bytes:
    event = {
        "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1_700_000_000,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    data = b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


def _stream_body() -> bytes:
    pieces = [_chunk({"role": "assistant", "content": ""}, None)]
    pieces += [_chunk({"content": word}, None) for word in ("Hello! ", "This is ", "a canned ",
                                                             "answer.")]
    pieces.append(_chunk({}, "stop"))
    done = b"data: [DONE]\n\n"
    pieces.append(b"%x\r\n%s\r\n" % (len(done), done))
    return b"".join(pieces) + b"0\r\n\r\n"


def _response(status: str, content_type: str, body: bytes) -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n").encode() + body


COMPLETION = _response("200 OK", "application/json", _completion_body())
STREAM = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
          b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n" + _stream_body())
MODELS = _response("200 OK", "application/json", json.dumps({
    "object": "list",
    "data": [{"id": MODEL, "object": "model", "created": 1_700_000_000, "owned_by": "bench"}],
}).encode())
NOT_FOUND = _response("404 Not Found", "application/json",
                      b'{"error":{"message":"not found","type":"invalid_request_error"}}')
BAD_REQUEST = _response("400 Bad Request", "application/json",
                        b'{"error":{"message":"Content-Length required",'
                        b'"type":"invalid_request_error"}}')


class UpstreamProtocol(asyncio.Protocol):
    """One keep-alive connection: parse requests from a buffer, answer canned bytes."""

    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        out = []
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = self.buffer[:end]
            match = _CONTENT_LENGTH.search(head)
            length = int(match.group(1)) if match else 0
            if length and len(self.buffer) < end + 4 + length:
                break  # body not complete yet
            body = self.buffer[end + 4:end + 4 + length]
            self.buffer = self.buffer[end + 4 + length:]
            out.append(self.answer(head, body, has_length=match is not None))
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    @staticmethod
    def answer(head: bytes, body: bytes, has_length: bool) -> bytes:
        """The canned response for one request."""
        line = head.split(b"\r\n", 1)[0]
        if line.startswith(b"POST ") and b"/chat/completions" in line:
            if not has_length:
                return BAD_REQUEST
            return STREAM if _STREAM_TRUE.search(body) else COMPLETION
        if line.startswith(b"GET ") and b"/models" in line:
            return MODELS
        return NOT_FOUND


async def serve(host: str, port: int) -> None:
    """Serve until cancelled."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(UpstreamProtocol, host, port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8101)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.host, args.port))
    else:
        uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
