"""Reading a turn's explicit feedback from its session's feedback hash (no I/O here).

The gateway writes the hash (``Keys.feedback``; see ``services.gateway.feedback``); for
a turn the most specific field present wins: ``turn:<response id>``, then
``index:<turn index>``, then ``session``.
"""

from __future__ import annotations

import logging
import math

import orjson

log = logging.getLogger("reef.scorer")

Explicit = tuple[float, str | None]
"""A user's feedback on a turn: the score in [-1, 1] and the comment, if any."""


def feedback_fields(turn_index: int, response_id: str | None) -> list[str]:
    """The hash fields that may hold a turn's feedback, most specific first."""
    fields = [f"index:{turn_index}", "session"]
    if response_id:
        fields.insert(0, f"turn:{response_id}")
    return fields


def first_feedback(values: list[bytes | None], tenant: str) -> Explicit | None:
    """The first usable value of ``feedback_fields``' replies; garbage is skipped."""
    for raw in values:
        if raw is None:
            continue
        try:
            data = orjson.loads(raw)
            score = float(data["score"])
            text = data.get("text")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            score = math.nan
        if math.isnan(score):
            log.warning("scorer.bad_feedback_entry", extra={"tenant": tenant})
            continue
        # A text that is not a string is dropped, not the whole turn with it.
        return max(-1.0, min(1.0, score)), text if isinstance(text, str) else None
    return None
