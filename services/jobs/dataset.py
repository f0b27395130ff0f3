"""What an exported scored turn looks like on disk, and writing the export atomically.

Two layouts of the same turns:

- ``scored.jsonl``: one readable row per scored turn (:func:`row_of`), the request and
  answer messages exactly as recorded, plus the whole ``scored.v1`` message under
  ``"message"``, so the file replays losslessly (``replay_dataset``).
- ``hf/``: a Hugging Face ``datasets`` repository layout: ``data/train-00000-of-00001.jsonl``
  and a ``README.md`` whose YAML front matter names the data files (``configs``) and their
  features, so ``datasets.load_dataset("<out_dir>/hf")`` needs no schema inference. Its rows
  (:func:`hf_row_of`) have one fixed shape: texts for message contents (a list of parts
  is joined), the reward components as name/value pairs, and the original message as a
  JSON string (``message``), which replays too.

Both are written under temporary names beside their destination and renamed into place
only when both are complete: a failed export leaves the directory as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import orjson

from shared.messages import ScoredV1

JSONL_NAME = "scored.jsonl"
HF_DIR = "hf"
HF_DATA_FILE = "data/train-00000-of-00001.jsonl"
CREDENTIAL_FIELDS = frozenset({"api_key", "apikey", "api-key", "authorization", "password",
                               "secret", "access_token", "token", "openai_api_key"})
"""Request fields dropped from exported turns: Reef authenticates by header and never
records keys in a turn, but ``request_params`` holds whatever else a client put in the
body, and an export must never carry a credential."""


def clean(scored: ScoredV1) -> tuple[dict[str, Any], int]:
    """The message as JSON, without credential-like request fields; and how many were
    dropped."""
    data = scored.model_dump(mode="json")
    params = data["turn"]["request_params"]
    dropped = [k for k in params if k.lower() in CREDENTIAL_FIELDS]
    for key in dropped:
        del params[key]
    return data, len(dropped)


def row_of(scored: ScoredV1, message: dict[str, Any], stream_id: str) -> dict[str, Any]:
    """The readable row of a scored turn; ``message`` is its JSON (see :func:`clean`)."""
    turn = scored.turn
    sampled = turn.sampled
    return {
        "turn_id": turn.id, "session_id": turn.session_id, "turn_index": turn.turn_index,
        "turn_type": turn.turn_type, "tenant": turn.tenant,
        "policy_version": turn.policy_version, "request_model": turn.request_model,
        "created_at": turn.created_at, "stream_id": stream_id,
        "messages": turn.messages, "answer": turn.response_message,
        "finish_reason": turn.finish_reason, "reward": scored.reward,
        "components": scored.components, "trainable": scored.trainable,
        "reason": scored.reason, "follow_up": scored.follow_up, "skill_ids": turn.skill_ids,
        "token_ids": sampled.token_ids if sampled else [],
        "logprobs": sampled.logprobs if sampled else [],
        "prompt_token_ids": sampled.prompt_token_ids if sampled else [],
        "message": message,
    }


def hf_row_of(row: dict[str, Any]) -> dict[str, Any]:
    """The ``datasets`` row of a readable row: fixed types (see :data:`HF_FEATURES`)."""
    return {
        **{k: row[k] for k in ("turn_id", "session_id", "turn_index", "turn_type", "tenant",
                               "policy_version", "reward", "trainable", "skill_ids",
                               "token_ids", "logprobs", "prompt_token_ids")},
        "messages": [_chat_message(m) for m in row["messages"]],
        "answer": _text(row["answer"].get("content")),
        "components": [{"name": k, "value": v} for k, v in sorted(row["components"].items())],
        "follow_up": [_chat_message(m) for m in row["follow_up"]],
        "message": orjson.dumps(row["message"]).decode(),
    }


HF_FEATURES: list[dict[str, Any]] = [
    {"name": "turn_id", "dtype": "string"},
    {"name": "session_id", "dtype": "string"},
    {"name": "turn_index", "dtype": "int64"},
    {"name": "turn_type", "dtype": "string"},
    {"name": "tenant", "dtype": "string"},
    {"name": "policy_version", "dtype": "string"},
    {"name": "reward", "dtype": "float64"},
    {"name": "trainable", "dtype": "bool"},
    {"name": "skill_ids", "list": "string"},
    {"name": "token_ids", "list": "int64"},
    {"name": "logprobs", "list": "float64"},
    {"name": "prompt_token_ids", "list": "int64"},
    {"name": "messages", "list": [{"name": "role", "dtype": "string"},
                                  {"name": "content", "dtype": "string"}]},
    {"name": "answer", "dtype": "string"},
    {"name": "components", "list": [{"name": "name", "dtype": "string"},
                                    {"name": "value", "dtype": "float64"}]},
    {"name": "follow_up", "list": [{"name": "role", "dtype": "string"},
                                   {"name": "content", "dtype": "string"}]},
    {"name": "message", "dtype": "string"},
]
"""The features of the ``hf/`` rows, declared in its README (``dataset_info``)."""


def _chat_message(message: dict[str, Any]) -> dict[str, str]:
    return {"role": str(message.get("role", "")), "content": _text(message.get("content"))}


def _text(content: Any) -> str:
    """A message content as text: text parts joined, anything else as JSON."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        return "\n".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
    return "" if content is None else orjson.dumps(content).decode()


