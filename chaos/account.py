"""After the load: wait for the pipeline to drain, then account for every answered turn.

Where each fact is read from (all in Redis, nothing from the services' memory):

- recorded: the ``turns`` stream (a ``turn.v1`` carries ``response_id``, the completion
  id the client saw);
- scored: the ``scored`` stream, counted by turn id (the scorer appends one entry per turn;
  a revision of its reward after late feedback, ``revision`` > 0, is not a second turn);
- seen by the trainer / the skill-miner: the stream worker's "handled" marker of the group
  (``Keys.handled(group, turn id)``; a ``scored.v1``'s id is its turn's id). It is written
  in the same MULTI as the ack: a set of the acked handlings (consumer, entry, delivery),
  so two members mean the group handled the turn twice;
- trained: the trainer's per-turn marker (``Keys.trained``), a count of the steps that
  trained the turn; mined: the skill-miner's ``mined`` marker;
- dead-lettered: the ``<stream>:dead`` twins, with the reason and the group.

An answered turn is *lost* when it is missing somewhere it must be and is not in a
dead-letter stream instead; *duplicated* when it was recorded, scored, handled by a group
or trained more than once.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from shared.keys import (
    FINALISED,
    GROUP_JUDGE,
    GROUP_SCORER,
    GROUP_SKILL_MINER,
    SCORED,
    TURNS,
    Keys,
    trainer_group,
)

GROUPS = ((TURNS, GROUP_SCORER), (FINALISED, GROUP_JUDGE), (SCORED, GROUP_SKILL_MINER))
"""The (stream, consumer group) pairs of the pipeline but the trainers' (one per adapter:
``trainer_group``); drained when none has work left."""


@dataclass
class Accounting:
    """The figures of one run."""

    answered: int = 0
    recorded: int = 0
    scored: int = 0
    seen: Counter[str] = field(default_factory=Counter)
    """Answered turns handled by each consumer group (trainer, skill-miner)."""
    trained: int = 0
    mined: int = 0
    dead_lettered: int = 0
    dead_reasons: Counter[str] = field(default_factory=Counter)
    lost: int = 0
    lost_where: Counter[str] = field(default_factory=Counter)
    duplicated: int = 0
    duplicated_where: Counter[str] = field(default_factory=Counter)
    cross_tenant: int = 0
    """Turns trained into another tenant's adapter (target 0)."""
    examples: list[str] = field(default_factory=list)

    def add(self, other: Accounting) -> None:
        """Fold another tenant's figures into these."""
        for name, value in vars(other).items():
            mine = getattr(self, name)
            if isinstance(value, Counter):
                mine.update(value)
            elif isinstance(value, list):
                mine.extend(value[: max(0, 10 - len(mine))])
            else:
                setattr(self, name, mine + value)

    def problem(self, kind: str, where: str, response_id: str) -> None:
        if kind == "lost":
            self.lost += 1
            self.lost_where[where] += 1
        else:
            self.duplicated += 1
            self.duplicated_where[where] += 1
        if len(self.examples) < 10:
            self.examples.append(f"{kind} ({where}): {response_id}")


def drain(client: redis.Redis, keys: Keys, spool: Path, timeout: float,
          adapters: tuple[str, ...], quiet_checks: int = 3) -> bool:
    """Wait until the gateway's spool is empty, no group has entries pending or unread,
    and no session waits for finalisation, ``quiet_checks`` times in a row; False on
    timeout (what it still waited for is printed)."""
    deadline = time.monotonic() + timeout
    quiet = 0
    busy: str | None = None
    while time.monotonic() < deadline:
        busy = _busy(client, keys, spool, adapters)
        quiet = quiet + 1 if busy is None else 0
        if quiet >= quiet_checks:
            return True
        time.sleep(0.5)
    print(f"drain: still waiting for {busy}", flush=True)
    return False


def _busy(client: redis.Redis, keys: Keys, spool: Path,
          adapters: tuple[str, ...]) -> str | None:
    """What the pipeline is still busy with, or None when it is idle."""
    if spool.exists() and spool.stat().st_size > 0:
        return "the gateway's spool"
    try:
        for stream, group in (*GROUPS, *((SCORED, trainer_group(a)) for a in adapters)):
            infos: Any = client.xinfo_groups(keys.stream(stream))
            info = next((i for i in infos if _text(i["name"]) == group), None)
            if info is None or info["pending"] or info.get("lag"):
                return f"{stream}/{group}: {info and (info['pending'], info.get('lag'))}"
        sessions = client.zcard(keys.idle_sessions())
        return f"{sessions} sessions to finalise" if sessions else None
    except (redis.RedisError, OSError) as exc:
        return f"Redis ({type(exc).__name__})"


