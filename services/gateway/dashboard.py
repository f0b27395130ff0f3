"""The dashboard: one page for people without Grafana, and the JSON behind it.

=====================================  ===============================================
``GET /admin/dashboard``               the page (static HTML; holds no data, asks for
                                       the admin key and keeps it in sessionStorage)
``GET /admin/dashboard/static/{name}``  its script and style sheet
``GET /admin/dashboard/data?tenant=``   what the page shows, behind the admin key
=====================================  ===============================================

The data route reads Redis on every call: the newest ``scored`` entries (reward over time,
recent turns with a short redacted preview; each entry is parsed once, see ``ScoredTail``), the
``weights`` stream (versions, swaps, rollbacks) and which version this gateway serves, the
skill library with its credit, and the length, dead letters and consumer groups of every
stream. It sits behind the same admin key as the admin API (``services.gateway.admin``):
no key or a wrong one is a 401, an inference key a 403, errors in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import orjson
import redis.asyncio as aioredis
from fastapi import APIRouter, Depends, FastAPI, Request
from redis.exceptions import RedisError
from starlette.responses import Response

from services.gateway.adapters import AdapterRouter
from services.gateway.admin import ADMIN_PREFIX, AdminAuth
from services.gateway.errors import APIError
from shared.keys import FINALISED, SCORED, SKILLS, TURNS, WEIGHTS, Keys
from shared.redact import DEFAULT, Redactor
from shared.settings import Settings
from shared.skill_store import InvalidSkill, SkillStore, check_tenant
from shared.skills import Skill

PAGE_PATH = ADMIN_PREFIX + "/dashboard"
STATIC_DIR = Path(__file__).parent / "static"
STATIC_FILES = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
"""The page's assets, by name, with their media types (nothing else is served)."""
STREAMS = (TURNS, FINALISED, SCORED, SKILLS, WEIGHTS)
"""Every stream in ``shared.keys``, in the order events flow through them."""
SCORED_WINDOW = 300
"""Newest ``scored`` entries shown: the reward chart's span."""
RECENT_TURNS = 25
WEIGHTS_WINDOW = 50
MAX_TENANTS = 50
"""Tenants whose skills are listed when no tenant is chosen."""
PREVIEW_CHARS = 140
STATUS_ORDER = ("active", "candidate", "retired")
"""How skills are listed: the ones in use first."""
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self'; form-action 'none'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
"""The page runs only its own script and talks only to this gateway."""


