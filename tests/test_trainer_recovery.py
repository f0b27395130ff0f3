"""The trainer keeps going: failed steps are retried or quarantined, gate refusals and
rollbacks never wedge it, its state survives a restart, and retention keeps what can
still be served. A real (tiny) model on the local backend, a real Redis."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from services.stack.rollback import RollbackError, rollback
from services.trainer.backend import Datum, StepError
from services.trainer.local import LocalBackend
from services.trainer.metrics import TrainerMetrics
from services.trainer.samples import Sample, to_sample
from services.trainer.service import Trainer
from shared.keys import Keys
from shared.messages import ScoredV1
from shared.settings import Settings
from tests.conftest import RedisServer
from tests.test_trainer_service import (
    scored_turn,
    settings_for,
    tiny_model,
    turn_with,
    weights_events,
)

__all__ = ["tiny_model"]  # a fixture, imported for this module's tests

POISON = 63
"""A token id the flaky backend below refuses to train on (a poisonous datum)."""


class FlakyBackend(LocalBackend):
    """The local backend, failing on purpose: ``transient`` failures first, then an
    error for every batch holding the poisonous token."""

    def __init__(self, *args: Any, transient: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.transient = transient
        self.calls = 0

    def forward_backward(self, datums: list[Datum], loss_fn: str) -> float:
        self.calls += 1
        if self.transient > 0:
            self.transient -= 1
            raise StepError("Tinker forward_backward failed: worker lost", transient=True)
        if any(POISON in d.tokens for d in datums):
            raise ValueError("poisonous datum")
        return super().forward_backward(datums, loss_fn)


def make_trainer(settings: Settings, client: aioredis.Redis, model: Path, state: Path,
                 backend: type[LocalBackend] = LocalBackend, **kwargs: Any) -> Trainer:
    return Trainer(settings, client, backend(settings, model, state, **kwargs),
                   TrainerMetrics.create())


def poisoned(i: int, reward: float) -> ScoredV1:
    return turn_with(i, [POISON, 21, 2], reward)


async def run_until(trainer: Trainer, done: Any, timeout: float = 60) -> asyncio.Task[None]:
    """Run the trainer's loop until ``done()`` holds; returns the (stopped) task."""
    stopping = asyncio.Event()
    task = asyncio.create_task(trainer.run(stopping))
    deadline = time.monotonic() + timeout
    try:
        while not await done():
            assert time.monotonic() < deadline, "the trainer did not get there in time"
            assert not task.done() or task.exception() is None, task.exception()
            await asyncio.sleep(0.05)
    finally:
        stopping.set()
        await task
    return task


async def test_a_poisonous_batch_is_quarantined_and_training_goes_on(
        redis_server: RedisServer, namespace: str, tiny_model: Path, tmp_path: Path) -> None:
    settings = settings_for(namespace, redis_server.url, tiny_model, tmp_path,
                            trainer_retry_backoff_seconds=0.01)
    client = aioredis.from_url(redis_server.url)
    keys = Keys(namespace)
    trainer = make_trainer(settings, client, tiny_model, tmp_path / "st", FlakyBackend)
    for i in range(4):  # the oldest batch holds a poisonous datum ...
        await trainer.on_scored(poisoned(i, 1.0 if i % 2 else -1.0), "0-0")
    for i in range(4, 12):  # ... the two after it do not
        await trainer.on_scored(scored_turn(i, 1.0 if i % 2 else -1.0), "0-0")

    async def trained_two() -> bool:
        return len(weights_events(redis_server.client(), namespace)) == 2

    await run_until(trainer, trained_two)
    (entry,) = await client.xrange(keys.trainer("reef", "quarantine"))
    fields = entry[1]
    assert b"poisonous datum" in fields[b"reason"]
    assert sorted(orjson.loads(fields[b"turn_ids"])) == [f"{1000 + i:06d}-turn"
                                                         for i in range(4)]
    assert trainer.backend.calls == 3 + 2  # tried 3 times (the setting), then moved on
    assert await client.hlen(keys.trainer("reef", "buffer")) == 0
    assert trainer.metrics.step_failures.labels("error")._value.get() == 3
    await trainer.on_scored(poisoned(0, 1.0), "0-0")  # redelivered: never buffered again
    assert await client.hlen(keys.trainer("reef", "buffer")) == 0
    await client.aclose()


