"""Every Redis key and stream name Reef uses, defined once and namespaced.

Streams carry the event flow; plain keys hold the little shared state there is.
``Keys(namespace)`` renders them, so two Reefs (or two tests) can share one Redis.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

TURNS = "turns"
"""Stream of recorded turns (``turn.v1``); produced by the gateway, read by the scorer."""
SCORED = "scored"
"""Stream of scored turns (``scored.v1``); read by the skill-miner and the trainer."""
SKILLS = "skills"
"""Stream of skill-library events (``skill.v1``); every gateway replica follows it."""
WEIGHTS = "weights"
"""Stream of new-adapter events (``weights.v1``); the policy server and gateways follow it."""
FINALISED = "finalised"
"""Scorer-internal stream of turns whose follow-up is known (``finalised.v1``)."""
FEEDBACK = "feedback"
"""Stream of explicit-feedback events (``feedback.v1``); produced by the gateway, read by
the scorer, which re-scores the turns named that were already scored."""
DEAD_SUFFIX = ":dead"
"""Appended to a stream's key to name its dead-letter stream."""

GROUP_SCORER = "scorer"
GROUP_JUDGE = "scorer-judge"
"""The scorer's second stage: scores ``finalised`` entries."""
GROUP_FEEDBACK = "scorer-feedback"
"""The scorer's late-feedback stage: re-scores already scored turns on ``feedback``."""
GROUP_SKILL_MINER = "skill-miner"
GROUP_TRAINER = "trainer"
"""The consumer group of a shared (cross-tenant) adapter's trainer; a tenant's adapter has
a group of its own, ``trainer_group(adapter)``."""
SHARED_TENANT = "*"
"""The tenant of a shared adapter (trained on every tenant's turns, served to all)."""
_SLUG = re.compile(r"[^a-z0-9]+")


def adapter_for(adapter_name: str, tenant: str) -> str:
    """The name of ``tenant``'s adapter: ``<adapter_name>-<tenant>`` for a tenant name of
    lower-case letters, digits and single dashes; otherwise a slug of it and a hash of the
    name, so that two tenants never share an adapter name."""
    slug = _SLUG.sub("-", tenant.lower()).strip("-")[:40]
    if slug != tenant:
        slug = f"{slug}-{hashlib.sha256(tenant.encode()).hexdigest()[:8]}".lstrip("-")
    return f"{adapter_name}-{slug}"


