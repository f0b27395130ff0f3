"""Malformed entries in every stream a Reef worker consumes.

Garbage fields, a schema version nobody knows, invalid JSON, missing fields, wrong types,
binary junk, nesting deeper than the parser allows, a valid message of the wrong kind,
and values that validate as JSON but cannot be used: each ends in the stream's
dead-letter stream with a reason (or, for the gateway's event followers, which have no
consumer group, is skipped with a logged error), and the worker goes on to process the
valid entry sent after it. Real processes for the scorer, the skill-miner and the
gateway; the trainer's consumer runs in-process on a tiny model, as its own tests do.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from services.trainer.local import LocalBackend
from services.trainer.metrics import TrainerMetrics
from services.trainer.service import Trainer
from shared.keys import (
    FINALISED,
    GROUP_JUDGE,
    GROUP_SCORER,
    GROUP_SKILL_MINER,
    GROUP_TRAINER,
    SCORED,
    SKILLS,
    TURNS,
    WEIGHTS,
    Keys,
)
from shared.messages import FinalisedV1, Message, ScoredV1, SkillEventV1, WeightsEventV1
from shared.settings import Settings
from shared.worker import Reject, StreamWorker
from tests.conftest import RedisServer
from tests.fake_llm import FakeLLM
from tests.fake_upstream import FakeUpstream
from tests.gateway_proc import API_KEY, GatewayProcess
from tests.service_proc import ServiceProcess, scorer_process
from tests.test_scorer import conversation, wait_scored
from tests.test_skill_injection import store_call
from tests.test_skill_miner import FILE_SKILL, answer, llm_server, miner_process, skills_of
from tests.test_skill_miner import scored as scored_turn_for_miner
from tests.test_trainer_service import scored_turn, settings_for, tiny_model

__all__ = ["llm_server", "tiny_model"]  # fixtures, imported for this module's tests

Junk = tuple[str, dict[bytes, bytes], str]
"""(what it is, the stream entry's fields, a phrase its dead-letter reason must hold)"""


def junk_for(valid: Message) -> list[Junk]:
    """Malformed entries shaped after ``valid`` (a message of the stream's kind)."""
    kind = valid.kind.encode()
    data = orjson.dumps(valid.model_dump(mode="json"))
    return [
        ("garbage fields", {b"foo": b"bar", b"\x00": b"\xff\xfe"}, "lacks 'kind' or 'data'"),
        ("wrong schema version", {b"kind": kind.replace(b".v1", b".v9"), b"data": data},
         "unknown message kind"),
        ("invalid JSON", {b"kind": kind, b"data": data[:-7]}, "Invalid JSON"),
        ("missing fields", {b"kind": kind, b"data": b'{"kind": "' + kind + b'"}'},
         "Field required"),
        ("wrong types", {b"kind": kind, b"data": orjson.dumps(
            {**orjson.loads(data), "id": ["x"], "created_at": "yesterday"})},
         "Input should be"),
        ("binary junk", {b"kind": b"\xff\xfe\x00\x01", b"data": b"\x89PNG\r\n\x1a\n\x00\xff"},
         "unknown message kind"),
        ("binary data", {b"kind": kind, b"data": bytes(range(256))}, "Invalid JSON"),
        ("JSON not an object", {b"kind": kind, b"data": b"[1, 2, 3]"}, "object"),
        ("deep nesting", {b"kind": kind, b"data": b"[" * 100_000 + b"]" * 100_000},
         "recursion limit"),
    ]


def inject(client: redis.Redis, stream_key: str, entries: list[Junk]) -> dict[str, str]:
    """XADD each entry; entry id -> the phrase its dead-letter reason must hold."""
    return {client.xadd(stream_key, fields).decode(): reason  # type: ignore[arg-type, union-attr]
            for _, fields, reason in entries}


def publish(client: redis.Redis, stream_key: str, *messages: Message) -> None:
    for message in messages:
        client.xadd(stream_key, message.to_fields())  # type: ignore[arg-type]


def wait_for(condition: Callable[[], Any], timeout: float = 20, what: str = "it") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def dead_letters(client: redis.Redis, dead_key: str, group: str) -> dict[str, str]:
    """The group's dead letters: original entry id -> reason."""
    return {f[b"dead_id"].decode(): f[b"dead_reason"].decode()
            for _, f in client.xrange(dead_key)  # type: ignore[union-attr]
            if f[b"dead_group"] == group.encode()}


def assert_dead_lettered(client: redis.Redis, dead_key: str, group: str,
                         expected: dict[str, str], timeout: float = 20) -> None:
    """Every injected entry, and nothing else, is in the dead-letter stream with its
    reason; nothing is left pending (once the valid entry's handler finishes)."""
    wait_for(lambda: len(dead_letters(client, dead_key, group)) >= len(expected), timeout,
             f"{len(expected)} dead letters in {dead_key}")
    found = dead_letters(client, dead_key, group)
    assert set(found) == set(expected)
    for entry_id, phrase in expected.items():
        assert phrase in found[entry_id], (phrase, found[entry_id])
    stream_key = dead_key.removesuffix(":dead")
    wait_for(lambda: client.xpending(stream_key, group)["pending"] == 0,  # type: ignore[index]
             timeout, "no pending entries")


def alive(proc: ServiceProcess) -> bool:
    return proc.proc is not None and proc.proc.poll() is None


# --- the scorer: turns and finalised ---------------------------------------------------

@pytest.fixture
def scorer(redis_server: RedisServer, namespace: str,
           tmp_path: Path) -> Iterator[ServiceProcess]:
    proc = scorer_process(redis_server.url, namespace, tmp_path)
    proc.start()
    yield proc
    proc.stop()


def test_scorer_dead_letters_malformed_turns_and_finalised_entries(
        scorer: ServiceProcess, redis_server: RedisServer, namespace: str) -> None:
    client, keys = redis_server.client(), Keys(namespace)
    valid = conversation("ok", ["How do I list files?", "Thanks, that works!"])
    weights = WeightsEventV1(tenant="t", adapter="a", version=1, path="/p")
    unrecorded = valid[0].model_copy(update={"id": "never-recorded", "turn_index": -1})
    turn_junk = [*junk_for(valid[0]),
                 ("another stream's message", weights.to_fields(), "expected turn.v1"),
                 ("a turn the gateway never recorded", unrecorded.to_fields(),
                  "index unusable")]
    bad_turns = inject(client, keys.stream(TURNS), turn_junk)  # type: ignore[arg-type]
    publish(client, keys.stream(TURNS), *valid)
    assert [s.turn.id for s in wait_scored(client, namespace, 2)] == ["ok-0", "ok-1"]

    alone = conversation("fin", ["What is 2 + 2?"])[0]
    fin = FinalisedV1(turn=alone, reason="session_done")
    bad_fins = inject(client, keys.stream(FINALISED), [
        *junk_for(fin), ("a turn instead", alone.to_fields(), "expected finalised.v1")])
    publish(client, keys.stream(FINALISED), fin)
    assert wait_scored(client, namespace, 3)[-1].turn.id == "fin-0"

    assert_dead_lettered(client, keys.dead(TURNS), GROUP_SCORER, bad_turns)
    assert_dead_lettered(client, keys.dead(FINALISED), GROUP_JUDGE, bad_fins)
    assert alive(scorer)
    assert scorer.metric("reef_worker_entries_total") >= len(bad_turns) + len(bad_fins) + 3


def test_scorer_skips_malformed_feedback(
        scorer: ServiceProcess, redis_server: RedisServer, namespace: str) -> None:
    # Feedback is a hash per session, written by the gateway; garbage in it (from anyone
    # with Redis access) must not cost the turn its score.
    client, keys = redis_server.client(), Keys(namespace)
    turns = conversation("fb", ["Tell me a joke."])
    client.hset(keys.feedback("t", "fb"), mapping={  # type: ignore[arg-type]
        f"turn:{turns[0].response_id}": b"\xff not json",
        "index:0": b"[1, 2]",
        "session": orjson.dumps({"score": -0.5, "text": {"not": "a string"}})})
    publish(client, keys.stream(TURNS), *turns)
    [scored] = wait_scored(client, namespace, 1)
    assert scored.components["explicit"] == -0.5 and scored.reward is not None
    assert scored.teacher_hint is None
    assert alive(scorer)


# --- the skill-miner: scored ---------------------------------------------------------

def test_skill_miner_dead_letters_malformed_scored_entries(
        redis_server: RedisServer, namespace: str, tmp_path: Path, llm_server: FakeLLM) -> None:
    llm_server.reset()
    llm_server.script = [answer(FILE_SKILL)]
    client, keys = redis_server.client(), Keys(namespace)
    valid = scored_turn_for_miner("s1", 0, -1.0, user="Edit settings.toml.",
                                  follow_up="That's wrong, there is no settings.toml.")
    bad = inject(client, keys.stream(SCORED), [
        *junk_for(valid),
        ("a NaN reward", _with_reward(valid, "NaN"), "finite number"),
        ("an infinite reward", _with_reward(valid, "-Infinity"), "finite number"),
        ("a turn instead", valid.turn.model_copy(update={"id": "turn-1"}).to_fields(),
         "expected scored.v1"),
        ("an unrecorded turn", valid.model_copy(update={
            "id": "x", "turn": valid.turn.model_copy(update={"turn_index": -1})}).to_fields(),
         "turn index unusable")])
    proc = miner_process(redis_server, namespace, tmp_path, llm_server)
    proc.start()
    try:
        publish(client, keys.stream(SCORED), valid)
        wait_for(lambda: skills_of(client, namespace), what="the valid entry's skill")
        assert [s.name for s in skills_of(client, namespace)] == [FILE_SKILL["name"]]
        assert_dead_lettered(client, keys.dead(SCORED), GROUP_SKILL_MINER, bad)
        assert alive(proc) and llm_server.calls == 1
    finally:
        proc.stop()


def _with_reward(valid: ScoredV1, reward: str) -> dict[bytes, bytes]:
    data = orjson.dumps(valid.model_dump(mode="json"))
    return {b"kind": b"scored.v1",
            b"data": data.replace(b'"reward":-1.0', b'"reward":' + reward.encode())}


# --- the trainer's consumer: scored --------------------------------------------------

@pytest.fixture
async def aredis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(port=redis_server.port)
    yield client
    await client.aclose()


async def test_trainer_consumer_dead_letters_malformed_scored_entries(
        redis_server: RedisServer, namespace: str, tmp_path: Path, tiny_model: Path,
        aredis: aioredis.Redis) -> None:
    model = tiny_model
    settings = settings_for(namespace, redis_server.url, model, tmp_path,
                            worker_block_ms=100, worker_claim_idle_ms=500)
    trainer = Trainer(settings, aredis, LocalBackend(settings, model, tmp_path / "state"),
                      TrainerMetrics.create())
    client, keys = redis_server.client(), Keys(namespace)
    valid = scored_turn(1, 1.0)
    raw = orjson.dumps(valid.model_dump(mode="json"))
    bad = inject(client, keys.stream(SCORED), [
        *junk_for(valid),
        ("a NaN reward", {b"kind": b"scored.v1",
                          b"data": raw.replace(b'"reward":1.0', b'"reward":NaN')},
         "finite number"),
        ("a turn instead", valid.turn.model_copy(update={"id": "turn-1"}).to_fields(),
         "expected scored.v1"),
        ("a skill event instead", SkillEventV1(tenant="t", skill_id="k",
                                               action="created").to_fields(),
         "expected scored.v1")])
    publish(client, keys.stream(SCORED), valid)
    worker = StreamWorker(aredis, keys, SCORED, GROUP_TRAINER, "trainer-1", trainer.on_scored,
                          settings, CollectorRegistry())
    task = asyncio.create_task(worker.run())
    try:
        deadline = time.monotonic() + 20
        while not await aredis.hexists(trainer.buffer_key, valid.turn.id):
            assert time.monotonic() < deadline, "the valid entry was not buffered"
            assert not task.done(), task
            await asyncio.sleep(0.05)
        await asyncio.to_thread(assert_dead_lettered, client, keys.dead(SCORED),
                                GROUP_TRAINER, bad)
        assert await aredis.hlen(trainer.buffer_key) == 1  # the NaN reward never got in
        assert not task.done()
    finally:
        worker.stop()
        await asyncio.wait_for(task, 5)


# --- the gateway's followers: skills and weights -------------------------------------

def test_gateway_followers_skip_malformed_events(
        redis_server: RedisServer, upstream: FakeUpstream, namespace: str,
        tmp_path: Path) -> None:
    gw = GatewayProcess(redis_server.url, upstream.base_url, namespace, tmp_path,
                        env={"REEF_USE_SKILLS": "true", "REEF_RETRIEVAL_MODE": "bm25",
                             "REEF_LOG_LEVEL": "INFO"})
    gw.start()
    try:
        wait_for(lambda: "gateway.skills_ready" in gw.log_path.read_text(), what="skills")
        client, keys = redis_server.client(), Keys(namespace)
        adapter = f"{namespace}-v1"
        weights = WeightsEventV1(tenant="*", adapter=adapter, version=1, path="/ckpt/v1")
        skill_event = SkillEventV1(tenant="alpha", skill_id="k", action="created")
        weights_junk = [*junk_for(weights), ("a skill event", skill_event.to_fields(), "")]
        skills_junk = [*junk_for(skill_event), ("a weights event", weights.to_fields(), "")]
        inject(client, keys.stream(WEIGHTS), weights_junk)
        inject(client, keys.stream(SKILLS), skills_junk)
        publish(client, keys.stream(WEIGHTS), weights)
        store_call(redis_server.url, namespace, lambda s: s.create(
            "alpha", name="answer-first", description="Answer first, then explain.",
            body="FOLLOWER-MARKER: answer first.", status="active"))
        wait_for(lambda: ("load", adapter) in upstream.adapter_calls, what="the adapter load")
        wait_for(lambda: gw.metric("reef_gateway_skills_indexed") == 1, what="the skill")
        log = gw.log_path.read_text()
        assert log.count("gateway.bad_weights_event") == len(weights_junk)
        assert log.count("gateway.bad_skill_event") == len(skills_junk)
        assert "Traceback" not in log
        assert alive(gw)
        resp = httpx.post(gw.url + "/v1/chat/completions", timeout=10,
                          headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"model": "fake-text",
                                "messages": [{"role": "user", "content": "answer first?"}]})
        assert resp.status_code == 200, resp.text
        assert "FOLLOWER-MARKER" in orjson.dumps(upstream.requests[-1]).decode()
    finally:
        gw.stop()


