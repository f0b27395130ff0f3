"""``reef skills``: a tenant's skill library from the command line, through the gateway's
admin API (``services/gateway/admin.py``) over HTTP.

    reef skills list     --tenant T [--status active]
    reef skills show     SKILL --tenant T
    reef skills create   --tenant T --name N --description D (--body TEXT | --body-file F)
                         [--category C] [--status S]
    reef skills edit     SKILL --tenant T [--description D] [--body TEXT | --body-file F]
                         [--category C] [--reason R]
    reef skills approve  SKILL --tenant T [--reason R]
    reef skills retire   SKILL --tenant T [--reason R]
    reef skills delete   SKILL --tenant T
    reef skills export   --tenant T --dir DIR [--status S]   # writes DIR/<name>/SKILL.md
    reef skills import   --tenant T --dir DIR [--status S]   # reads DIR/<name>/SKILL.md
    reef skills starter  --tenant T                          # installs the starter set

SKILL is a skill id (``sk_...``) or name. Every command takes ``--url`` (default
``$REEF_GATEWAY_URL`` or http://127.0.0.1:8000), ``--admin-key`` (default
``$REEF_ADMIN_KEY``) and ``--json`` (print the API's answer as it is). Exit status: 0 done,
1 the API or the files refused, 2 bad usage or the gateway unreachable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from shared.skill_files import SkillFileError, parse_entry, read_dir, render, write_dir

DEFAULT_URL = "http://127.0.0.1:8000"
STATUSES = ("candidate", "active", "retired")


class CLIError(Exception):
    """Something to tell the user, with an exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--tenant", required=True, help="the tenant whose skills to act on")
    common.add_argument("--url", default=os.environ.get("REEF_GATEWAY_URL", DEFAULT_URL),
                        help="the gateway's base URL")
    common.add_argument("--admin-key", default=os.environ.get("REEF_ADMIN_KEY"),
                        help="the admin key (default: $REEF_ADMIN_KEY)")
    common.add_argument("--json", action="store_true", help="print the API's JSON answer")
    common.add_argument("--timeout", type=float, default=30.0)
    parser = argparse.ArgumentParser(prog="reef skills",
                                     description="Manage a tenant's skill library.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", parents=[common], help="list skills")
    p.add_argument("--status", choices=STATUSES)
    for name in ("show", "approve", "retire", "delete"):
        p = sub.add_parser(name, parents=[common], help=f"{name} a skill")
        p.add_argument("skill", help="skill id or name")
        if name in ("approve", "retire"):
            p.add_argument("--reason")
    p = sub.add_parser("create", parents=[common], help="create a skill")
    p.add_argument("--name", required=True)
    p.add_argument("--description", required=True)
    p.add_argument("--category", default="general")
    p.add_argument("--status", choices=STATUSES, default="candidate")
    _body_args(p, required=True)
    p = sub.add_parser("edit", parents=[common], help="edit a skill (a new version)")
    p.add_argument("skill", help="skill id or name")
    p.add_argument("--description")
    p.add_argument("--category")
    p.add_argument("--reason", default="edited by admin")
    _body_args(p, required=False)
    for name in ("export", "import"):
        p = sub.add_parser(name, parents=[common], help=f"{name} a SKILL.md directory")
        p.add_argument("--dir", required=True, type=Path)
        p.add_argument("--status", choices=STATUSES,
                       help="export: only this status; import: for files naming none")
    sub.add_parser("starter", parents=[common], help="install the starter skills")
    return parser


def _body_args(p: argparse.ArgumentParser, required: bool) -> None:
    group = p.add_mutually_exclusive_group(required=required)
    group.add_argument("--body", help="the instruction (Markdown)")
    group.add_argument("--body-file", type=Path, help="read the body from this file")


def _body(args: argparse.Namespace) -> str | None:
    if args.body_file is not None:
        try:
            return str(args.body_file.read_text(encoding="utf-8"))
        except OSError as exc:
            raise CLIError(f"cannot read {args.body_file}: {exc.strerror}") from None
    return args.body if args.body is None else str(args.body)


class AdminClient:
    """The admin API of one gateway, for one tenant."""

    def __init__(self, url: str, admin_key: str, tenant: str, timeout: float) -> None:
        self._http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout,
                                  headers={"Authorization": f"Bearer {admin_key}"})
        self._base = f"/admin/tenants/{quote(tenant, safe='')}/skills"

    def close(self) -> None:
        self._http.close()

    def call(self, method: str, path: str = "", **kw: Any) -> Any:
        """The JSON answer, or ``CLIError`` with the API's message."""
        try:
            resp = self._http.request(method, self._base + path, **kw)
        except httpx.HTTPError as exc:
            raise CLIError(f"cannot reach the gateway at {self._http.base_url}: {exc}",
                           2) from None
        try:
            body = resp.json()
        except ValueError:
            body = None
        if resp.status_code >= 400:
            error = body.get("error") if isinstance(body, dict) else None
            message = error.get("message") if isinstance(error, dict) else resp.text[:300]
            raise CLIError(f"{resp.status_code}: {message}")
        return body


