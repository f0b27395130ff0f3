"""The gateway's Prometheus metrics (prefix ``reef_gateway_``, small fixed label sets)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SWAP_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
"""Seconds from a full batch to its adapter live: a local CPU step takes seconds to a
minute, a Tinker step longer."""
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0, 120.0)

_SKILL_COUNT_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12)
_RETRIEVAL_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


@dataclass(frozen=True)
class GatewayMetrics:
    """Every metric the gateway exports, registered on one registry."""

    registry: CollectorRegistry
    requests: Counter
    request_seconds: Histogram
    upstream_errors: Counter
    turns_recorded: Counter
    turns_spooled: Counter
    turns_replayed: Counter
    turns_lost: Counter
    recorder_queue: Gauge
    spool_bytes: Gauge
    adapter_swaps: Counter
    live_version: Gauge
    policy_replicas: Gauge
    adapters_waiting: Gauge
    weights_live_seconds: Histogram
    skills_injected: Histogram
    skill_retrieval_seconds: Histogram
    skill_retrieval_mode: Gauge
    skills_indexed: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> GatewayMetrics:
        """Metrics on ``registry`` (a fresh one by default, so tests never collide)."""
        reg = registry or CollectorRegistry()
        return cls(
            registry=reg,
            requests=Counter("reef_gateway_requests_total", "Chat requests answered.",
                             ["stream", "status"], registry=reg),
            request_seconds=Histogram("reef_gateway_request_seconds",
                                      "Time to the whole answer.", ["stream"],
                                      buckets=_LATENCY_BUCKETS, registry=reg),
            upstream_errors=Counter("reef_gateway_upstream_errors_total",
                                    "Upstream failures by kind.", ["kind"], registry=reg),
            turns_recorded=Counter("reef_gateway_turns_recorded_total",
                                   "Turns appended to the turns stream.", registry=reg),
            turns_spooled=Counter("reef_gateway_turns_spooled_total",
                                  "Turns written to the local spool (Redis down).",
                                  registry=reg),
            turns_replayed=Counter("reef_gateway_turns_replayed_total",
                                   "Spooled turns sent to Redis once it was back.",
                                   registry=reg),
            turns_lost=Counter("reef_gateway_turns_lost_total",
                               "Turns neither recorded nor spooled (spool unwritable).",
                               registry=reg),
            recorder_queue=Gauge("reef_gateway_recorder_queue",
                                 "Turns waiting in memory for the recorder.", registry=reg),
            spool_bytes=Gauge("reef_gateway_spool_bytes", "Size of the local spool file.",
                              registry=reg),
            adapter_swaps=Counter("reef_gateway_adapter_swaps_total",
                                  "New adapters by outcome (ok: routed to; load_failed: a load "
                                  "on a vllm upstream failed, retried; bad_event).",
                                  ["outcome"], registry=reg),
            live_version=Gauge("reef_gateway_live_adapter_version",
                               "Version of the adapter new requests are routed to.",
                               registry=reg),
            policy_replicas=Gauge(
                "reef_gateway_policy_replicas",
                "Live policy replicas in the adapter registry (upstream_kind reef).",
                registry=reg),
            adapters_waiting=Gauge(
                "reef_gateway_adapters_waiting",
                "Tenants whose newest published adapter is not routed to yet (not held by "
                "every policy replica yet, upstream_kind reef).", registry=reg),
            weights_live_seconds=Histogram(
                "reef_gateway_weights_live_seconds",
                "From the trainer taking a full batch to the adapter it trained serving new "
                "requests here (training, saving, the gate, publishing, loading).",
                buckets=_SWAP_BUCKETS, registry=reg),
            skills_injected=Histogram("reef_gateway_skills_injected",
                                      "Skills injected per main turn (use_skills on).",
                                      buckets=_SKILL_COUNT_BUCKETS, registry=reg),
            skill_retrieval_seconds=Histogram(
                "reef_gateway_skill_retrieval_seconds",
                "Skill retrieval per main turn of a tenant with skills (query embedding "
                "included).", buckets=_RETRIEVAL_BUCKETS, registry=reg),
            skill_retrieval_mode=Gauge("reef_gateway_skill_retrieval_mode",
                                       "1 for the retrieval mode in use (embedding, bm25).",
                                       ["mode"], registry=reg),
            skills_indexed=Gauge("reef_gateway_skills_indexed",
                                 "Active skills in this replica's index, all tenants.",
                                 registry=reg),
        )
