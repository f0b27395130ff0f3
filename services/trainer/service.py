"""The trainer service: scored turns -> durable sample buffer -> steps -> weights events.

A turn is trained at most once, also across crashes:

1. ``on_scored`` puts a trainable turn's sample in a Redis hash (the buffer), unless the
   turn carries a "trained" marker; the entry is acked after that write.
2. A step takes ``batch_size`` samples, records them as the *in-flight* batch, trains,
   saves a checkpoint named after the step, and then commits in one transaction: the
   samples leave the buffer, get "trained" markers, the step becomes the committed
   one, and the ``weights`` event is appended.
3. On start, the backend resumes from its latest checkpoint. If that checkpoint is the
   in-flight step (the crash came after the save, before the commit) the commit is
   redone; if it is older, the in-flight batch is still in the buffer and trained again
   from the same optimizer state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import asdict
from typing import Any, cast

import orjson
import redis.asyncio as aioredis

from services.trainer.backend import Checkpoint, TrainingBackend
from services.trainer.metrics import TrainerMetrics
from services.trainer.samples import (
    NotTrainable,
    Sample,
    adapter_label,
    advantages,
    to_datums,
    to_sample,
)
from shared.keys import WEIGHTS, Keys
from shared.messages import Message, ScoredV1, WeightsEventV1
from shared.settings import Settings

log = logging.getLogger("reef.trainer")

POLL_SECONDS = 0.5
"""How often the step loop looks at the buffer when it holds less than a batch."""

_BUFFER_LUA = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
return redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
"""


