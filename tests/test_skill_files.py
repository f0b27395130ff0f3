"""SKILL.md directories: parse, render, round trip, malformed files, the starter set (and
that the wheel ships it), importing into a real Redis."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from shared.keys import Keys
from shared.skill_files import (
    SkillFile,
    SkillFileError,
    import_skills,
    parse,
    parse_entry,
    read_dir,
    render,
    write_dir,
)
from shared.skill_store import SkillStore
from shared.starter_skills import install_starter, starter_skills
from tests.conftest import RedisServer

ROOT = Path(__file__).resolve().parents[1]

TRICKY = SkillFile(
    name="quote-yaml-specials",
    description='When text has: colons, "quotes", # hashes and ünïcode — all kept.',
    body="First line.\n\n---\n\n- a list with `code`\n- and a *second* item: yes",
    category="style", status="active", version=3)


def test_render_then_parse_keeps_everything() -> None:
    text = render(TRICKY)
    assert text.startswith("---\nname: quote-yaml-specials\n")
    assert parse(text) == TRICKY


def test_directory_round_trip(tmp_path: Path) -> None:
    skills = [TRICKY, SkillFile(name="plain", description="Plain.", body="Do it.")]
    write_dir(tmp_path, skills)
    assert (tmp_path / "plain" / "SKILL.md").is_file()
    assert read_dir(tmp_path) == sorted(skills, key=lambda s: s.name)
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / "empty-dir").mkdir()
    assert len(read_dir(tmp_path)) == 2


def test_hand_written_file_with_top_level_fields_and_unknown_ones() -> None:
    text = ("---\nname: hand-made\ndescription: When testing.\ncategory: tools\n"
            "status: candidate\nlicense: MIT\nallowed-tools: [bash]\n---\nBody here.\n")
    assert parse(text) == SkillFile(name="hand-made", description="When testing.",
                                    body="Body here.", category="tools", status="candidate")


@pytest.mark.parametrize(("text", "needle"), [
    ("name: x\n", "does not start with YAML front matter"),
    ("---\nname: x\ndescription: d\nbody", "not closed"),
    ("---\nname: [unclosed\n---\nb", "not valid YAML"),
    ("---\n- a list\n---\nb", "not a YAML mapping"),
    ("---\ndescription: d\n---\nb", "lacks 'name'"),
    ("---\nname: ok\n---\nb", "lacks 'description'"),
    ("---\nname: Not_Kebab\ndescription: d\n---\nb", "kebab-case"),
    ("---\nname: ok\ndescription: d\n---\n  \n", "body"),
    ("---\nname: ok\ndescription: d\nstatus: live\n---\nb", "'status' must be one of"),
    ("---\nname: ok\ndescription: d\nmetadata: {version: two}\n---\nb", "'version'"),
    ("---\nname: ok\ndescription: {a: 1}\n---\nb", "'description' must be a string"),
    ("---\nname: ok\ndescription: d\ncategory: Not OK\n---\nb", "Invalid category"),
])
def test_malformed_files_are_rejected_naming_the_file(text: str, needle: str) -> None:
    with pytest.raises(SkillFileError) as err:
        parse(text, "skills/ok/SKILL.md")
    assert str(err.value).startswith("skills/ok/SKILL.md: ")
    assert needle in str(err.value)


def test_directory_must_match_the_name(tmp_path: Path) -> None:
    write_dir(tmp_path, [SkillFile(name="right", description="d", body="b")])
    (tmp_path / "right").rename(tmp_path / "wrong")
    with pytest.raises(SkillFileError) as err:
        read_dir(tmp_path)
    assert "wrong/SKILL.md" in str(err.value) and "'right'" in str(err.value)
    with pytest.raises(SkillFileError, match="must be named after"):
        parse_entry("wrong/SKILL.md", render(SkillFile(name="right", description="d", body="b")))
    with pytest.raises(SkillFileError, match=re.escape("<skill-name>/SKILL.md")):
        parse_entry("../SKILL.md/x", "")


def test_non_utf8_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "SKILL.md").write_bytes(b"---\nname: \xff\n---\n")
    with pytest.raises(SkillFileError, match=re.escape("bad/SKILL.md: is not UTF-8")):
        read_dir(tmp_path)


def test_starter_set_is_valid() -> None:
    skills = starter_skills()
    assert 5 <= len(skills) <= 8
    assert all(s.status == "active" and s.description and s.body for s in skills)
    assert "answer-the-question-first" in {s.name for s in skills}


@pytest.fixture
async def store(redis_server: RedisServer, namespace: str) -> AsyncIterator[SkillStore]:
    client = aioredis.Redis(port=redis_server.port)
    yield SkillStore(client, Keys(namespace), maxlen=1000)
    await client.aclose()


async def test_export_import_round_trip_through_a_store(store: SkillStore,
                                                        tmp_path: Path) -> None:
    first = await import_skills(store, "alpha", [TRICKY, SkillFile(
        name="plain", description="Plain.", body="Do it.")])
    assert first.created == ["quote-yaml-specials", "plain"]
    plain = await store.by_name("alpha", "plain")
    assert plain is not None and plain.status == "candidate"
    assert plain.provenance.source == "import"
    exported = [SkillFile.of(s) for s in await store.list("alpha")]
    write_dir(tmp_path / "out", await store.list("alpha"))
    report = await import_skills(store, "beta", read_dir(tmp_path / "out"))
    assert sorted(report.created) == ["plain", "quote-yaml-specials"]
    imported = [SkillFile.of(s) for s in await store.list("beta")]
    strip = [(s.name, s.description, s.body, s.category, s.status) for s in exported]
    assert [(s.name, s.description, s.body, s.category, s.status) for s in imported] == strip
    # Importing the same files again changes nothing; a changed file makes a new version.
    again = await import_skills(store, "beta", read_dir(tmp_path / "out"))
    assert again.created == [] and again.updated == [] and len(again.unchanged) == 2
    edited = SkillFile(name="plain", description="Plain.", body="Do it twice.",
                       status="active")
    third = await import_skills(store, "beta", [edited])
    assert third.updated == ["plain"]
    got = await store.by_name("beta", "plain")
    assert got is not None and (got.version, got.status, got.reason) == (2, "active",
                                                                          "imported")


async def test_install_starter_is_idempotent(store: SkillStore) -> None:
    first = await install_starter(store, "alpha")
    assert len(first.created) == len(starter_skills())
    skills = await store.list("alpha")
    assert all(s.status == "active" and s.provenance.source == "starter" for s in skills)
    retire = skills[0]
    await store.set_status("alpha", retire.id, "retired", "not for us")
    second = await install_starter(store, "alpha")
    assert second.created == [] and len(second.unchanged) == len(skills)
    kept = await store.get("alpha", retire.id)
    assert kept is not None and kept.status == "retired"  # an admin's choice is kept
    assert len(await store.list("alpha")) == len(skills)


@pytest.mark.slow
def test_wheel_ships_the_starter_skills(tmp_path: Path) -> None:
    src = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / part, src / part if src.exists() else _mkdir(src) / part)
    for package in ("shared", "services"):
        shutil.copytree(ROOT / package, src / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {proc.stderr[-300:]}")
    wheel = next(tmp_path.glob("reef-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n for n in names if n.startswith("shared/starter_skills/")
               and n.endswith("/SKILL.md")}
    assert {f"shared/starter_skills/{s.name}/SKILL.md" for s in starter_skills()} == shipped


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path
