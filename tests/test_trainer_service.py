"""The trainer service on a real (tiny) model: scored turns in, steps and weights out,
each turn trained at most once, also across a SIGKILL mid-step."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import redis.asyncio as aioredis
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from services.trainer.local import LocalBackend
from services.trainer.metrics import TrainerMetrics
from services.trainer.samples import Sample, to_sample
from services.trainer.service import Trainer
from shared.keys import SCORED, WEIGHTS, Keys
from shared.messages import ScoredV1, TokenLogprobs, TurnV1, WeightsEventV1, decode
from shared.settings import Settings
from tests.conftest import RedisServer, free_port
from tests.service_proc import ServiceProcess


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def scored_turn(i: int, reward: float, version: str = "base") -> ScoredV1:
    prompt = [1, 5 + i % 3, 9, 11]  # three prompt groups
    completion = [20 + (i * 7) % 30, 21 + i % 5, 2]
    turn = TurnV1(id=f"{1000 + i:06d}-turn", tenant="t", session_id=f"s{i}", turn_index=0,
                  request_model="m", upstream_model="m", policy_version=version,
                  messages=[{"role": "user", "content": "x"}],
                  response_message={"role": "assistant", "content": "y"},
                  sampled=TokenLogprobs(token_ids=completion, logprobs=[-3.0, -2.5, -1.0],
                                        prompt_token_ids=prompt))
    return ScoredV1(id=turn.id, turn=turn, reward=reward, trainable=True)


def settings_for(namespace: str, redis_url: str, model: Path, data_dir: Path,
                 **extra: Any) -> Settings:
    fields: dict[str, Any] = {"gate_enabled": False, "batch_size": 4, "lora_rank": 4,
                              "lora_alpha": 8, "learning_rate": 1e-2, **extra}
    return Settings(profile="dev", namespace=namespace, redis_url=redis_url,
                    model_name=str(model), data_dir=data_dir, **fields)


def weights_events(client: redis.Redis, namespace: str) -> list[WeightsEventV1]:
    out = []
    for _, fields in client.xrange(Keys(namespace).stream(WEIGHTS)):
        msg = decode(fields)
        assert isinstance(msg, WeightsEventV1)
        out.append(msg)
    return out


async def test_steps_publish_weights_and_never_retrain_a_turn(
        redis_server: RedisServer, namespace: str, tiny_model: Path, tmp_path: Path) -> None:
    settings = settings_for(namespace, redis_server.url, tiny_model, tmp_path)
    client = aioredis.from_url(redis_server.url)
    backend = LocalBackend(settings, tiny_model, tmp_path / "state")
    trainer = Trainer(settings, client, backend, TrainerMetrics.create())
    batch = [scored_turn(i, 1.0 if i % 2 else -1.0) for i in range(8)]
    for message in batch + batch[:3]:  # redeliveries change nothing
        await trainer.on_scored(message, "0-0")
    stopping = asyncio.Event()
    task = asyncio.create_task(trainer.run(stopping))
    deadline = time.monotonic() + 60
    while trainer.ledger.version < 2:
        assert time.monotonic() < deadline and not task.done()
        await asyncio.sleep(0.05)
    for message in batch:  # already trained: never buffered again
        await trainer.on_scored(message, "0-0")
    await asyncio.sleep(0.6)
    stopping.set()
    await task
    events = weights_events(redis_server.client(), namespace)
    assert [e.version for e in events] == [1, 2] and events[1].adapter == "reef-v2"
    assert (Path(events[1].path) / "adapter_config.json").is_file()
    assert events[0].metrics["datums"] == 4 and "loss" in events[0].metrics
    assert await client.hlen(Keys(namespace).trainer("reef", "buffer")) == 0
    assert trainer.ledger.version == 2
    await client.aclose()


def perturb_lora(backend: Any) -> None:
    """Non-zero LoRA B weights: the adapter changes the logits (a fresh one does not)."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in backend.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