async def test_transient_failures_are_retried_never_quarantined(
        redis_server: RedisServer, namespace: str, tiny_model: Path, tmp_path: Path) -> None:
    settings = settings_for(namespace, redis_server.url, tiny_model, tmp_path,
                            trainer_retry_backoff_seconds=0.01)
    client = aioredis.from_url(redis_server.url)
    trainer = make_trainer(settings, client, tiny_model, tmp_path / "st", FlakyBackend,
                           transient=6)  # twice trainer_max_batch_failures
    for i in range(4):
        await trainer.on_scored(scored_turn(i, 1.0 if i % 2 else -1.0), "0-0")

    async def published() -> bool:
        return len(weights_events(redis_server.client(), namespace)) == 1

    await run_until(trainer, published)
    assert await client.xlen(Keys(namespace).trainer("reef", "quarantine")) == 0
    assert trainer.metrics.step_failures.labels("transient")._value.get() == 6
    assert trainer.metrics.last_step._value.get() > time.time() - 60
    await client.aclose()


async def test_a_batch_whose_process_died_each_time_is_quarantined(
        redis_server: RedisServer, namespace: str, tiny_model: Path, tmp_path: Path) -> None:
    """The try is recorded before training, so a process killed mid-step (a datum that
    crashes the process, or exhausts its memory) counts: no crash loop."""
    settings = settings_for(namespace, redis_server.url, tiny_model, tmp_path)
    client = aioredis.from_url(redis_server.url)
    trainer = make_trainer(settings, client, tiny_model, tmp_path / "st")
    await trainer.start()
    doomed = batch(1.0, 0)
    for _ in range(3):  # three tries that never came back
        await trainer.ledger.count_attempt([s.turn_id for s in doomed])
    assert await trainer.attempt(doomed) == 0.0
    assert await client.xlen(Keys(namespace).trainer("reef", "quarantine")) == 1
    assert weights_events(redis_server.client(), namespace) == []
    await client.aclose()


GOOD, BAD = [30, 31, 32], [40, 41, 42]


def gated(namespace: str, url: str, model: Path, data: Path, **extra: Any) -> Settings:
    fields: dict[str, Any] = {"gate_enabled": True, "gate_holdout_every": 1,
                              "learning_rate": 5e-2, "gate_max_shift": 100.0,
                              "max_staleness": 1, **extra}
    return settings_for(namespace, url, model, data, **fields)


async def hold_out(trainer: Trainer) -> None:
    """Held-out turns saying GOOD answers are rewarded and BAD ones are not."""
    for i in range(8):
        await trainer.on_scored(turn_with(i, GOOD if i % 2 else BAD, 1.0 if i % 2 else -1.0),
                                "0-0")


def batch(reward_good: float, start: int, version: str = "base") -> list[Sample]:
    out = []
    for i in range(4):
        turn = turn_with(start + i, GOOD if i % 2 else BAD,
                         reward_good if i % 2 else -reward_good)
        turn = turn.model_copy(update={"turn": turn.turn.model_copy(
            update={"policy_version": version})})
        out.append(to_sample(turn, "reef"))
    return out


