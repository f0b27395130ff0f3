"""The trainer's ledger: its durable state (:mod:`services.trainer.state`) held in memory,
and what keeps it and the backend in step - starting on the live version, recovering
from a failed step, counting tries at a batch, rollbacks and retention."""

from __future__ import annotations

import asyncio
import logging
from typing import cast

import orjson
import redis.asyncio as aioredis

from services.trainer.backend import Checkpoint, StepError, TrainingBackend
from services.trainer.gate import Snapshot
from services.trainer.metrics import TrainerMetrics
from services.trainer.state import (
    Version,
    checkpoint_name,
    dump_kept,
    dump_version,
    keep_set,
    load_kept,
    load_snapshot,
    load_version,
    pinned,
    rolled_back_lineage,
    snapshot_current,
)
from shared.settings import Settings

log = logging.getLogger("reef.trainer")


class Ledger:
    """The committed step, the live version, its lineage, the kept checkpoints and the
    gate's snapshot of one adapter; every change is written to the state hash."""

    def __init__(self, settings: Settings, redis: aioredis.Redis, state_key: str,
                 tries_key: str, backend: TrainingBackend, metrics: TrainerMetrics) -> None:
        self.settings = settings
        self.redis = redis
        self.state_key = state_key
        self.tries_key = tries_key
        """Hash: turn id -> tries at a step holding it that did not come back."""
        self.backend = backend
        self.metrics = metrics
        self.version = 0
        """The number of the last committed candidate (published or refused)."""
        self.live = Version(0, 0, "", "", published=True, pinned=True)
        """The version served now; set from the state hash by ``reconcile``."""
        self.lineage: list[int] = [0]
        self.kept: dict[int, Version] = {}
        self.snapshot: Snapshot | None = None
        self.needs_restore = False
        """A recovery failed: restore the live version before the next try."""

    async def restore_live(self) -> None:
        """Put the backend back on the live version's state."""
        await asyncio.to_thread(self.backend.restore, self.live.checkpoint())

    async def settle_failure(self, ids: list[str], exc: Exception, transient: bool) -> None:
        """Note the failure (a transient one takes its try back from every turn of the
        batch; another is kept as the last error), drop the in-flight record, and restore
        the live version's weights. A failure here (Redis or the backend still down) is
        left to the next try."""
        try:
            if transient:
                async with self.redis.pipeline(transaction=True) as pipe:
                    for turn_id in ids:
                        pipe.hincrby(self.tries_key, turn_id, -1)
                    await pipe.execute()
            else:
                await self.redis.hset(self.state_key, "last_error",
                                      f"{type(exc).__name__}: {exc}"[:1000])
            state = cast(dict[bytes, bytes], await self.redis.hgetall(self.state_key))
            self.load(state)
            await self.drop_inflight(state)
            await self.restore_live()
        except Exception as again:  # noqa: BLE001 - the next try settles it
            log.warning("trainer.recovery_failed",
                        extra={"error": f"{type(again).__name__}: {again}"[:300]})
            self.needs_restore = True

    async def count_attempt(self, ids: list[str]) -> tuple[dict[str, int], str]:
        """Record one more try at each turn of a batch (durably, before training, so that
        a process dying mid-step counts); returns every turn's tries so far and the last
        error. Counted per turn, not per batch: a batch's make-up changes as late turns
        arrive, and a poisonous turn must still reach the limit."""
        if self.needs_restore:  # a recovery that failed: the backend may hold a half step
            await self.restore_live()
            self.needs_restore = False
        async with self.redis.pipeline(transaction=True) as pipe:
            for turn_id in ids:
                pipe.hincrby(self.tries_key, turn_id, 1)
            pipe.expire(self.tries_key, self.settings.dedupe_ttl_seconds)
            pipe.hget(self.state_key, "last_error")
            *counts, _, error = await pipe.execute()
        return dict(zip(ids, (int(c) for c in counts), strict=True)), (error or b"").decode()

    async def retain(self) -> None:
        """Delete the checkpoints retention does not keep (state first, then storage: a
        checkpoint is forgotten only once it is deleted, so a failure is retried)."""
        raw = await self.redis.hget(self.state_key, "rollback")
        wanted = orjson.loads(raw)["version"] if raw else None
        keep = keep_set(self.kept, self.live.version, self.settings.checkpoint_keep_published,
                        wanted)
        gone = []
        for number in sorted(set(self.kept) - keep):
            try:
                await asyncio.to_thread(self.backend.delete, self.kept[number].checkpoint())
            except (StepError, OSError) as exc:
                log.warning("trainer.checkpoint_delete_failed",
                            extra={"step": number, "error": f"{type(exc).__name__}: {exc}"})
                continue
            gone.append(number)
        if gone:
            self.kept = {v: info for v, info in self.kept.items() if v not in gone}
            await self.redis.hset(self.state_key, "kept", dump_kept(self.kept))
        self.metrics.checkpoints_kept.set(len(self.kept))

    def load(self, state: dict[bytes, bytes]) -> None:
        """Take the committed step, the live version, lineage and kept checkpoints from
        the state hash (when it has them)."""
        live = load_version(state.get(b"live"))
        if live is None:
            return
        self.live = live
        self.version = int(state.get(b"step", b"0"))
        self.lineage = orjson.loads(state.get(b"lineage", b"[]")) or [live.version]
        self.kept = load_kept(state.get(b"kept")) or {live.version: live}

    async def reconcile(self, resumed: Checkpoint | None) -> None:
        """After ``backend.start``: make the backend hold the live version, drop a
        candidate that was never committed, reload the gate's snapshot."""
        state = cast(dict[bytes, bytes], await self.redis.hgetall(self.state_key))
        if b"live" not in state:
            await self._first_live(resumed, int(state.get(b"step", b"0")))
            state = cast(dict[bytes, bytes], await self.redis.hgetall(self.state_key))
        self.load(state)
        if resumed is None or resumed.state_path != self.live.state_path:
            await self.restore_live()
        await self.drop_inflight(state)
        snapshot = load_snapshot(state.get(b"snapshot"))
        if snapshot and snapshot_current(snapshot, self.lineage,
                                         self.settings.gate_refresh_steps):
            self.snapshot = snapshot
        self.metrics.live_version.set(self.live.version)
        await self.retain()

    async def _first_live(self, resumed: Checkpoint | None, committed: int) -> None:
        """No live version recorded: a new adapter (its fresh weights are version 0), or
        state from before versions were recorded (what the backend resumed is live)."""
        if resumed is None:
            resumed, number = await asyncio.to_thread(self.backend.save,
                                                      checkpoint_name(0)), 0
        else:
            number = committed or resumed.step
            log.warning("trainer.live_adopted", extra={"step": number})
        live = Version.of(number, resumed, published=True, pinned=True)
        await self.redis.hset(self.state_key, mapping={
            "step": number, "live": dump_version(live), "lineage": orjson.dumps([number]),
            "kept": dump_kept({number: live})})

    async def drop_inflight(self, state: dict[bytes, bytes] | None) -> None:
        """Forget an uncommitted step; its saved candidate (if any) goes to retention."""
        raw = (state or {}).get(b"inflight") if state is not None else await self.redis.hget(
            self.state_key, "inflight")
        if not raw:
            return
        inflight = orjson.loads(raw)
        await self.redis.hdel(self.state_key, "inflight")
        if "candidate" in inflight and inflight["step"] not in self.kept:
            self.kept[inflight["step"]] = Version.of(inflight["step"],
                                                     Checkpoint(**inflight["candidate"]))

    async def apply_rollback(self) -> None:
        """Apply a pending ``reef rollback N``: N becomes the live version (kept for
        good), the backend goes back to N's state, and training goes on from there."""
        raw = await self.redis.hget(self.state_key, "rollback")
        if not raw:
            return
        number = int(orjson.loads(raw)["version"])
        target = self.kept.get(number)
        if target is None or not target.published:
            log.error("trainer.rollback_unknown", extra={"step": number,
                                                         "kept": sorted(self.kept)})
            await self.redis.hdel(self.state_key, "rollback")
            return
        await asyncio.to_thread(self.backend.restore, target.checkpoint())
        self.live = self.kept[number] = pinned(target)
        self.lineage = rolled_back_lineage(self.lineage, number)
        self.snapshot = None
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.state_key, mapping={
                "live": dump_version(self.live), "lineage": orjson.dumps(self.lineage),
                "kept": dump_kept(self.kept)})
            pipe.hdel(self.state_key, "rollback", "snapshot")
            await pipe.execute()
        self.metrics.rollbacks.inc()
        self.metrics.live_version.set(number)
        log.warning("trainer.rolled_back", extra={"step": number})
        await self.retain()

