"""Credit assignment for skills, and when a skill's credit retires it (no I/O here).

Each trainable turn's reward is counted for the skills injected into it (``with``) and for
the *comparable* active skills that were not injected (``without``).

Comparable, here: the active skills of the same tenant that share a category with at least
one skill injected into the turn. Retrieval put a skill of that category into the prompt,
so the request was of that kind, and a sibling skill of the category that was left out was
competing for the same requests; its ``without`` mean is the reward of its kind of request
without it. Turns with no skill injected credit nothing: with nothing retrieved there is no
sign that the request was comparable to any skill's. This is a simple, biased-but-honest
baseline (retrieval is not random); a skill is only judged on its own record when it has
no baseline (see ``retirement_evidence``).

Skills injected into *every* main turn (``skill_always_categories``: standing preferences)
have no comparable turns without them by construction, and their own record says more
about how hard the tenant's requests are than about the skill. They are judged against the
tenant's turns with no skill injected at all (mostly those before the skill went live), and
only when there are enough of those.

A turn's reward may be revised (explicit feedback after it was scored: a superseding
``scored`` entry with ``revision`` + 1). Credit counts each turn once, at its newest
reward: what was counted for a turn (``Counted``, kept in its ``credit`` marker) is moved
to the revision's reward (``credit_move``), and an older revision arriving late changes
nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import orjson

from shared.skills import Skill


@dataclass(frozen=True, slots=True)
class Counted:
    """What a turn's reward was counted as in credit (the value of its ``credit``
    marker): the revision, the reward (None: nothing counted) and the comparable skills
    credited ``without`` it (None: not known, a marker written before revisions)."""

    revision: int
    reward: float | None
    without: tuple[str, ...] | None = None

    def to_json(self) -> bytes:
        return orjson.dumps({"revision": self.revision, "reward": self.reward,
                             "without": self.without})

    @classmethod
    def parse(cls, raw: bytes | None, previous_reward: float | None) -> Counted | None:
        """The marker's value; an old marker (``1``) counted the revision before this
        one, whose reward the revision carries as ``previous_reward``."""
        if raw is None:
            return None
        try:
            data = orjson.loads(raw)
            without = data.get("without")
            return cls(int(data["revision"]), data.get("reward"),
                       None if without is None else tuple(str(i) for i in without))
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
            return cls(0, previous_reward)


@dataclass(frozen=True, slots=True)
class CreditMove:
    """A change to credit counters: turns (+1 a first count, -1 a count withdrawn, 0 a
    reward revised) and reward sum."""

    count: int
    reward: float


def credit_move(counted: Counted | None, revision: int, reward: float | None
                ) -> CreditMove | None:
    """What moves a turn's credit from what was ``counted`` to ``reward`` at
    ``revision`` (None: reward not counted); None when this revision or a newer one was
    counted already (a redelivery, or an older revision arriving late)."""
    if counted is not None and revision <= counted.revision:
        return None
    before = None if counted is None else counted.reward
    move = CreditMove(int(reward is not None) - int(before is not None),
                      (reward or 0.0) - (before or 0.0))
    return move


def comparable_without(injected: Iterable[Skill], active: Iterable[Skill]) -> list[str]:
    """The ids of the active skills not injected that share a category with one that was."""
    injected = list(injected)
    injected_ids = {s.id for s in injected}
    categories = {s.category for s in injected}
    return [s.id for s in active
            if s.status == "active" and s.id not in injected_ids and s.category in categories]


def retirement_evidence(skill: Skill, min_turns: int, margin: float, *,
                        always_baseline: tuple[int, float] | None = None) -> str | None:
    """Why ``skill`` should be retired (its credit, in words), or None if it should stay.

    ``always_baseline`` (count, reward sum of the tenant's turns without skills) is given
    for a skill injected into every turn: it is judged against that baseline only.

    A skill keeps hurting when it was injected into at least ``min_turns`` scored turns and
    its mean reward there is more than ``margin`` below the mean of comparable turns without
    it. A baseline needs ``min_turns`` comparable turns too (a handful of turns is noise);
    without one, the skill is retired when its own mean is below ``-margin``: its turns
    went badly on the whole, whatever the others did."""
    credit = skill.credit
    with_mean = credit.with_mean
    if with_mean is None or credit.with_count < max(1, min_turns):
        return None
    if always_baseline is not None:
        count, total = always_baseline
        if count < max(1, min_turns) or with_mean >= total / count - margin:
            return None
        return (f"credit: mean reward {with_mean:+.3f} over {credit.with_count} turns with "
                f"the skill vs {total / count:+.3f} over {count} of the tenant's turns with "
                f"no skill (retire margin {margin:g})")
    without_mean = credit.without_mean
    if without_mean is not None and credit.without_count >= max(1, min_turns):
        if with_mean < without_mean - margin:
            return (f"credit: mean reward {with_mean:+.3f} over {credit.with_count} turns with "
                    f"the skill vs {without_mean:+.3f} over {credit.without_count} comparable "
                    f"turns without it (retire margin {margin:g})")
        return None
    if with_mean < -margin:
        return (f"credit: mean reward {with_mean:+.3f} over {credit.with_count} turns with the "
                f"skill, below -{margin:g}, and only {credit.without_count} comparable turns "
                f"without it (fewer than {min_turns}: no baseline)")
    return None
