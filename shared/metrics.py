"""Prometheus metrics of the stream workers, and the ``/metrics`` endpoint a worker serves.

Names follow one scheme: prefix ``reef_``, base units, ``_total`` only on counters, and
small fixed label sets (stream, group, outcome) - never message or entry ids.

Metric objects are created once per ``CollectorRegistry`` and shared by every worker that
uses it (workers differ by their labels), so several workers can live in one process; tests
pass a registry of their own.
"""

from __future__ import annotations

import hmac
import json
import socketserver
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from threading import Lock, Thread
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    make_wsgi_app,
)

from shared.settings import ConfigError, Settings, hash_api_key

OUTCOME_PROCESSED = "processed"
"""The handler returned and the entry was acked."""
OUTCOME_FAILED = "failed"
"""The handler raised; the entry stays pending and will be redelivered."""
OUTCOME_DUPLICATE = "duplicate"
"""The message id was handled before (a redelivery or a replay); acked without handling."""
OUTCOME_DEAD_LETTERED = "dead_lettered"
"""The entry went to the dead-letter stream (invalid, rejected, or out of deliveries)."""

HANDLER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Handler durations span cheap bookkeeping to multi-vote LLM judging."""


@dataclass(frozen=True, slots=True)
class WorkerMetrics:
    """The metric families every stream worker reports into (labelled per worker)."""

    entries: Counter
    reclaimed: Counter
    handler_duration: Histogram
    pending: Gauge
    lag: Gauge
    dead_letters: Gauge
    lost: Counter
    trimmed: Counter
    over_cap: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> WorkerMetrics:
        """Register the families in ``registry`` (once per registry: see ``worker_metrics``)."""
        labels = ("stream", "group")
        return cls(
            entries=Counter(
                "reef_worker_entries_total",
                "Stream entries settled or attempted, by outcome "
                "(processed, failed, duplicate, dead_lettered).",
                (*labels, "outcome"), registry=registry),
            reclaimed=Counter(
                "reef_worker_reclaimed_total",
                "Entries taken over from an idle consumer with XAUTOCLAIM.",
                labels, registry=registry),
            handler_duration=Histogram(
                "reef_worker_handler_duration_seconds",
                "Time spent in the message handler, by outcome (processed, failed).",
                (*labels, "outcome"), buckets=HANDLER_BUCKETS, registry=registry),
            pending=Gauge(
                "reef_worker_pending_entries",
                "Entries delivered to the group and not yet acked (XPENDING).",
                labels, registry=registry),
            lag=Gauge(
                "reef_worker_lag_entries",
                "Entries in the stream not yet delivered to the group (XINFO GROUPS lag).",
                labels, registry=registry),
            dead_letters=Gauge(
                "reef_worker_dead_letter_entries",
                "Entries in the stream's dead-letter stream (XLEN <stream>:dead), waiting "
                "for someone to look at them.",
                ("stream",), registry=registry),
            lost=Counter(
                "reef_stream_entries_lost_total",
                "Entries removed from the stream before the group handled them: deleted "
                "while pending, or trimmed (by the producers' hard cap) before delivery.",
                labels, registry=registry),
            trimmed=Counter(
                "reef_stream_trimmed_entries_total",
                "Entries the stream workers trimmed, every group having finished them.",
                ("stream",), registry=registry),
            over_cap=Gauge(
                "reef_stream_over_cap_entries",
                "Entries beyond stream_maxlen that stay because this group has not "
                "finished them (the workers do not trim them; 0 for the other groups).",
                labels, registry=registry),
        )


_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, WorkerMetrics] = (
    weakref.WeakKeyDictionary()
)
_by_registry_lock = Lock()


def worker_metrics(registry: CollectorRegistry | None = None) -> WorkerMetrics:
    """The worker metric families of ``registry`` (default: the process-wide one),
    registered on first use. Registering the same names twice would raise, hence the cache."""
    target = REGISTRY if registry is None else registry
    with _by_registry_lock:
        metrics = _by_registry.get(target)
        if metrics is None:
            metrics = WorkerMetrics.create(target)
            _by_registry[target] = metrics
        return metrics


class MetricsAuth:
    """The ``metrics_key`` check: ``Authorization: Bearer <metrics_key>``, compared as
    SHA-256 digests in constant time. Without a key every request is allowed (the dev
    profile only: elsewhere ``require_metrics_key`` refuses to start)."""

    def __init__(self, settings: Settings) -> None:
        key = settings.metrics_key.get_secret_value() if settings.metrics_key else ""
        self._digest = hash_api_key(key) if key else None

    def allows(self, authorization: str | None) -> bool:
        """Whether a request with this ``Authorization`` header may read metrics."""
        if self._digest is None:
            return True
        if not authorization or authorization[:7].lower() != "bearer ":
            return False
        return hmac.compare_digest(hash_api_key(authorization[7:].strip()), self._digest)


def require_metrics_key(settings: Settings, service: str) -> None:
    """Refuse to serve metrics without a key outside the dev profile (a ``ConfigError``
    naming the setting)."""
    if settings.profile != "dev" and settings.metrics_key is None:
        raise ConfigError(f"{service} serves /metrics but metrics_key (REEF_METRICS_KEY) is "
                          "not set: set the key Prometheus sends as a bearer token, or use "
                          "REEF_PROFILE=dev")


_WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
_HEALTHY = b'{"status":"ok"}'


class Health:
    """Whether a service is healthy, for ``/healthz``: it turns unhealthy for good once a
    task of the service failed (the process is on its way out, non-zero)."""

    def __init__(self) -> None:
        self._failure: str | None = None

    def fail(self, reason: str) -> None:
        """Mark the service failed (the first reason is kept)."""
        if self._failure is None:
            self._failure = reason

    @property
    def failure(self) -> str | None:
        """Why the service failed, or None while it is healthy."""
        return self._failure

    def body(self) -> tuple[str, bytes]:
        """The status line and JSON body ``/healthz`` answers."""
        if self._failure is None:
            return "200 OK", _HEALTHY
        return "503 Service Unavailable", json.dumps(
            {"status": "failed", "reason": self._failure[:200]}).encode()

METRICS_KEY_REFUSED = ("Missing or incorrect metrics key: send 'Authorization: Bearer "
                       "<metrics_key>'.")
"""The message of every service's 401 on ``/metrics`` (OpenAI's shape, ``invalid_api_key``)."""
_UNAUTHORIZED = json.dumps({"error": {
    "message": METRICS_KEY_REFUSED, "type": "invalid_request_error", "param": None,
    "code": "invalid_api_key"}}).encode()


def _guarded(app: _WSGIApp, auth: MetricsAuth, health: Health) -> _WSGIApp:
    """``app`` behind the metrics key: a 401 in OpenAI's error shape without it.
    ``/healthz`` stays open (a probe needs no key); it is a 503 once ``health`` failed."""

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            status, body = health.body()
            start_response(status, [("Content-Type", "application/json"),
                                    ("Content-Length", str(len(body)))])
            return [body]
        if auth.allows(environ.get("HTTP_AUTHORIZATION")):
            return app(environ, start_response)
        start_response("401 Unauthorized", [("Content-Type", "application/json"),
                                            ("Content-Length", str(len(_UNAUTHORIZED))),
                                            ("WWW-Authenticate", "Bearer")])
        return [_UNAUTHORIZED]

    return guarded


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No access log (a scrape every few seconds)."""


def serve_metrics(
    settings: Settings, registry: CollectorRegistry | None = None, addr: str = "0.0.0.0",
    health: Health | None = None,
) -> tuple[WSGIServer, Thread] | None:
    """Serve ``/metrics`` on ``settings.metrics_port`` in a background thread, behind
    ``metrics_key`` (``Authorization: Bearer <metrics_key>``, else a 401); ``/healthz``
    answers anyone: 200, or a 503 once ``health`` failed.

    Returns the server and its thread (``server.shutdown()`` stops it), or None when the
    port is 0. ``addr`` defaults to every interface because Prometheus scrapes workers
    from another container; metrics carry no content and no ids. (Outside the dev profile
    ``Settings`` refuses a ``metrics_port`` without a ``metrics_key``.)
    """
    if settings.metrics_port <= 0:
        return None
    app = _guarded(make_wsgi_app(REGISTRY if registry is None else registry),
                   MetricsAuth(settings), health or Health())
    server = make_server(addr, settings.metrics_port, app, _ThreadingServer,
                         handler_class=_QuietHandler)
    thread = Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    return server, thread
