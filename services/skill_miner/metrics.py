"""The skill-miner's Prometheus metrics (prefix ``reef_skill_miner_``, small fixed labels)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram

LLM_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)

OUTCOME_ACCEPTED = "accepted"
"""A new skill was created (candidate, or active with ``skill_auto_promote``)."""
OUTCOME_MERGED = "merged"
"""The proposal became a new version of an existing, similar skill."""
OUTCOME_UNCHANGED = "unchanged"
"""The proposal repeats an existing skill word for word: nothing is written."""
OUTCOME_INVALID = "invalid"
"""The LLM's answer was not valid JSON of the asked shape, also after one retry."""
OUTCOME_REJECTED_RETIRED = "rejected_retired"
"""The proposal is a near-duplicate of a skill that was retired: it is not brought back."""
OUTCOME_REJECTED_INVALID = "rejected_invalid"
"""The store refused the proposal (e.g. too long once redacted)."""


@dataclass(frozen=True)
class MinerMetrics:
    """Every metric of one skill-miner process, on one registry."""

    registry: CollectorRegistry
    proposals: Counter
    """Proposals by outcome: accepted, merged, rejected_<reason>, invalid (answers)."""
    llm_seconds: Histogram
    llm_errors: Counter
    llm_retries: Counter
    llm_tokens: Counter
    retired: Counter
    redactions: Counter
    mined: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> MinerMetrics:
        reg = registry or CollectorRegistry()
        return cls(
            registry=reg,
            proposals=Counter(
                "reef_skill_miner_proposals_total", "Skill proposals by outcome (accepted, "
                "merged, rejected_<reason>; invalid counts answers).", ["outcome"],
                registry=reg),
            llm_seconds=Histogram(
                "reef_skill_miner_llm_seconds", "One miner LLM call, retries included.",
                buckets=LLM_BUCKETS, registry=reg),
            llm_errors=Counter(
                "reef_skill_miner_llm_errors_total", "Failed miner LLM calls by kind "
                "(timeout, connect, http, unparseable).", ["kind"], registry=reg),
            llm_retries=Counter(
                "reef_skill_miner_llm_retries_total", "Miner LLM attempts retried, by kind "
                "of failure.", ["kind"], registry=reg),
            llm_tokens=Counter(
                "reef_skill_miner_llm_tokens_total", "Tokens used by the miner LLM (the "
                "cost).", ["direction"], registry=reg),
            retired=Counter(
                "reef_skill_miner_skills_retired_total", "Skills retired because their "
                "credit showed they hurt.", registry=reg),
            redactions=Counter(
                "reef_skill_miner_redactions_total", "Secrets and personal data removed from "
                "proposals, by kind (api_key, email, phone ...).", ["kind"], registry=reg),
            mined=Counter(
                "reef_skill_miner_turns_mined_total", "Failing turns mined, by result "
                "(proposed, nothing, invalid).", ["result"], registry=reg),
        )
