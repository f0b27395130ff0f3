"""``python -m services.trainer``: one trainer, for one adapter (``adapter_name``)."""

from __future__ import annotations

import asyncio

from services.trainer.backend import TrainingBackend
from services.trainer.metrics import TrainerMetrics
from services.trainer.service import Trainer
from shared.keys import GROUP_TRAINER, SCORED
from shared.logs import setup_logging
from shared.redis_client import connect
from shared.settings import Settings
from shared.worker import Consumer, run_workers


def build_backend(settings: Settings) -> TrainingBackend:
    """The configured backend; heavy imports happen only for the one in use."""
    if settings.backend == "tinker":
        from services.trainer.tinker_backend import TinkerBackend

        return TinkerBackend(settings)
    from services.trainer.local import LocalBackend
    from shared.local_model import prepare

    base_dir, _ = prepare(settings.model_name, settings.data_dir)
    state_dir = settings.data_dir / "trainer" / settings.adapter_name
    return LocalBackend(settings, base_dir, state_dir)


async def serve(settings: Settings) -> None:
    """Buffer scored turns and train on them until SIGTERM."""
    metrics = TrainerMetrics.create()
    client = connect(settings)
    trainer = Trainer(settings, client, build_backend(settings), metrics)
    try:
        await run_workers(settings, [Consumer(SCORED, GROUP_TRAINER, trainer.on_scored)],
                          registry=metrics.registry, client=client, background=[trainer.run])
    finally:
        await client.aclose()


def main() -> None:
    settings = Settings()
    setup_logging(settings.log_level)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