async def test_ten_refusals_then_a_pass_and_steps_go_on(
        redis_server: RedisServer, namespace: str, tiny_model: Path, tmp_path: Path) -> None:
    """Before: each refusal advanced the version, so after three the base model's
    samples were stale for good (max_staleness) and the trainer never stepped again; and
    the next step trained on top of the refused weights."""
    settings = gated(namespace, redis_server.url, tiny_model, tmp_path, gate_max_shift=0.0,
                     max_staleness=2)
    client = aioredis.from_url(redis_server.url)
    trainer = make_trainer(settings, client, tiny_model, tmp_path / "st")
    await trainer.start()
    await hold_out(trainer)
    live_weights = _lora(trainer)
    for n in range(10):  # any move is refused (gate_max_shift 0)
        await trainer.step(batch(1.0, 100 + 10 * n))
    assert weights_events(redis_server.client(), namespace) == []
    assert trainer.ledger.live.version == 0 and trainer.ledger.version == 10
    assert _lora(trainer) == live_weights  # back on the live weights after each refusal
    trainer.settings = settings.model_copy(update={"gate_max_shift": 100.0,
                                                    "gate_tolerance": 100.0})
    buffer = Keys(namespace).trainer("reef", "buffer")
    for n in range(3):  # base-model samples: still fresh, so the loop trains them
        for sample in batch(1.0, 300 + 10 * n):
            await client.hset(buffer, sample.turn_id, orjson.dumps(asdict(sample)))

    async def three_published() -> bool:
        return len(weights_events(redis_server.client(), namespace)) == 3

    await run_until(trainer, three_published)
    assert [e.version for e in weights_events(redis_server.client(), namespace)] == [11, 12, 13]
    # Only refused candidates' checkpoints are gone; v0 and the published ones stay.
    assert sorted(trainer.ledger.kept) == [0, 11, 12, 13]
    assert sorted(p.name for p in (tmp_path / "st").iterdir()) == [
        "v000000", "v000011", "v000012", "v000013"]
    await client.aclose()


def _lora(trainer: Trainer) -> list[float]:
    return [float(p.detach().abs().sum()) for n, p in trainer.backend.model.named_parameters()
            if "lora_" in n]


async def test_a_restart_between_a_refusal_and_the_next_step_keeps_the_live_baseline(
        redis_server: RedisServer, namespace: str, tiny_model: Path, tmp_path: Path) -> None:
    """Before: the gate's snapshot lived in memory and the backend resumed the newest
    checkpoint, so after a restart the refused candidate became the baseline."""
    settings = gated(namespace, redis_server.url, tiny_model, tmp_path)
    client = aioredis.from_url(redis_server.url)
    first = make_trainer(settings, client, tiny_model, tmp_path / "st")
    await first.start()
    await hold_out(first)
    lenient = settings.model_copy(update={"gate_tolerance": 100.0})
    first.settings = lenient
    await first.step(batch(1.0, 100))  # published
    first.settings = settings.model_copy(update={"gate_max_shift": 0.0})
    await first.step(batch(-1.0, 200))  # refused
    assert [e.version for e in weights_events(redis_server.client(), namespace)] == [1]
    assert first.ledger.snapshot is not None
    live_lp, live_weights = first.ledger.snapshot.live_lp, _lora(first)
    second = make_trainer(lenient, client, tiny_model, tmp_path / "st")  # a restart
    await second.start()
    assert second.ledger.live.version == 1 and second.ledger.version == 2
    assert _lora(second) == live_weights  # the live version, not the refused candidate
    assert second.ledger.snapshot is not None and second.ledger.snapshot.live_lp == live_lp
    await second.step(batch(1.0, 300, version="reef-v1"))
    assert [e.version for e in weights_events(redis_server.client(), namespace)] == [1, 3]
    await client.aclose()


async def test_rollback_mid_run_then_training_goes_on_from_it(
        redis_server: RedisServer, namespace: str, tiny_model: Path, tmp_path: Path) -> None:
    """Before: ``reef rollback`` only republished the old adapter; the trainer kept
    training (and publishing) from its newest weights, and samples of the rolled-back
    version counted as stale for good."""
    settings = settings_for(namespace, redis_server.url, tiny_model, tmp_path,
                            checkpoint_keep_published=2, max_staleness=1, shared_adapter=True)
    client = aioredis.from_url(redis_server.url)
    trainer = make_trainer(settings, client, tiny_model, tmp_path / "st")
    await trainer.start()
    for n in range(4):
        await trainer.step(batch(1.0, 100 + 10 * n, version=f"reef-v{n}" if n else "base"))
    assert trainer.ledger.live.version == 4 and sorted(trainer.ledger.kept) == [0, 3, 4]
    sync = redis_server.client()
    with pytest.raises(RollbackError, match="no longer kept"):
        rollback(sync, settings, 1)  # pruned by retention
    v3_weights = _lora_of(tmp_path / "st" / "v000003")
    rollback(sync, settings, 3)
    for i in range(4):  # turns sampled by v3 are fresh again; v4's are off the lineage
        await trainer.on_scored(_versioned(400 + i, "reef-v3"), "0-0")
        await trainer.on_scored(_versioned(500 + i, "reef-v4"), "0-0")

    async def published_after_rollback() -> bool:
        return len(weights_events(sync, namespace)) == 4 + 1 + 1

    await run_until(trainer, published_after_rollback)
    events = weights_events(sync, namespace)
    assert [e.version for e in events] == [1, 2, 3, 4, 3, 5]
    assert events[4].metrics.get("rollback") == 1.0
    assert trainer.ledger.lineage[-2:] == [3, 5] and trainer.ledger.live.version == 5
    assert trainer.ledger.kept[3].pinned  # a rollback target is kept for good
    assert _lora_of(tmp_path / "st" / "v000003") == v3_weights
    assert trainer.metrics.samples.labels("stale")._value.get() == 4  # v4's
    assert await client.hget(Keys(namespace).trainer("reef", "state"), "rollback") is None
    await client.aclose()