def trainer_group(adapter: str) -> str:
    """The consumer group in which ``adapter``'s trainer reads ``scored``: one per adapter,
    so that trainers of different tenants never ack each other's turns."""
    return f"{GROUP_TRAINER}:{adapter}"


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names under one namespace."""

    namespace: str = "reef"

    def stream(self, name: str) -> str:
        """The key of a stream (``turns``, ``scored`` ...)."""
        return f"{self.namespace}:stream:{name}"

    def dead(self, name: str) -> str:
        """The dead-letter stream of a stream."""
        return self.stream(name) + DEAD_SUFFIX

    def turn_index(self, tenant: str, session_id: str) -> str:
        """Counter of turns recorded in a session (INCR gives the next index)."""
        return f"{self.namespace}:session:{tenant}:{session_id}:turns"

    def session_responses(self, tenant: str, session_id: str) -> str:
        """Hash of a session's recorded turns by answer: response id -> turn index
        (written with the turn counter, expiring with it)."""
        return f"{self.namespace}:session:{tenant}:{session_id}:responses"

    def dedupe(self, kind: str, message_id: str) -> str:
        """Marker that a message id was already produced (idempotent replay)."""
        return f"{self.namespace}:seen:{kind}:{message_id}"

    def handled(self, group: str, message_id: str) -> str:
        """Marker that a consumer group finished a message (set with the ack), so a
        redelivered or replayed entry with the same message id is acked, not handled again.
        A Redis set of the acked handlings (one member unless a message was handled twice)."""
        return f"{self.namespace}:done:{group}:{message_id}"

    def session_turns(self, tenant: str, session_id: str) -> str:
        """Hash of a session's turns seen by the scorer and not yet finalised (by index)."""
        return f"{self.namespace}:session:{tenant}:{session_id}:pending"

    def session_scored(self, tenant: str, session_id: str) -> str:
        """Hash of a session's scored turns, kept ``feedback_window_seconds`` for late
        feedback: turn index -> compact JSON (the first ``scored`` entry's stream id,
        reward, components, revision; see ``services.scorer.revise``)."""
        return f"{self.namespace}:session:{tenant}:{session_id}:scored"

    def idle_sessions(self) -> str:
        """Sorted set: session-turns key -> time of its last turn (for idle finalisation)."""
        return f"{self.namespace}:scorer:active"

    def feedback(self, tenant: str, session_id: str) -> str:
        """Hash of explicit feedback on a session: ``turn:<response id>``, ``index:<n>`` or
        ``session`` -> feedback JSON."""
        return f"{self.namespace}:feedback:{tenant}:{session_id}"

    # The adapter registry (shared.adapter_registry): entries expire unless refreshed.

    def policy_replicas(self) -> str:
        """Set of the policy replicas' ids that registered (members whose entry expired are
        removed by whoever reads it)."""
        return f"{self.namespace}:registry:policy"

    def policy_replica(self, replica_id: str) -> str:
        """A policy replica's registry entry (JSON, with a TTL): its base model's name, the
        adapters it holds, the ones it failed to load."""
        return f"{self.namespace}:registry:policy:{replica_id}"

    def gateway_routers(self) -> str:
        """Set of the gateways' ids that registered their routes."""
        return f"{self.namespace}:registry:gateway"

    def gateway_router(self, gateway_id: str) -> str:
        """A gateway's registry entry (JSON, with a TTL): the adapters it routes to or has
        requests on, which policy replicas keep loaded."""
        return f"{self.namespace}:registry:gateway:{gateway_id}"

    def trainer(self, adapter: str, part: str) -> str:
        """A trainer's state: ``buffer`` (hash turn id -> sample), ``state`` (hash: step,
        in-flight batch)."""
        return f"{self.namespace}:trainer:{adapter}:{part}"

    def trained(self, adapter: str, turn_id: str) -> str:
        """Marker that a turn was trained into an adapter (so it never is again)."""
        return f"{self.namespace}:trainer:{adapter}:trained:{turn_id}"

    # Skills: the tenant sits before a skill id (which never holds ':'), or last, so a
    # tenant name with ':' in it cannot make one tenant's key another's.

    def skill(self, tenant: str, skill_id: str) -> str:
        """A skill of a tenant (JSON, without its credit counters)."""
        return f"{self.namespace}:skills:skill:{tenant}:{skill_id}"

    def skill_credit(self, tenant: str, skill_id: str) -> str:
        """Hash of a skill's credit counters (``with_count``, ``with_reward_sum``,
        ``without_count``, ``without_reward_sum``), incremented atomically."""
        return f"{self.namespace}:skills:credit:{tenant}:{skill_id}"

    def skill_names(self, tenant: str) -> str:
        """Hash of a tenant's skills: name -> skill id (names are unique per tenant)."""
        return f"{self.namespace}:skills:names:{tenant}"

    def skill_tenants(self) -> str:
        """Set of tenants that have (or had) skills."""
        return f"{self.namespace}:skills:tenants"

    def skill_baseline(self, tenant: str) -> str:
        """Hash (``count``, ``reward_sum``) of the rewards of a tenant's trainable turns that
        had no skill injected: the baseline of skills injected into every turn."""
        return f"{self.namespace}:skills:baseline:{tenant}"

    def skill_status_counts(self) -> str:
        """Hash: status -> number of skills with it, over all tenants (for the metric)."""
        return f"{self.namespace}:skills:counts"

    # Skill-miner: the tenant is written with its length first, so no tenant, session or
    # turn id (which may hold ':') can make one tenant's key another's.

    def miner_session(self, tenant: str, session_id: str) -> str:
        """Sorted set of a session's recent scored turns (compact JSON scored by turn
        index, capped and expiring): the trajectories the skill-miner diagnoses."""
        return f"{self.namespace}:miner:session:{len(tenant)}:{tenant}:{session_id}"

    def miner_done(self, step: str, tenant: str, turn_id: str) -> str:
        """Marker that the skill-miner finished a step (``credit``, ``mined``) for a turn,
        so a redelivered entry does not count or mine it twice."""
        return f"{self.namespace}:miner:{step}:{len(tenant)}:{tenant}:{turn_id}"

    def miner_answer(self, tenant: str, turn_id: str) -> str:
        """The validated proposals the miner's LLM gave for a failing turn, kept until the
        turn is mined so a redelivery applies them again instead of asking again."""
        return f"{self.namespace}:miner:answer:{len(tenant)}:{tenant}:{turn_id}"
