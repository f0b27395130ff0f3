"""The trainer's durable state: what is live, which checkpoints are kept, what the gate
compares against, and how often a batch failed. It lives in one Redis hash per adapter
(``Keys.trainer(adapter, "state")``), so a restarted trainer goes on where it stopped:

- ``step``: the number of the last committed candidate. Candidates are numbered
  1, 2, 3 ... in training order; a refused one keeps its number (names never repeat), so
  published versions may skip numbers (v1, v2, v4).
- ``live``: the :class:`Version` served now (version 0 is the fresh adapter: the base).
- ``lineage``: the live version's ancestry, oldest first (``[0, 1, 2, 4]``): what the
  weights being trained descend from. A sample's staleness is how many versions back
  in the lineage the version that sampled it is; one off the lineage (a version that
  was rolled back) is stale.
- ``kept``: every checkpoint the trainer keeps, by version (retention, below).
- ``snapshot``: the gate's held-out replay and the live version's logprobs on it.
- ``inflight``: the batch of the step being trained (and its candidate once saved).
- ``last_error``: the last error of a failed step, the reason given to a quarantine
  (the tries themselves are counted per turn, in ``Keys.trainer(adapter, "tries")``).
- ``rollback``: a rollback request from ``reef rollback``, applied by the trainer.
- ``gate_refusal``: the last refusal, for operators.

Retention keeps the live version, version 0, every version rolled back to (``pinned``),
the newest ``checkpoint_keep_published`` gate-passed versions and a pending rollback
target; everything else (refused candidates first) is deleted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import orjson

from services.trainer.backend import Checkpoint
from services.trainer.gate import Snapshot
from services.trainer.samples import Sample

LINEAGE_MIN = 64
"""Versions of ancestry kept at least (staleness is measured within it)."""


@dataclass(frozen=True, slots=True)
class Version:
    """A checkpoint the trainer keeps, under its version number."""

    version: int
    step: int
    """The backend's optimizer step count in this checkpoint."""
    state_path: str
    adapter_path: str
    published: bool = False
    """Gate-passed and announced on the ``weights`` stream (or version 0)."""
    pinned: bool = False
    """Kept for good: version 0 and every version rolled back to."""

    @classmethod
    def of(cls, version: int, checkpoint: Checkpoint, *, published: bool = False,
           pinned: bool = False) -> Version:
        return cls(version, checkpoint.step, checkpoint.state_path, checkpoint.adapter_path,
                   published, pinned)

    def checkpoint(self) -> Checkpoint:
        return Checkpoint(step=self.step, state_path=self.state_path,
                          adapter_path=self.adapter_path)


def checkpoint_name(version: int) -> str:
    """The name a candidate is saved under."""
    return f"v{version:06d}"


def staleness(lineage: list[int], sampled_by: int) -> int | None:
    """How many versions behind the live one (the lineage's last) ``sampled_by`` is;
    None when it is not in the lineage (rolled back, or too old to remember)."""
    for back, version in enumerate(reversed(lineage)):
        if version == sampled_by:
            return back
    return None


def extend_lineage(lineage: list[int], version: int, max_staleness: int) -> list[int]:
    """The lineage after ``version`` went live on top of it (capped)."""
    cap = max(LINEAGE_MIN, max_staleness + 2)
    return [*lineage, version][-cap:]


def rolled_back_lineage(lineage: list[int], version: int) -> list[int]:
    """The lineage after a rollback to ``version``: its ancestry, as far as known."""
    if version in lineage:
        return lineage[: lineage.index(version) + 1]
    return [version]


def keep_set(kept: dict[int, Version], live: int, keep_published: int,
             rollback_to: int | None) -> set[int]:
    """The versions whose checkpoints retention keeps (see the module docstring)."""
    published = sorted(v for v, info in kept.items() if info.published)
    keep = {live, 0, *(published[-keep_published:] if keep_published > 0 else [])}
    keep |= {v for v, info in kept.items() if info.pinned}
    if rollback_to is not None:
        keep.add(rollback_to)
    return keep


# --- (de)serialisation of the hash's JSON fields ----------------------------------------------


def dump_version(version: Version) -> bytes:
    return orjson.dumps(asdict(version))


def load_version(raw: bytes | None) -> Version | None:
    return Version(**orjson.loads(raw)) if raw else None


def dump_kept(kept: dict[int, Version]) -> bytes:
    return orjson.dumps({str(v): asdict(info) for v, info in sorted(kept.items())})


def load_kept(raw: bytes | None) -> dict[int, Version]:
    if not raw:
        return {}
    return {int(v): Version(**info) for v, info in orjson.loads(raw).items()}


def dump_snapshot(snapshot: Snapshot) -> bytes:
    return orjson.dumps({"samples": [asdict(s) for s in snapshot.samples],
                         "live_lp": snapshot.live_lp, "live_version": snapshot.live_version})


def load_snapshot(raw: bytes | None) -> Snapshot | None:
    if not raw:
        return None
    data: dict[str, Any] = orjson.loads(raw)
    return Snapshot([Sample(**s) for s in data["samples"]], data["live_lp"],
                    data["live_version"])


def snapshot_current(snapshot: Snapshot, lineage: list[int], refresh_steps: int) -> bool:
    """Whether the gate still compares with ``snapshot``: it was taken of a version in
    the live lineage fewer than ``refresh_steps`` versions back."""
    back = staleness(lineage, snapshot.live_version)
    return back is not None and back < refresh_steps


def pinned(version: Version) -> Version:
    """The same version, kept for good."""
    return replace(version, pinned=True)
