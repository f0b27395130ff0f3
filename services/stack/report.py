"""Rows, table and plot of a learning run: what ``make demo`` and ``bench --part learning``
print while the scripted user talks to the loop, and the PNG they leave behind."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from services.stack.drive import TrainingLog
from services.stack.scripted import Evaluation, Outcome

HEADER = (f"{'round':>5} {'time':>7} {'answered by':>14} {'steps':>5} {'reward':>7} "
          f"{'meets':>6} {'topic':>6} {'words':>6} {'skills':>7}")


@dataclass(frozen=True)
class RoundRow:
    """One round of training conversations, as the scripted user saw it."""

    round: int
    seconds: float
    version: str
    steps: int
    mean_reward: float
    hit_rate: float
    on_topic: float
    mean_words: float
    with_skills: float = 0.0
    """Share of the round's answers that had at least one skill injected."""


def round_row(index: int, outcomes: list[Outcome], log: TrainingLog, started: float,
              with_skills: float = 0.0) -> RoundRow:
    versions = [o.version for o in outcomes]
    return RoundRow(
        round=index, seconds=time.monotonic() - started,
        version=max(set(versions), key=versions.count), steps=log.committed,
        mean_reward=statistics.fmean(o.verdict.reward for o in outcomes),
        hit_rate=statistics.fmean(1.0 if o.verdict.ok else 0.0 for o in outcomes),
        on_topic=statistics.fmean(1.0 if o.verdict.on_topic else 0.0 for o in outcomes),
        mean_words=statistics.fmean(o.verdict.words for o in outcomes),
        with_skills=with_skills)


def format_row(row: RoundRow) -> str:
    return (f"{row.round:>5} {row.seconds:>6.0f}s {row.version[-14:]:>14} {row.steps:>5} "
            f"{row.mean_reward:>+7.2f} {row.hit_rate:>6.0%} {row.on_topic:>6.0%} "
            f"{row.mean_words:>6.1f} {row.with_skills:>7.0%}")


def plot(rows: list[RoundRow], before: Evaluation, after: Evaluation, path: Path,
         title: str, by_round: bool = False) -> None:
    """Mean reward per round against trainer steps (or, ``by_round``, against rounds),
    held-out before/after, mean words; the first round with skills injected is marked
    when there is one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, reward_axis = plt.subplots(figsize=(8, 4.5))
    steps = [r.round if by_round else r.steps for r in rows]
    reward_axis.plot(steps, [r.mean_reward for r in rows], marker="o", label="training rounds")
    last = max(steps) if steps else 0
    reward_axis.scatter([0, last], [before.mean_reward, after.mean_reward], color="red",
                        zorder=3, label="held-out (before / after)")
    first_skilled = next((r for r in rows if r.with_skills >= 0.5), None)
    if first_skilled is not None:
        reward_axis.axvline(first_skilled.round if by_round else first_skilled.steps,
                            color="green", linestyle=":", label="mined skill injected")
    reward_axis.set_xlabel("round (16 conversations)" if by_round
                           else "trainer steps committed")
    reward_axis.set_ylabel("mean reward (scripted user)")
    reward_axis.set_ylim(-1.05, 1.05)
    words_axis = reward_axis.twinx()
    words_axis.plot(steps, [r.mean_words for r in rows], color="gray", linestyle="--",
                    label="mean words")
    words_axis.set_ylabel("mean words per answer")
    handles = reward_axis.get_legend_handles_labels()
    more = words_axis.get_legend_handles_labels()
    reward_axis.legend(handles[0] + more[0], handles[1] + more[1], loc="lower right")
    reward_axis.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