def _versioned(i: int, version: str) -> ScoredV1:
    turn = scored_turn(i, 1.0 if i % 2 else -1.0)
    return turn.model_copy(update={"turn": turn.turn.model_copy(
        update={"policy_version": version})})


def _lora_of(checkpoint: Path) -> bytes:
    return (checkpoint / "adapter" / "adapter_model.safetensors").read_bytes()


async def test_retention_keeps_live_last_published_and_rollback_targets(
        redis_server: RedisServer, namespace: str, tiny_model: Path, tmp_path: Path) -> None:
    """Before: the local backend kept the newest 3 checkpoints whatever they were (the
    live adapter and rollback targets included)."""
    settings = settings_for(namespace, redis_server.url, tiny_model, tmp_path,
                            checkpoint_keep_published=2, max_staleness=100, shared_adapter=True)
    client = aioredis.from_url(redis_server.url)
    trainer = make_trainer(settings, client, tiny_model, tmp_path / "st")
    await trainer.start()
    for n in range(3):
        await trainer.step(batch(1.0, 100 + 10 * n))
    rollback(redis_server.client(), settings, 2)
    await trainer.ledger.apply_rollback()
    for n in range(3, 8):
        await trainer.step(batch(1.0, 100 + 10 * n))
    names = sorted(p.name for p in (tmp_path / "st").iterdir())
    assert names == ["v000000", "v000002", "v000007", "v000008"]
    assert trainer.metrics.checkpoints_kept._value.get() == 4
    await client.aclose()


def revised(i: int, reward: float, revision: int) -> ScoredV1:
    first = scored_turn(i, reward)
    return first.model_copy(update={"revision": revision, "id": f"{first.id}:r{revision}"})


async def test_late_feedback_retrains_on_the_newest_reward_or_counts_a_correction(
        redis_server: RedisServer, namespace: str, tiny_model: Path, tmp_path: Path) -> None:
    """Before: the buffer kept the first reward it saw (HSETNX), so a superseding scored
    entry from late explicit feedback was dropped as a duplicate."""
    settings = settings_for(namespace, redis_server.url, tiny_model, tmp_path)
    client = aioredis.from_url(redis_server.url)
    keys = Keys(namespace)
    trainer = make_trainer(settings, client, tiny_model, tmp_path / "st")
    await trainer.start()
    buffer = keys.trainer("reef", "buffer")

    async def reward_of(i: int) -> float:
        raw = await client.hget(buffer, f"{1000 + i:06d}-turn")
        assert raw is not None
        return float(orjson.loads(raw)["reward"])

    for i in range(4):
        await trainer.on_scored(scored_turn(i, 1.0), "0-0")
    await trainer.on_scored(revised(0, -1.0, 1), "0-0")
    await trainer.on_scored(scored_turn(0, 1.0), "0-0")  # the first score, redelivered
    await trainer.on_scored(revised(0, -1.0, 1), "0-0")  # the revision, redelivered
    assert await reward_of(0) == -1.0
    fates = trainer.metrics.samples
    assert fates.labels("revised")._value.get() == 1
    assert fates.labels("duplicate")._value.get() == 2
    # A revision for a turn of the step in flight: counted as corrected (the step trains
    # the reward it began with).
    await client.hset(keys.trainer("reef", "state"), "inflight",
                      orjson.dumps({"step": 1, "ids": [f"{1000 + 1:06d}-turn"]}))
    await trainer.on_scored(revised(1, -1.0, 1), "0-0")
    assert fates.labels("corrected")._value.get() == 1
    await client.hdel(keys.trainer("reef", "state"), "inflight")
    (batch,) = [await trainer._next_batch()]
    assert batch is not None and sorted(s.reward for s in batch) == [-1.0, -1.0, 1.0, 1.0]
    await trainer.step(batch)
    assert [e.metrics["reward_mean"] for e in weights_events(redis_server.client(),
                                                              namespace)] == [0.0]
    await trainer.on_scored(revised(2, -1.0, 1), "0-0")  # trained already: a correction
    assert fates.labels("corrected")._value.get() == 2
    assert await client.hlen(buffer) == 0  # and never trained again
    await client.aclose()


