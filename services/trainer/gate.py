"""The gate: a new adapter goes live only if it does not regress on held-out turns.

Some scored turns (every ``gate_holdout_every``-th) are never trained on: they form a
held-out replay of recent traffic. The gate scores a policy on that replay by how much
likelihood it gives to good answers over bad ones:

    score = sum_i A_i * lp_i / sum_i |A_i|

where ``lp_i`` is the policy's mean log-probability of sample *i*'s sampled completion
and ``A_i`` the sample's advantage (reward minus the replay's mean reward). A policy that
learned from the rewards raises ``lp`` on good answers and lowers it on bad ones, so its
score grows. A snapshot holds the replay and the live policy's ``lp`` on it; a candidate
is refused when its score drops more than ``gate_tolerance`` below the live one's, or
when its ``lp`` moved more than ``gate_max_shift`` nats per token on average (a policy
collapsing into something else, as reward hacking does).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from services.trainer.backend import Datum
from services.trainer.samples import Sample


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The replay, and the live policy's mean logprob per sample on it."""

    samples: list[Sample]
    live_lp: list[float]
    live_version: int


@dataclass(frozen=True, slots=True)
class Decision:
    passed: bool
    reason: str
    live_score: float
    candidate_score: float
    shift: float


def replay_datums(samples: list[Sample]) -> list[Datum]:
    """Datums to score the replay with (advantages unused: logprobs only)."""
    return [Datum.from_sample(s.prompt, s.completion, s.logprobs, 0.0) for s in samples]


def mean_completion_lp(samples: list[Sample], logprobs: list[list[float]]) -> list[float]:
    """Each sample's mean logprob over its completion tokens (the last positions)."""
    return [statistics.fmean(lps[-len(s.completion):]) for s, lps in zip(samples, logprobs,
                                                                          strict=True)]


def score(samples: list[Sample], lp: list[float]) -> float:
    """Advantage-weighted mean logprob (see the module docstring); 0 without signal."""
    mean = statistics.fmean(s.reward for s in samples)
    advs = [s.reward - mean for s in samples]
    total = sum(abs(a) for a in advs)
    return sum(a * x for a, x in zip(advs, lp, strict=True)) / total if total else 0.0


def decide(snapshot: Snapshot, candidate_lp: list[float], tolerance: float,
           max_shift: float) -> Decision:
    """Whether the candidate may go live, and why."""
    live = score(snapshot.samples, snapshot.live_lp)
    cand = score(snapshot.samples, candidate_lp)
    shift = statistics.fmean(abs(c - x) for c, x in zip(candidate_lp, snapshot.live_lp,
                                                         strict=True))
    if cand < live - tolerance:
        return Decision(False, f"regression on {len(snapshot.samples)} held-out turns: score "
                        f"{cand:.4f} < live {live:.4f} - {tolerance}", live, cand, shift)
    if shift > max_shift:
        return Decision(False, f"moved {shift:.3f} nats/token from the live policy on held-out "
                        f"turns (limit {max_shift})", live, cand, shift)
    return Decision(True, "ok", live, cand, shift)
