"""The gateway's OpenAPI document (``GET /openapi.json``).

FastAPI describes the routes it serves, but the chat route is a raw ASGI handler in front
of it (``services.gateway.endpoint``) and the feedback and admin routes read their bodies
themselves: this module adds what FastAPI cannot see. The chat request schema follows
what ``services.gateway.request`` checks (limits included); every error answer is
described as OpenAI's ``{"error": {...}}``, which is also what the 400s FastAPI would
call 422 really are. Built once, on the first request for it; nothing here runs on the
chat path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from services.gateway.admin import CreateSkill, EditSkill, ImportBody, StatusChangeBody
from services.gateway.endpoint import CHAT_PATH
from services.gateway.feedback import FEEDBACK_PATH, FeedbackRequest
from services.gateway.request import ROLES, RequestLimits

REF = "#/components/schemas/"
ERROR_STATUSES = {
    "400": "Invalid request: the message and ``param`` name the field.",
    "401": "Missing or incorrect API key.",
    "403": "The key may not do this.",
    "404": "No such route or object.",
    "405": "Method not allowed on this route.",
    "413": "Request body too large.",
    "415": "The body is not declared as JSON.",
    "429": "Rate limit reached; see ``Retry-After``.",
    "500": "Upstream error, passed through.",
    "502": "The upstream failed or answered with garbage.",
    "503": "A dependency (Redis) is unreachable; retry shortly.",
    "504": "The upstream did not answer in time.",
}
"""Error answers any route may give, each with an ``Error`` body."""
BODY_MODELS: dict[tuple[str, str], type[BaseModel]] = {
    (FEEDBACK_PATH, "post"): FeedbackRequest,
    ("/admin/tenants/{tenant}/skills", "post"): CreateSkill,
    ("/admin/tenants/{tenant}/skills/import", "post"): ImportBody,
    ("/admin/tenants/{tenant}/skills/{skill}", "patch"): EditSkill,
    ("/admin/tenants/{tenant}/skills/{skill}/approve", "post"): StatusChangeBody,
    ("/admin/tenants/{tenant}/skills/{skill}/retire", "post"): StatusChangeBody,
}
"""Routes that read their JSON body themselves, and the model that checks it."""
RESPONSE_SCHEMAS = {(FEEDBACK_PATH, "post"): "Feedback", ("/v1/models", "get"): "ModelList"}
"""Answers FastAPI cannot describe (the routes build their JSON themselves)."""
ROUTE_ERRORS = {(FEEDBACK_PATH, "post"): {
    "404": "No such session in the caller's tenant, or no such ``response_id`` or "
           "``turn_index`` in it (``param`` names the field; ``code``: ``not_found``). "
           "Sessions and their answers can be named for ``feedback_window_seconds`` "
           "after their last turn.",
    "403": "The session is another API key's: feedback is taken only from the key that "
           "made its turns, or the tenant's admin key (``code``: ``permission_denied``).",
    "503": "Redis is unreachable, or the gateway is still writing turns to it; retry "
           "shortly (``Retry-After``).",
}}
"""Error answers whose meaning on one route is more specific than ``ERROR_STATUSES``."""


def install_openapi(app: FastAPI, limits: RequestLimits,
                    allowed: Callable[[Mapping[str, str]], None]) -> None:
    """Make ``app.openapi()`` describe the whole gateway, and serve it at ``/openapi.json``
    to callers ``allowed`` lets through (it raises the API's 401 or 403 otherwise): the
    document is for the API's clients, like every route but the health checks."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                                 description=__doc__)
            app.openapi_schema = complete(schema, limits)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_document(request: Request) -> Response:
        allowed(request.headers)
        return Response(orjson.dumps(app.openapi()), media_type="application/json")


def complete(schema: dict[str, Any], limits: RequestLimits) -> dict[str, Any]:
    """FastAPI's document with the chat route, body schemas and OpenAI-shaped errors."""
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas.update(chat_schemas(limits))
    components["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
    schema["security"] = [{"bearerAuth": []}]
    paths = schema.setdefault("paths", {})
    paths[CHAT_PATH] = {"post": chat_operation()}
    for (path, method), model in BODY_MODELS.items():
        operation = paths.get(path, {}).get(method)
        if operation is not None:
            schemas[model.__name__] = model.model_json_schema(ref_template=REF + "{model}")
            operation["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": {"$ref": REF + model.__name__}}}}
    for (path, method), name in RESPONSE_SCHEMAS.items():
        operation = paths.get(path, {}).get(method)
        if operation is not None:
            operation.setdefault("responses", {})["200"] = {
                "description": "OK", "content": {"application/json": {"schema": _ref(name)}}}
    for (path, method), errors in ROUTE_ERRORS.items():
        operation = paths.get(path, {}).get(method)
        if operation is not None:
            _error_responses(operation, errors)
    for item in paths.values():
        for operation in item.values():
            _error_responses(operation)
    return schema


def _error_responses(operation: dict[str, Any],
                     statuses: dict[str, str] = ERROR_STATUSES) -> None:
    responses = operation.setdefault("responses", {})
    responses.pop("422", None)
    error = {"application/json": {"schema": {"$ref": REF + "Error"}}}
    for status, description in statuses.items():
        responses.setdefault(status, {"description": description, "content": error})


