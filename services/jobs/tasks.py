"""Reef's jobs: plain functions rq imports by name (``services.jobs.tasks.<name>``).

Each takes JSON-able arguments, builds its own settings (from the environment, with the
namespace it is given) and Redis client, and returns a small JSON-able summary. Each is
safe to retry: the export is written atomically, the replay is idempotent per turn, and
re-mining is idempotent per proposal (see ``services.jobs.remine``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import orjson
import redis
from pydantic import ValidationError

from services.jobs import dataset
from services.jobs.queue import sync_redis
from services.jobs.remine import remine
from shared.keys import SCORED, Keys
from shared.messages import BadMessage, ScoredV1, decode, scored_id
from shared.settings import Settings
from shared.worker import APPEND_ONCE_LUA

log = logging.getLogger("reef.jobs")

XRANGE_BATCH = 500
"""Stream entries read per round trip."""
REPLAY_BATCH = 500
"""Turns appended per pipeline when replaying."""



class ReplayFileError(ValueError):
    """A line of a replayed file is not an exported scored turn; nothing was replayed."""


def job_settings(namespace: str) -> Settings:
    """The settings of a job: the environment's, in ``namespace``."""
    return Settings(namespace=namespace)


# --- export -------------------------------------------------------------------------------

def export_dataset(namespace: str, tenant: str, out_dir: str, since_id: str = "-",
                   until_id: str = "+") -> dict[str, Any]:
    """Export ``tenant``'s scored turns (stream ids ``since_id``..``until_id``) to
    ``out_dir/scored.jsonl`` and ``out_dir/hf/`` (see ``services.jobs.dataset``)."""
    settings = job_settings(namespace)
    out = Path(out_dir)
    counts: Counter[str] = Counter()
    client = sync_redis(settings)
    try:
        with dataset.staged(out) as stage:
            rows = _rows(client, Keys(namespace).stream(SCORED), tenant, since_id, until_id,
                         counts)
            exported = dataset.write_export(stage, rows)
            hf = stage / dataset.HF_DIR
            (hf / "README.md").write_text(dataset.dataset_card(
                namespace, tenant, exported, (hf / dataset.HF_DATA_FILE).stat().st_size))
            dataset.publish(stage, out)
    finally:
        client.close()
    log.info("jobs.exported", extra={"namespace": namespace, "exported": exported,
                                     **counts})
    return {"namespace": namespace, "tenant": tenant, "exported": exported,
            "skipped": counts["skipped"], "invalid": counts["invalid"],
            "duplicates": counts["duplicates"], "superseded": counts["superseded"],
            "credential_fields_dropped": counts["credential_fields_dropped"],
            "jsonl": str(out / dataset.JSONL_NAME), "hf": str(out / dataset.HF_DIR)}


def _entries(client: redis.Redis, stream: str, since_id: str,
             until_id: str) -> Iterator[tuple[str, dict[bytes, bytes]]]:
    start = since_id
    while True:
        chunk = cast(list[tuple[bytes, dict[bytes, bytes]]],
                     client.xrange(stream, start, until_id, count=XRANGE_BATCH))
        for entry_id, fields in chunk:
            yield entry_id.decode(), fields
        if len(chunk) < XRANGE_BATCH:
            return
        start = "(" + chunk[-1][0].decode()


def _rows(client: redis.Redis, stream: str, tenant: str, since_id: str, until_id: str,
          counts: Counter[str]) -> Iterator[dict[str, Any]]:
    """The readable rows of ``tenant``'s scored turns, oldest first, each turn once: at
    its newest revision in the range (an earlier revision counts as ``superseded``)."""
    newest = _revised(client, stream, tenant, since_id, until_id)
    seen: set[str] = set()
    for entry_id, fields in _entries(client, stream, since_id, until_id):
        try:
            message = decode(fields)
        except BadMessage:
            counts["invalid"] += 1
            continue
        if not isinstance(message, ScoredV1) or message.turn.tenant != tenant:
            counts["skipped"] += 1
            continue
        if message.id in seen:
            counts["duplicates"] += 1
            continue
        if message.revision < newest.get(message.turn.id, 0):
            counts["superseded"] += 1
            continue
        seen.add(message.id)
        data, dropped = dataset.clean(message)
        counts["credential_fields_dropped"] += dropped
        yield dataset.row_of(message, data, entry_id)


