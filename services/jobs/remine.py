"""Re-mining one session on demand: the skill-miner's own ``mine`` step, run by a job.

The session's scored turns are read back from the ``scored`` stream (the miner's
trajectory of a session expires a day after its last turn, the stream keeps them), put back
into the session's trajectory, and every failing main turn (reward below
``skill_update_threshold``) is mined again: its ``mined`` marker and any cached LLM answer
are cleared first, so the miner asks its LLM (or the ``corrections`` proposer) afresh.
Credit is not counted again (its markers stay). The curator's own idempotency still holds:
a proposal whose skill already names the turn is not applied twice, so re-mining a session
whose turns already produced skills changes nothing unless the LLM proposes something new.

This is the one place a service imports another's code: the job runs the skill-miner's
step in-process, configured from the same settings as the skill-miner service.
"""

from __future__ import annotations

from typing import Any, cast

import redis.asyncio as aioredis

from services.skill_miner.__main__ import dedupe_similarity
from services.skill_miner.metrics import MinerMetrics
from services.skill_miner.service import SkillMiner, should_mine
from shared.keys import SCORED, Keys
from shared.messages import BadMessage, ScoredV1, decode
from shared.redis_client import connect
from shared.settings import Settings
from shared.skill_store import SkillStore

XRANGE_BATCH = 500
"""Stream entries read per round trip."""


def _needle(value: str) -> bytes | None:
    """Bytes every JSON encoding of ``value`` contains (a cheap pre-filter before
    decoding an entry), or None when escaping could differ between encoders."""
    if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
        return value.encode()
    return None


async def session_turns(redis: aioredis.Redis, keys: Keys, tenant: str,
                        session_id: str) -> list[ScoredV1]:
    """The session's scored turns in the ``scored`` stream, by turn index: one per turn,
    its newest revision."""
    stream, start = keys.stream(SCORED), "-"
    needle = _needle(session_id)
    found: dict[str, ScoredV1] = {}
    while True:
        chunk = cast(list[tuple[bytes, dict[bytes, bytes]]],
                     await redis.xrange(stream, start, "+", count=XRANGE_BATCH))
        for _, fields in chunk:
            if needle is not None and needle not in fields.get(b"data", b""):
                continue
            try:
                message = decode(fields)
            except BadMessage:
                continue
            if (isinstance(message, ScoredV1) and message.turn.tenant == tenant
                    and message.turn.session_id == session_id):
                kept = found.get(message.turn.id)
                if kept is None or message.revision > kept.revision:
                    found[message.turn.id] = message
        if len(chunk) < XRANGE_BATCH:
            return sorted(found.values(), key=lambda s: s.turn.turn_index)
        start = "(" + chunk[-1][0].decode()


async def remine(settings: Settings, tenant: str, session_id: str) -> dict[str, Any]:
    """Mine the session's failing turns again; returns what happened (JSON-able)."""
    client = connect(settings)
    keys = Keys(settings.namespace)
    metrics = MinerMetrics.create()
    try:
        turns = await session_turns(client, keys, tenant, session_id)
        failing = [s for s in turns if should_mine(settings, s)]
        if failing:
            await _mine(settings, client, metrics, failing, turns)
        turn_ids = {s.turn.id for s in turns}
        miner_skills = [s for s in await _store_list(settings, client, tenant)
                        if turn_ids & set(s["turn_ids"])]
    finally:
        await client.aclose()
    return {"tenant": tenant, "session_id": session_id, "turns": len(turns),
            "failing_turns": [s.turn.id for s in failing],
            "proposals": _by_label(metrics, "reef_skill_miner_proposals_total", "outcome"),
            "mined": _by_label(metrics, "reef_skill_miner_turns_mined_total", "result"),
            "skills": miner_skills}


async def _mine(settings: Settings, client: aioredis.Redis, metrics: MinerMetrics,
                failing: list[ScoredV1], turns: list[ScoredV1]) -> None:
    keys = Keys(settings.namespace)
    # Not a stream worker: a re-mined turn is not pending in the miner's group, so there
    # is no claim to keep while the LLM answers (and none of the live miner's to take).
    miner = SkillMiner(settings, client, metrics, similarity=dedupe_similarity(settings))
    await miner.start()
    try:
        for scored in turns:  # a trajectory expires; the stream still has the turns
            await miner.trajectories.record(scored)
        for scored in failing:
            turn = scored.turn
            await client.delete(keys.miner_done("mined", turn.tenant, turn.id),
                                keys.miner_answer(turn.tenant, turn.id))
            await miner.mine(scored)
    finally:
        await miner.close()


async def _store_list(settings: Settings, client: aioredis.Redis,
                      tenant: str) -> list[dict[str, Any]]:
    store = SkillStore(client, Keys(settings.namespace), settings.stream_maxlen)
    return [{"id": s.id, "name": s.name, "status": s.status, "version": s.version,
             "turn_ids": list(s.provenance.turn_ids)} for s in await store.list(tenant)]


def _by_label(metrics: MinerMetrics, name: str, label: str) -> dict[str, int]:
    """A counter's non-zero values by label (what this job's miner did)."""
    out: dict[str, int] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name and sample.value:
                out[sample.labels[label]] = int(sample.value)
    return out

