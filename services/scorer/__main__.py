"""``python -m services.scorer``: one scorer process (run N of them to scale out)."""

from __future__ import annotations

import asyncio

from services.scorer.metrics import ScorerMetrics
from services.scorer.service import Scorer
from shared.keys import FEEDBACK, FINALISED, GROUP_FEEDBACK, GROUP_JUDGE, GROUP_SCORER, TURNS
from shared.logs import setup_logging
from shared.redis_client import connect
from shared.settings import Settings
from shared.worker import Consumer, run_workers


async def serve(settings: Settings) -> None:
    """Consume ``turns``, ``finalised`` and ``feedback`` and sweep idle sessions until
    SIGTERM."""
    metrics = ScorerMetrics.create()
    client = connect(settings)
    scorer = Scorer(settings, client, metrics)
    await scorer.start()
    try:
        await run_workers(
            settings,
            # Every handler is idempotent by itself (their Lua steps check markers of
            # their own; a feedback event revises only what changed), so the worker's
            # "handled" markers would only cost time.
            [Consumer(TURNS, GROUP_SCORER, dedupe=False, batch_handler=scorer.on_turns),
             Consumer(FINALISED, GROUP_JUDGE, dedupe=False,
                      batch_handler=scorer.on_finalised),
             Consumer(FEEDBACK, GROUP_FEEDBACK, scorer.revisions.on_feedback, dedupe=False)],
            registry=metrics.registry, client=client, background=[scorer.sweep])
    finally:
        await scorer.close()
        await client.aclose()


def main() -> None:
    settings = Settings()
    setup_logging(settings.log_level)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
