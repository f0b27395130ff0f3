"""Unit tests of the gate's decision (no I/O)."""

from __future__ import annotations

from services.trainer.gate import Snapshot, decide, score
from services.trainer.samples import Sample


def sample(reward: float) -> Sample:
    return Sample(turn_id="x", prompt=[1], completion=[2], logprobs=[-1.0], reward=reward,
                  version=0, group="g")


def test_score_rewards_likelihood_on_good_answers() -> None:
    samples = [sample(1.0), sample(-1.0)]
    assert score(samples, [-1.0, -3.0]) > score(samples, [-3.0, -1.0])
    assert score([sample(1.0), sample(1.0)], [-1.0, -2.0]) == 0.0  # no signal


def test_decide_refuses_regressions_and_big_shifts() -> None:
    snap = Snapshot([sample(1.0), sample(-1.0)], live_lp=[-2.0, -2.0], live_version=3)
    assert decide(snap, [-1.5, -2.5], tolerance=0.05, max_shift=1.0).passed
    worse = decide(snap, [-2.5, -1.5], tolerance=0.05, max_shift=1.0)
    assert not worse.passed and "regression" in worse.reason
    moved = decide(snap, [-0.1, -5.0], tolerance=0.05, max_shift=1.0)
    assert not moved.passed and "moved" in moved.reason