def _revised(client: redis.Redis, stream: str, tenant: str, since_id: str,
             until_id: str) -> dict[str, int]:
    """Turn id -> newest revision in the range, for ``tenant``'s revised turns only (a
    first pass that only parses the JSON: revisions are rare, the turns are not)."""
    newest: dict[str, int] = {}
    for _, fields in _entries(client, stream, since_id, until_id):
        try:
            data = orjson.loads(fields.get(b"data", b"{}"))
            revision, turn = int(data.get("revision") or 0), data["turn"]
            if revision > 0 and turn["tenant"] == tenant:
                newest[turn["id"]] = max(revision, newest.get(turn["id"], 0))
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
            continue  # the second pass counts it as invalid
    return newest


# --- replay -------------------------------------------------------------------------------

def replay_dataset(jsonl_path: str, namespace: str, tenant: str | None = None
                   ) -> dict[str, Any]:
    """Append the scored turns of an exported file (``scored.jsonl`` or the ``hf/`` data
    file) to ``namespace``'s ``scored`` stream, only ``tenant``'s when given. A turn
    already there (by its message id, the turn's id for a first score and
    ``<turn id>:r<n>`` for a revision: ``shared.worker.APPEND_ONCE_LUA``, the scorer's own
    guard) is not appended again."""
    settings = job_settings(namespace)
    path = Path(jsonl_path)
    read = sum(1 for _ in _replayed(path, tenant))  # every line valid before any append
    keys = Keys(namespace)
    client = sync_redis(settings)
    appended = 0
    try:
        append_once = client.register_script(APPEND_ONCE_LUA)
        batch: list[ScoredV1] = []
        for message in _replayed(path, tenant):
            batch.append(message)
            if len(batch) >= REPLAY_BATCH:
                appended += _append(client, append_once, keys, settings, batch)
                batch = []
        appended += _append(client, append_once, keys, settings, batch)
    finally:
        client.close()
    log.info("jobs.replayed", extra={"namespace": namespace, "read": read,
                                     "appended": appended})
    return {"namespace": namespace, "tenant": tenant, "read": read, "appended": appended,
            "already_present": read - appended}


def _append(client: redis.Redis, script: Any, keys: Keys, settings: Settings,
            batch: list[ScoredV1]) -> int:
    if not batch:
        return 0
    pipe = client.pipeline(transaction=False)
    for message in batch:
        marker = keys.dedupe("scored", scored_id(message.turn.id, message.revision))
        script(keys=[marker, keys.stream(SCORED)],
               args=[settings.dedupe_ttl_seconds, settings.resolved_stream_hard_maxlen(),
                     message.kind, message.to_fields()["data"]], client=pipe)
    return sum(int(r) for r in pipe.execute())


def _replayed(path: Path, tenant: str | None) -> Iterator[ScoredV1]:
    """The scored turns of an exported file, validated; ``ReplayFileError`` names the
    first bad line."""
    with open(path, "rb") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = orjson.loads(line)
                raw = row["message"]
                message = (ScoredV1.model_validate_json(raw) if isinstance(raw, str)
                           else ScoredV1.model_validate(raw))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValidationError) as exc:
                raise ReplayFileError(f"{path.name} line {number}: not an exported scored "
                                      f"turn ({type(exc).__name__})") from None
            if tenant is None or message.turn.tenant == tenant:
                yield message


# --- re-mining ------------------------------------------------------------------------------

def remine_session(namespace: str, tenant: str, session_id: str) -> dict[str, Any]:
    """Run the skill-miner over ``session_id``'s failing turns again (see
    ``services.jobs.remine``); returns the proposals' outcomes and the session's skills."""
    settings = job_settings(namespace)
    result = asyncio.run(remine(settings, tenant, session_id))
    log.info("jobs.remined", extra={"namespace": namespace,
                                    "failing_turns": len(result["failing_turns"]),
                                    "proposals": result["proposals"]})
    return result