async def test_the_step_loop_waits_out_a_redis_restart(
        redis_server: RedisServer, namespace: str, tiny_model: Path, tmp_path: Path) -> None:
    """The loop's own Redis reads (the buffer, the rollback request) fail while Redis is
    down: the loop backs off and goes on (it must not end the service)."""
    settings = settings_for(namespace, redis_server.url, tiny_model, tmp_path,
                            trainer_retry_backoff_seconds=0.05)
    client = aioredis.from_url(redis_server.url)
    trainer = make_trainer(settings, client, tiny_model, tmp_path / "st")
    stopping = asyncio.Event()
    task = asyncio.create_task(trainer.run(stopping))
    try:
        while not trainer._started:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(redis_server.kill)
        await asyncio.sleep(1.0)
        assert not task.done()
        await asyncio.to_thread(redis_server.start)
        for i in range(4):
            await trainer.on_scored(scored_turn(i, 1.0 if i % 2 else -1.0), "0-0")
        deadline = time.monotonic() + 30
        while not weights_events(redis_server.client(), namespace):
            assert time.monotonic() < deadline and not task.done()
            await asyncio.sleep(0.1)
    finally:
        stopping.set()
        await task
        await client.aclose()


async def test_a_poisonous_turn_is_quarantined_while_its_batch_changes(
        redis_server: RedisServer, namespace: str, tiny_model: Path, tmp_path: Path) -> None:
    """Found by make chaos: after a Redis restart, older turns kept arriving late, so the
    oldest batch changed with every try; tries were counted per batch, never reached the
    limit, and the trainer retried the poisonous turn for good with a growing backoff."""
    settings = settings_for(namespace, redis_server.url, tiny_model, tmp_path,
                            trainer_retry_backoff_seconds=0.01)
    client = aioredis.from_url(redis_server.url)
    trainer = make_trainer(settings, client, tiny_model, tmp_path / "st", FlakyBackend)
    await trainer.start()
    await trainer.on_scored(poisoned(500, -1.0), "0-0")  # its group: 501, rewarded 1
    for i in range(501, 504):
        await trainer.on_scored(scored_turn(i, 1.0 if i % 2 else -1.0), "0-0")
    for late in range(4):  # before each try, an older turn arrives and joins the batch
        batch = await trainer._next_batch()
        assert batch is not None
        await trainer.attempt(batch)
        await trainer.on_scored(scored_turn(499 - late, 1.0 if late % 2 else -1.0), "0-0")
    quarantine = Keys(namespace).trainer("reef", "quarantine")
    (entry,) = await client.xrange(quarantine)
    assert "001500-turn" in orjson.loads(entry[1][b"turn_ids"])  # after 3 tries
    assert len(orjson.loads(entry[1][b"turn_ids"])) == 1  # the late arrivals stay
    batch = await trainer._next_batch()
    assert batch is not None
    await trainer.attempt(batch)  # and train: their tries start afresh
    assert len(weights_events(redis_server.client(), namespace)) == 1
    assert await client.xlen(quarantine) == 1
    await client.aclose()
