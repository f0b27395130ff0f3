"""``python -m services.trainer``: the trainers of the adapters this process is given: one
per tenant (``train_tenants``, by default every tenant of ``api_keys``), or one shared
adapter (``shared_adapter``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import redis.asyncio as aioredis

from services.trainer.backend import TrainingBackend
from services.trainer.claim import AdapterClaims
from services.trainer.metrics import TrainerMetrics
from services.trainer.opd import PROBE, Teacher
from services.trainer.per_adapter import combined_registry
from services.trainer.service import Trainer
from shared.keys import GROUP_TRAINER, SCORED, Keys, adapter_for, trainer_group
from shared.logs import setup_logging
from shared.redis_client import connect
from shared.settings import Settings
from shared.worker import Consumer, default_consumer_name, run_workers

log = logging.getLogger("reef.trainer")

Builder = Callable[[Settings], tuple[TrainingBackend, list[str] | None]]
"""Makes one adapter's backend (and the student's probe tokens) from its settings."""


def build_backend(settings: Settings) -> tuple[TrainingBackend, list[str] | None]:
    """The configured backend, and the student's tokens for the teacher's tokenizer check
    (local backend only); heavy imports happen only for the backend in use."""
    if settings.backend == "tinker":
        from services.trainer.tinker_backend import TinkerBackend

        return TinkerBackend(settings), None
    from transformers import AutoTokenizer

    from services.trainer.local import LocalBackend
    from shared.local_model import prepare

    base_dir, _ = prepare(settings.model_name, settings.data_dir)
    state_dir = settings.data_dir / "trainer" / settings.adapter_name
    probe: list[str] | None = None
    if distilling(settings) and (base_dir / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        probe = list(tokenizer.convert_ids_to_tokens(
            tokenizer(PROBE, add_special_tokens=False)["input_ids"]))
    return LocalBackend(settings, base_dir, state_dir), probe


def distilling(settings: Settings) -> bool:
    """``opd``, or ``auto`` with ``use_opd`` and a teacher."""
    return settings.mode == "opd" or (settings.mode == "auto" and settings.use_opd
                                      and bool(settings.teacher_model))


def trainers_for(settings: Settings, redis: aioredis.Redis, build: Builder) -> list[Trainer]:
    """A trainer for each adapter this process trains (``Settings.trained_tenants``),
    with its own backend, settings (``adapter_name``: the tenant's adapter) and metrics."""
    trainers = []
    for tenant in settings.trained_tenants():
        adapter = (settings.adapter_name if tenant is None
                   else adapter_for(settings.adapter_name, tenant))
        own = settings.model_copy(update={"adapter_name": adapter})
        backend, probe = build(own)
        teacher = Teacher(own) if distilling(own) else None
        trainers.append(Trainer(own, redis, backend, TrainerMetrics.create(), teacher, probe,
                                tenant=tenant))
    return trainers


async def serve(settings: Settings, build: Builder = build_backend) -> None:
    """Buffer scored turns and train on them until SIGTERM: one adapter per tenant this
    process trains, each read from ``scored`` in a consumer group of its own (``build``
    makes a backend: the chaos suite wraps it to inject faults)."""
    client = connect(settings)
    trainers = trainers_for(settings, client, build)
    claims = AdapterClaims(client, Keys(settings.namespace), [t.adapter for t in trainers],
                           default_consumer_name())
    consumers = [Consumer(SCORED, GROUP_TRAINER if t.tenant is None else trainer_group(t.adapter),
                          t.on_scored) for t in trainers]
    registry = combined_registry({t.adapter: t.metrics.registry for t in trainers})
    log.info("trainer.adapters", extra={"adapters": [t.adapter for t in trainers]})
    try:
        await claims.acquire()
        await run_workers(settings, consumers, registry=registry, client=client,
                          background=[*(t.run for t in trainers), claims.keep])
    finally:
        await claims.release()
        for trainer in trainers:
            if trainer.teacher is not None:
                await trainer.teacher.close()
            await asyncio.to_thread(trainer.backend.close)
        await client.aclose()


def main() -> None:
    settings = Settings()
    setup_logging(settings.log_level)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
