"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import orjson
from starlette.responses import Response

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "requests",  # what OpenAI answers for a requests-per-minute limit
}


class APIError(Exception):
    """An error to answer with; raised anywhere in a request, rendered once."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers


def error_body(status: int, message: str, code: str | None = None,
               param: str | None = None) -> bytes:
    """The JSON body of an error answer."""
    return orjson.dumps({"error": {
        "message": message,
        "type": _TYPES.get(status, "api_error"),
        "param": param,
        "code": code,
    }})


def error_response(err: APIError) -> Response:
    """The HTTP answer for an ``APIError``."""
    return Response(error_body(err.status, err.message, err.code, err.param),
                    status_code=err.status, media_type="application/json",
                    headers=err.headers)


def upstream_error(status: int, body: bytes) -> APIError:
    """An upstream's error answer, its status kept; the body in OpenAI's shape."""
    message = f"upstream answered {status}"
    code = None
    param = None
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        err = parsed["error"]
        message = str(err.get("message") or message)
        code = err.get("code") if isinstance(err.get("code"), str) else None
        param = err.get("param") if isinstance(err.get("param"), str) else None
    elif isinstance(parsed, dict) and isinstance(parsed.get("detail"), str):
        message = parsed["detail"]
    elif body:
        message = f"{message}: {body[:200].decode(errors='replace')}"
    return APIError(status, message, code=code, param=param)
