"""Combining the reward sources into one reward per turn."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Combined:
    reward: float | None
    """None: unscored (no source gave a signal, or a required judge failed)."""
    components: dict[str, float]
    source: str
    """Label for metrics: explicit, judge, implicit, combined or none."""


def combine(*, judge: float | None, judge_required: bool, implicit: float | None,
            implicit_signals: dict[str, float], explicit: float | None,
            weights: dict[str, float], explicit_overrides: bool) -> Combined:
    """The reward of a turn from the sources that gave one.

    - Explicit feedback from the user, when ``explicit_overrides``, is the reward.
    - A judge that was asked and failed leaves the turn unscored: never a silent 0.
    - Otherwise the reward is the weighted mean of the sources present.
    """
    present = {name: value for name, value in
               (("judge", judge), ("implicit", implicit), ("explicit", explicit))
               if value is not None}
    components = dict(present)
    components.update({f"implicit.{k}": v for k, v in implicit_signals.items()})
    if explicit is not None and explicit_overrides:
        return Combined(explicit, components, "explicit")
    if judge_required and judge is None:
        return Combined(None, components, "none")
    weighted = {k: weights.get(k, 1.0) for k in present if weights.get(k, 1.0) > 0}
    total = sum(weighted.values())
    if not weighted or total <= 0:
        return Combined(None, components, "none")
    reward = sum(present[k] * w for k, w in weighted.items()) / total
    source = next(iter(weighted)) if len(weighted) == 1 else "combined"
    return Combined(max(-1.0, min(1.0, reward)), components, source)