async def test_rl_kl_to_base_trains_even_a_batch_of_equal_rewards(
        redis_server: RedisServer, namespace: str, tiny_model: Path, tmp_path: Path) -> None:
    plain = settings_for(namespace, redis_server.url, tiny_model, tmp_path)
    with_kl = settings_for(namespace + "-kl", redis_server.url, tiny_model, tmp_path / "kl",
                           kl_base_coef=0.5)
    client = aioredis.from_url(redis_server.url)
    try:
        for settings, steps in ((plain, 0), (with_kl, 1)):
            metrics = TrainerMetrics.create()
            trainer = Trainer(settings, client, LocalBackend(
                settings, tiny_model, settings.data_dir / "state"), metrics)
            trainer.backend.start()
            perturb_lora(trainer.backend)  # a policy that differs from the base
            # The adapter's running baseline is 1: rewards at it carry no signal.
            await client.hset(trainer.baseline_key, mapping={"mean": "1.0", "steps": "5"})
            batch = [scored_turn(i, 1.0) for i in range(4)]  # all equal: no reward signal
            for message in batch:
                await trainer.on_scored(message, "0-0")
            samples = await trainer._next_batch()
            assert samples is not None
            await trainer.step(samples)
            assert trainer.ledger.version == steps
            events = weights_events(redis_server.client(), settings.namespace)
            assert len(events) == steps
        # The (perturbed) policy's logprobs differ from the base's: a KL estimate.
        kl = metrics.registry.get_sample_value("reef_trainer_kl")
        assert kl is not None and kl != 0.0
        assert events[0].metrics["datums"] == 4
    finally:
        await client.aclose()


async def test_stale_samples_are_dropped(redis_server: RedisServer, namespace: str,
                                         tiny_model: Path, tmp_path: Path) -> None:
    settings = settings_for(namespace, redis_server.url, tiny_model, tmp_path, max_staleness=1)
    client = aioredis.from_url(redis_server.url)
    trainer = Trainer(settings, client, LocalBackend(settings, tiny_model, tmp_path / "st"),
                      TrainerMetrics.create())
    trainer.ledger.lineage = [0, 1, 2, 3, 4, 5]  # v5 is live
    for i in range(4):
        await trainer.on_scored(scored_turn(i, float(i), version="reef-v3"), "0-0")
    assert await trainer._next_batch() is None  # all four are 2 versions behind
    assert await client.hlen(Keys(namespace).trainer("reef", "buffer")) == 0
    for i in range(4, 8):  # one version behind: fresh
        await trainer.on_scored(scored_turn(i, float(i), version="reef-v4"), "0-0")
    fresh = await trainer._next_batch()
    assert fresh is not None and len(fresh) == 4
    await client.aclose()


def test_sigkill_mid_step_resumes_and_trains_each_turn_once(
        redis_server: RedisServer, namespace: str, tiny_model: Path, tmp_path: Path) -> None:
    client = redis_server.client()
    keys = Keys(namespace)
    for i in range(16):
        client.xadd(keys.stream(SCORED), scored_turn(i, [1.0, -1.0, 0.5, 0.0][i % 4])
                    .to_fields())  # type: ignore[arg-type]
    port = free_port()
    env = {"REEF_PROFILE": "dev", "REEF_NAMESPACE": namespace, "REEF_REDIS_URL": redis_server.url,
           "REEF_MODEL_NAME": str(tiny_model), "REEF_BATCH_SIZE": "4", "REEF_LORA_RANK": "4",
           "REEF_METRICS_PORT": str(port), "REEF_WORKER_BLOCK_MS": "200",
           "REEF_MAX_STALENESS": "10", "REEF_GATE_ENABLED": "false",
           "REEF_SHARED_ADAPTER": "true"}  # the adapter "reef", on tenant t's turns
    proc = ServiceProcess("services.trainer", env, tmp_path, port, "/metrics")
    proc.start(timeout=60)
    state = keys.trainer("reef", "state")
    deadline = time.monotonic() + 60
    while not client.hexists(state, "inflight"):  # kill it with a step in flight
        assert time.monotonic() < deadline, "no step started"
        time.sleep(0.005)
    proc.kill()
    proc.start(timeout=60)
    try:
        deadline = time.monotonic() + 90
        while len(weights_events(client, namespace)) < 4:
            assert time.monotonic() < deadline, "training did not finish after the restart"
            time.sleep(0.1)
        time.sleep(1.0)
        events = weights_events(client, namespace)
        assert [e.version for e in events] == [1, 2, 3, 4]  # no step lost, none repeated
        assert client.hlen(keys.trainer("reef", "buffer")) == 0
        trained = client.keys(keys.trained("reef", "*"))
        assert len(trained) == 16
    finally:
        proc.stop()