def account(client: redis.Redis, keys: Keys, adapter: str, tenant: str,
            answered: list[str]) -> Accounting:
    """The figures for the turns answered (by completion id)."""
    acc = Accounting(answered=len(answered))
    turns = turn_ids_by_response(client, keys)
    scored = Counter({turn_id: sum(not e.get("revision") for e in entries)
                      for turn_id, entries in scored_by_turn(client, keys).items()})
    dead = _dead_letters(client, keys)
    acc.dead_reasons = Counter(reason for _, reason in dead.values())
    for rid in answered:
        ids = turns.get(rid, [])
        if not ids:
            acc.problem("lost", "not recorded", rid)
            continue
        acc.recorded += 1
        if len(ids) > 1:
            acc.problem("duplicated", "recorded twice", rid)
        _follow(client, keys, acc, rid, ids[0], scored[ids[0]], dead, adapter, tenant)
    return acc


def _follow(client: redis.Redis, keys: Keys, acc: Accounting, rid: str, turn_id: str,
            times_scored: int, dead: dict[tuple[str, str], tuple[str, str]],
            adapter: str, tenant: str) -> None:
    """Account for one recorded turn downstream of the gateway."""
    if times_scored == 0:
        if (turn_id, GROUP_SCORER) in dead or (turn_id, GROUP_JUDGE) in dead:
            acc.dead_lettered += 1
        else:
            acc.problem("lost", "recorded, never scored", rid)
        return
    acc.scored += 1
    if times_scored > 1:
        acc.problem("duplicated", "scored twice", rid)
    for name, group in (("trainer", trainer_group(adapter)),
                        ("skill-miner", GROUP_SKILL_MINER)):
        seen = int(client.scard(keys.handled(group, turn_id)))
        if seen == 0 and (turn_id, group) in dead:
            acc.dead_lettered += 1
        elif seen == 0:
            acc.problem("lost", f"scored, never seen by the {name}", rid)
        else:
            acc.seen[name] += 1
            if seen > 1:
                acc.problem("duplicated", f"seen {seen} times by the {name}", rid)
    trained = int(client.get(keys.trained(adapter, turn_id)) or 0)
    acc.trained += trained > 0
    if trained > 1:
        acc.problem("duplicated", f"trained {trained} times", rid)
    acc.mined += bool(client.exists(keys.miner_done("mined", tenant, turn_id)))


def _entries(client: redis.Redis, key: str) -> list[tuple[dict[str, Any], dict[bytes, bytes]]]:
    """Every entry of a stream: its ``data`` parsed (``{}`` when it is not JSON), and its
    fields."""
    out: list[tuple[dict[str, Any], dict[bytes, bytes]]] = []
    start = "-"
    while True:
        batch: Any = client.xrange(key, start, "+", count=1000)
        for _entry_id, fields in batch:
            try:
                data = json.loads(fields.get(b"data", b"{}"))
            except ValueError:
                data = {}
            out.append((data if isinstance(data, dict) else {}, fields))
        if len(batch) < 1000:
            return out
        start = "(" + _text(batch[-1][0])


def _turn_id(data: dict[str, Any], stream: str) -> str:
    turn = data if stream == TURNS else data.get("turn") or {}
    return str(turn.get("id", ""))


def scored_by_turn(client: redis.Redis, keys: Keys) -> dict[str, list[dict[str, Any]]]:
    """Turn id -> its ``scored`` entries (the first score and any revisions)."""
    by_turn: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for data, _ in _entries(client, keys.stream(SCORED)):
        by_turn[_turn_id(data, SCORED)].append(data)
    return by_turn


def turn_ids_by_response(client: redis.Redis, keys: Keys) -> dict[str, list[str]]:
    """Completion id -> the ids of the turns recorded with it (one, unless duplicated)."""
    by_response: dict[str, list[str]] = defaultdict(list)
    for data, _ in _entries(client, keys.stream(TURNS)):
        if data.get("response_id"):
            by_response[data["response_id"]].append(str(data["id"]))
    return by_response


def _dead_letters(client: redis.Redis, keys: Keys) -> dict[tuple[str, str], tuple[str, str]]:
    """(turn id, group) -> (stream, reason) for every dead letter of the pipeline."""
    dead: dict[tuple[str, str], tuple[str, str]] = {}
    for stream in (TURNS, FINALISED, SCORED):
        for data, fields in _entries(client, keys.dead(stream)):
            group = _text(fields.get(b"dead_group", b""))
            reason = _text(fields.get(b"dead_reason", b""))
            dead[(_turn_id(data, stream), group)] = (stream, reason.split(":", 1)[0])
    return dead


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def count_cross_tenant(client: redis.Redis, keys: Keys, acc: Accounting, answered: list[str],
                       other_adapters: list[str]) -> None:
    """Count the answered turns (of one tenant) that another tenant's adapter trained on."""
    turns = turn_ids_by_response(client, keys)
    for rid in answered:
        for turn_id in turns.get(rid, [])[:1]:
            for adapter in other_adapters:
                if client.exists(keys.trained(adapter, turn_id)):
                    acc.cross_tenant += 1
                    if len(acc.examples) < 10:
                        acc.examples.append(f"trained into {adapter}: {rid}")
