"""A round-robin HTTP load balancer over real HTTP on 127.0.0.1, for tests with replicas.

Each request goes to the next backend in turn (not each connection: a gateway keeps its
connections open, and a per-connection balancer could leave a replica idle). Bodies and
streamed answers are relayed as they come; the backends' headers (``x-reef-*``) pass.
"""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from tests.threaded_server import ThreadedServer

_HOP = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive"})


class RoundRobin:
    """The balancer, and how many requests each backend got."""

    def __init__(self, port: int, backends: list[str]) -> None:
        self.port = port
        self.backends = backends
        self.sent: Counter[str] = Counter()
        self._next = itertools.cycle(backends)
        self._lock = threading.Lock()
        self._client: httpx.AsyncClient | None = None
        app = Starlette(routes=[Route("/{path:path}", self._proxy,
                                      methods=["GET", "POST", "DELETE", "PUT"])])
        self._http = ThreadedServer(app, port, "round robin")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._http.start()

    def stop(self) -> None:
        self._http.stop()

    async def _proxy(self, request: Request) -> Any:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=120, limits=httpx.Limits(
                max_connections=64, max_keepalive_connections=64))
        with self._lock:
            backend = next(self._next)
            self.sent[backend] += 1
        url = backend + request.url.path + (f"?{request.url.query}" if request.url.query
                                             else "")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        upstream = await self._client.send(
            self._client.build_request(request.method, url, headers=headers,
                                       content=await request.body()), stream=True)
        return StreamingResponse(
            upstream.aiter_raw(), status_code=upstream.status_code,
            headers={k: v for k, v in upstream.headers.items() if k.lower() not in _HOP},
            background=BackgroundTask(upstream.aclose))


def main() -> None:
    """``python -m tests.round_robin --port N --backend URL --backend URL`` (benchmarks run
    it as a process of its own, off the load generator's event loop)."""
    import argparse
    import contextlib
    import signal

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", action="append", required=True)
    args = parser.parse_args()
    balancer = RoundRobin(args.port, args.backend)
    balancer.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    balancer.stop()


if __name__ == "__main__":
    main()