def _show(skill: dict[str, Any]) -> str:
    credit = skill["credit"]
    lines = [f"{skill['name']}  ({skill['id']})",
             f"  status:      {skill['status']}"
             + (f" ({skill['retired_reason']})" if skill.get("retired_reason") else ""),
             f"  version:     {skill['version']}  ({skill['reason']})",
             f"  category:    {skill['category']}",
             f"  description: {skill['description']}",
             f"  provenance:  {skill['provenance']['source']}"
             f" sessions={len(skill['provenance']['session_ids'])}"
             f" turns={len(skill['provenance']['turn_ids'])}",
             f"  credit:      with {_mean(credit['with_mean'])} (n={credit['with_count']}),"
             f" without {_mean(credit['without_mean'])} (n={credit['without_count']})",
             "", *("  " + line for line in skill["body"].splitlines()), ""]
    for old in reversed(skill["history"]):
        lines.append(f"  v{old['version']} ({old['reason']}): {old['description']}")
    for change in skill.get("status_history", []):
        lines.append(f"  -> {change['status']}: {change['reason']}")
    return "\n".join(lines).rstrip()


def _mean(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}"


def _table(skills: list[dict[str, Any]]) -> str:
    rows = [("ID", "NAME", "STATUS", "VER", "CATEGORY", "WITH", "WITHOUT")]
    for s in skills:
        c = s["credit"]
        rows.append((s["id"], s["name"], s["status"], str(s["version"]), s["category"],
                     f"{_mean(c['with_mean'])}/{c['with_count']}",
                     f"{_mean(c['without_mean'])}/{c['without_count']}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def _export(api: AdminClient, args: argparse.Namespace) -> tuple[Any, str]:
    params = {"status": args.status} if args.status else {}
    answer = api.call("GET", "/export", params=params)
    try:
        files = [parse_entry(f["path"], f["content"]) for f in answer["files"]]
    except SkillFileError as exc:
        raise CLIError(f"the gateway sent a malformed file: {exc}") from None
    written = write_dir(args.dir, files)
    return answer, f"exported {len(written)} skill(s) to {args.dir}"


def _import(api: AdminClient, args: argparse.Namespace) -> tuple[Any, str]:
    try:
        files = read_dir(args.dir)
    except SkillFileError as exc:
        raise CLIError(str(exc)) from None
    body: dict[str, Any] = {"files": [{"path": f.path, "content": render(f)} for f in files]}
    if args.status:
        body["status"] = args.status
    answer = api.call("POST", "/import", json=body)
    return answer, _report(answer)


def _report(answer: dict[str, Any]) -> str:
    return "\n".join(f"{what}: {', '.join(answer[what]) or '-'}"
                     for what in ("created", "updated", "unchanged"))


def _run(api: AdminClient, args: argparse.Namespace) -> tuple[Any, str]:
    """Do the command; the API's answer and the text to print."""
    cmd = args.command
    if cmd == "list":
        answer = api.call("GET", params={"status": args.status} if args.status else {})
        return answer, _table(answer["data"])
    if cmd in ("export", "import"):
        return (_export if cmd == "export" else _import)(api, args)
    if cmd == "starter":
        answer = api.call("POST", "/starter")
        return answer, _report(answer)
    if cmd == "create":
        answer = api.call("POST", json={
            "name": args.name, "description": args.description, "body": _body(args),
            "category": args.category, "status": args.status})
        return answer, _show(answer)
    path = "/" + quote(args.skill, safe="")
    if cmd == "show":
        answer = api.call("GET", path)
    elif cmd == "edit":
        edit = {"description": args.description, "body": _body(args),
                "category": args.category, "reason": args.reason}
        answer = api.call("PATCH", path, json={k: v for k, v in edit.items() if v is not None})
    elif cmd in ("approve", "retire"):
        answer = api.call("POST", f"{path}/{cmd}",
                          json={"reason": args.reason} if args.reason else {})
    else:  # delete
        answer = api.call("DELETE", path)
        return answer, f"deleted {answer['id']}"
    return answer, _show(answer)


def main(argv: list[str] | None = None) -> int:
    """Run ``reef skills``; ``argv`` is what follows ``skills`` (``["list", "--tenant",
    "t"]``). Returns the exit status."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if not args.admin_key:
        print("error: no admin key: pass --admin-key or set REEF_ADMIN_KEY", file=sys.stderr)
        return 2
    api = AdminClient(args.url, args.admin_key, args.tenant, args.timeout)
    try:
        answer, text = _run(api, args)
    except CLIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    finally:
        api.close()
    print(json.dumps(answer, indent=2) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
