"""The policy server's Prometheus metrics, served on its own ``/metrics`` (metrics key).

An ASGI middleware counts every request by route and status and times it; the adapter
routes count loads and unloads (``action`` ``load``/``unload``), and so does the replica's
follower of the ``weights`` stream (``follow``/``follow_unload``, outcome ``ok`` or
``failed``); gauges say whether the model is ready, how many adapters are loaded and how
many tenants' newest adapter is failing to load here. Labels are route templates and
outcomes, never content.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
"""Seconds per request: a CPU sample of a few dozen tokens takes seconds."""
ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/load_lora_adapter",
                    "/v1/unload_lora_adapter", "/v1/models"})
"""Routes counted by name; anything else is ``other`` (no unbounded label values)."""


@dataclass(frozen=True)
class PolicyMetrics:
    registry: CollectorRegistry
    requests: Counter
    request_seconds: Histogram
    adapter_changes: Counter
    adapters_loaded: Gauge
    adapters_failing: Gauge
    ready: Gauge

    @classmethod
    def create(cls) -> PolicyMetrics:
        reg = CollectorRegistry()
        return cls(
            registry=reg,
            requests=Counter("reef_policy_requests_total", "Requests by route and status.",
                             ["route", "status"], registry=reg),
            request_seconds=Histogram("reef_policy_request_seconds",
                                      "Time to the whole answer, by route.", ["route"],
                                      buckets=_BUCKETS, registry=reg),
            adapter_changes=Counter("reef_policy_adapter_changes_total",
                                    "LoRA adapter loads and unloads by outcome.",
                                    ["action", "outcome"], registry=reg),
            adapters_loaded=Gauge("reef_policy_adapters_loaded", "LoRA adapters in memory.",
                                  registry=reg),
            adapters_failing=Gauge(
                "reef_policy_adapters_failing",
                "Tenants whose newest published adapter failed to load on this replica "
                "(retried with backoff; /readyz answers 503 meanwhile).", registry=reg),
            ready=Gauge("reef_policy_ready",
                        "1 once the model (or the Tinker sampler) is loaded.", registry=reg),
        )


class CountRequests:
    """Counts and times every HTTP request (the status is read from the response)."""

    def __init__(self, app: ASGIApp, metrics: PolicyMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in ("/metrics", "/healthz", "/readyz"):
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status = 500
        started = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.request_seconds.labels(route).observe(time.perf_counter() - started)
