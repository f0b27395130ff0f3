"""The admin API and ``reef skills`` end to end: a gateway process with an admin key, a real
Redis, httpx and the CLI as clients."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.stack.skills_cli import main as cli
from shared.keys import SKILLS, Keys
from shared.messages import SkillEventV1, decode
from shared.skill_files import SkillFile, read_dir, render, write_dir
from shared.starter_skills import starter_skills
from tests.conftest import RedisServer, free_port
from tests.fake_upstream import FakeUpstream
from tests.gateway_proc import API_KEY, METRICS_AUTH, GatewayProcess

NAMESPACE = "admintest"
ADMIN_KEY = "sk-admin-test-key-1234"


@pytest.fixture(scope="module")
def gateway(redis_server: RedisServer, upstream: FakeUpstream,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(redis_server.url, upstream.base_url, NAMESPACE,
                        tmp_path_factory.mktemp("gateway"), env={"REEF_ADMIN_KEY": ADMIN_KEY})
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture
def admin(gateway: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=10,
                      headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as client:
        yield client


@pytest.fixture
def tenant() -> str:
    """A tenant of its own for each test, instead of wiping Redis between tests."""
    return "t-" + uuid.uuid4().hex[:10]


def base(tenant: str) -> str:
    return f"/admin/tenants/{tenant}/skills"


def create(admin: httpx.Client, tenant: str, name: str = "answer-first",
           **kw: Any) -> dict[str, Any]:
    body = {"name": name, "description": "When a question is asked.",
            "body": "Answer in the first sentence.", **kw}
    resp = admin.post(base(tenant), json=body)
    assert resp.status_code == 201, resp.text
    return dict(resp.json())


def assert_error(resp: httpx.Response, status: int, param: str | None = None) -> str:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    return str(error["message"])


def test_auth(gateway: GatewayProcess, tenant: str) -> None:
    url = gateway.url + base(tenant)
    assert_error(httpx.get(url), 401)
    assert_error(httpx.get(url, headers={"Authorization": "Bearer sk-wrong"}), 401)
    message = assert_error(httpx.get(url, headers={"Authorization": f"Bearer {API_KEY}"}), 403)
    assert "inference" in message
    assert httpx.get(url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}).status_code == 200
    for method, path in (("POST", ""), ("PATCH", "/x"), ("POST", "/x/approve"),
                         ("POST", "/x/retire"), ("GET", "/export"), ("POST", "/import"),
                         ("POST", "/starter"), ("DELETE", "/x")):
        assert_error(httpx.request(method, url + path, json={}), 401)
    assert_error(httpx.get(gateway.url + "/admin/tenants",
                           headers={"Authorization": f"Bearer {API_KEY}"}), 403)


def test_disabled_without_an_admin_key(redis_server: RedisServer, upstream: FakeUpstream,
                                       tmp_path: Path) -> None:
    gw = GatewayProcess(redis_server.url, upstream.base_url, NAMESPACE, tmp_path)
    gw.start()
    try:
        for headers in ({}, {"Authorization": f"Bearer {API_KEY}"},
                        {"Authorization": f"Bearer {ADMIN_KEY}"}):
            resp = httpx.get(gw.url + "/admin/tenants/alpha/skills", headers=headers)
            assert "admin API is disabled" in assert_error(resp, 403)
    finally:
        gw.stop()


def test_create_show_list_edit_approve_retire_delete(admin: httpx.Client, tenant: str) -> None:
    skill = create(admin, tenant)
    assert skill["object"] == "skill" and skill["id"].startswith("sk_")
    assert (skill["tenant"], skill["status"], skill["version"]) == (tenant, "candidate", 1)
    assert skill["provenance"]["source"] == "admin"
    for ref in (skill["id"], "answer-first"):
        shown = admin.get(f"{base(tenant)}/{ref}").json()
        assert shown["id"] == skill["id"] and shown["history"] == []
        assert shown["credit"] == {"with_count": 0, "with_reward_sum": 0.0, "without_count": 0,
                                   "without_reward_sum": 0.0, "with_mean": None,
                                   "without_mean": None}
    edited = admin.patch(f"{base(tenant)}/{skill['id']}",
                         json={"body": "Lead with the answer.", "reason": "clearer"}).json()
    assert (edited["version"], edited["body"], edited["reason"]) == (
        2, "Lead with the answer.", "clearer")
    assert [(h["version"], h["body"]) for h in edited["history"]] == [
        (1, "Answer in the first sentence.")]
    approved = admin.post(f"{base(tenant)}/answer-first/approve").json()
    assert approved["status"] == "active" and approved["version"] == 2
    create(admin, tenant, name="second")
    listed = admin.get(base(tenant)).json()
    assert [s["name"] for s in listed["data"]] == ["answer-first", "second"]
    assert [s["name"] for s in admin.get(base(tenant), params={"status": "active"})
            .json()["data"]] == ["answer-first"]
    retired = admin.post(f"{base(tenant)}/answer-first/retire",
                         json={"reason": "hurts replies"}).json()
    assert (retired["status"], retired["retired_reason"]) == ("retired", "hurts replies")
    assert [c["status"] for c in retired["status_history"]] == ["active", "retired"]
    assert admin.delete(f"{base(tenant)}/second").json()["deleted"] is True
    assert_error(admin.get(f"{base(tenant)}/second"), 404, "skill")
    assert tenant in admin.get("/admin/tenants").json()["data"]


def test_errors(admin: httpx.Client, tenant: str) -> None:
    create(admin, tenant)
    assert_error(admin.post(base(tenant), json={"name": "answer-first", "description": "d",
                                                "body": "b"}), 409, "name")
    assert_error(admin.post(base(tenant), json={"name": "Bad Name", "description": "d",
                                                "body": "b"}), 400, "name")
    assert_error(admin.post(base(tenant), json={"name": "ok", "body": "b"}), 400,
                 "description")
    assert_error(admin.post(base(tenant), json={"name": "ok", "description": "d",
                                                "body": "b", "status": "live"}), 400, "status")
    assert_error(admin.post(base(tenant), json={"name": "ok", "description": "d",
                                                "body": "  "}), 400, "body")
    assert_error(admin.post(base(tenant), content=b"{not json"), 400)
    assert_error(admin.get(base(tenant), params={"status": "live"}), 400, "status")
    assert_error(admin.get(f"{base(tenant)}/sk_0000000000000000"), 404, "skill")
    assert_error(admin.get(f"{base(tenant)}/no-such-skill"), 404, "skill")
    assert_error(admin.patch(f"{base(tenant)}/answer-first", json={"reason": "x"}), 400)
    assert_error(admin.patch(f"{base(tenant)}/answer-first", json={"category": "Bad Cat"}),
                 400, "category")
    assert_error(admin.post(f"{base(tenant)}/nope/approve"), 404)
    bad_file = {"files": [{"path": "x/SKILL.md", "content": "no front matter"}]}
    message = assert_error(admin.post(f"{base(tenant)}/import", json=bad_file), 400,
                           "files.0")
    assert "x/SKILL.md" in message


def test_tenant_isolation(admin: httpx.Client, tenant: str) -> None:
    mine = create(admin, tenant)
    other = tenant + "-other"
    assert admin.get(base(other)).json()["data"] == []
    assert_error(admin.get(f"{base(other)}/{mine['id']}"), 404)
    assert_error(admin.patch(f"{base(other)}/{mine['id']}", json={"body": "x"}), 404)
    assert_error(admin.post(f"{base(other)}/{mine['id']}/approve"), 404)
    assert_error(admin.delete(f"{base(other)}/{mine['id']}"), 404)
    assert admin.get(f"{base(other)}/export").json()["files"] == []
    create(admin, other)  # the same name in another tenant is a different skill
    shown = admin.get(f"{base(tenant)}/answer-first").json()
    assert shown["id"] == mine["id"] and shown["version"] == 1


def test_export_import_round_trip(admin: httpx.Client, tenant: str) -> None:
    create(admin, tenant, name="one", category="style", status="active")
    create(admin, tenant, name="two", description='Colons: "quotes" and ünïcode.')
    exported = admin.get(f"{base(tenant)}/export").json()
    assert exported["object"] == "skill_files"
    assert [f["path"] for f in exported["files"]] == ["one/SKILL.md", "two/SKILL.md"]
    target = tenant + "-copy"
    report = admin.post(f"{base(target)}/import", json={"files": exported["files"]}).json()
    assert report == {"object": "skill_import", "created": ["one", "two"], "updated": [],
                      "unchanged": []}
    again = admin.get(f"{base(target)}/export").json()
    assert again["files"] == exported["files"]
    copied = admin.get(f"{base(target)}/one").json()
    assert copied["status"] == "active" and copied["provenance"]["source"] == "import"
    report = admin.post(f"{base(target)}/import", json={"files": exported["files"]}).json()
    assert report["unchanged"] == ["one", "two"]
    assert admin.get(f"{base(tenant)}/export", params={"status": "active"}).json()[
        "files"] == exported["files"][:1]


def test_starter(admin: httpx.Client, tenant: str) -> None:
    report = admin.post(f"{base(tenant)}/starter").json()
    names = sorted(s.name for s in starter_skills())
    assert sorted(report["created"]) == names
    again = admin.post(f"{base(tenant)}/starter").json()
    assert again["created"] == [] and sorted(again["unchanged"]) == names
    listed = admin.get(base(tenant), params={"status": "active"}).json()["data"]
    assert sorted(s["name"] for s in listed) == names
    assert {s["provenance"]["source"] for s in listed} == {"starter"}


def test_writes_announce_events(admin: httpx.Client, redis_server: RedisServer,
                                tenant: str) -> None:
    skill = create(admin, tenant)
    admin.patch(f"{base(tenant)}/{skill['id']}", json={"body": "v2"})
    admin.post(f"{base(tenant)}/{skill['id']}/approve")
    entries = redis_server.client().xrange(Keys(NAMESPACE).stream(SKILLS))
    mine = [m for m in (decode(f) for _, f in entries)
            if isinstance(m, SkillEventV1) and m.tenant == tenant]
    assert [(m.action, m.version) for m in mine] == [("created", 1), ("updated", 2),
                                                     ("activated", 2)]


def test_skills_gauge(admin: httpx.Client, gateway: GatewayProcess, tenant: str) -> None:
    def gauge() -> dict[str, float]:
        text = httpx.get(gateway.url + "/metrics", headers=METRICS_AUTH).text
        return {s: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                for s in ("candidate", "active", "retired")
                if line.startswith(f'reef_skills{{status="{s}"}}')}

    gauge()
    time.sleep(0.2)
    before = gauge()
    assert set(before) == {"candidate", "active", "retired"}
    create(admin, tenant, name="g1", status="active")
    create(admin, tenant, name="g2")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # the gauge answers from a cache refreshed after scrapes
        now = gauge()
        if now["active"] == before["active"] + 1:
            break
        time.sleep(0.5)
    assert now["active"] == before["active"] + 1
    assert now["candidate"] == before["candidate"] + 1


def run_cli(capsys: pytest.CaptureFixture[str], gateway: GatewayProcess, tenant: str,
            *args: str, json_out: bool = False) -> tuple[int, str, str]:
    argv = [args[0], "--tenant", tenant, "--url", gateway.url, "--admin-key", ADMIN_KEY,
            *args[1:]] + (["--json"] if json_out else [])
    code = cli(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli(gateway: GatewayProcess, tenant: str, tmp_path: Path,
             capsys: pytest.CaptureFixture[str]) -> None:
    body_file = tmp_path / "body.md"
    body_file.write_text("Say what you checked.\n")
    code, out, _ = run_cli(capsys, gateway, tenant, "create", "--name", "check-results",
                           "--description", "When tools ran.", "--body-file", str(body_file))
    assert code == 0 and "check-results" in out and "candidate" in out
    code, out, _ = run_cli(capsys, gateway, tenant, "edit", "check-results", "--body",
                           "Say what you verified.", "--reason", "wording", json_out=True)
    assert code == 0 and json.loads(out)["version"] == 2
    assert run_cli(capsys, gateway, tenant, "approve", "check-results")[0] == 0
    code, out, _ = run_cli(capsys, gateway, tenant, "show", "check-results")
    assert code == 0 and "active" in out and "v1 (created)" in out
    assert run_cli(capsys, gateway, tenant, "starter")[0] == 0
    code, out, _ = run_cli(capsys, gateway, tenant, "list", "--status", "active")
    assert code == 0 and "check-results" in out and "answer-the-question-first" in out
    code, out, _ = run_cli(capsys, gateway, tenant, "retire", "answer-the-question-first",
                           "--reason", "not needed")
    assert code == 0 and "retired (not needed)" in out
    # export to disk, edit a file, import into another tenant and back
    code, out, _ = run_cli(capsys, gateway, tenant, "export", "--dir", str(tmp_path / "out"))
    assert code == 0
    files = read_dir(tmp_path / "out")
    assert len(files) == len(starter_skills()) + 1
    other = tenant + "-b"
    code, out, _ = run_cli(capsys, gateway, other, "import", "--dir", str(tmp_path / "out"))
    assert code == 0 and "updated: -" in out
    run_cli(capsys, gateway, other, "export", "--dir", str(tmp_path / "back"))
    assert read_dir(tmp_path / "back") == [
        SkillFile(f.name, f.description, f.body, f.category, f.status, 1) for f in files]
    changed = SkillFile("check-results", "When tools ran.", "Changed on disk.",
                        status="active")
    write_dir(tmp_path / "edit", [changed])
    code, out, _ = run_cli(capsys, gateway, other, "import", "--dir", str(tmp_path / "edit"))
    assert code == 0 and "updated: check-results" in out
    assert run_cli(capsys, gateway, other, "delete", "check-results")[0] == 0


def test_cli_errors(gateway: GatewayProcess, tenant: str, tmp_path: Path,
                    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run_cli(capsys, gateway, tenant, "show", "missing")
    assert code == 1 and "404" in err and "missing" in err
    bad = tmp_path / "bad" / "broken"
    bad.mkdir(parents=True)
    (bad / "SKILL.md").write_text("---\nname: broken\n---\nbody\n")
    code, _, err = run_cli(capsys, gateway, tenant, "import", "--dir", str(tmp_path / "bad"))
    assert code == 1 and "broken/SKILL.md" in err and "description" in err
    monkeypatch.delenv("REEF_ADMIN_KEY", raising=False)
    assert cli(["list", "--tenant", tenant, "--url", gateway.url]) == 2
    assert "admin key" in capsys.readouterr().err
    monkeypatch.setenv("REEF_ADMIN_KEY", "sk-wrong")
    assert cli(["list", "--tenant", tenant, "--url", gateway.url]) == 1
    assert "401" in capsys.readouterr().err
    code = cli(["list", "--tenant", tenant, "--url", f"http://127.0.0.1:{free_port()}",
                "--admin-key", ADMIN_KEY])
    assert code == 2 and "cannot reach" in capsys.readouterr().err
    assert render(SkillFile("x", "d", "b")).startswith("---\n")