def preview(text: str, redactor: Redactor = DEFAULT) -> str:
    """``text`` on one line with secrets and personal data replaced by placeholders (the
    whole text, before it is cut: a cut could leave half a key unrecognised), cut to
    ``PREVIEW_CHARS``. Whoever holds the admin key sees it; nobody else."""
    text = redactor.redact(" ".join(text.split()))[0]
    return text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS - 1] + "…"


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        return " ".join(p.get("text", "") for p in content
                        if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _last_user(messages: Any) -> str:
    for message in reversed(messages if isinstance(messages, list) else []):
        if isinstance(message, dict) and message.get("role") == "user":
            return _content_text(message.get("content"))
    return ""


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _entries_of(raw: Any, kind: bytes) -> Iterable[tuple[str, dict[str, Any]]]:
    """(entry id, message as a dict) of the entries of ``kind``; others are skipped. Plain
    JSON, not the pydantic models: a refresh reads hundreds of turns."""
    for entry_id, fields in cast(list[Any], raw or []):
        if fields.get(b"kind") != kind:
            continue
        try:
            data = orjson.loads(fields.get(b"data", b""))
        except orjson.JSONDecodeError:
            continue
        if isinstance(data, dict):
            yield _text(entry_id), data


def scored_row(entry_id: str, msg: dict[str, Any],
               redactor: Redactor = DEFAULT) -> dict[str, Any] | None:
    """What the page shows of one ``scored.v1`` entry (previews redacted), or None."""
    turn = msg.get("turn")
    if not isinstance(turn, dict):
        return None
    answer = turn.get("response_message")
    reward = msg.get("reward")
    return {
        "entry_id": entry_id, "created_at": float(msg.get("created_at") or 0.0),
        "reward": float(reward) if isinstance(reward, int | float) else None,
        "reason": msg.get("reason"), "tenant": str(turn.get("tenant", "")),
        "session_id": turn.get("session_id"), "turn_index": turn.get("turn_index"),
        "turn_type": turn.get("turn_type"), "policy_version": turn.get("policy_version"),
        "skills": len(turn.get("skill_ids") or []),
        "components": msg.get("components") or {},
        "user": preview(_last_user(turn.get("messages")), redactor),
        "answer": preview(_content_text(answer.get("content"))
                          if isinstance(answer, dict) else "", redactor),
    }


class ScoredTail:
    """The newest ``size`` scored turns, each parsed once. Stream entries never change, so
    a refresh reads only the entries added since the last one (a turn carries its whole
    conversation and token logprobs: re-reading hundreds each refresh would cost the
    gateway's event loop tens of milliseconds)."""

    def __init__(self, size: int, redactor: Redactor = DEFAULT) -> None:
        self.rows: deque[dict[str, Any]] = deque(maxlen=size)
        """Newest first."""
        self.size = size
        self.redactor = redactor

    @property
    def min_id(self) -> str:
        """The XREVRANGE lower bound: just after the newest entry held."""
        return "(" + self.rows[0]["entry_id"] if self.rows else "-"

    def add(self, raw: Any) -> None:
        """Take the reply of ``XREVRANGE key + <min_id> COUNT <size>`` (newest first)."""
        fresh = [row for entry_id, msg in _entries_of(raw, b"scored.v1")
                 if (row := scored_row(entry_id, msg, self.redactor)) is not None]
        self.rows.extendleft(reversed(fresh))


def scored_summary(rows: Iterable[dict[str, Any]], tenant: str | None) -> dict[str, Any]:
    """Reward points (oldest first) and the newest turns of ``tenant`` (or of all)."""
    chosen = [r for r in rows if tenant is None or r["tenant"] == tenant]
    points = [[r["created_at"], r["reward"]] for r in reversed(chosen) if r["reward"] is not None]
    rewards = [p[1] for p in points]
    return {"points": points, "turns": chosen[:RECENT_TURNS],
            "count": len(rewards), "mean": sum(rewards) / len(rewards) if rewards else None}


def _metrics(msg: dict[str, Any]) -> dict[str, Any]:
    metrics = msg.get("metrics")
    return metrics if isinstance(metrics, dict) else {}


def weights_summary(raw: Any, router: AdapterRouter | None) -> dict[str, Any]:
    """Versions published (newest first) and what this gateway serves per tenant."""
    live = router.live if router is not None else {}
    live_ids = {event.id for event in live.values()}
    events = [{
        "entry_id": entry_id, "id": msg.get("id"), "created_at": msg.get("created_at"),
        "tenant": msg.get("tenant"), "adapter": msg.get("adapter"),
        "version": msg.get("version"), "step": msg.get("step"),
        "rollback": bool(_metrics(msg).get("rollback")),
        "loss": _metrics(msg).get("loss"), "batch_reward": _metrics(msg).get("reward_mean"),
        "live": msg.get("id") in live_ids,
    } for entry_id, msg in _entries_of(raw, b"weights.v1")]
    serving = [{"tenant": t, "adapter": e.adapter, "version": e.version, "step": e.step,
                "since": e.created_at} for t, e in sorted(live.items())]
    return {"live": serving, "events": events}


def skill_row(skill: Skill, redactor: Redactor = DEFAULT) -> dict[str, Any]:
    credit = skill.credit
    return {"id": skill.id, "tenant": skill.tenant, "name": skill.name,
            "status": skill.status, "category": skill.category, "version": skill.version,
            "description": preview(skill.description, redactor),
            "with_count": credit.with_count, "with_mean": credit.with_mean,
            "without_count": credit.without_count, "without_mean": credit.without_mean}


def _group_row(group: dict[Any, Any]) -> dict[str, Any]:
    fields = {_text(k): v for k, v in group.items()}
    return {"name": _text(fields.get("name", b"")), "consumers": fields.get("consumers"),
            "pending": fields.get("pending"), "lag": fields.get("lag"),
            "last_delivered_id": _text(fields.get("last-delivered-id", b""))}


class Dashboard:
    """Reads what the page shows; one pipeline for the streams, one call per tenant for
    the skills."""

    def __init__(self, settings: Settings, redis: aioredis.Redis,
                 router: AdapterRouter | None) -> None:
        self._redis = redis
        self._keys = Keys(settings.namespace)
        self._store = SkillStore(redis, self._keys, settings.stream_maxlen)
        self._router = router
        self._known_tenants = set(settings.api_keys.values())
        self._redactor = Redactor(settings.redact_patterns)
        self._scored = ScoredTail(SCORED_WINDOW, self._redactor)
        self._lock = asyncio.Lock()

    async def data(self, tenant: str | None) -> dict[str, Any]:
        keys = self._keys
        async with self._lock:  # two refreshes at once must not add the same entries twice
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xrevrange(keys.stream(SCORED), min=self._scored.min_id,
                               count=SCORED_WINDOW)
                pipe.xrevrange(keys.stream(WEIGHTS), count=WEIGHTS_WINDOW)
                for name in STREAMS:
                    pipe.xlen(keys.stream(name))
                    pipe.xlen(keys.dead(name))
                    pipe.xinfo_groups(keys.stream(name))
                replies = await pipe.execute(raise_on_error=False)
            for reply in replies[:2]:
                if isinstance(reply, Exception):
                    raise reply
            self._scored.add(replies[0])
        scored = scored_summary(self._scored.rows, tenant)
        queues = []
        for i, name in enumerate(STREAMS):
            length, dead, groups = replies[2 + 3 * i: 5 + 3 * i]
            if isinstance(length, Exception) or isinstance(dead, Exception):
                raise length if isinstance(length, Exception) else dead
            # XINFO GROUPS fails on a stream nobody created yet: no groups.
            rows = [] if isinstance(groups, Exception) else [_group_row(g) for g in groups]
            queues.append({"stream": name, "key": keys.stream(name), "length": length,
                           "dead_letters": dead, "groups": rows})
        skill_tenants = await self._store.tenants()
        seen = {row["tenant"] for row in self._scored.rows}
        tenants = sorted(self._known_tenants | set(skill_tenants) | seen)
        return {"object": "dashboard", "namespace": keys.namespace, "tenant": tenant,
                "tenants": [t for t in tenants if t], "scored_window": SCORED_WINDOW,
                "reward": {k: scored[k] for k in ("points", "count", "mean")},
                "turns": scored["turns"], "weights": weights_summary(replies[1], self._router),
                "skills": await self._skills(tenant, skill_tenants), "queues": queues}

    async def _skills(self, tenant: str | None, tenants: list[str]) -> list[dict[str, Any]]:
        chosen = [tenant] if tenant is not None else tenants[:MAX_TENANTS]
        rows = [skill_row(s, self._redactor) for t in chosen for s in await self._store.list(t)]
        order = {status: i for i, status in enumerate(STATUS_ORDER)}
        return sorted(rows, key=lambda r: (order[r["status"]], r["tenant"], r["name"]))


def _tenant_param(tenant: str | None) -> str | None:
    if tenant is None or tenant == "":
        return None
    try:
        return check_tenant(tenant)
    except InvalidSkill as exc:
        raise APIError(400, exc.message, code="invalid_value", param="tenant") from None


def _asset(name: str) -> bytes:
    return (STATIC_DIR / name).read_bytes()


def add_dashboard_routes(app: FastAPI, settings: Settings, redis: aioredis.Redis,
                         router: AdapterRouter | None) -> None:
    """Mount the page (open: it holds no data) and its data route (admin key)."""
    auth = AdminAuth(settings)
    dashboard = Dashboard(settings, redis, router)
    page = _asset("dashboard.html")
    assets = {name: (_asset(name), media) for name, media in STATIC_FILES.items()}

    async def guard(request: Request) -> None:
        auth(request.headers)

    @app.get(PAGE_PATH)
    async def dashboard_page() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)

    @app.get(PAGE_PATH + "/static/{name}")
    async def dashboard_asset(name: str) -> Response:
        if name not in assets:
            raise APIError(404, f"No dashboard file {name!r}.", code="not_found")
        body, media = assets[name]
        return Response(body, media_type=media, headers=SECURITY_HEADERS)

    data_routes = APIRouter(prefix=PAGE_PATH, dependencies=[Depends(guard)])

    @data_routes.get("/data")
    async def dashboard_data(tenant: str | None = None) -> Response:
        try:
            body = await dashboard.data(_tenant_param(tenant))
        except (RedisError, OSError):
            raise APIError(503, "Redis is unreachable; the dashboard will retry.",
                           code="service_unavailable", headers={"Retry-After": "1"}) from None
        return Response(orjson.dumps(body), media_type="application/json",
                        headers={"Cache-Control": "no-store"})

    app.include_router(data_routes)
