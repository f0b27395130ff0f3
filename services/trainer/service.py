"""The trainer service: scored turns -> durable sample buffer -> steps -> weights events.

A turn is trained at most once, also across crashes:

1. ``on_scored`` puts a trainable turn's sample in a Redis hash (the buffer), unless the
   turn carries a "trained" marker; the entry is acked after that write.
2. A step takes ``batch_size`` samples, records them as the *in-flight* batch, trains
   from the live version's weights, saves a candidate checkpoint, lets the gate decide,
   and commits in one transaction: the samples leave the buffer and get "trained"
   markers, the candidate's number becomes the committed step, and - if the gate passed
   it - it becomes the live version and its ``weights`` event is appended. A refused
   candidate is recorded, and the backend goes back to the live version's state.
3. On start, the backend resumes the live version (``services.trainer.state``); a
   candidate that was saved but not committed is dropped, and its batch, still in the
   buffer, is trained again from the same state.

The step loop never dies quietly: a transient failure (network, Tinker, the teacher) is
retried with backoff; any other failure of a batch, or a process that died during it,
counts as a try of each turn of the batch, and turns tried ``trainer_max_batch_failures``
times are quarantined (``Keys.trainer(adapter, "quarantine")``, with the reason) and training
moves on. ``reef rollback N`` asks for a rollback in the state hash; the trainer makes N
live again and goes on training from N.
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
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

from services.trainer.backend import (
    RATIO_LOSSES,
    Checkpoint,
    Datum,
    StepError,
    TrainingBackend,
)
from services.trainer.gate import Snapshot, decide, mean_completion_lp, replay_datums
from services.trainer.ledger import Ledger
from services.trainer.metrics import TrainerMetrics
from services.trainer.opd import Teacher, opd_advantages
from services.trainer.samples import (
    NotTrainable,
    RunningBaseline,
    Sample,
    adapter_label,
    advantages,
    is_held_out,
    kl_shaped,
    normalised,
    to_datums,
    to_sample,
)
from services.trainer.state import (
    Version,
    checkpoint_name,
    dump_kept,
    dump_snapshot,
    dump_version,
    extend_lineage,
    snapshot_current,
    staleness,
)
from shared.keys import SHARED_TENANT, WEIGHTS, Keys
from shared.messages import Message, ScoredV1, WeightsEventV1
from shared.redact import sensitive_for_tinker
from shared.settings import Settings
from shared.worker import Reject

log = logging.getLogger("reef.trainer")

POLL_SECONDS = 0.5
"""How often the step loop looks at the buffer when it holds less than a batch."""
MAX_BACKOFF_SECONDS = 60.0
"""Longest pause between failed tries at a step."""

# Buffer a sample (KEYS[1]: the buffer or held-out hash) unless its turn was trained
# (KEYS[2]: the "trained" marker; 0 = quarantined). A newer reward revision (ARGV[3])
# replaces the buffered one; one for a turn already trained is only counted ("corrected"),
# as is one for a turn of the step in flight (KEYS[3]: the state hash), which is trained
# on the reward it had when the step began. Returns the sample's fate.
_BUFFER_LUA = """
local revision = tonumber(ARGV[3])
local trained = redis.call('GET', KEYS[2])
if trained then
  if revision > 0 and tonumber(trained) > 0 then return 'corrected' end
  return 'duplicate'
end
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current and (cjson.decode(current)['revision'] or 0) >= revision then return 'duplicate' end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if not current then return 'buffered' end
local inflight = redis.call('HGET', KEYS[3], 'inflight')
if inflight and string.find(inflight, '"' .. ARGV[1] .. '"', 1, true) then
  return 'corrected'
