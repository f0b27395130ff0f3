"""The scorer's Prometheus metrics (prefix ``reef_scorer_``, small fixed label sets)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram

REWARD_BUCKETS = (-1.0, -0.75, -0.5, -0.25, -0.001, 0.001, 0.25, 0.5, 0.75, 1.0)
JUDGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LAG_BUCKETS = (0.01, 0.1, 1.0, 5.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0)


@dataclass(frozen=True)
class ScorerMetrics:
    """Every metric of one scorer process, on one registry."""

    registry: CollectorRegistry
    scored: Counter
    """Turns scored, by source (judge, implicit, explicit, none) and outcome."""
    reward: Histogram
    judge_seconds: Histogram
    judge_errors: Counter
    judge_tokens: Counter
    finalised: Counter
    finalisation_lag: Histogram
    judge_retries: Counter
    """Judge call attempts that failed and were retried, by kind (timeout, http, connect)."""
    reward_magnitude: Counter
    """Sum of |reward| by sign: with ``reward``'s count it gives the mean reward
    (``reward`` has negative buckets, so prometheus-client exports no ``_sum`` for it)."""
    late_feedback: Counter
    """Feedback events by outcome: applied, unchanged, not_scored, too_late, entry_gone."""
    revisions: Counter
    """Superseding scored entries published (a turn's reward revised by late feedback)."""

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> ScorerMetrics:
        reg = registry or CollectorRegistry()
        return cls(
            registry=reg,
            scored=Counter("reef_scorer_turns_scored_total", "Scored turns by reward source "
                           "and outcome (scored, unscored, untrained).", ["source", "outcome"],
                           registry=reg),
            reward=Histogram("reef_scorer_reward", "Combined reward of scored turns.",
                             buckets=REWARD_BUCKETS, registry=reg),
            judge_seconds=Histogram("reef_scorer_judge_seconds", "One judge call, retries "
                                    "included.", buckets=JUDGE_BUCKETS, registry=reg),
            judge_errors=Counter("reef_scorer_judge_errors_total", "Failed judge calls by "
                                 "kind (timeout, http, connect, unparseable).", ["kind"],
                                 registry=reg),
            judge_tokens=Counter("reef_scorer_judge_tokens_total", "Tokens used by the judge "
                                 "(the cost).", ["direction"], registry=reg),
            finalised=Counter("reef_scorer_turns_finalised_total", "Turns whose follow-up "
                              "became known, by reason.", ["reason"], registry=reg),
            finalisation_lag=Histogram("reef_scorer_finalisation_lag_seconds", "From a turn's "
                                       "recording to its finalisation.",
                                       buckets=LAG_BUCKETS, registry=reg),
            judge_retries=Counter("reef_scorer_judge_retries_total", "Judge call attempts "
                                  "retried, by kind of failure (timeout, http, connect).",
                                  ["kind"], registry=reg),
            reward_magnitude=_signed(Counter(
                "reef_scorer_reward_magnitude_total", "Sum of |reward| of scored turns, by "
                "sign (positive, negative); mean reward = (positive - negative) / "
                "reef_scorer_reward_count.", ["sign"], registry=reg)),
            late_feedback=Counter(
                "reef_scorer_late_feedback_total", "Explicit-feedback events by outcome: "
                "applied (a turn already scored got a superseding scored entry), unchanged "
                "(nothing new for it), not_scored (not scored yet: its first score reads "
                "the feedback), too_late (scored over feedback_window_seconds ago), "
                "entry_gone (its scored entry was trimmed from the stream).", ["outcome"],
                registry=reg),
            revisions=Counter("reef_scorer_revisions_published_total", "Superseding scored "
                              "entries published: turns whose reward late explicit feedback "
                              "revised.", registry=reg),
        )

    def observe_reward(self, reward: float) -> None:
        """Count one scored turn's reward in ``reward`` and ``reward_magnitude``."""
        self.reward.observe(reward)
        self.reward_magnitude.labels("positive" if reward >= 0 else "negative").inc(abs(reward))


def _signed(counter: Counter) -> Counter:
    """Both signs exported from the start, so the mean is defined before a negative reward."""
    for sign in ("positive", "negative"):
        counter.labels(sign)
    return counter
