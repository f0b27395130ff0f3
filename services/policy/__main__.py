"""``python -m services.policy``: serve the local model over the OpenAI chat API.

Reads the ``policy server`` section of the settings (``REEF_MODEL_NAME``,
``REEF_POLICY_HOST``, ``REEF_POLICY_PORT``, ``REEF_POLICY_DEVICE``,
``REEF_POLICY_MAX_NEW_TOKENS``, ``REEF_POLICY_THREADS``, ``REEF_POLICY_FOLLOW_WEIGHTS``,
``REEF_POLICY_LOGPROBS_MODE``), ``REEF_DATA_DIR`` (converted models are cached there, and
adapters are loaded only from inside it), ``REEF_UPSTREAM_API_KEY`` (the key every request
must carry; required outside ``REEF_PROFILE=dev``) and, to follow the ``weights`` stream,
``REEF_REDIS_URL`` and ``REEF_NAMESPACE``. Exits 2, naming the field, on a configuration it
refuses.
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
        app = create_app(settings)
    except (ConfigError, ValidationError, model.ModelNotFoundError) as exc:
        print(f"reef policy: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    uvicorn.run(app, host=settings.policy_host, port=settings.policy_port,
                log_level=settings.log_level.lower(), access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
