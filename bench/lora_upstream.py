"""The fake upstream with vLLM's dynamic LoRA routes, for the hot-swap part.

Chat answers are ``fake_upstream``'s canned ones (zero latency), except that the answer's
``model`` is the model the request named, as vLLM answers: so the load generator sees
which adapter served each request. Added routes:

- ``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path"}``: reads the adapter
  directory from disk in a worker thread (``adapter_config.json`` parsed, the whole of
  ``adapter_model.safetensors`` read and its header parsed), then waits ``--load-delay-ms``
  more (what moving the tensors to the accelerator costs in vLLM), then answers vLLM's
  sentence. Errors are vLLM's 400/404 shapes. The event loop keeps serving meanwhile.
- ``POST /v1/unload_lora_adapter`` ``{"lora_name"}``.
- ``GET /stats``: loads done and their durations (seconds), for the benchmark's table.

Run: ``python -m bench.lora_upstream --port 8102 [--load-delay-ms 200]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import struct
import time
from pathlib import Path

from bench.fake_upstream import MODEL, UpstreamProtocol, _completion_body, _response

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)
_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,200})"')
_CANNED = _completion_body()
_CANNED_MODEL = f'"model":"{MODEL}"'.encode()


class LoraState:
    """Adapters loaded on this server (shared by every connection)."""

    def __init__(self, load_delay: float) -> None:
        self.load_delay = load_delay
        self.adapters: dict[str, str] = {}
        self.load_seconds: list[float] = []
        self.unloads = 0


def read_adapter(path: str) -> int:
    """Read a PEFT adapter directory as a server would; the bytes of its weights."""
    folder = Path(path)
    json.loads((folder / "adapter_config.json").read_text())
    data = (folder / "adapter_model.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    json.loads(data[8:8 + header_len])
    return len(data)


def _json_response(status: str, payload: object) -> bytes:
    return _response(status, "application/json", json.dumps(payload).encode())


def _error(status: str, message: str) -> bytes:
    code = int(status.split()[0])
    return _json_response(status, {"error": {"message": message, "type": "BadRequestError",
                                             "param": None, "code": code}})


class LoraUpstreamProtocol(UpstreamProtocol):
    """One connection; LoRA loads are answered when done, in order with what follows."""

    state: LoraState

    def __init__(self) -> None:
        super().__init__()
        self.loading = False

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.loading:
            self.drain()

    def drain(self) -> None:
        out = []
        while not self.loading:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = self.buffer[:end]
            match = _CONTENT_LENGTH.search(head)
            length = int(match.group(1)) if match else 0
            if length and len(self.buffer) < end + 4 + length:
                break
            body = self.buffer[end + 4:end + 4 + length]
            self.buffer = self.buffer[end + 4 + length:]
            line = head.split(b"\r\n", 1)[0]
            if b"/load_lora_adapter" in line:
                self.loading = True  # later requests wait, so answers stay in order
                asyncio.get_running_loop().create_task(self.load(body))
            elif b"/unload_lora_adapter" in line:
                out.append(self.unload(body))
            elif b"/stats" in line:
                out.append(_json_response("200 OK", {"adapters": sorted(self.state.adapters),
                                                     "load_seconds": self.state.load_seconds,
                                                     "unloads": self.state.unloads}))
            elif line.startswith(b"POST ") and b"/chat/completions" in line and match:
                out.append(self.chat(body))
            else:
                out.append(self.answer(head, body, has_length=match is not None))
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    def chat(self, body: bytes) -> bytes:
        if b'"stream"' in body:
            return self.answer(b"POST /v1/chat/completions", body, has_length=True)
        found = _MODEL.search(body)
        model = found.group(1) if found else MODEL.encode()
        return _response("200 OK", "application/json",
                         _CANNED.replace(_CANNED_MODEL, b'"model":"' + model + b'"'))

    async def load(self, body: bytes) -> None:
        started = time.perf_counter()
        try:
            request = json.loads(body)
            name, path = str(request["lora_name"]), str(request["lora_path"])
            if name in self.state.adapters:
                reply = _error("400 Bad Request",
                               f"The lora adapter '{name}' has already been loaded.")
            else:
                await asyncio.to_thread(read_adapter, path)
                await asyncio.sleep(self.state.load_delay)
                self.state.adapters[name] = path
                self.state.load_seconds.append(time.perf_counter() - started)
                reply = _response("200 OK", "text/plain; charset=utf-8",
                                  f"Success: LoRA adapter '{name}' added successfully.".encode())
        except (KeyError, TypeError, ValueError, struct.error) as exc:
            reply = _error("400 Bad Request", f"invalid adapter request: {exc}")
        except OSError as exc:
            reply = _error("404 Not Found", f"cannot read adapter: {exc}")
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(reply)
        self.loading = False
        self.drain()

    def unload(self, body: bytes) -> bytes:
        try:
            name = str(json.loads(body)["lora_name"])
        except (KeyError, TypeError, ValueError) as exc:
            return _error("400 Bad Request", f"invalid unload request: {exc}")
        if self.state.adapters.pop(name, None) is None:
            return _error("404 Not Found", f"The lora adapter '{name}' cannot be found.")
        self.state.unloads += 1
        return _response("200 OK", "text/plain; charset=utf-8",
                         f"Success: LoRA adapter '{name}' removed successfully.".encode())


async def serve(host: str, port: int, state: LoraState) -> None:
    LoraUpstreamProtocol.state = state
    loop = asyncio.get_running_loop()
    server = await loop.create_server(LoraUpstreamProtocol, host, port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8102)
    parser.add_argument("--load-delay-ms", type=float, default=200.0)
    args = parser.parse_args()
    state = LoraState(args.load_delay_ms / 1000)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.host, args.port, state))
    else:
        uvloop.run(serve(args.host, args.port, state))


if __name__ == "__main__":
    main()