def chat_operation() -> dict[str, Any]:
    """``POST /v1/chat/completions``: OpenAI's chat API plus Reef's session headers."""
    header = "header"
    return {
        "operationId": "create_chat_completion",
        "summary": "Create a chat completion (OpenAI-compatible); the turn is recorded.",
        "parameters": [
            {"name": "X-Session-Id", "in": header, "required": False,
             "schema": {"type": "string", "minLength": 1, "maxLength": 256},
             "description": "The session; default: one per API key and ``user``."},
            {"name": "X-Turn-Type", "in": header, "required": False,
             "schema": {"type": "string", "enum": ["main", "side"]}},
            {"name": "X-Session-Done", "in": header, "required": False,
             "schema": {"type": "string", "enum": ["true", "false", "1", "0"]}},
        ],
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": REF + "ChatCompletionRequest"}}}},
        "responses": {"200": {
            "description": "The completion, or with ``stream`` its chunks as SSE events.",
            "headers": {"X-Reef-Session-Id": {"schema": {"type": "string"}}},
            "content": {
                "application/json": {"schema": {"$ref": REF + "ChatCompletion"}},
                # Each event: ``data:`` a ChatCompletionChunk as JSON, last ``[DONE]``.
                "text/event-stream": {"schema": {
                    "type": "object", "required": ["data"],
                    "properties": {"data": {"type": "string",
                                            "contentMediaType": "application/json"},
                                   "event": {"type": "string"}}}},
            }}},
    }


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF + name}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def chat_schemas(limits: RequestLimits) -> dict[str, Any]:
    """The component schemas of the chat route and of errors."""
    text = {"type": "string"}
    content = {"anyOf": [text, {"type": "array", "items": _ref("ContentPart")}]}

    def message(roles: list[str], required: list[str], **fields: Any) -> dict[str, Any]:
        return {"type": "object", "required": ["role", *required],
                "properties": {"role": {"type": "string", "enum": roles},
                               "name": text, **fields}}

    count = {"type": "integer", "minimum": 1}
    return {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["message", "type", "param", "code"],
            "properties": {"message": text, "type": text,
                           "param": _nullable(text), "code": _nullable(text)}}}},
        "ContentPart": {"type": "object", "required": ["type"],
                        "properties": {"type": text, "text": text}},
        "ToolCall": {"type": "object", "required": ["id", "type", "function"],
                     "properties": {
                         "id": text, "type": {"type": "string", "enum": ["function"]},
                         "function": {"type": "object", "required": ["name", "arguments"],
                                      "properties": {"name": {"type": "string",
                                                              "minLength": 1},
                                                     "arguments": text}}}},
        "Tool": {"type": "object", "required": ["type", "function"], "properties": {
            "type": {"type": "string", "enum": ["function"]},
            "function": {"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string", "minLength": 1}, "description": text,
                "parameters": {"type": "object"}}}}},
        "ChatMessage": {"oneOf": [
            message(["system", "developer"], ["content"], content=content),
            message(["user"], ["content"], content=content),
            message(["assistant"], [], content=_nullable(content),
                    tool_calls={"type": "array", "items": _ref("ToolCall")}),
            message(["tool"], ["content", "tool_call_id"], content=content,
                    tool_call_id={"type": "string", "minLength": 1}),
            message(["function"], ["name"], content=_nullable(text)),
        ], "description": f"Roles: {', '.join(sorted(ROLES))}."},
        "ChatCompletionRequest": {
            "type": "object", "required": ["model", "messages"],
            "additionalProperties": True,
            "description": "Fields not listed here are passed to the upstream unchanged.",
            "properties": {
                "model": {"type": "string", "minLength": 1},
                "messages": {"type": "array", "minItems": 1, "items": _ref("ChatMessage")},
                "stream": {"type": "boolean"},
                "stream_options": {"type": "object",
                                   "properties": {"include_usage": {"type": "boolean"}}},
                "n": {**count, "maximum": limits.max_choices},
                "max_tokens": {**count, "maximum": limits.max_output_tokens},
                "max_completion_tokens": {**count, "maximum": limits.max_output_tokens},
                "temperature": {"type": "number", "minimum": 0, "maximum": 2},
                "top_p": {"type": "number", "minimum": 0, "maximum": 1},
                "stop": {"anyOf": [text, {"type": "array", "items": text}]},
                "logprobs": {"type": "boolean"},
                "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
                "tools": {"type": "array", "items": _ref("Tool")},
                "tool_choice": {"anyOf": [{"type": "string",
                                           "enum": ["none", "auto", "required"]},
                                          {"type": "object"}]},
                "user": text,
                "seed": {"type": "integer"},
                "session_id": {"type": "string", "minLength": 1, "maxLength": 256,
                               "description": "Reef: the session (X-Session-Id wins)."},
                "turn_type": {"type": "string", "enum": ["main", "side"]},
                "session_done": {"type": "boolean"},
            }},
        "Feedback": {"type": "object",
                     "required": ["object", "id", "session_id", "target", "score"],
                     "properties": {"object": {"type": "string", "enum": ["feedback"]},
                                    "id": text, "session_id": text, "target": text,
                                    "score": {"type": "number", "minimum": -1,
                                              "maximum": 1}}},
        "ModelList": {"type": "object", "required": ["object", "data"], "properties": {
            "object": {"type": "string", "enum": ["list"]},
            "data": {"type": "array", "items": {
                "type": "object", "required": ["id", "object"],
                "properties": {"id": text, "object": text, "created": {"type": "integer"},
                               "owned_by": text}}}}},
        "ChatCompletion": {"type": "object", "required": ["id", "object", "choices"],
                           "properties": {"id": text, "object": text, "model": text,
                                          "created": {"type": "integer"},
                                          "choices": {"type": "array",
                                                      "items": {"type": "object"}},
                                          "usage": _nullable({"type": "object"})}},
    }
