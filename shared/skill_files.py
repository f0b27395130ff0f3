"""Skills as files: SKILL.md directories in the Agent Skills layout, to write and review
skills by hand and to move a library between tenants or Reefs.

Layout: ``<dir>/<skill-name>/SKILL.md``, the directory named after the skill. A file is
YAML front matter between ``---`` lines, then the Markdown body (the instruction)::

    ---
    name: answer-the-question-first
    description: When the user asks a direct question.
    metadata:
      category: general
      status: active
      version: "2"
    ---

    Put the answer in the first sentence ...

``name`` and ``description`` are required. Reef's own fields live under ``metadata``
(string values, as the format asks); ``category`` and ``status`` are also accepted at the
top level. ``version`` is informational: the version the skill had where it was exported;
an importing library counts its own versions. Unknown fields (``license``,
``allowed-tools`` ...) are ignored. Export then import keeps name, description, category,
status and body.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal

import yaml

from shared.skill_store import (
    MAX_BODY_CHARS,
    MAX_DESCRIPTION_CHARS,
    STATUSES,
    InvalidSkill,
    SkillStore,
    check_category,
    check_name,
)
from shared.skills import Provenance, Skill, SkillStatus

FILE_NAME = "SKILL.md"
MAX_FILE_BYTES = 64 * 1024


class SkillFileError(ValueError):
    """A SKILL.md file that cannot be read; the message names the file."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


@dataclass(frozen=True, slots=True)
class SkillFile:
    """What one SKILL.md holds."""

    name: str
    description: str
    body: str
    category: str = "general"
    status: SkillStatus | None = None
    """None when the file does not say (the importer picks)."""
    version: int | None = None

    @property
    def path(self) -> str:
        """Where it lives, relative to the skills directory."""
        return f"{self.name}/{FILE_NAME}"

    @classmethod
    def of(cls, skill: Skill) -> SkillFile:
        return cls(name=skill.name, description=skill.description, body=skill.body,
                   category=skill.category, status=skill.status, version=skill.version)


def render(skill: SkillFile | Skill) -> str:
    """The SKILL.md text of a skill."""
    f = skill if isinstance(skill, SkillFile) else SkillFile.of(skill)
    metadata: dict[str, str] = {"category": f.category}
    if f.status is not None:
        metadata["status"] = f.status
    if f.version is not None:
        metadata["version"] = str(f.version)
    front = yaml.safe_dump({"name": f.name, "description": f.description, "metadata": metadata},
                           sort_keys=False, allow_unicode=True, width=1_000_000)
    return f"---\n{front}---\n\n{f.body.strip()}\n"


def _split(text: str, path: str) -> tuple[str, str]:
    lines = text.replace("\r\n", "\n").split("\n")
    if not lines or lines[0].strip() != "---":
        raise SkillFileError(path, "does not start with YAML front matter ('---' line)")
    for i, line in enumerate(lines[1:], start=1):
        if line.strip() == "---":
            return "\n".join(lines[1:i]), "\n".join(lines[i + 1:])
    raise SkillFileError(path, "front matter is not closed by a '---' line")


def _field(front: dict[str, Any], name: str, path: str, required: bool = False) -> str | None:
    meta = front.get("metadata")
    value = meta.get(name) if isinstance(meta, dict) and name in meta else front.get(name)
    if value is None:
        if required:
            raise SkillFileError(path, f"front matter lacks '{name}'")
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise SkillFileError(path, f"'{name}' must be a string")
    return str(value)


