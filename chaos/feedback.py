"""Late explicit feedback during the chaos run, and its accounting.

While the load runs (and the faults with it), a share of the answered turns get a
``POST /v1/feedback`` (a thumbs up or down, by the completion id the client saw) some
seconds after their answer, when most of them have been scored already. Each one must
be used exactly once: either in the turn's first score (it arrived first) or in exactly
one superseding ``scored`` entry (revision 1). Nothing else reads it twice, and none is
dropped. A request that failed (the gateway was being killed) is retried until it is
answered; a 404 for a turn the client saw answered is a failure.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from chaos.load import LoadResult

RETRY_SECONDS = 0.5
"""Pause before resending feedback that got no answer (the gateway restarting)."""
GIVE_UP_SECONDS = 60.0
"""A feedback request still unanswered after this long counts as failed."""


@dataclass
class FeedbackResult:
    """What the feedback sender did."""

    sent: dict[str, float] = field(default_factory=dict)
    """Completion id -> the score given, for every feedback answered 200."""
    statuses: Counter[str] = field(default_factory=Counter)
    """Final outcome per feedback: ``200``, ``404``, ``gave_up``; and ``retries``."""


async def send_late_feedback(base_url: str, api_key: str, load: LoadResult, share: float,
                             delay: float, seed: int | None) -> FeedbackResult:
    """Until the load is done: give ``share`` of the answered turns feedback ``delay``
    seconds after their answer."""
    result = FeedbackResult()
    rng = random.Random(seed)
    considered: set[str] = set()
    pending: list[asyncio.Task[None]] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=10.0,
                                 headers={"Authorization": f"Bearer {api_key}"}) as client:
        while not load.done:
            now = time.monotonic()
            for rid, (session, answered_at) in list(load.sessions.items()):
                if rid in considered or now - answered_at < delay:
                    continue
                considered.add(rid)
                if rng.random() < share:
                    score = rng.choice((1.0, -1.0))
                    pending.append(asyncio.create_task(
                        _send(client, result, rid, session, score)))
            await asyncio.sleep(0.5)
        await asyncio.gather(*pending)
    return result


async def _send(client: httpx.AsyncClient, result: FeedbackResult, rid: str, session: str,
                score: float) -> None:
    body = {"session_id": session, "response_id": rid, "score": score}
    deadline = time.monotonic() + GIVE_UP_SECONDS
    while time.monotonic() < deadline:
        try:
            response = await client.post("/v1/feedback", json=body)
        except httpx.HTTPError:
            response = None
        if response is not None and response.status_code in (200, 404):
            result.statuses[str(response.status_code)] += 1
            if response.status_code == 200:
                result.sent[rid] = score
            return
        result.statuses["retries"] += 1
        await asyncio.sleep(RETRY_SECONDS)
    result.statuses["gave_up"] += 1


@dataclass
class FeedbackAccounting:
    """How each answered feedback was used."""

    given: int = 0
    in_first_score: int = 0
    late: int = 0
    """Used in one superseding scored entry (the turn had been scored already)."""
    unused: int = 0
    used_twice: int = 0
    examples: list[str] = field(default_factory=list)


def account_feedback(sent: dict[str, float], turns: dict[str, list[str]],
                     scored: dict[str, list[dict[str, Any]]]) -> FeedbackAccounting:
    """``turns``: completion id -> turn ids; ``scored``: turn id -> its scored entries."""
    acc = FeedbackAccounting(given=len(sent))
    for rid in sent:
        ids = turns.get(rid, [])
        entries = scored.get(ids[0], []) if ids else []
        if not entries:
            continue  # never scored: the main accounting says why (dead letter or lost)
        first = [e for e in entries if not e.get("revision")]
        in_first = any("explicit" in (e.get("components") or {}) for e in first)
        revisions = [e for e in entries if e.get("revision")]
        used = int(in_first) + len(revisions)
        if used == 1:
            acc.in_first_score += in_first
            acc.late += len(revisions)
            continue
        if used == 0:
            acc.unused += 1
        else:
            acc.used_twice += 1
        if len(acc.examples) < 5:
            acc.examples.append(f"feedback used {used} times: {rid}")
    return acc
