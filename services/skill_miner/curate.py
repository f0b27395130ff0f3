"""From a proposal to the library: safety, redaction, dedupe/merge, and the gate.

1. *Safety*: a proposal that any rule of ``safety`` flags is rejected; the rejection is
   logged with its reason, the tenant and the turn, never with the proposal's text.
2. *Redaction*: secrets and personal data are replaced by placeholders in every text
   that is stored (description, category, body); the name is kebab-case and is checked,
   not rewritten: a name holding an e-mail or a key cannot pass ``NAME_RE``.
3. *Dedupe/merge*: the proposal is compared with every skill of the tenant (any status).
   The same name, or a similarity >= ``skill_merge_similarity``, makes it a new version
   of that skill (reason ``merged``, provenance extended) - unless that skill was retired:
   a retired skill hurt, so a near-copy of it is rejected (``rejected_retired``); a
   proposal whose text equals the skill's changes nothing (``unchanged``).
4. *Gate*: a new skill starts as ``candidate``, or ``active`` with ``skill_auto_promote``.

Applying is idempotent per turn: a skill whose provenance already names the turn was
written by an earlier delivery of the same entry, so the proposal is skipped.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from services.skill_miner import safety
from services.skill_miner.metrics import (
    OUTCOME_ACCEPTED,
    OUTCOME_MERGED,
    OUTCOME_REJECTED_INVALID,
    OUTCOME_REJECTED_RETIRED,
    OUTCOME_UNCHANGED,
    MinerMetrics,
)
from services.skill_miner.proposals import SkillProposal
from services.skill_miner.similarity import Similarity, skill_text, text_of
from shared.skill_store import InvalidSkill, SkillExists, SkillStore
from shared.skills import Provenance, Skill

log = logging.getLogger("reef.skill_miner")

OUTCOME_ALREADY_APPLIED = "already_applied"
"""Not a metric outcome: the proposal was applied by an earlier delivery."""
MINED_REASON = "mined from a failing turn"
MERGED_REASON = "merged"


@dataclass(frozen=True, slots=True)
class Origin:
    """The failing turn a proposal came from."""

    tenant: str
    session_id: str
    turn_id: str

    def provenance(self) -> Provenance:
        return Provenance(source="miner", session_ids=[self.session_id],
                          turn_ids=[self.turn_id])

    def log_fields(self) -> dict[str, str]:
        return {"tenant": self.tenant, "turn_id": self.turn_id}


class Curator:
    """Applies proposals to one store, as the module docstring says."""

    def __init__(self, store: SkillStore, metrics: MinerMetrics, similarity: Similarity,
                 merge_similarity: float, auto_promote: bool) -> None:
        self._store = store
        self._metrics = metrics
        self._similarity = similarity
        self._merge_similarity = merge_similarity
        self._auto_promote = auto_promote

    async def apply(self, proposal: SkillProposal, origin: Origin) -> str:
        """Apply one proposal; returns its outcome (counted unless already applied)."""
        reason = safety.check(proposal.name, proposal.description, proposal.category,
                              proposal.body)
        if reason is not None:
            log.warning("skill_miner.proposal_rejected",
                        extra={**origin.log_fields(), "reason": reason})
            return self._count(f"rejected_{reason}")
        clean = self._redact(proposal)
        try:
            outcome = await self._store_proposal(clean, origin)
        except InvalidSkill as exc:
            log.warning("skill_miner.proposal_rejected",
                        extra={**origin.log_fields(), "reason": "invalid", "field": exc.field})
            outcome = OUTCOME_REJECTED_INVALID
        if outcome == OUTCOME_ALREADY_APPLIED:
            return outcome
        return self._count(outcome)

    async def _store_proposal(self, proposal: SkillProposal, origin: Origin) -> str:
        existing = await self._store.list(origin.tenant)
        target = await self._most_similar(proposal, existing)
        if target is None:
            try:
                skill = await self._store.create(
                    origin.tenant, name=proposal.name, description=proposal.description,
                    body=proposal.body, category=proposal.category,
                    status="active" if self._auto_promote else "candidate",
                    provenance=origin.provenance(), reason=MINED_REASON)
            except SkillExists:  # another replica created that name just now
                target = await self._store.by_name(origin.tenant, proposal.name)
                if target is None:
                    raise
            else:
                log.info("skill_miner.skill_created",
                         extra={**origin.log_fields(), "skill_id": skill.id,
                                "status": skill.status})
                return OUTCOME_ACCEPTED
        return await self._merge(proposal, target, origin)

    async def _merge(self, proposal: SkillProposal, target: Skill, origin: Origin) -> str:
        if origin.turn_id in target.provenance.turn_ids:
            return OUTCOME_ALREADY_APPLIED
        if target.status == "retired":
            log.warning("skill_miner.proposal_rejected",
                        extra={**origin.log_fields(), "reason": "retired",
                               "skill_id": target.id})
            return OUTCOME_REJECTED_RETIRED
        if (proposal.description, proposal.body) == (target.description, target.body):
            return OUTCOME_UNCHANGED  # the same lesson again: no new version
        skill = await self._store.update(
            origin.tenant, target.id, description=proposal.description, body=proposal.body,
            reason=MERGED_REASON, provenance=origin.provenance())
        log.info("skill_miner.skill_merged",
                 extra={**origin.log_fields(), "skill_id": skill.id, "version": skill.version})
        return OUTCOME_MERGED

    async def _most_similar(self, proposal: SkillProposal,
                            existing: list[Skill]) -> Skill | None:
        """The skill of the same name, else the most similar one at or above the merge
        threshold, else None."""
        for skill in existing:
            if skill.name == proposal.name:
                return skill
        if not existing:
            return None
        scores = await asyncio.to_thread(
            self._similarity, skill_text(proposal.name, proposal.description),
            [text_of(s) for s in existing])
        best_score, best = max(zip(scores, existing, strict=True), key=lambda pair: pair[0])
        return best if best_score >= self._merge_similarity else None

    def _redact(self, proposal: SkillProposal) -> SkillProposal:
        fields = {}
        for name in ("description", "category", "body"):
            text, found = safety.redact(getattr(proposal, name))
            fields[name] = text
            for kind, count in found.items():
                self._metrics.redactions.labels(kind).inc(count)
        return proposal.model_copy(update=fields)

    def _count(self, outcome: str) -> str:
        self._metrics.proposals.labels(outcome).inc()
        return outcome
