"""The policy server on Tinker sampling clients, as the gateway's upstream.

The Tinker cloud cannot be reached here, so the SDK's ``ServiceClient`` and
``SamplingClient`` are in-process fakes with the SDK's method signatures (checked against
the installed SDK) that take and return the SDK's own types and futures. Everything else
is real: the policy server over HTTP, the gateway process in front of it, Redis, the
official ``openai`` client, and a real (tiny, word-level) Hugging Face tokenizer with a
chat template.
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import redis

tinker = pytest.importorskip("tinker")

from tinker import types as ttypes  # noqa: E402
from tinker.lib.public_interfaces.api_future import AwaitableConcurrentFuture  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from services.policy import tinker_engine  # noqa: E402
from services.policy.app import create_app  # noqa: E402
from shared.keys import WEIGHTS, Keys  # noqa: E402
from shared.messages import WeightsEventV1  # noqa: E402
from shared.settings import Settings  # noqa: E402
from tests.conftest import RedisServer, free_port  # noqa: E402
from tests.gateway_proc import API_KEY, GatewayProcess  # noqa: E402
from tests.test_gateway import wait_turn  # noqa: E402
from tests.threaded_server import ThreadedServer  # noqa: E402

MODEL = "Qwen/Qwen3-4B-Instruct-2507"
NS = "tinkerpolicy"
WORDS = ["<unk>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant", "You", "are",
         "helpful.", "What", "is", "the", "capital", "of", "France?", "Paris", "It", "STOP",
         "x"]
TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} "
            "<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> assistant "
            "{% endif %}")
SAMPLER_PATH = "tinker://run-7/sampler_weights/step-000001"


def tokenizer() -> PreTrainedTokenizerFast:
    """A real fast tokenizer: whitespace-split words, a ChatML-like chat template."""
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>",
                                  eos_token="<|im_end|>")
    tok.chat_template = TEMPLATE
    return tok


def ids(text: str) -> list[int]:
    return [WORDS.index(w) for w in text.split()]


def done(value: Any) -> AwaitableConcurrentFuture[Any]:
    from concurrent.futures import Future

    future: Future[Any] = Future()
    future.set_result(value)
    return AwaitableConcurrentFuture(future)


class FakeSampler:
    """A sampling client: the base model answers "Paris", the adapter "It is Paris"."""

    def __init__(self, cloud: FakeService, name: str) -> None:
        self.cloud = cloud
        self.name = name

    def sample(self, prompt: ttypes.ModelInput, num_samples: int,
               sampling_params: ttypes.SamplingParams, include_prompt_logprobs: bool = False,
               topk_prompt_logprobs: int = 0, topk_sample_logprobs: int = 0,
               target_prompt_logprobs: ttypes.TensorData | None = None,
               prompt_alt_tokens_k: int = 0, prompt_logprobs_last_n: int | None = None) -> Any:
        self.cloud.calls.append(("sample", self.name, prompt.to_ints(), sampling_params,
                                 num_samples))
        answer = ids("Paris <|im_end|>" if self.name == "base" else "It is Paris STOP x")
        sequences = [ttypes.SampledSequence(
            stop_reason="stop", sequence_id=f"{self.name}-{i}",
            tokens_np=np.array(answer, dtype=np.int32),
            logprobs_np=np.array([-0.5 - 0.25 * j for j in range(len(answer))],
                                 dtype=np.float32))
            for i in range(num_samples)]
        return done(ttypes.SampleResponse(sequences=sequences))

    def compute_logprobs(self, prompt: ttypes.ModelInput,
                         prompt_logprobs_last_n: int | None = None) -> Any:
        tokens = prompt.to_ints()
        self.cloud.calls.append(("compute_logprobs", self.name, tokens))
        return done([None, *(-0.1 * t for t in tokens[1:])])


class FakeService:
    """A ``ServiceClient``: sampling clients for the base model or a sampler path."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def create_sampling_client(self, model_path: str | None = None,
                               base_model: str | None = None, retry_config: Any = None,
                               record_stability_info: bool = False) -> Any:
        self.calls.append(("create_sampling_client", model_path, base_model))
        return done(FakeSampler(self, "base" if base_model else str(model_path)))


