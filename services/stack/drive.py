"""Driving the local learning loop with the scripted user: training rounds, hot swaps.

A *round* is ``prompts_per_round`` training prompts, each asked ``per_prompt`` times in
its own session (one prompt, one group: the trainer's baseline is the group's mean
reward), each answer followed by the user's thanks or correction. With
``prompts_per_round * per_prompt == batch_size`` a round is one trainer batch.

Rounds are paced by the trainer's buffer: a round starts only while fewer than ``lag``
batches wait besides the one being trained, so sampling and training overlap while the
samples stay at most a version or two off-policy (the trainer drops older ones). Not
every conversation lands in the buffer: the trainer keeps every few turns apart as its
gate's held-out replay. The trainer's progress is read from its buffer in Redis, its
``/metrics`` and its ``weights`` stream; the gateway's from the ``model`` its answers
name.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import httpx
import orjson
import redis

from services.stack.launch import StackInfo
from services.stack.scripted import Outcome, Prompt, ScriptedUser
from shared.keys import WEIGHTS, Keys
from shared.messages import WeightsEventV1, decode


class LoopStalled(RuntimeError):
    """The trainer or the gateway made no progress in time; the message says which."""


@dataclass(frozen=True)
class StepRecord:
    """One committed trainer step, as its ``weights`` event reports it."""

    version: int
    adapter: str
    metrics: dict[str, float]
    at: float
    """Seconds since the start of training."""


@dataclass
class TrainingLog:
    """What happened while training: every conversation and every committed step."""

    rounds: list[list[Outcome]] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)
    """Published steps (``weights`` events); a step the gate refused publishes none."""
    committed: int = 0
    """Steps committed, published or not."""
    seconds: float = 0.0


class LoopDriver:
    """The scripted user plus a view of the trainer's and the gateway's progress."""

    def __init__(self, info: StackInfo, user: ScriptedUser, *, adapter: str = "reef",
                 batch_size: int = 16) -> None:
        self.info = info
        self.user = user
        self.adapter = adapter
        self.batch_size = batch_size
        self._redis = redis.Redis.from_url(info.redis_url)
        keys = Keys(info.namespace)
        self._weights = keys.stream(WEIGHTS)
        self._buffer = keys.trainer(adapter, "buffer")
        self._state = keys.trainer(adapter, "state")

    def close(self) -> None:
        self._redis.close()

    # --- progress ----------------------------------------------------------------------------

    def weights_events(self) -> list[WeightsEventV1]:
        entries = cast(list[tuple[bytes, dict[bytes, bytes]]], self._redis.xrange(self._weights))
        return [e for e in (decode(f) for _, f in entries) if isinstance(e, WeightsEventV1)]

    def trainer_metric(self, name: str, labels: Sequence[str] = ()) -> float:
        """Sum of a trainer metric's samples (those with one of ``labels``, if given)."""
        return metric_sum(self.info.trainer_metrics_url, name, labels)

    def steps(self) -> int:
        """Steps the trainer has committed (published or refused by its gate)."""
        return int(self.trainer_metric("reef_trainer_steps_total"))

    def pending(self) -> int:
        """Samples in the trainer's buffer that are not in the step being trained."""
        length = int(self._redis.hlen(self._buffer))
        inflight = cast(bytes | None, self._redis.hget(self._state, "inflight"))
        return length - (len(orjson.loads(inflight)["ids"]) if inflight else 0)

    async def wait_for_room(self, samples: int, target: int, timeout: float) -> None:
        """Wait until fewer than ``samples`` wait for a step (beyond the one in flight),
        or the trainer has committed ``target`` steps (it may stop there: max_steps)."""
        deadline = time.monotonic() + timeout
        while (waiting := await asyncio.to_thread(self.pending)) >= samples:
            if await asyncio.to_thread(self.steps) >= target:
                return
            if time.monotonic() > deadline:
                raise LoopStalled(f"{waiting} samples still wait for the trainer after "
                                  f"{timeout:.0f}s (trainer log: <data_dir>/logs/trainer.log)")
            await asyncio.sleep(0.5)

    async def wait_live(self, version: int, timeout: float) -> str:
        """Wait until the gateway answers with adapter ``version`` (or newer); its name."""
        deadline = time.monotonic() + timeout
        wanted = f"{self.adapter}-v{version}"
        while True:
            outcome = await self.user.ask(
                Prompt("Hi", ()), f"probe-{time.monotonic_ns()}", done=True, max_tokens=1)
            if _version_of(outcome.version, self.adapter) >= version:
                return outcome.version
            if time.monotonic() > deadline:
                raise LoopStalled(f"the gateway still answers with {outcome.version!r}, "
                                  f"not {wanted!r}, after {timeout:.0f}s")
            await asyncio.sleep(0.5)

    # --- training ----------------------------------------------------------------------------

    async def train(self, prompts: Sequence[Prompt], *, steps: int, prompts_per_round: int = 4,
                    per_prompt: int = 4, lag: int = 1, max_rounds: int | None = None,
                    round_timeout: float = 300.0,
                    on_round: Callable[[int, list[Outcome], TrainingLog], Any] | None = None
                    ) -> TrainingLog:
        """Run rounds until the trainer has committed ``steps`` more steps, or
        ``max_rounds`` rounds (default ``3 * steps``) were sent.

        A round starts only while fewer than ``lag`` batches wait for the trainer besides
        the one it is training, so samples stay at most about ``lag + 1`` versions old."""
        log, started = TrainingLog(), time.monotonic()
        base_events = len(self.weights_events())
        target = await asyncio.to_thread(self.steps) + steps
        for r in range(max_rounds if max_rounds is not None else 3 * steps):
            await self.wait_for_room(max(1, lag) * self.batch_size, target, round_timeout)
            if await asyncio.to_thread(self.steps) >= target:
                break
            chosen = [prompts[(r * prompts_per_round + i) % len(prompts)]
                      for i in range(prompts_per_round)]
            outcomes = await self.user.train_round(chosen, per_prompt, f"train-r{r}")
            log.rounds.append(outcomes)
            log.committed = await asyncio.to_thread(self.steps) - target + steps
            self._record_steps(log, base_events, started)
            if on_round is not None:
                on_round(r, outcomes, log)
        await self._wait_steps(target, round_timeout)
        log.committed = await asyncio.to_thread(self.steps) - target + steps
        self._record_steps(log, base_events, started)
        log.seconds = time.monotonic() - started
        return log

    async def _wait_steps(self, target: int, timeout: float) -> None:
        """Wait for the trainer to reach ``target`` steps while it can (a full batch)."""
        deadline = time.monotonic() + timeout
        while await asyncio.to_thread(self.steps) < target and time.monotonic() < deadline:
            if await asyncio.to_thread(self._idle):
                return
            await asyncio.sleep(0.5)

    def _idle(self) -> bool:
        """No step in flight and less than a batch waiting: no step is coming."""
        return (self._redis.hget(self._state, "inflight") is None
                and self.pending() < self.batch_size)

    def _record_steps(self, log: TrainingLog, base: int, started: float) -> None:
        now = time.monotonic() - started
        for event in self.weights_events()[base + len(log.steps):]:
            log.steps.append(StepRecord(event.version, event.adapter, dict(event.metrics), now))


def metric_sum(url: str, name: str, labels: Sequence[str] = ()) -> float:
    """Sum of the samples of metric ``name`` on the ``/metrics`` page at ``url`` (those with
    one of ``labels`` as a label value, if given); 0 when absent."""
    total = 0.0
    for line in httpx.get(url, timeout=5).text.splitlines():
        if not line.startswith((name + " ", name + "{")):
            continue
        if labels and not any(f'"{label}"' in line for label in labels):
            continue
        total += float(line.rsplit(" ", 1)[1])
    return total


def _version_of(served: str, adapter: str) -> int:
    prefix = adapter + "-v"
    digits = served[len(prefix):] if served.startswith(prefix) else ""
    return int(digits) if digits.isdigit() else 0
