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
import statistics
import time
from dataclasses import asdict
from typing import Any, cast

import orjson
import redis.asyncio as aioredis

from services.trainer.backend import Checkpoint, Datum, TrainingBackend
from services.trainer.gate import Snapshot, decide, mean_completion_lp, replay_datums
from services.trainer.metrics import TrainerMetrics
from services.trainer.opd import Teacher, opd_advantages
from services.trainer.samples import (
    NotTrainable,
    Sample,
    adapter_label,
    advantages,
    is_held_out,
    kl_shaped,
    to_datums,
    to_sample,
)
from shared.keys import WEIGHTS, Keys
from shared.messages import Message, ScoredV1, WeightsEventV1
from shared.redact import sensitive_for_tinker
from shared.settings import Settings
from shared.worker import Reject

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
                 metrics: TrainerMetrics, teacher: Teacher | None = None,
                 student_probe_tokens: list[str] | None = None) -> None:
        self.settings = settings
        self.teacher = teacher
        """Set in on-policy distillation (``opd``) mode."""
        self._probe_tokens = student_probe_tokens
        self.redis = redis
        self.backend = backend
        self.metrics = metrics
        self.keys = Keys(settings.namespace)
        self.adapter = settings.adapter_name
        self.buffer_key = self.keys.trainer(self.adapter, "buffer")
        self.state_key = self.keys.trainer(self.adapter, "state")
        self.holdout_key = self.keys.trainer(self.adapter, "holdout")
        self.snapshot: Snapshot | None = None
        self.live_matches_backend = True
        """Whether the backend's weights are the live adapter's (not after a refusal)."""
        self.version = 0
        self._buffer = redis.register_script(_BUFFER_LUA)

    # --- intake ---------------------------------------------------------------------------

    async def on_scored(self, message: Message, _entry_id: str) -> None:
        """Buffer a trainable scored turn (idempotent: keyed by the turn id)."""
        if not isinstance(message, ScoredV1):
            raise Reject(f"expected scored.v1, got {message.kind}")
        if self.settings.mode == "skills_only":
            return
        if self.settings.train_tenant and message.turn.tenant != self.settings.train_tenant:
            return
        if self.teacher is not None and message.reward is None and _distillable(message):
            # Distillation needs no reward: the teacher's logprobs are the signal.
            message = message.model_copy(update={"reward": 0.0, "trainable": True})
        try:
            sample = to_sample(message, self.adapter)
        except NotTrainable as exc:
            self.metrics.samples.labels(str(exc)).inc()
            return
        if sensitive_for_tinker(self.settings, [*message.turn.messages,
                                                message.turn.response_message]):
            self.metrics.samples.labels("sensitive").inc()  # never sent to Tinker
            return
        held_out = self.gating and is_held_out(
            sample.turn_id, self.settings.gate_holdout_every)
        added = await self._buffer(
            keys=[self.holdout_key if held_out else self.buffer_key,
                  self.keys.trained(self.adapter, sample.turn_id)],
            args=[sample.turn_id, orjson.dumps(asdict(sample))])
        fate = "held_out" if held_out else "buffered"
        self.metrics.samples.labels(fate if added else "duplicate").inc()

    # --- the step loop --------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        """Resume, then train whenever a batch is ready, until ``stopping``."""
        checkpoint = await asyncio.to_thread(self.backend.start)
        await self._reconcile(checkpoint)
        if self.teacher is not None and self._probe_tokens is not None:
            await self.teacher.check_tokenizer(self._probe_tokens)
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
        started, batch_at = time.monotonic(), time.time()
        ids = [s.turn_id for s in batch]
        if self.teacher is not None:
            datums, advs, kl = await self._distillation_datums(batch)
            self.metrics.kl.set(kl)
        elif self.settings.kl_base_coef > 0:
            advs = advantages(batch)
            datums, kl = await asyncio.to_thread(self._kl_base_datums, batch, advs)
            self.metrics.kl.set(kl)
        else:
            advs = advantages(batch)
            datums = to_datums(batch, advs)
        if not datums:  # identical rewards: nothing to learn, and no step to pretend
            await self.redis.hdel(self.buffer_key, *ids)
            self.metrics.samples.labels("zero_advantage").inc(len(ids))
            return
        step = self.version + 1
        await self.redis.hset(self.state_key, "inflight",
                              orjson.dumps({"step": step, "ids": ids}))
        snapshot = await self._gate_snapshot()
        checkpoint, result_loss, step_metrics, candidate_lp = await asyncio.to_thread(
            self._train_blocking, datums, f"step-{step:06d}", snapshot)
        self.metrics.step_seconds.observe(time.monotonic() - started)
        rewards = [s.reward for s in batch]
        summary = {"loss": result_loss, "reward_mean": sum(rewards) / len(rewards),
                   "advantage_abs_mean": sum(abs(a) for a in advs) / len(advs),
                   "datums": float(len(datums)), **step_metrics}
        decision = None
        if snapshot is not None and candidate_lp is not None:
            decision = decide(snapshot, candidate_lp, self.settings.gate_tolerance,
                              self.settings.gate_max_shift)
            summary.update(gate_live_score=decision.live_score,
                           gate_candidate_score=decision.candidate_score,
                           gate_shift=decision.shift)
            self.metrics.gate.labels("passed" if decision.passed else "refused").inc()
        await self._commit(ids, checkpoint, summary, started, batch_at=batch_at,
                           publish=decision is None or decision.passed,
                           refusal=None if decision is None or decision.passed
                           else decision.reason)
        if decision is not None and decision.passed:
            self._maybe_refresh_snapshot()

    def _train_blocking(self, datums: list[Any], name: str, snapshot: Snapshot | None
                        ) -> tuple[Checkpoint, float, dict[str, float], list[float] | None]:
        loss = self.backend.forward_backward(datums, self.settings.loss_fn)
        result = self.backend.optim_step(self.settings.learning_rate)
        candidate_lp = None
        if snapshot is not None:
            logprobs = self.backend.logprobs(replay_datums(snapshot.samples))
            candidate_lp = mean_completion_lp(snapshot.samples, logprobs)
        checkpoint = self.backend.save(name)
        return checkpoint, loss, result.metrics, candidate_lp

    def _kl_base_datums(self, batch: list[Sample], advs: list[float]
                        ) -> tuple[list[Datum], float]:
        """RL datums with the KL penalty to the base model in their per-token advantages
        (every sample: the penalty trains even where the reward advantage is zero), and the
        mean per-token KL estimate (sampled minus base logprob). Blocking: a forward pass."""
        plain = [Datum.from_sample(s.prompt, s.completion, s.logprobs, 0.0) for s in batch]
        base = self.backend.base_logprobs(plain)
        datums, gaps = [], []
        for sample, adv, lps in zip(batch, advs, base, strict=True):
            base_lps = lps[-len(sample.completion):]
            per_token = kl_shaped(adv, sample.logprobs, base_lps, self.settings.kl_base_coef)
            gaps += [s - b for s, b in zip(sample.logprobs, base_lps, strict=True)]
            if any(abs(a) > 1e-9 for a in per_token):
                datums.append(Datum.from_sample(sample.prompt, sample.completion,
                                                sample.logprobs, per_token))
        return datums, statistics.fmean(gaps)

    async def _distillation_datums(self, batch: list[Sample]
                                   ) -> tuple[list[Datum], list[float], float]:
        """Datums with per-token reverse-KL advantages from the teacher; the mean advantage
        per sample; and the mean per-token KL estimate (student minus teacher logprob)."""
        assert self.teacher is not None
        teacher_lps = await asyncio.gather(*(self.teacher.logprobs([*s.prompt, *s.completion])
                                             for s in batch))
        datums, means, gaps = [], [], []
        coef = self.settings.kl_penalty_coef
        for sample, lps in zip(batch, teacher_lps, strict=True):
            completion_lps = lps[-len(sample.completion):]
            advs = opd_advantages(sample.logprobs, completion_lps, coef)
            datums.append(Datum.from_sample(sample.prompt, sample.completion, sample.logprobs,
                                            advs))
            means.append(statistics.fmean(advs))
            gaps += [s - t for s, t in zip(sample.logprobs, completion_lps, strict=True)]
        return datums, means, statistics.fmean(gaps)

    @property
    def gating(self) -> bool:
        """The gate runs in RL only: its replay score is built on rewards."""
        return self.settings.gate_enabled and self.teacher is None

    # --- the gate -------------------------------------------------------------------------

    async def _gate_snapshot(self) -> Snapshot | None:
        """The held-out replay with the live policy's logprobs; built from the newest
        held-out turns while the backend's weights are the live ones."""
        if not self.gating:
            return None
        if self.snapshot is None and self.live_matches_backend:
            samples = await self._holdout()
            if len(samples) >= 2:
                logprobs = await asyncio.to_thread(self.backend.logprobs,
                                                   replay_datums(samples))
                self.snapshot = Snapshot(samples, mean_completion_lp(samples, logprobs),
                                         self.version)
        return self.snapshot

    async def _holdout(self) -> list[Sample]:
        raw = cast(dict[bytes, bytes], await self.redis.hgetall(self.holdout_key))
        samples = sorted((Sample(**orjson.loads(v)) for v in raw.values()),
                         key=lambda s: s.turn_id)
        keep = self.settings.gate_holdout_size
        if len(samples) > 4 * keep:  # the held-out set keeps only recent turns
            await self.redis.hdel(self.holdout_key, *(s.turn_id for s in samples[:-keep]))
        return samples[-keep:]

    def _maybe_refresh_snapshot(self) -> None:
        """After a publish the backend is live again: rebuild the replay from newer
        held-out turns every ``gate_refresh_steps`` versions."""
        snapshot = self.snapshot
        if snapshot and self.version - snapshot.live_version >= self.settings.gate_refresh_steps:
            self.snapshot = None

    async def _commit(self, ids: list[str], checkpoint: Checkpoint,
                      summary: dict[str, float], started: float, *, batch_at: float = 0.0,
                      publish: bool = True,
                      refusal: str | None = None) -> None:
        """Consume the batch and record the step; publish its weights unless the gate
        refused them (then the live adapter stays, and the refusal is recorded)."""
        version = checkpoint.step
        event = WeightsEventV1(
            id=f"{self.adapter}-v{version}", tenant=self.settings.train_tenant or "*",
            adapter=adapter_label(self.adapter, version), version=version,
            path=checkpoint.adapter_path, step=checkpoint.step, metrics=summary,
            batch_at=batch_at)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(self.buffer_key, *ids)
            for turn_id in ids:  # a count, not a flag: a turn trained twice would show
                pipe.incr(self.keys.trained(self.adapter, turn_id))
                pipe.expire(self.keys.trained(self.adapter, turn_id),
                            self.settings.dedupe_ttl_seconds)
            pipe.hset(self.state_key, "step", version)
            pipe.hdel(self.state_key, "inflight")
            if publish:
                pipe.hset(self.state_key, "live_path", checkpoint.adapter_path)
                pipe.xadd(self.keys.stream(WEIGHTS), cast(Any, event.to_fields()),
                          maxlen=self.settings.stream_maxlen, approximate=True)
            else:
                pipe.hset(self.state_key, "gate_refusal", orjson.dumps(
                    {"step": version, "reason": refusal, "at": time.time(), **summary}))
            await pipe.execute()
        self.live_matches_backend = publish
        if not publish:
            log.warning("trainer.gate_refused", extra={"step": version, "reason": refusal})
        self.version = version
        self.metrics.steps.inc()
        self.metrics.samples.labels("trained").inc(len(ids))
        if publish:
            self.metrics.live_version.set(version)
        self.metrics.batch_to_publish_seconds.observe(time.monotonic() - started)
        for name in ("loss", "reward_mean", "advantage_abs_mean"):
            if name in summary:
                getattr(self.metrics, name).set(summary[name])
        log.info("trainer.step_committed", extra={"step": version, **summary})


def _distillable(message: ScoredV1) -> bool:
    turn = message.turn
    return turn.completed and turn.turn_type == "main" and turn.sampled is not None
