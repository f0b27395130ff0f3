"""``python -m chaos.trainer``: the real trainer service (``services.trainer``) on a
backend that fails on purpose, for the chaos run. The faults, drawn per call with
``CHAOS_SEED``:

- a poisonous datum: a batch holding the token :data:`chaos.upstream.POISON` (the
  upstream samples it in ``--poison-rate`` of its answers) fails its step with a
  ``ValueError``, every time: the trainer must quarantine it and go on;
- transient backend failures: ``CHAOS_TRANSIENT_RATE`` of the ``forward_backward`` calls
  raise a transient ``StepError`` (as a Tinker 5xx would): retried, never quarantined;
- forced gate refusals: in ``CHAOS_REFUSE_RATE`` of the steps the candidate's logprobs on
  the held-out replay are shifted by :data:`REFUSE_SHIFT` nats, beyond ``gate_max_shift``,
  so the real gate refuses the candidate.

Everything else is the real service: settings, the stream worker, the local backend's
training, checkpoints, restore and retention.
"""

from __future__ import annotations

import asyncio
import os
import random
from typing import Any

from chaos.upstream import POISON
from services.trainer.__main__ import build_backend, serve
from services.trainer.backend import Checkpoint, Datum, StepError, StepResult, TrainingBackend
from shared.logs import setup_logging
from shared.settings import Settings

REFUSE_SHIFT = 5.0
"""Nats added to a candidate's held-out logprobs to force a refusal (gate_max_shift is 1)."""


class FaultyBackend:
    """A :class:`TrainingBackend` that passes every call to ``inner``, failing some."""

    def __init__(self, inner: TrainingBackend, transient_rate: float, refuse_rate: float,
                 seed: int | None) -> None:
        self.inner = inner
        self.transient_rate = transient_rate
        self.refuse_rate = refuse_rate
        self._random = random.Random(seed)
        self._candidate = False
        """An optimizer step was taken since the live weights were loaded: the next
        ``logprobs`` call scores the candidate (the gate's replay)."""

    def start(self) -> Checkpoint | None:
        self._candidate = False
        return self.inner.start()

    def restore(self, checkpoint: Checkpoint) -> None:
        self._candidate = False
        self.inner.restore(checkpoint)

    def forward_backward(self, datums: list[Datum], loss_fn: str) -> float:
        if self._random.random() < self.transient_rate:
            raise StepError("chaos: forward_backward failed (injected, transient)",
                            transient=True)
        if any(POISON in d.tokens for d in datums):
            raise ValueError("chaos: a poisonous datum (injected)")
        return self.inner.forward_backward(datums, loss_fn)

    def optim_step(self, learning_rate: float) -> StepResult:
        result = self.inner.optim_step(learning_rate)
        self._candidate = True
        return result

    def logprobs(self, datums: list[Datum]) -> list[list[float]]:
        scored = self.inner.logprobs(datums)
        candidate, self._candidate = self._candidate, False
        if candidate and self._random.random() < self.refuse_rate:
            return [[lp + REFUSE_SHIFT for lp in row] for row in scored]
        return scored

    def save(self, name: str) -> Checkpoint:
        return self.inner.save(name)

    def base_logprobs(self, datums: list[Datum]) -> list[list[float]]:
        return self.inner.base_logprobs(datums)

    def delete(self, checkpoint: Checkpoint) -> None:
        self.inner.delete(checkpoint)

    def pin(self, checkpoint: Checkpoint) -> None:
        self.inner.pin(checkpoint)

    def close(self) -> None:
        self.inner.close()


def build_faulty(settings: Settings) -> tuple[Any, list[str] | None]:
    backend, probe = build_backend(settings)
    seed = os.environ.get("CHAOS_SEED")
    return FaultyBackend(backend, float(os.environ.get("CHAOS_TRANSIENT_RATE", "0")),
                         float(os.environ.get("CHAOS_REFUSE_RATE", "0")),
                         int(seed) if seed else None), probe


def main() -> None:
    settings = Settings()
    setup_logging(settings.log_level)
    asyncio.run(serve(settings, build_faulty))


if __name__ == "__main__":
    main()