def dataset_card(namespace: str, tenant: str, rows: int, data_bytes: int) -> str:
    """The ``hf/README.md``: YAML front matter (configs, features, the split's size) and a
    short card."""
    import yaml

    front = {
        "configs": [{"config_name": "default",
                     "data_files": [{"split": "train", "path": HF_DATA_FILE}]}],
        "dataset_info": {"features": HF_FEATURES,
                         "splits": [{"name": "train", "num_bytes": data_bytes,
                                     "num_examples": rows}]},
        "tags": ["reef", "rlhf", "conversations"],
    }
    return (f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n"
            f"# Reef scored turns: tenant `{tenant}`\n\n"
            f"{rows} turns of tenant `{tenant}` recorded by Reef's gateway and scored by its "
            f"scorer (namespace `{namespace}`), one row per turn: the request messages, the "
            "answer, the reward and its components, the sampled token ids and logprobs when "
            "the upstream returned them, and what the user did next.\n\n"
            "`message` holds the whole `scored.v1` message as JSON: `reef jobs replay` puts "
            "the turns back into a Reef's `scored` stream for a fresh trainer or skill-miner. "
            "The data is the conversations themselves: treat it as you treat them.\n")


def write_export(stage: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write ``rows`` into ``stage``: ``scored.jsonl`` and the ``hf/`` data file, in one
    pass (rows are not held in memory), flushed to disk; returns how many."""
    hf_data = stage / HF_DIR / HF_DATA_FILE
    hf_data.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(stage / JSONL_NAME, "wb") as readable, open(hf_data, "wb") as hf:
        for row in rows:
            readable.write(orjson.dumps(row) + b"\n")
            hf.write(orjson.dumps(hf_row_of(row)) + b"\n")
            count += 1
        for out in (readable, hf):
            out.flush()
            os.fsync(out.fileno())
    return count


@contextmanager
def staged(out_dir: Path) -> Iterator[Path]:
    """A fresh temporary directory inside ``out_dir`` (created if missing), removed at
    the end whatever happens: build the export there, then :func:`publish` it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def publish(stage: Path, out_dir: Path) -> None:
    """Move the staged ``hf/`` and ``scored.jsonl`` into ``out_dir``, replacing an earlier
    export: the JSONL last, so a complete ``scored.jsonl`` always comes with its ``hf/``."""
    target = out_dir / HF_DIR
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")
    old = stage / "previous-hf"
    if target.is_dir():
        os.replace(target, old)
    try:
        os.replace(stage / HF_DIR, target)
    except OSError:
        if old.is_dir():
            with suppress(OSError):
                os.replace(old, target)
        raise
    os.replace(stage / JSONL_NAME, out_dir / JSONL_NAME)
