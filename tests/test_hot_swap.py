"""Hot swap through the gateway: weights events -> adapter loaded upstream -> routed."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import openai
import pytest
import redis

from services.stack.rollback import RollbackError, rollback
from shared.keys import WEIGHTS, Keys
from shared.messages import WeightsEventV1
from shared.settings import Settings
from tests.conftest import RedisServer
from tests.fake_upstream import FakeUpstream
from tests.gateway_proc import API_KEY, GatewayProcess
from tests.test_gateway import wait_turn


def publish(client: redis.Redis, namespace: str, version: int, path: str = "/ckpt",
            batch_at: float = 0.0) -> None:
    event = WeightsEventV1(tenant="*", adapter=f"reef-v{version}", version=version,
                           path=f"{path}/v{version}", step=version, batch_at=batch_at)
    client.xadd(Keys(namespace).stream(WEIGHTS), event.to_fields())  # type: ignore[arg-type]


def wait_for(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_new_weights_are_loaded_then_routed_and_the_old_ones_unloaded(
        redis_server: RedisServer, upstream: FakeUpstream, tmp_path) -> None:  # type: ignore[no-untyped-def]
    client = redis_server.client()
    publish(client, "swap", 1, batch_at=time.time() - 3600)  # live before the start
    gw = GatewayProcess(redis_server.url, upstream.base_url, "swap", tmp_path,
                        env={"REEF_ADAPTER_UNLOAD_GRACE_SECONDS": "0.3",
                             "REEF_ADAPTER_NAME": "reef"})
    gw.start()
    try:
        chat = openai.OpenAI(base_url=gw.url + "/v1", api_key=API_KEY, max_retries=0)
        wait_for(lambda: "reef-v1" in upstream.adapters)

        def ask(model: str, session: str) -> str:
            chat.chat.completions.create(model=model, extra_headers={"X-Session-Id": session},
                                         messages=[{"role": "user", "content": "hi"}])
            return str(upstream.requests[-1]["model"])

        wait_for(lambda: ask("reef", "warm") == "reef-v1")
        assert ask("fake-text", "other-model") == "fake-text"  # other models untouched
        (turn,) = wait_turn(redis_server, "warm", namespace="swap")
        assert turn.policy_version == "reef-v1" and turn.request_model == "reef"

        publish(client, "swap", 2, path="/missing")  # the upstream refuses it: v1 stays
        publish(client, "swap", 3, batch_at=time.time() - 2)
        wait_for(lambda: ask("reef", "after") == "reef-v3")
        # From the batch to live, measured for v3 only (v1 was a start-up catch-up).
        assert gw.metric("reef_gateway_weights_live_seconds_count") == 1
        assert 2 <= gw.metric("reef_gateway_weights_live_seconds_sum") < 60
        assert ("load", "reef-v2") in upstream.adapter_calls
        wait_for(lambda: ("unload", "reef-v1") in upstream.adapter_calls)
        assert gw.metric("reef_gateway_live_adapter_version") == 3

        # An admin rolls back to v1: loaded again, routed again.
        settings = Settings(profile="dev", namespace="swap", redis_url=redis_server.url,
                            shared_adapter=True)  # these events are of the shared "reef"
        with pytest.raises(RollbackError, match="known: \\[1, 2, 3\\]"):
            rollback(client, settings, 7)
        rollback(client, settings, 1)
        wait_for(lambda: ask("reef", "rolled-back") == "reef-v1")
        assert upstream.adapters["reef-v1"] == "/ckpt/v1"
    finally:
        gw.stop()


@pytest.fixture
def direct_gateway(redis_server: RedisServer, upstream: FakeUpstream, namespace: str,
                   tmp_path) -> Iterator[GatewayProcess]:  # type: ignore[no-untyped-def]
    """A gateway told its upstream is a plain vLLM: it loads adapters itself."""
    gw = GatewayProcess(redis_server.url, upstream.base_url, namespace, tmp_path,
                        env={"REEF_ADAPTER_UNLOAD_GRACE_SECONDS": "0.2",
                             "REEF_ADAPTER_NAME": "reef", "REEF_UPSTREAM_KIND": "vllm",
                             "REEF_UPSTREAM_TIMEOUT_SECONDS": "30"})
    gw.start()
    yield gw
    gw.stop()


def asker(gw: GatewayProcess, upstream: FakeUpstream) -> Callable[[], str]:
    chat = openai.OpenAI(base_url=gw.url + "/v1", api_key=API_KEY, max_retries=0)

    def ask() -> str:
        """The model the upstream was asked for, for one request for ``reef``."""
        chat.chat.completions.create(model="reef", messages=[{"role": "user", "content": "hi"}])
        return str(upstream.requests[-1]["model"])

    return ask


def test_a_refused_load_is_tried_again_until_it_works(
        direct_gateway: GatewayProcess, redis_server: RedisServer, upstream: FakeUpstream,
        namespace: str) -> None:
    ask = asker(direct_gateway, upstream)
    upstream.refuse_loads = 2  # the upstream is busy for the first two tries
    publish(redis_server.client(), namespace, 11)
    wait_for(lambda: ask() == "reef-v11", timeout=20)
    assert upstream.adapter_calls.count(("load", "reef-v11")) == 3
    failed = direct_gateway.metric('reef_gateway_adapter_swaps_total{outcome="load_failed"}')
    assert failed == 2


def test_the_replaced_adapter_is_unloaded_once_the_requests_on_it_ended(
        direct_gateway: GatewayProcess, redis_server: RedisServer, upstream: FakeUpstream,
        namespace: str) -> None:
    """Not after a set time: a stream on the old adapter outlives the grace period."""
    ask = asker(direct_gateway, upstream)
    client = redis_server.client()
    publish(client, namespace, 12, path="/ckpt/slow")  # its answers stream for ~2 s
    wait_for(lambda: ask() == "reef-v12")
    chat = openai.OpenAI(base_url=direct_gateway.url + "/v1", api_key=API_KEY, max_retries=0)
    stream = chat.chat.completions.create(model="reef", stream=True,
                                          messages=[{"role": "user", "content": "hi"}])
    chunks = [next(stream)]
    publish(client, namespace, 13)
    wait_for(lambda: ask() == "reef-v13")
    chunks += list(stream)  # the stream on v12 ends well after the swap and the grace ...
    assert chunks[-1].model == "reef-v12" and chunks[-1].choices[-1].finish_reason
    assert ("unload", "reef-v12") not in upstream.adapter_calls  # ... and v12 outlived it
    wait_for(lambda: ("unload", "reef-v12") in upstream.adapter_calls)