end
return 'revised'
"""


class Trainer:
    """Buffers samples and runs steps on one backend, for one adapter."""

    def __init__(self, settings: Settings, redis: aioredis.Redis, backend: TrainingBackend,
                 metrics: TrainerMetrics, teacher: Teacher | None = None,
                 student_probe_tokens: list[str] | None = None,
                 tenant: str | None = None) -> None:
        """Trains ``settings.adapter_name`` on ``tenant``'s turns only (its adapter is
        served to it alone), or on every tenant's (None: a shared adapter)."""
        self.settings = settings
        self.tenant = tenant
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
        self.quarantine_key = self.keys.trainer(self.adapter, "quarantine")
        self.baseline_key = self.keys.trainer(self.adapter, "baseline")
        self._baseline = RunningBaseline()
        """The running baseline as the current step read it (its commit updates it)."""
        self.tries_key = self.keys.trainer(self.adapter, "tries")
        self.ledger = Ledger(settings, redis, self.state_key, self.tries_key, backend, metrics)
        self._backoff = 0.0
        self._started = False
        self._resumed: tuple[Checkpoint | None] | None = None
        """What ``backend.start`` resumed, once it ran."""
        self._buffer = redis.register_script(_BUFFER_LUA)

    # --- intake ---------------------------------------------------------------------------

    async def on_scored(self, message: Message, _entry_id: str) -> None:
        """Buffer a trainable scored turn (idempotent: keyed by the turn id); a later
        reward revision of the turn replaces the buffered one, or, once the turn was
        trained, is counted as ``corrected``."""
        if not isinstance(message, ScoredV1):
            raise Reject(f"expected scored.v1, got {message.kind}")
        if self.settings.mode == "skills_only":
            return
        if self.tenant is not None and message.turn.tenant != self.tenant:
            return  # another tenant's turn: its own adapter's group handles it
        if self.teacher is not None and message.reward is None and _distillable(message):
            # Distillation needs no reward: the teacher's logprobs are the signal.
            message = message.model_copy(update={"reward": 0.0, "trainable": True})
        try:
            sample = to_sample(message, self.adapter,
                               ratio_loss=self.settings.loss_fn in RATIO_LOSSES)
        except NotTrainable as exc:
            self.metrics.samples.labels(str(exc)).inc()
            return
        if sensitive_for_tinker(self.settings, [*message.turn.messages,
                                                message.turn.response_message]):
            self.metrics.samples.labels("sensitive").inc()  # never sent to Tinker
            return
        held_out = self.gating and is_held_out(
            sample.turn_id, self.settings.gate_holdout_every)
        fate = (await self._buffer(
            keys=[self.holdout_key if held_out else self.buffer_key,
                  self.keys.trained(self.adapter, sample.turn_id), self.state_key],
            args=[sample.turn_id, orjson.dumps(asdict(sample)), sample.revision])).decode()
        self.metrics.samples.labels("held_out" if held_out and fate == "buffered"
                                    else fate).inc()

    # --- the step loop --------------------------------------------------------------------

    async def start(self) -> None:
        """Start the backend on the live version (``run`` calls it first; a start that
        failed on Redis is tried again, the backend started once)."""
        if self._started:
            return
        self.metrics.batch_size.set(self.settings.batch_size)
        self.metrics.last_step.set(time.time())
        if self._resumed is None:
            self._resumed = (await asyncio.to_thread(self.backend.start),)
        await self.ledger.reconcile(self._resumed[0])
        if self.teacher is not None and self._probe_tokens is not None:
            await self.teacher.check_tokenizer(self._probe_tokens)
        self._started = True

    async def run(self, stopping: asyncio.Event) -> None:
        """Resume, then train whenever a batch is ready, until ``stopping`` (or
        ``max_steps``). Redis or the network briefly gone is waited out, with backoff;
        anything else ends the loop, and with it the service (``run_workers``)."""
        while not stopping.is_set():
            try:
                delay = await self._turn()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                delay = self._next_backoff()
                log.warning("trainer.unavailable", extra={
                    "error": f"{type(exc).__name__}: {exc}"[:300], "retry_in": delay})
            if delay is None:
                return
            if delay:
                await _wait(stopping, delay)

    async def _turn(self) -> float | None:
        """One turn of the loop: how long to wait before the next (None: stop)."""
        await self.start()
        await self.ledger.apply_rollback()
        if self.ledger.version >= self.settings.max_steps:
            return None
        batch = await self._next_batch()
        if batch is None:
            self._backoff = 0.0
            return POLL_SECONDS
        return await self.attempt(batch)

    async def attempt(self, batch: list[Sample]) -> float:
        """One supervised try at a step on ``batch``; returns how long to back off before
        the next try (0 after a success). Turns tried ``trainer_max_batch_failures`` times
        without success are quarantined instead: a whole batch when it failed as it is, the
        turns over the limit when late arrivals changed it meanwhile (the rest stays
        buffered and counts its tries afresh)."""
        ids = [s.turn_id for s in batch]
        tries, last_error = await self.ledger.count_attempt(ids)
        doomed = [s for s in batch if tries[s.turn_id] > self.settings.trainer_max_batch_failures]
        if doomed:
            await self._quarantine(doomed, last_error or "the trainer died during each try")
            # The culprit is likely gone with them: the others start counting afresh.
            await self.redis.hdel(self.tries_key, *ids)
            self._backoff = 0.0
            return 0.0
        try:
            await self.step(batch)
        except Exception as exc:  # noqa: BLE001 - every failure is classified and settled
            return await self._failed(ids, exc)
        self._backoff = 0.0
        return 0.0

    async def _failed(self, ids: list[str], exc: Exception) -> float:
        """Settle a failed try: log it, put the backend back on the live version, and
        count it against the batch unless it was transient. Returns the backoff."""
        transient = is_transient(exc)
        kind = "transient" if transient else "error"
        self.metrics.step_failures.labels(kind).inc()
        log.log(logging.WARNING if transient else logging.ERROR, "trainer.step_failed",
                exc_info=exc, extra={"kind": kind, "turns": len(ids),
                                     "error": f"{type(exc).__name__}: {exc}"[:300]})
        await self.ledger.settle_failure(ids, exc, transient)
        return self._next_backoff()

    def _next_backoff(self) -> float:
        """The pause after one more failure in a row: ``trainer_retry_backoff_seconds``,
        doubled each time, at most ``MAX_BACKOFF_SECONDS``."""
        self._backoff = min(MAX_BACKOFF_SECONDS, max(
            self.settings.trainer_retry_backoff_seconds, self._backoff * 2))
        return self._backoff

    async def _quarantine(self, batch: list[Sample], reason: str) -> None:
        """Set a batch aside for good: its samples go to the quarantine stream with the
        reason, leave the buffer, and get a "trained" marker of 0 (never trained, never
        buffered again)."""
        ids = [s.turn_id for s in batch]
        fields: dict[Any, Any] = {
            "reason": reason[:1000], "adapter": self.adapter, "at": repr(time.time()),
            "turn_ids": orjson.dumps(ids), "samples": orjson.dumps([asdict(s) for s in batch])}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.quarantine_key, fields, maxlen=self.settings.stream_maxlen,
                      approximate=True)
            pipe.hdel(self.buffer_key, *ids)
            for turn_id in ids:
                pipe.set(self.keys.trained(self.adapter, turn_id), 0, nx=True,
                         ex=self.settings.dedupe_ttl_seconds)
            pipe.hdel(self.tries_key, *ids)
            pipe.hdel(self.state_key, "inflight")
            await pipe.execute()
        self.metrics.samples.labels("quarantined").inc(len(ids))
        log.error("trainer.batch_quarantined", extra={"turns": len(ids),
                                                      "reason": reason[:300]})

    async def _next_batch(self) -> list[Sample] | None:
        """The oldest ``batch_size`` fresh samples, or None; stale ones are dropped: those
        sampled more than ``max_staleness`` versions back in the live lineage, or by a
        version off it (rolled back)."""
        raw = cast(dict[bytes, bytes], await self.redis.hgetall(self.buffer_key))
        self.metrics.buffer.set(len(raw))
        if len(raw) < self.settings.batch_size:
            return None
        samples = [Sample(**orjson.loads(v)) for v in raw.values()]
        stale = []
        for sample in samples:
            back = staleness(self.ledger.lineage, sample.version)
            if back is None or back > self.settings.max_staleness:
                stale.append(sample.turn_id)
        if stale:
            await self.redis.hdel(self.buffer_key, *stale)
            self.metrics.samples.labels("stale").inc(len(stale))
            return None
        samples.sort(key=lambda s: s.turn_id)  # producer ids start with the time
        return samples[: self.settings.batch_size]

    async def step(self, batch: list[Sample]) -> None:
        """One optimisation step on ``batch``, committed with its weights event (or the
        gate's refusal); raises what the backend, the teacher or Redis raised."""
        started, batch_at = time.monotonic(), time.time()
        ids = [s.turn_id for s in batch]
        datums, advs = await self._datums(batch)
        if not datums:  # identical rewards: nothing to learn, and no step to pretend
            await self.redis.hdel(self.buffer_key, *ids)
            await self.redis.hdel(self.tries_key, *ids)
            self.metrics.samples.labels("zero_advantage").inc(len(ids))
            return
        number = self.ledger.version + 1
        await self.redis.hset(self.state_key, "inflight",
                              orjson.dumps({"step": number, "ids": ids}))
        snapshot = await self._gate_snapshot()
        checkpoint, result_loss, step_metrics, candidate_lp = await asyncio.to_thread(
            self._train_blocking, datums, checkpoint_name(number), snapshot)
        await self.redis.hset(self.state_key, "inflight", orjson.dumps(
            {"step": number, "ids": ids, "candidate": asdict(checkpoint)}))
        self.metrics.step_seconds.observe(time.monotonic() - started)
        rewards = [s.reward for s in batch]
        summary = {"loss": result_loss, "reward_mean": sum(rewards) / len(rewards),
                   "advantage_abs_mean": sum(abs(a) for a in advs) / len(advs),
                   "datums": float(len(datums)), **step_metrics}
        refusal = self._judge(snapshot, candidate_lp, summary)
        candidate = Version.of(number, checkpoint, published=refusal is None)
        if not await self._commit(ids, candidate, summary, started, batch_at, refusal):
            await self.ledger.drop_inflight(None)  # a rollback came first: it wins
            return
        await self._after_commit(candidate, refusal)

    async def _datums(self, batch: list[Sample]) -> tuple[list[Datum], list[float]]:
        """The batch's datums (RL, RL with the KL to the base, or distillation) and the
        advantage of each sample: group baselines, else the running baseline (read here;
        the step's commit updates it), per-token advantages normalised over the batch."""
        if self.teacher is not None:
            datums, advs, kl = await self._distillation_datums(batch)
            self.metrics.kl.set(kl)
            return datums, advs
        self._baseline = RunningBaseline.load(cast(
            dict[bytes, bytes], await self.redis.hgetall(self.baseline_key)))
        advs = advantages(batch, self._baseline.mean,
                          batch_normalize=self.settings.advantage_batch_normalize)
        if self.settings.kl_base_coef > 0:
            datums, kl = await asyncio.to_thread(self._kl_base_datums, batch, advs)
            self.metrics.kl.set(kl)
            return datums, advs
        return to_datums(batch, advs, self.settings.loss_normalization), advs

    def _judge(self, snapshot: Snapshot | None, candidate_lp: list[float] | None,
               summary: dict[str, float]) -> str | None:
        """The gate's verdict on a candidate: None to publish it, or why it is refused."""
        if snapshot is None or candidate_lp is None:
            return None
        decision = decide(snapshot, candidate_lp, self.settings.gate_tolerance,
                          self.settings.gate_max_shift)
        summary.update(gate_live_score=decision.live_score,
                       gate_candidate_score=decision.candidate_score,
                       gate_shift=decision.shift)
        self.metrics.gate.labels("passed" if decision.passed else "refused").inc()
        return None if decision.passed else decision.reason

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
        mean per-token KL estimate (policy minus base logprob; the policy's, not the
        sampler's, which are of the tempered distribution when sampling used a temperature).
        Blocking: two forward passes."""
        plain = [Datum.from_sample(s.prompt, s.completion, s.logprobs, 0.0) for s in batch]
        base, policy = self.backend.base_logprobs(plain), self.backend.logprobs(plain)
        datums, gaps = [], []
        mode = self.settings.loss_normalization
        for sample, adv, lps, own in zip(batch, advs, base, policy, strict=True):
            n = len(sample.completion)
            base_lps, own_lps = lps[-n:], own[-n:]
            per_token = kl_shaped(adv, own_lps, base_lps, self.settings.kl_base_coef)
            gaps += [s - b for s, b in zip(own_lps, base_lps, strict=True)]
            if any(abs(a) > 1e-9 for a in per_token):
                datums.append(Datum.from_sample(sample.prompt, sample.completion,
                                                sample.logprobs,
                                                normalised(per_token, len(batch), mode)))
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
                                            normalised(advs, len(batch),
                                                       self.settings.loss_normalization)))
            means.append(statistics.fmean(advs))
            gaps += [s - t for s, t in zip(sample.logprobs, completion_lps, strict=True)]
        return datums, means, statistics.fmean(gaps)

    @property
    def gating(self) -> bool:
        """The gate runs in RL only: its replay score is built on rewards."""
        return self.settings.gate_enabled and self.teacher is None

    # --- the gate -------------------------------------------------------------------------

    async def _gate_snapshot(self) -> Snapshot | None:
        """The held-out replay with the live policy's logprobs, built from the newest
        held-out turns (the backend holds the live weights when a step starts) and kept
        in the state hash, so that a restart compares with the same live version."""
        if not self.gating:
            return None
        if self.ledger.snapshot is None:
            samples = await self._holdout()
            if len(samples) >= 2:
                logprobs = await asyncio.to_thread(self.backend.logprobs,
                                                   replay_datums(samples))
                self.ledger.snapshot = Snapshot(samples, mean_completion_lp(samples, logprobs),
                                         self.ledger.live.version)
                await self.redis.hset(self.state_key, "snapshot",
                                      dump_snapshot(self.ledger.snapshot))
        return self.ledger.snapshot

    async def _holdout(self) -> list[Sample]:
        raw = cast(dict[bytes, bytes], await self.redis.hgetall(self.holdout_key))
        samples = sorted((Sample(**orjson.loads(v)) for v in raw.values()),
                         key=lambda s: s.turn_id)
        keep = self.settings.gate_holdout_size
        if len(samples) > 4 * keep:  # the held-out set keeps only recent turns
            await self.redis.hdel(self.holdout_key, *(s.turn_id for s in samples[:-keep]))
        return samples[-keep:]

    # --- commit, and what follows it ------------------------------------------------------

    async def _commit(self, ids: list[str], candidate: Version, summary: dict[str, float],
                      started: float, batch_at: float, refusal: str | None) -> bool:
        """Consume the batch and record the step; publish the candidate unless the gate
        refused it (then the refusal is recorded). False, and nothing written, when a
        rollback request is pending or arrives meanwhile (``WATCH`` on the state hash)."""
        publish = refusal is None
        number = candidate.version
        kept = {**self.ledger.kept, number: candidate}
        lineage = (extend_lineage(self.ledger.lineage, number, self.settings.max_staleness)
                   if publish else self.ledger.lineage)
        baseline = self._baseline.updated(summary["reward_mean"], self.settings.baseline_decay)
        async with self.redis.pipeline(transaction=True) as pipe:
            await pipe.watch(self.state_key)
            if await pipe.hexists(self.state_key, "rollback"):
                return False
            pipe.multi()  # type: ignore[no-untyped-call]
            pipe.hdel(self.buffer_key, *ids)
            for turn_id in ids:  # a count, not a flag: a turn trained twice would show
                pipe.incr(self.keys.trained(self.adapter, turn_id))
                pipe.expire(self.keys.trained(self.adapter, turn_id),
                            self.settings.dedupe_ttl_seconds)
            pipe.hset(self.state_key, mapping={"step": number, "kept": dump_kept(kept)})
            if self.teacher is None:  # RL: the running baseline moves once per step
                pipe.hset(self.baseline_key, mapping=cast(Any, baseline.fields()))
            pipe.hdel(self.state_key, "inflight")
            pipe.hdel(self.tries_key, *ids)
            if publish:
                pipe.hset(self.state_key, mapping={"live": dump_version(candidate),
                                                   "lineage": orjson.dumps(lineage)})
                pipe.xadd(self.keys.stream(WEIGHTS), cast(Any, self._event(
                    candidate, summary, batch_at).to_fields()),
                    maxlen=self.settings.stream_maxlen, approximate=True)
            else:
                pipe.hset(self.state_key, "gate_refusal", orjson.dumps(
                    {"step": number, "reason": refusal, "at": time.time(), **summary}))
            try:
                await pipe.execute()
            except WatchError:
                return False
        self.ledger.version, self.ledger.kept, self.ledger.lineage = number, kept, lineage
        if self.teacher is None:
            self._baseline = baseline
            self.metrics.baseline.set(baseline.mean)
        self._observe_commit(len(ids), summary, started)
        log.info("trainer.step_committed", extra={"step": number, "published": publish,
                                                  **summary})
        return True

    def _event(self, candidate: Version, summary: dict[str, float],
               batch_at: float) -> WeightsEventV1:
        return WeightsEventV1(
            id=f"{self.adapter}-v{candidate.version}", tenant=self.tenant or SHARED_TENANT,
            adapter=adapter_label(self.adapter, candidate.version), version=candidate.version,
            path=candidate.adapter_path, step=candidate.step, metrics=summary,
            batch_at=batch_at)

    def _observe_commit(self, trained: int, summary: dict[str, float], started: float) -> None:
        self.metrics.steps.inc()
        self.metrics.last_step.set(time.time())
        self.metrics.samples.labels("trained").inc(trained)
        self.metrics.batch_to_publish_seconds.observe(time.monotonic() - started)
        for name in ("loss", "reward_mean", "advantage_abs_mean", "grad_norm"):
            if name in summary:
                getattr(self.metrics, name).set(summary[name])

    async def _after_commit(self, candidate: Version, refusal: str | None) -> None:
        """Go live with a published candidate, or back to the live weights after a
        refusal; then apply retention."""
        if refusal is None:
            self.ledger.live = candidate
            self.metrics.live_version.set(candidate.version)
            ledger = self.ledger
            if ledger.snapshot and not snapshot_current(ledger.snapshot, ledger.lineage,
                                                        self.settings.gate_refresh_steps):
                ledger.snapshot = None  # rebuilt from newer held-out turns
            await asyncio.to_thread(self.backend.pin, candidate.checkpoint())
        else:
            log.warning("trainer.gate_refused", extra={"step": candidate.version,
                                                       "reason": refusal})
            await self.ledger.restore_live()
        await self.ledger.retain()


async def _wait(stopping: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), seconds)


def is_transient(exc: BaseException) -> bool:
    """Whether a failed step is worth retrying as it is: Redis or the network briefly
    unreachable, or a backend or teacher call that says so."""
    if isinstance(exc, StepError):
        return exc.transient
    return isinstance(exc, RedisConnectionError | RedisTimeoutError | ConnectionError
                      | TimeoutError)


def _distillable(message: ScoredV1) -> bool:
    turn = message.turn
    return turn.completed and turn.turn_type == "main" and turn.sampled is not None
