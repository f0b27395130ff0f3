"""Skills: short, reusable instructions injected into the system prompt of relevant turns.

This module holds the data model shared by the gateway (retrieval and injection, the
admin API), the skill-miner (proposals, merges, credit) and the CLI. The library itself
lives in Redis (``shared.skill_store``), one namespace per tenant.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SkillStatus = Literal["candidate", "active", "retired"]


class SkillVersion(BaseModel):
    """One past state of a skill (its history)."""

    model_config = ConfigDict(frozen=True)

    version: int
    description: str
    body: str
    changed_at: float
    reason: str
    """Why it changed: created, merged (a near-duplicate proposal), edited, imported ..."""
    category: str = "general"


class StatusChange(BaseModel):
    """One change of a skill's status: who approved or retired it, and why."""

    model_config = ConfigDict(frozen=True)

    status: SkillStatus
    changed_at: float
    reason: str
    """Why: approved by an admin, promoted automatically, retired with its credit evidence ..."""


class Provenance(BaseModel):
    """Where a skill came from: the sessions and turns whose failures produced it."""

    model_config = ConfigDict(frozen=True)

    source: Literal["miner", "admin", "import", "starter"]
    session_ids: list[str] = Field(default_factory=list)
    turn_ids: list[str] = Field(default_factory=list)


class Credit(BaseModel):
    """How turns fared with the skill injected vs comparable turns without it."""

    model_config = ConfigDict(frozen=True)

    with_count: int = 0
    with_reward_sum: float = 0.0
    without_count: int = 0
    without_reward_sum: float = 0.0

    @property
    def with_mean(self) -> float | None:
        return self.with_reward_sum / self.with_count if self.with_count else None

    @property
    def without_mean(self) -> float | None:
        return self.without_reward_sum / self.without_count if self.without_count else None


class Skill(BaseModel):
    """A skill of one tenant. ``name`` is unique within the tenant (kebab-case)."""

    model_config = ConfigDict(frozen=True)

    id: str
    tenant: str
    name: str
    description: str
    """One line saying when the skill applies: what retrieval matches the request against."""
    category: str = "general"
    body: str
    """The instruction itself (Markdown), injected as it is."""
    status: SkillStatus = "candidate"
    version: int = 1
    history: list[SkillVersion] = Field(default_factory=list)
    provenance: Provenance = Field(default_factory=lambda: Provenance(source="admin"))
    credit: Credit = Field(default_factory=Credit)
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    retired_reason: str | None = None
    reason: str = "created"
    """Why the current version was made (``history`` holds the earlier versions, each with
    its own reason)."""
    changed_at: float = Field(default_factory=time.time)
    """When the current version was made (``updated_at`` also moves on status changes)."""
    status_history: list[StatusChange] = Field(default_factory=list)
    """Every status change after creation, oldest first."""