@pytest.mark.parametrize(("fake", "real", "method"), [
    (FakeService, tinker.ServiceClient, "create_sampling_client"),
    (FakeSampler, tinker.SamplingClient, "sample"),
    (FakeSampler, tinker.SamplingClient, "compute_logprobs"),
])
def test_fakes_have_the_sdk_signatures(fake: type, real: type, method: str) -> None:
    def shape(cls: type) -> list[tuple[str, Any, Any]]:
        params = inspect.signature(getattr(cls, method)).parameters.values()
        return [(p.name, p.kind, p.default) for p in params]
    assert shape(fake) == shape(real)


@pytest.fixture(scope="module")
def cloud() -> FakeService:
    return FakeService()


@pytest.fixture(scope="module")
def policy(cloud: FakeService, redis_server: RedisServer) -> Iterator[str]:
    """The policy server as a replica following the test's weights stream."""
    settings = Settings(profile="dev", policy_backend="tinker", model_name=MODEL,
                        tinker_context_length=64, tinker_timeout_seconds=5,
                        redis_url=redis_server.url, namespace=NS,
                        adapter_registry_interval_seconds=0.1)
    tok = tokenizer()

    def load(s: Settings, served: str) -> tinker_engine.TinkerServing:
        return tinker_engine.load(s, served, service_factory=lambda _: cloud,
                                  tokenizer_factory=lambda name: tok)

    port = free_port()
    server = ThreadedServer(create_app(settings, tinker_load=load), port, "tinker-policy")
    server.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while httpx.get(url + "/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the Tinker policy server never got ready"
        time.sleep(0.05)
    yield url
    server.stop()


@pytest.fixture(scope="module")
def gateway(redis_server: RedisServer, policy: str,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(redis_server.url, policy + "/v1", NS, tmp_path_factory.mktemp("gw"),
                        env={"REEF_ADAPTER_NAME": "reef", "REEF_REQUEST_LOGPROBS": "true",
                             "REEF_REQUEST_TOKEN_IDS": "true",
                             "REEF_ADAPTER_UNLOAD_GRACE_SECONDS": "0.2"})
    gw.start()
    yield gw
    gw.stop()


def ask(gw: GatewayProcess, session: str, stream: bool = False) -> tuple[str, str]:
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=API_KEY, max_retries=0)
    messages: Any = [{"role": "system", "content": "You are helpful."},
                     {"role": "user", "content": "What is the capital of France?"}]
    headers = {"X-Session-Id": session}
    if stream:
        text, model = "", ""
        for chunk in client.chat.completions.create(
                model="reef", messages=messages, stream=True, max_tokens=8, temperature=0.7,
                stop=["STOP"], extra_headers=headers):
            model = chunk.model
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
        return text, model
    reply = client.chat.completions.create(model="reef", messages=messages, max_tokens=8,
                                           temperature=0.7, stop=["STOP"],
                                           extra_headers=headers)
    return reply.choices[0].message.content or "", reply.model


def test_the_gateway_samples_from_tinker_and_records_the_exact_tokens(
        gateway: GatewayProcess, cloud: FakeService, redis_server: RedisServer) -> None:
    assert ("create_sampling_client", None, MODEL) in cloud.calls
    text, model = ask(gateway, "tk-1")
    assert text == "Paris" and model == MODEL
    _, sampler, prompt, params, n = next(c for c in reversed(cloud.calls) if c[0] == "sample")
    rendered = ids("<|im_start|> system You are helpful. <|im_end|> <|im_start|> user What is "
                   "the capital of France? <|im_end|> <|im_start|> assistant")
    assert (sampler, prompt, n) == ("base", rendered, 1)
    assert (params.max_tokens, params.temperature, params.stop) == (8, 0.7, ["STOP"])
    (turn,) = wait_turn(redis_server, "tk-1", namespace=NS)
    assert turn.sampled is not None
    assert turn.sampled.token_ids == ids("Paris <|im_end|>")
    assert turn.sampled.logprobs == [-0.5, -0.75]
    assert turn.sampled.prompt_token_ids == rendered
    assert turn.policy_version == "base"
    # What Tinker's logprobs are of is not documented: recorded as unknown, with the
    # sampling the request asked for (no top-k cut: -1 for Tinker).
    assert (turn.sampled.logprobs_kind, turn.sampled.temperature, turn.sampled.top_p,
            turn.sampled.top_k, turn.sampled.greedy) == (None, 0.7, 1.0, 0, False)
    assert params.top_k == -1

    streamed, _ = ask(gateway, "tk-2", stream=True)
    assert streamed == "Paris"


def test_published_tinker_weights_are_swapped_in(
        gateway: GatewayProcess, cloud: FakeService, redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    stream = Keys(NS).stream(WEIGHTS)
    refused = WeightsEventV1(tenant="*", adapter="reef-v1", version=1, path="/local/dir",
                             step=1)
    client.xadd(stream, refused.to_fields())  # type: ignore[arg-type]
    event = WeightsEventV1(tenant="*", adapter="reef-v2", version=2, path=SAMPLER_PATH, step=2)
    client.xadd(stream, event.to_fields())  # type: ignore[arg-type]
    deadline = time.monotonic() + 15
    while (answer := ask(gateway, f"tk-swap-{time.monotonic_ns()}"))[1] != "reef-v2":
        assert time.monotonic() < deadline, f"still answered by {answer[1]}"
        time.sleep(0.1)
    assert answer[0] == "It is Paris "  # cut at the stop string the sampler stopped on
    assert ("create_sampling_client", SAMPLER_PATH, None) in cloud.calls
    assert not any(c[0] == "create_sampling_client" and c[1] == "/local/dir"
                   for c in cloud.calls)  # refused by the server, never sent to Tinker
    session = f"tk-v2-{time.monotonic_ns()}"
    ask(gateway, session)
    (turn,) = wait_turn(redis_server, session, namespace=NS)
    assert turn.policy_version == "reef-v2"
    assert turn.sampled is not None and turn.sampled.token_ids == ids("It is Paris STOP x")
    client.close()


def test_scoring_uses_compute_logprobs(policy: str, cloud: FakeService) -> None:
    tokens = ids("What is the capital of France?")
    reply = httpx.post(policy + "/v1/completions", json={
        "model": MODEL, "prompt": tokens, "echo": True, "logprobs": 1, "max_tokens": 0})
    assert reply.status_code == 200, reply.text
    values = reply.json()["choices"][0]["logprobs"]["token_logprobs"]
    assert values == [None, *(pytest.approx(-0.1 * t) for t in tokens[1:])]
    assert cloud.calls[-1] == ("compute_logprobs", "base", tokens)


def test_a_local_path_is_refused_and_tinker_failures_keep_the_server_unready(
        policy: str) -> None:
    reply = httpx.post(policy + "/v1/load_lora_adapter",
                       json={"lora_name": "x", "lora_path": "/tmp/adapter"})
    assert reply.status_code == 400 and "tinker://" in reply.json()["error"]["message"]

    def failing(s: Settings, served: str) -> tinker_engine.TinkerServing:
        raise ConnectionError("tinker unreachable")

    port = free_port()
    settings = Settings(profile="dev", policy_backend="tinker", model_name=MODEL,
                        policy_follow_weights=False)
    server = ThreadedServer(create_app(settings, tinker_load=failing), port, "failing")
    server.start()
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 5
        while "tinker unreachable" not in (body := httpx.get(url + "/readyz").text):
            assert time.monotonic() < deadline, body
            time.sleep(0.05)
        chat = httpx.post(url + "/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "x"}]})
        assert chat.status_code == 503
        assert json.loads(chat.text)["error"]["code"] == "model_not_ready"
    finally:
        server.stop()


def test_metrics_need_the_metrics_key(cloud: FakeService) -> None:
    prod: dict[str, Any] = {"profile": "prod", "policy_backend": "tinker", "model_name": MODEL,
                            "upstream_api_key": "sk-gateway-key",
                            "api_keys": {"sk-some-client-key": "t"},
                            "policy_follow_weights": False}
    settings = Settings(**prod, metrics_key="policy-metrics-key-1")
    with pytest.raises(ValueError, match="metrics_key"):
        create_app(Settings(**prod))
    port = free_port()
    server = ThreadedServer(create_app(settings, tinker_load=lambda s, n: tinker_engine.load(
        s, n, service_factory=lambda _: cloud, tokenizer_factory=lambda _: tokenizer())),
        port, "policy-metrics")
    server.start()
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        assert httpx.get(url).status_code == 401
        wrong = httpx.get(url, headers={"Authorization": "Bearer sk-gateway-key"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        ok = httpx.get(url, headers={"Authorization": "Bearer policy-metrics-key-1"})
        assert ok.status_code == 200 and "reef_policy_requests_total" in ok.text
    finally:
        server.stop()


def test_settings_name_the_backend(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="policy_backend"):
        Settings(profile="dev", policy_backend="vllm")  # type: ignore[arg-type]