def turn_with(i: int, completion: list[int], reward: float) -> ScoredV1:
    base = scored_turn(i, reward)
    sampled = TokenLogprobs(token_ids=completion, logprobs=[-3.0] * len(completion),
                            prompt_token_ids=[1, 5, 9, 11])
    return base.model_copy(update={"turn": base.turn.model_copy(update={"sampled": sampled})})


GOOD, BAD = [30, 31, 32], [40, 41, 42]


async def test_the_gate_refuses_a_regression_and_passes_an_improvement(
        redis_server: RedisServer, namespace: str, tiny_model: Path, tmp_path: Path) -> None:
    """Held-out turns say GOOD answers are rewarded and BAD ones are not. A batch that
    rewards BAD is refused (the live adapter stays); one that rewards GOOD goes live."""
    settings = settings_for(namespace, redis_server.url, tiny_model, tmp_path,
                            gate_enabled=True, gate_holdout_every=1, learning_rate=5e-2,
                            gate_max_shift=100.0)
    client = aioredis.from_url(redis_server.url)
    trainer = Trainer(settings, client, LocalBackend(settings, tiny_model, tmp_path / "g"),
                      TrainerMetrics.create())
    await trainer.start()
    for i in range(8):  # every turn is held out (gate_holdout_every=1) ...
        await trainer.on_scored(turn_with(i, GOOD if i % 2 else BAD, 1.0 if i % 2 else -1.0),
                                "0-0")
    assert await client.hlen(Keys(namespace).trainer("reef", "holdout")) == 8

    def batch(reward_good: float, start: int) -> list[Sample]:
        return [to_sample(turn_with(start + i, GOOD if i % 2 else BAD,
                                    reward_good if i % 2 else -reward_good), "reef")
                for i in range(4)]

    await trainer.step(batch(-1.0, 100))  # ... and this batch teaches the opposite
    assert weights_events(redis_server.client(), namespace) == []
    refusal = await client.hget(Keys(namespace).trainer("reef", "state"), "gate_refusal")
    assert refusal is not None and b"regression" in refusal
    for _ in range(3):
        await trainer.step(batch(1.0, 200))
        if weights_events(redis_server.client(), namespace):
            break
    (event,) = weights_events(redis_server.client(), namespace)
    assert event.metrics["gate_candidate_score"] >= event.metrics["gate_live_score"] - 0.05
    await client.aclose()


def organic_turn(i: int, reward: float, **sampling: Any) -> ScoredV1:
    """A turn whose prompt no other turn shares (organic traffic); ``sampling``: what the
    sampler recorded about how it sampled."""
    turn = TurnV1(id=f"{2000 + i:06d}-organic", tenant="t", session_id=f"o{i}", turn_index=0,
                  request_model="m", upstream_model="m", policy_version="base",
                  messages=[{"role": "user", "content": "x"}],
                  response_message={"role": "assistant", "content": "y"},
                  sampled=TokenLogprobs(token_ids=[20 + i, 30, 2], logprobs=[-3.0, -2.5, -1.0],
                                        prompt_token_ids=[1, 5 + i, 9, 11], **sampling))
    return ScoredV1(id=turn.id, turn=turn, reward=reward, trainable=True)


