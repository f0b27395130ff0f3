"""Reef's starter skills: a few general habits every agent benefits from, shipped as
SKILL.md files in this package (``<name>/SKILL.md``, package data in the wheel)."""

from __future__ import annotations

from importlib.resources import files

from shared.skill_files import ImportReport, SkillFile, import_skills, read_dir
from shared.skill_store import SkillStore


def starter_skills() -> list[SkillFile]:
    """The starter set, sorted by name."""
    return read_dir(files(__name__))


async def install_starter(store: SkillStore, tenant: str) -> ImportReport:
    """Add the starter skills a tenant does not have yet, as active skills with provenance
    ``starter``. Idempotent: a name the tenant already has is left as it is (an admin's
    edits or retirement of a starter skill are kept)."""
    return await import_skills(store, tenant, starter_skills(), default_status="active",
                               source="starter", reason="starter set", overwrite=False)
