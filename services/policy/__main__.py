"""``python -m services.policy``: serve the local model over the OpenAI chat API.

Reads the ``policy server`` section of the settings (``REEF_MODEL_NAME``,
``REEF_POLICY_HOST``, ``REEF_POLICY_PORT``, ``REEF_POLICY_DEVICE``,
``REEF_POLICY_MAX_NEW_TOKENS``, ``REEF_POLICY_THREADS``) and ``REEF_DATA_DIR``, where
converted models are cached.
"""

from __future__ import annotations

import logging
import sys

import uvicorn
from pydantic import ValidationError

from services.policy import model
from services.policy.app import create_app
from shared.settings import ConfigError, Settings


def main() -> int:
    """Start the server; returns the exit status."""
    try:
        settings = Settings()
        if settings.policy_backend == "local":
            model.resolve(settings.model_name)  # a wrong name fails now, not after startup
    except (ConfigError, ValidationError, model.ModelNotFoundError) as exc:
        print(f"reef policy: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    uvicorn.run(create_app(settings), host=settings.policy_host, port=settings.policy_port,
                log_level=settings.log_level.lower(), access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
