"""The admin API: a tenant's skill library, behind the admin key.

Every route needs ``Authorization: Bearer <admin_key>`` (``REEF_ADMIN_KEY``), or a
tenant's admin key (``REEF_TENANT_ADMIN_KEYS``) on that tenant's routes: no header or an
unknown key is a 401, an inference key (one of ``api_keys``) or a tenant's admin key
elsewhere a 403, and with no admin key configured every route answers 403 "admin API
disabled": the API is never open.
Routes act on the tenant named in the path; a skill is named by its id (``sk_...``) or
its name. Errors come in OpenAI's shape: 400 naming the field, 404 unknown skill, 409
duplicate name, 503 Redis unreachable.

=========================================================  ================================
``GET    /admin/tenants``                                     tenants with skills
``GET    /admin/tenants/{tenant}/skills?status=``             list (with credit)
``POST   /admin/tenants/{tenant}/skills``                     create: ``name``,
                                                              ``description``, ``body``,
                                                              ``category``?, ``status``?
``GET    /admin/tenants/{tenant}/skills/{skill}``             one, with history and credit
``PATCH  /admin/tenants/{tenant}/skills/{skill}``             edit (a new version):
                                                              ``description``?, ``body``?,
                                                              ``category``?, ``reason``?
``DELETE /admin/tenants/{tenant}/skills/{skill}``             delete
``POST   /admin/tenants/{tenant}/skills/{skill}/approve``     status active (``reason``?)
``POST   /admin/tenants/{tenant}/skills/{skill}/retire``      status retired (``reason``?)
``GET    /admin/tenants/{tenant}/skills/export?status=``      SKILL.md files as JSON
``POST   /admin/tenants/{tenant}/skills/import``              SKILL.md files as JSON
``POST   /admin/tenants/{tenant}/skills/starter``             install the starter set
=========================================================  ================================

Export answers, and import takes, the files of a SKILL.md directory as JSON::

    {"object": "skill_files", "tenant": "t", "files": [
        {"path": "answer-first/SKILL.md", "content": "---\\nname: answer-first\\n..."}]}

Import also takes ``"status"`` (for files that name none; default ``candidate``) and
answers ``{"object": "skill_import", "created": [...], "updated": [...],
"unchanged": [...]}`` (names). A malformed file fails the whole import with a 400 whose
message names the file; nothing is written then.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Literal, TypeVar

import orjson
import redis.asyncio as aioredis
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.routing import APIRoute
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.exceptions import RedisError
from starlette.responses import Response

from services.gateway.errors import APIError
from services.gateway.request import parse_json, read_limited
from shared.keys import Keys
from shared.settings import Settings, hash_api_key
from shared.skill_files import SkillFile, SkillFileError, import_skills, parse_entry, render
from shared.skill_store import (
    STATUSES,
    InvalidSkill,
    SkillExists,
    SkillNotFound,
    SkillStatusCollector,
    SkillStore,
    check_tenant,
)
from shared.skills import Provenance, Skill, SkillStatus
from shared.starter_skills import install_starter

ADMIN_PREFIX = "/admin"
MAX_BODY_BYTES = 16 * 1024 * 1024
"""An import of a few hundred SKILL.md files fits many times over."""
M = TypeVar("M", bound=BaseModel)


class AdminAuth:
    """Checks the admin key; keys are compared as SHA-256 digests, in constant time."""

    def __init__(self, settings: Settings) -> None:
        key = settings.admin_key.get_secret_value() if settings.admin_key else ""
        self._digest = hash_api_key(key) if key else None
        self._inference = frozenset(settings.api_keys)
        self._tenant_keys = dict(settings.tenant_admin_keys)

    def __call__(self, headers: Mapping[str, str], tenant: str | None = None) -> None:
        """Allow the admin key anywhere, a tenant's admin key (``tenant_admin_keys``) on
        that tenant's routes only (``tenant`` is the route's; None on routes over every
        tenant); raise a 401 or 403 otherwise."""
        if self._digest is None and not self._tenant_keys:
            raise APIError(403, "The admin API is disabled: set admin_key (REEF_ADMIN_KEY) "
                                "to enable it.", code="admin_api_disabled")
        header = headers.get("authorization")
        if not header or header[:7].lower() != "bearer ":
            raise APIError(401, "Missing admin key: send 'Authorization: Bearer <admin key>'.",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        digest = hash_api_key(header[7:].strip())
        if self._digest is not None and hmac.compare_digest(digest, self._digest):
            return
        scoped = self._tenant_keys.get(digest)
        if scoped is not None:
            if scoped == tenant:
                return
            raise APIError(403, "This admin key is for one tenant's routes "
                                "(/admin/tenants/<its tenant>/...) only.",
                           code="permission_denied")
        if digest in self._inference:
            raise APIError(403, "This is an inference API key; the admin API needs the "
                                "admin key.", code="permission_denied")
        raise APIError(401, "Incorrect admin key provided.", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


class CreateSkill(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    name: str
    description: str
    body: str
    category: str = "general"
    status: Literal["candidate", "active", "retired"] = "candidate"


class EditSkill(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    description: str | None = None
    body: str | None = None
    category: str | None = None
    reason: str = Field("edited by admin", min_length=1)


class StatusChangeBody(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    reason: str | None = Field(None, min_length=1)


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    path: str
    content: str


class ImportBody(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    files: list[FileEntry]
    status: Literal["candidate", "active", "retired"] = "candidate"


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def skill_json(skill: Skill) -> dict[str, Any]:
    """A skill as the API shows it: every field, plus the credit means."""
    out = {"object": "skill", **skill.model_dump(mode="json")}
    out["credit"].update(with_mean=skill.credit.with_mean,
                         without_mean=skill.credit.without_mean)
    return out


async def _read_model(request: Request, model: type[M], optional: bool = False) -> M:
    """The JSON body as ``model``; a 400 naming the first bad field."""
    raw = await read_limited(request.stream(), MAX_BODY_BYTES)
    data: dict[str, Any] = {} if optional and not raw.strip() else parse_json(raw)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or "body"
        if err["type"] == "missing":
            raise APIError(400, f"Missing required parameter: '{param}'.",
                           code="invalid_value", param=param) from None
        raise APIError(400, f"Invalid '{param}': {err['msg']}.", code="invalid_value",
                       param=param) from None


def _status_param(status: str | None) -> SkillStatus | None:
    if status is None or status == "":
        return None
    for known in STATUSES:
        if status == known:
            return known
    raise APIError(400, f"Invalid 'status': one of {', '.join(STATUSES)}.",
                   code="invalid_value", param="status")


class SkillsAdmin:
    """The route handlers; each maps store errors to API errors."""

    def __init__(self, store: SkillStore) -> None:
        self.store = store

    async def find(self, tenant: str, ref: str) -> Skill:
        skill = await self.store.resolve(tenant, ref)
        if skill is None:
            raise APIError(404, f"No skill {ref!r} in tenant {tenant!r}.",
                           code="skill_not_found", param="skill")
        return skill

    async def export(self, tenant: str, status: SkillStatus | None) -> dict[str, Any]:
        skills = await self.store.list(tenant, status)
        files = [{"path": SkillFile.of(s).path, "content": render(s)} for s in skills]
        return {"object": "skill_files", "tenant": tenant, "files": files}

    async def import_files(self, tenant: str, body: ImportBody) -> dict[str, Any]:
        files: list[SkillFile] = []
        for i, entry in enumerate(body.files):
            try:
                files.append(parse_entry(entry.path, entry.content))
            except SkillFileError as exc:
                raise APIError(400, str(exc), code="invalid_skill_file",
                               param=f"files.{i}") from None
        names = [f.name for f in files]
        if len(set(names)) != len(names):
            raise APIError(400, "Two files name the same skill.", code="invalid_value",
                           param="files")
        report = await import_skills(self.store, tenant, files, default_status=body.status)
        return {"object": "skill_import", **report.as_dict()}


def _api_error(exc: Exception) -> APIError:
    if isinstance(exc, InvalidSkill):
        return APIError(400, exc.message, code="invalid_value", param=exc.field)
    if isinstance(exc, SkillExists):
        return APIError(409, str(exc), code="skill_exists", param="name")
    if isinstance(exc, SkillNotFound):
        return APIError(404, f"No skill {exc.args[0]!r} in this tenant.",
                        code="skill_not_found", param="skill")
    return APIError(503, "The skill library's Redis is unreachable. Please retry shortly.",
                    code="service_unavailable", headers={"Retry-After": "1"})


class _AdminRoute(APIRoute):
    """A route whose store errors become API errors (only on admin routes: a Redis error
    elsewhere in the gateway keeps its own handling)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except (InvalidSkill, SkillExists, SkillNotFound, RedisError, OSError) as exc:
                raise _api_error(exc) from None

        return run