def parse(text: str, path: str = FILE_NAME) -> SkillFile:
    """Read one SKILL.md; ``SkillFileError`` naming ``path`` if it is malformed."""
    head, body = _split(text, path)
    try:
        front = yaml.safe_load(head)
    except yaml.YAMLError as exc:
        raise SkillFileError(path, f"front matter is not valid YAML ({exc})") from None
    if not isinstance(front, dict):
        raise SkillFileError(path, "front matter is not a YAML mapping")
    name = _field(front, "name", path, required=True) or ""
    description = (_field(front, "description", path, required=True) or "").strip()
    category = _field(front, "category", path) or "general"
    status = _field(front, "status", path)
    version = _field(front, "version", path)
    body = body.strip()
    try:
        check_name(name)
        check_category(category)
    except InvalidSkill as exc:
        raise SkillFileError(path, exc.message) from None
    if not description or "\n" in description or len(description) > MAX_DESCRIPTION_CHARS:
        raise SkillFileError(path, f"'description' must be one non-empty line of at most "
                                   f"{MAX_DESCRIPTION_CHARS} characters")
    if not body or len(body) > MAX_BODY_CHARS:
        raise SkillFileError(path, f"the body (the instruction after the front matter) must "
                                   f"be non-empty and at most {MAX_BODY_CHARS} characters")
    if status is not None and status not in STATUSES:
        raise SkillFileError(path, f"'status' must be one of {', '.join(STATUSES)}")
    if version is not None and not version.isdigit():
        raise SkillFileError(path, "'version' must be a whole number")
    return SkillFile(name=name, description=description, body=body, category=category,
                     status=status,  # checked against STATUSES above
                     version=int(version) if version is not None else None)


def parse_entry(path: str, content: str) -> SkillFile:
    """A SKILL.md given with its relative path (``<name>/SKILL.md``), the directory
    checked against the name inside."""
    parts = path.strip("/").split("/")
    if len(parts) != 2 or parts[1] != FILE_NAME:
        raise SkillFileError(path, f"expected a path of the form <skill-name>/{FILE_NAME}")
    skill = parse(content, path)
    if parts[0] != skill.name:
        raise SkillFileError(path, f"its directory must be named after the skill "
                                   f"('{skill.name}')")
    return skill


def read_dir(directory: Path | Traversable) -> list[SkillFile]:
    """Every ``<name>/SKILL.md`` directly under ``directory``, sorted by name."""
    if not directory.is_dir():
        raise SkillFileError(str(directory), "is not a directory")
    found = []
    for child in sorted(directory.iterdir(), key=lambda c: c.name):
        entry = child / FILE_NAME
        if not child.is_dir() or not entry.is_file():
            continue
        raw = entry.read_bytes()
        where = str(entry) if isinstance(entry, Path) else f"{child.name}/{FILE_NAME}"
        if len(raw) > MAX_FILE_BYTES:
            raise SkillFileError(where, f"larger than {MAX_FILE_BYTES} bytes")
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise SkillFileError(where, "is not UTF-8 text") from None
        skill = parse(text, where)
        if child.name != skill.name:
            raise SkillFileError(where, f"its directory must be named after the skill "
                                        f"('{skill.name}')")
        found.append(skill)
    return found


def write_dir(directory: Path, skills: Iterable[SkillFile | Skill]) -> list[Path]:
    """Write each skill to ``<directory>/<name>/SKILL.md`` (replacing what is there)."""
    written = []
    for skill in skills:
        path = directory / skill.name / FILE_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(skill), encoding="utf-8")
        written.append(path)
    return written


@dataclass(slots=True)
class ImportReport:
    """What an import did, by skill name."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[str]]:
        return {"created": self.created, "updated": self.updated, "unchanged": self.unchanged}


async def import_skills(store: SkillStore, tenant: str, files: Iterable[SkillFile], *,
                        default_status: SkillStatus = "candidate",
                        source: Literal["import", "starter", "admin"] = "import",
                        reason: str = "imported", overwrite: bool = True) -> ImportReport:
    """Put files into a tenant's library: a new name is created (with the file's status,
    else ``default_status``); a known name gets a new version if its text differs and the
    file's status if it names one. With ``overwrite`` False known names are left alone
    (how the starter set stays idempotent without undoing an admin's edits)."""
    report = ImportReport()
    provenance = Provenance(source=source)
    for f in files:
        existing = await store.by_name(tenant, f.name)
        if existing is None:
            await store.create(tenant, name=f.name, description=f.description, body=f.body,
                               category=f.category, status=f.status or default_status,
                               provenance=provenance, reason=reason)
            report.created.append(f.name)
            continue
        if not overwrite:
            report.unchanged.append(f.name)
            continue
        changed = False
        if (existing.description, existing.body, existing.category) != (
                f.description, f.body, f.category):
            existing = await store.update(tenant, existing.id, description=f.description,
                                          body=f.body, category=f.category,
                                          reason=reason)
            changed = True
        if f.status is not None and f.status != existing.status:
            await store.set_status(tenant, existing.id, f.status, reason)
            changed = True
        (report.updated if changed else report.unchanged).append(f.name)
    return report