# --- the worker itself ----------------------------------------------------------------

async def test_a_stray_message_sharing_an_id_does_not_shadow_the_real_one(
        redis_server: RedisServer, namespace: str, aredis: aioredis.Redis) -> None:
    # A scored.v1 carries its turn's id: a turn.v1 on the scored stream, read in the same
    # batch, is rejected, and the scored entry after it must still be handled.
    settings = Settings(profile="dev", namespace=namespace, redis_url=redis_server.url,
                        worker_block_ms=100)
    handled: list[str] = []

    async def handler(message: Message, _entry_id: str) -> None:
        if not isinstance(message, ScoredV1):
            raise Reject(f"expected scored.v1, got {message.kind}")
        handled.append(message.id)

    client, keys = redis_server.client(), Keys(namespace)
    real = scored_turn(7, 1.0)
    stray = inject(client, keys.stream(SCORED),
                   [("its turn", real.turn.to_fields(), "expected scored.v1")])
    publish(client, keys.stream(SCORED), real)
    worker = StreamWorker(aredis, keys, SCORED, "g", "c-1", handler, settings,
                          CollectorRegistry())
    task = asyncio.create_task(worker.run())
    try:
        deadline = time.monotonic() + 10
        while not handled:
            assert time.monotonic() < deadline and not task.done(), "not handled"
            await asyncio.sleep(0.05)
        assert handled == [real.id]
        await asyncio.to_thread(assert_dead_lettered, client, keys.dead(SCORED), "g", stray)
    finally:
        worker.stop()
        await asyncio.wait_for(task, 5)
