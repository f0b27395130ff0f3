"""The rules of the hot swap across replicas, as pure functions (no I/O): which adapter a
gateway routes to, what a replica keeps loaded, what a turn records about sampling."""

from __future__ import annotations

from services.gateway.assemble import sampling_fields
from services.policy.replica import wanted_adapters
from shared.adapter_registry import ReplicaEntry, routable
from shared.messages import WeightsEventV1
from shared.weights_log import WeightsLog


def event(tenant: str, version: int, adapter: str | None = None) -> WeightsEventV1:
    return WeightsEventV1(id=f"{tenant}-{version}-{adapter}", tenant=tenant,
                          adapter=adapter or f"reef-{tenant}-v{version}", version=version,
                          path=f"/data/{tenant}/v{version}")


def replica(name: str, *adapters: str) -> ReplicaEntry:
    return ReplicaEntry(name, "base-model", frozenset(adapters))


def test_the_log_keeps_stream_order_and_a_rollback_moves_its_version_first() -> None:
    log = WeightsLog()
    for version in (1, 2, 3):
        assert log.apply(event("a", version))
    assert not log.apply(event("a", 3))  # the same event again: nothing new
    rollback = WeightsEventV1(id="a-rollback", tenant="a", adapter="reef-a-v1", version=1,
                              path="/data/a/v1")
    log.apply(rollback)
    assert [e.adapter for e in log.candidates("a")] == ["reef-a-v1", "reef-a-v3", "reef-a-v2"]
    assert log.owner("reef-a-v2") == "a" and log.event_for("reef-a-v1") == rollback


def test_a_gateway_routes_to_the_newest_adapter_every_replica_holds() -> None:
    log = WeightsLog()
    for version in (1, 2, 3):
        log.apply(event("a", version))
    candidates = log.candidates("a")
    both = [replica("r1", "reef-a-v1", "reef-a-v2", "reef-a-v3"),
            replica("r2", "reef-a-v1", "reef-a-v2")]
    assert (routable(candidates, both) or candidates[0]).adapter == "reef-a-v2"  # v3: not on r2
    assert (routable(candidates, both[:1]) or candidates[-1]).adapter == "reef-a-v3"
    assert routable(candidates, [replica("r3")]) is None  # nothing everywhere: keep
    assert routable(candidates, []) is None  # no replica registered: keep


def test_a_replica_keeps_the_newest_what_is_routable_and_what_gateways_use() -> None:
    log = WeightsLog()
    for version in (1, 2, 3, 4):
        log.apply(event("a", version))
    log.apply(event("b", 1))
    replicas = [replica("r1", "reef-a-v2", "reef-a-v3", "reef-b-v1"),
                replica("r2", "reef-a-v2", "reef-b-v1")]
    wanted = wanted_adapters(log, replicas, used={"reef-a-v1"})
    # a: v4 newest, v2 held by every replica (what gateways may route to), v1 still used
    # by a gateway; v3 (on one replica only, superseded) is not wanted. b: its only one.
    assert set(wanted) == {"reef-a-v4", "reef-a-v2", "reef-a-v1", "reef-b-v1"}
    assert wanted_adapters(WeightsLog(), replicas, {"reef-a-v1"}) == {}  # unknown: ignored


def test_a_turn_records_what_the_upstream_stated_over_what_was_asked() -> None:
    stated = ('{"logprobs_kind": "processed", "temperature": 0.7, "top_p": 1.0, "top_k": 0,'
              ' "seed": 3, "greedy": false}')
    body = {"temperature": 0.5, "top_p": 0.9, "seed": 9}
    assert sampling_fields(body, stated) == {
        "logprobs_kind": "processed", "temperature": 0.7, "top_p": 1.0, "top_k": 0,
        "seed": 3, "greedy": False}
    # An upstream that says nothing: the request's own values, the kind unknown.
    assert sampling_fields(body, None) == {
        "logprobs_kind": None, "temperature": 0.5, "top_p": 0.9, "top_k": None, "seed": 9,
        "greedy": False}
    assert sampling_fields({"temperature": 0}, None)["greedy"] is True
    assert sampling_fields({"top_k": 1}, "not json")["greedy"] is True
    # Values of the wrong type never make a turn invalid.
    odd = sampling_fields({"temperature": "hot", "top_k": 2.5, "seed": True},
                          '{"logprobs_kind": "tempered", "greedy": "yes"}')
    assert odd == {"logprobs_kind": None, "temperature": None, "top_p": None, "top_k": None,
                   "seed": None, "greedy": False}
