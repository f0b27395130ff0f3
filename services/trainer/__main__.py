"""``python -m services.trainer``: one trainer, for one adapter (``adapter_name``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from services.trainer.backend import TrainingBackend
from services.trainer.metrics import TrainerMetrics
from services.trainer.opd import PROBE, Teacher
from services.trainer.service import Trainer
from shared.keys import GROUP_TRAINER, SCORED
from shared.logs import setup_logging
from shared.redis_client import connect
from shared.settings import Settings
from shared.worker import Consumer, run_workers


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


async def serve(settings: Settings, build: Callable[
        [Settings], tuple[TrainingBackend, list[str] | None]] = build_backend) -> None:
    """Buffer scored turns and train on them until SIGTERM (``build`` makes the backend:
    the chaos suite wraps it to inject faults)."""
    metrics = TrainerMetrics.create()
    client = connect(settings)
    backend, probe = build(settings)
    teacher = Teacher(settings) if distilling(settings) else None
    trainer = Trainer(settings, client, backend, metrics, teacher, probe)
    try:
        await run_workers(settings, [Consumer(SCORED, GROUP_TRAINER, trainer.on_scored)],
                          registry=metrics.registry, client=client, background=[trainer.run])
    finally:
        if teacher is not None:
            await teacher.close()
        await asyncio.to_thread(backend.close)
        await client.aclose()


def main() -> None:
    settings = Settings()
    setup_logging(settings.log_level)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
