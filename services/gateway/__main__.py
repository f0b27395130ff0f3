"""``python -m services.gateway``: serve the gateway with uvicorn."""

from __future__ import annotations

import uvicorn

from services.gateway.app import create_app
from shared.logs import setup_logging
from shared.settings import Settings


def main() -> None:
    settings = Settings()
    setup_logging(settings.log_level)
    uvicorn.run(create_app(settings), host=settings.gateway_host, port=settings.gateway_port,
                loop="uvloop", http="httptools", access_log=False, log_config=None,
                timeout_graceful_shutdown=10, proxy_headers=False,
                server_header=False)


if __name__ == "__main__":
    main()