def add_admin_routes(app: FastAPI, settings: Settings, redis: aioredis.Redis,
                     registry: CollectorRegistry) -> None:
    """Mount the admin API on ``app`` and the ``reef_skills`` gauge on ``registry``."""
    auth = AdminAuth(settings)
    store = SkillStore(redis, Keys(settings.namespace), settings.stream_maxlen)
    registry.register(SkillStatusCollector(store))
    admin = SkillsAdmin(store)

    async def guard(request: Request) -> None:
        tenant = request.path_params.get("tenant")
        auth(request.headers, tenant)
        if tenant is not None:
            try:
                check_tenant(tenant)
            except InvalidSkill as exc:
                raise APIError(400, exc.message, code="invalid_value", param="tenant") from None

    router = APIRouter(prefix=ADMIN_PREFIX, dependencies=[Depends(guard)],
                       route_class=_AdminRoute)
    _routes(router, admin)
    app.include_router(router)


def _routes(router: APIRouter, admin: SkillsAdmin) -> None:
    store = admin.store
    base = "/tenants/{tenant}/skills"

    @router.get("/tenants")
    async def tenants() -> Response:
        return _json({"object": "list", "data": await store.tenants()})

    @router.get(base)
    async def list_skills(tenant: str, status: str | None = None) -> Response:
        skills = await store.list(tenant, _status_param(status))
        return _json({"object": "list", "data": [skill_json(s) for s in skills]})

    @router.post(base)
    async def create(tenant: str, request: Request) -> Response:
        req = await _read_model(request, CreateSkill)
        skill = await store.create(tenant, name=req.name, description=req.description,
                                   body=req.body, category=req.category, status=req.status,
                                   provenance=Provenance(source="admin"))
        return _json(skill_json(skill), 201)

    @router.get(base + "/export")
    async def export(tenant: str, status: str | None = None) -> Response:
        return _json(await admin.export(tenant, _status_param(status)))

    @router.post(base + "/import")
    async def import_(tenant: str, request: Request) -> Response:
        return _json(await admin.import_files(tenant, await _read_model(request, ImportBody)))

    @router.post(base + "/starter")
    async def starter(tenant: str) -> Response:
        report = await install_starter(store, tenant)
        return _json({"object": "skill_import", **report.as_dict()})

    @router.get(base + "/{skill}")
    async def show(tenant: str, skill: str) -> Response:
        return _json(skill_json(await admin.find(tenant, skill)))

    @router.patch(base + "/{skill}")
    async def edit(tenant: str, skill: str, request: Request) -> Response:
        req = await _read_model(request, EditSkill)
        if req.description is None and req.body is None and req.category is None:
            raise APIError(400, "Nothing to change: give 'description', 'body' or "
                                "'category'.", code="invalid_value", param="body")
        found = await admin.find(tenant, skill)
        updated = await store.update(tenant, found.id, description=req.description,
                                     body=req.body, category=req.category, reason=req.reason,
                                     provenance=Provenance(source="admin"))
        return _json(skill_json(updated))

    @router.delete(base + "/{skill}")
    async def delete(tenant: str, skill: str) -> Response:
        found = await admin.find(tenant, skill)
        await store.delete(tenant, found.id)
        return _json({"object": "skill.deleted", "id": found.id, "deleted": True})

    @router.post(base + "/{skill}/approve")
    async def approve(tenant: str, skill: str, request: Request) -> Response:
        req = await _read_model(request, StatusChangeBody, optional=True)
        found = await admin.find(tenant, skill)
        changed = await store.set_status(tenant, found.id, "active",
                                         req.reason or "approved by admin")
        return _json(skill_json(changed))

    @router.post(base + "/{skill}/retire")
    async def retire(tenant: str, skill: str, request: Request) -> Response:
        req = await _read_model(request, StatusChangeBody, optional=True)
        found = await admin.find(tenant, skill)
        changed = await store.set_status(tenant, found.id, "retired",
                                         req.reason or "retired by admin")
        return _json(skill_json(changed))