class Trainer:
    """Buffers samples and runs steps on one backend, for one adapter."""

    def __init__(self, settings: Settings, redis: aioredis.Redis, backend: TrainingBackend,
                 metrics: TrainerMetrics) -> None:
        self.settings = settings
        self.redis = redis
        self.backend = backend
        self.metrics = metrics
        self.keys = Keys(settings.namespace)
        self.adapter = settings.adapter_name
        self.buffer_key = self.keys.trainer(self.adapter, "buffer")
        self.state_key = self.keys.trainer(self.adapter, "state")
        self.version = 0
        self._buffer = redis.register_script(_BUFFER_LUA)

    # --- intake ---------------------------------------------------------------------------

    async def on_scored(self, message: Message, _entry_id: str) -> None:
        """Buffer a trainable scored turn (idempotent: keyed by the turn id)."""
        if not isinstance(message, ScoredV1) or self.settings.mode == "skills_only":
            return
        if self.settings.train_tenant and message.turn.tenant != self.settings.train_tenant:
            return
        try:
            sample = to_sample(message, self.adapter)
        except NotTrainable as exc:
            self.metrics.samples.labels(str(exc)).inc()
            return
        added = await self._buffer(
            keys=[self.buffer_key, self.keys.trained(self.adapter, sample.turn_id)],
            args=[sample.turn_id, orjson.dumps(asdict(sample))])
        self.metrics.samples.labels("buffered" if added else "duplicate").inc()

    # --- the step loop --------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        """Resume, then train whenever a batch is ready, until ``stopping``."""
        checkpoint = await asyncio.to_thread(self.backend.start)
        await self._reconcile(checkpoint)
        while not stopping.is_set():
            if self.version >= self.settings.max_steps:
                break
            batch = await self._next_batch()
            if batch is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), POLL_SECONDS)
                continue
            await self.step(batch)

    async def _reconcile(self, checkpoint: Checkpoint | None) -> None:
        state = cast(dict[bytes, bytes], await self.redis.hgetall(self.state_key))
        committed = int(state.get(b"step", b"0"))
        inflight = orjson.loads(state[b"inflight"]) if b"inflight" in state else None
        resumed = checkpoint.step if checkpoint else 0
        if inflight and checkpoint and resumed == inflight["step"] and resumed > committed:
            log.info("trainer.recommit", extra={"step": resumed})
            await self._commit(inflight["ids"], checkpoint, {}, time.monotonic())
        elif inflight:
            await self.redis.hdel(self.state_key, "inflight")
        self.version = max(resumed, committed)
        self.metrics.live_version.set(self.version)

    async def _next_batch(self) -> list[Sample] | None:
        """The oldest ``batch_size`` fresh samples, or None; stale ones are dropped."""
        raw = cast(dict[bytes, bytes], await self.redis.hgetall(self.buffer_key))
        self.metrics.buffer.set(len(raw))
        if len(raw) < self.settings.batch_size:
            return None
        samples = [Sample(**orjson.loads(v)) for v in raw.values()]
        stale = [s.turn_id for s in samples
                 if self.version - s.version > self.settings.max_staleness]
        if stale:
            await self.redis.hdel(self.buffer_key, *stale)
            self.metrics.samples.labels("stale").inc(len(stale))
            return None
        samples.sort(key=lambda s: s.turn_id)  # producer ids start with the time
        return samples[: self.settings.batch_size]

    async def step(self, batch: list[Sample]) -> None:
        """One optimisation step on ``batch``, committed with its weights event."""
        started = time.monotonic()
        ids = [s.turn_id for s in batch]
        advs = advantages(batch)
        datums = to_datums(batch, advs)
        if not datums:  # identical rewards: nothing to learn, and no step to pretend
            await self.redis.hdel(self.buffer_key, *ids)
            self.metrics.samples.labels("zero_advantage").inc(len(ids))
            return
        step = self.version + 1
        await self.redis.hset(self.state_key, "inflight",
                              orjson.dumps({"step": step, "ids": ids}))
        checkpoint, result_loss, step_metrics = await asyncio.to_thread(
            self._train_blocking, datums, f"step-{step:06d}")
        self.metrics.step_seconds.observe(time.monotonic() - started)
        rewards = [s.reward for s in batch]
        summary = {"loss": result_loss, "reward_mean": sum(rewards) / len(rewards),
                   "advantage_abs_mean": sum(abs(a) for a in advs) / len(advs),
                   "datums": float(len(datums)), **step_metrics}
        await self._commit(ids, checkpoint, summary, started)

    def _train_blocking(self, datums: list[Any], name: str
                        ) -> tuple[Checkpoint, float, dict[str, float]]:
        loss = self.backend.forward_backward(datums, self.settings.loss_fn)
        result = self.backend.optim_step(self.settings.learning_rate)
        checkpoint = self.backend.save(name)
        return checkpoint, loss, result.metrics

    async def _commit(self, ids: list[str], checkpoint: Checkpoint,
                      summary: dict[str, float], started: float) -> None:
        version = checkpoint.step
        event = WeightsEventV1(
            id=f"{self.adapter}-v{version}", tenant=self.settings.train_tenant or "*",
            adapter=adapter_label(self.adapter, version), version=version,
            path=checkpoint.adapter_path, step=checkpoint.step, metrics=summary)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(self.buffer_key, *ids)
            for turn_id in ids:
                pipe.set(self.keys.trained(self.adapter, turn_id), b"1",
                         ex=self.settings.dedupe_ttl_seconds)
            pipe.hset(self.state_key, mapping={"step": version,
                                               "live_path": checkpoint.adapter_path})
            pipe.hdel(self.state_key, "inflight")
            pipe.xadd(self.keys.stream(WEIGHTS), cast(Any, event.to_fields()),
                      maxlen=self.settings.stream_maxlen, approximate=True)
            await pipe.execute()
        self.version = version
        self.metrics.steps.inc()
        self.metrics.samples.labels("trained").inc(len(ids))
        self.metrics.live_version.set(version)
        self.metrics.batch_to_publish_seconds.observe(time.monotonic() - started)
        for name in ("loss", "reward_mean", "advantage_abs_mean"):
            if name in summary:
                getattr(self.metrics, name).set(summary[name])
        log.info("trainer.step_committed", extra={"step": version, **summary})
