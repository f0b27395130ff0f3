"""The "thin forwarder" anchor: FastAPI + one shared aiohttp ``ClientSession``, no real work.

It forwards ``/v1/chat/completions`` to the upstream byte for byte (streamed answers chunk by
chunk) and does nothing else: the lower bound on what a Python gateway costs per request.

Run: ``python -m bench.thin_forwarder --port 8102 --upstream http://127.0.0.1:8101/v1``.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse


def create_app(upstream: str) -> FastAPI:
    """The forwarder app for one upstream base URL (``http://host:port/v1``)."""
    state: dict[str, aiohttp.ClientSession] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as session:
            state["session"] = session
            yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/healthz")
    async def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await request.body()
        upstream_response = await state["session"].post(
            upstream + "/chat/completions", data=body,
            headers={"Content-Type": "application/json"})
        media_type = upstream_response.headers.get("Content-Type", "application/json")
        if media_type.startswith("text/event-stream"):
            async def relay() -> AsyncIterator[bytes]:
                async with upstream_response:
                    async for chunk in upstream_response.content.iter_any():
                        yield chunk
            return StreamingResponse(relay(), upstream_response.status, media_type=media_type)
        async with upstream_response:
            content = await upstream_response.read()
        return Response(content, upstream_response.status, media_type=media_type)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8102)
    parser.add_argument("--upstream", default="http://127.0.0.1:8101/v1")
    args = parser.parse_args()
    uvicorn.run(create_app(args.upstream), host=args.host, port=args.port, loop="uvloop",
                http="httptools", access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
