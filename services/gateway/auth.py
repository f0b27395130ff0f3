"""Bearer API keys, each mapped to a tenant; keys are held only as SHA-256 hashes.

Three scopes, three kinds of key: inference keys (``api_keys``) open the OpenAI routes
(chat, models, feedback) of their own tenant; the admin key (``admin_key``, see
``admin``) opens ``/admin`` and nothing else; the metrics key (``metrics_key``) opens
``/metrics``. An inference key is refused on ``/admin`` (403), and the admin key is not an
inference key unless it is also listed in ``api_keys``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.gateway.errors import APIError
from services.gateway.ratelimit import RateLimiter
from shared.metrics import METRICS_KEY_REFUSED, MetricsAuth
from shared.settings import DEV_TENANT as DEV_TENANT  # re-exported: the gateway's name
from shared.settings import Settings, hash_api_key


@dataclass(frozen=True, slots=True)
class Caller:
    tenant: str
    key_hash: str


class Authenticator:
    """Maps a request's bearer key to its tenant, and applies the key's rate limit."""

    def __init__(self, settings: Settings) -> None:
        self._tenants = dict(settings.api_keys)
        self._open = settings.profile == "dev" and not self._tenants
        self.limiter = RateLimiter(settings)
        self._limited = self.limiter.enabled

    def __call__(self, headers: Mapping[str, str]) -> Caller:
        """The caller, or a 401 (or 429) in OpenAI's shape.

        The key is never compared itself: its SHA-256 digest is looked up, so what the
        lookup's timing could reveal is bits of a digest, which say nothing about a key
        (the same reasoning as comparing HMACs in constant time)."""
        caller = self._caller(headers)
        if self._limited:
            self.limiter.check(caller.key_hash, caller.tenant)
        return caller

    def _caller(self, headers: Mapping[str, str]) -> Caller:
        header = headers.get("authorization")
        if not header or header[:7].lower() != "bearer ":
            if self._open:
                return Caller(DEV_TENANT, "anonymous")
            raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        digest = hash_api_key(header[7:].strip())
        tenant = self._tenants.get(digest)
        if tenant is None:
            if self._open:
                return Caller(DEV_TENANT, digest)
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        return Caller(tenant, digest)


def check_metrics(auth: MetricsAuth, headers: Mapping[str, str]) -> None:
    """A 401 unless the request carries the metrics key (or none is configured)."""
    if not auth.allows(headers.get("authorization")):
        raise APIError(401, METRICS_KEY_REFUSED, code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
