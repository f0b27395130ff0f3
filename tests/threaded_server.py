"""Serving a test fake's ASGI app over real HTTP on 127.0.0.1, in a daemon thread."""

from __future__ import annotations

import threading
import time
from typing import Any

import uvicorn


class ThreadedServer:
    """uvicorn in a background thread; ``start`` returns once it accepts connections."""

    def __init__(self, app: Any, port: int, name: str, **config: Any) -> None:
        self.name = name
        options: dict[str, Any] = {"log_level": "warning", "access_log": False,
                                   "timeout_graceful_shutdown": 1, **config}
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                                     **options))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self, timeout: float = 10.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(5)