async def test_greedy_and_raw_tempered_turns_are_counted_and_never_buffered(
        redis_server: RedisServer, namespace: str, tiny_model: Path, tmp_path: Path) -> None:
    settings = settings_for(namespace, redis_server.url, tiny_model, tmp_path)
    client = aioredis.from_url(redis_server.url)
    metrics = TrainerMetrics.create()
    trainer = Trainer(settings, client, LocalBackend(settings, tiny_model, tmp_path / "st"),
                      metrics)
    await trainer.on_scored(organic_turn(0, 1.0, logprobs_kind="processed", temperature=0.0,
                                         greedy=True), "0-0")
    await trainer.on_scored(organic_turn(1, 1.0, logprobs_kind="raw", temperature=0.8), "0-0")
    await trainer.on_scored(organic_turn(2, 1.0, logprobs_kind="processed", temperature=0.8,
                                         top_p=0.95), "0-0")

    def fate(name: str) -> float | None:
        return metrics.registry.get_sample_value("reef_trainer_samples_total", {"fate": name})

    assert (fate("greedy"), fate("raw_logprobs"), fate("buffered")) == (1.0, 1.0, 1.0)
    buffered = await client.hgetall(trainer.buffer_key)
    assert [Sample(**orjson.loads(v)).behaviour for v in buffered.values()] == ["processed"]
    await client.aclose()


async def test_the_running_baseline_moves_once_per_committed_step_and_survives_a_restart(
        redis_server: RedisServer, namespace: str, tiny_model: Path, tmp_path: Path) -> None:
    settings = settings_for(namespace, redis_server.url, tiny_model, tmp_path,
                            baseline_decay=0.5)
    client = aioredis.from_url(redis_server.url)
    metrics = TrainerMetrics.create()
    trainer = Trainer(settings, client, LocalBackend(settings, tiny_model, tmp_path / "st"),
                      metrics)
    trainer.backend.start()
    key = Keys(namespace).trainer("reef", "baseline")
    rounds = [[1.0, 0.5, 0.0, -0.5], [1.0, 1.0, 1.0, 0.5]]
    for n, rewards in enumerate(rounds):
        for i, reward in enumerate(rewards):
            await trainer.on_scored(organic_turn(4 * n + i, reward), "0-0")
        batch = await trainer._next_batch()
        assert batch is not None
        await trainer.step(batch)
    events = weights_events(redis_server.client(), namespace)
    # step 1: no baseline yet (0): |1|, |0.5|, |0|, |-0.5| -> 0.5; it becomes the mean, 0.25
    # step 2: |1 - 0.25| x3, |0.5 - 0.25| -> 0.625; then 0.5 * 0.25 + 0.5 * 0.875 = 0.5625
    assert [e.metrics["advantage_abs_mean"] for e in events] == pytest.approx([0.5, 0.625])
    assert await client.hgetall(key) == {b"mean": b"0.5625", b"steps": b"2"}
    assert metrics.registry.get_sample_value("reef_trainer_reward_baseline") == 0.5625
    restarted = Trainer(settings, client, trainer.backend, TrainerMetrics.create())
    for i, reward in enumerate([0.5625, 0.5625, 0.5625, 1.5625]):
        await restarted.on_scored(organic_turn(8 + i, reward), "0-0")
    batch = await restarted._next_batch()
    assert batch is not None
    datums, advs = await restarted._datums(batch)
    assert advs == pytest.approx([0.0, 0.0, 0.0, 1.0]) and len(datums) == 1
    # token_mean: 1.0 / (3 tokens x 4 samples) on each completion token
    assert datums[0].advantages[-3:] == pytest.approx([1 / 12] * 3)
    await client.aclose()
