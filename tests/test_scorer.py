"""The scorer end to end: turns in a real Redis stream -> scorer processes -> scored entries."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
import redis

from shared.keys import FINALISED, SCORED, TURNS, Keys
from shared.messages import ScoredV1, TurnV1, decode
from tests.conftest import RedisServer, free_port
from tests.fake_judge import FakeJudge
from tests.service_proc import ServiceProcess, scorer_process


def conversation(session: str, user_turns: list[str], done: bool = True,
                 tenant: str = "t") -> list[TurnV1]:
    """The turns a gateway records for a conversation: each carries the history."""
    turns: list[TurnV1] = []
    history: list[dict[str, str]] = [{"role": "system", "content": "You are helpful."}]
    for i, text in enumerate(user_turns):
        history = [*history, {"role": "user", "content": text}]
        answer = {"role": "assistant", "content": f"Answer number {i} about {text[:20]}"}
        turns.append(TurnV1(id=f"{session}-{i}", tenant=tenant, session_id=session,
                            turn_index=i, session_done=done and i == len(user_turns) - 1,
                            request_model="m", upstream_model="m", messages=history,
                            response_message=answer, response_id=f"chatcmpl-{session}-{i}"))
        history = [*history, answer]
    return turns


def publish(client: redis.Redis, namespace: str, turns: list[TurnV1]) -> None:
    pipe = client.pipeline(transaction=False)
    for turn in turns:
        pipe.xadd(Keys(namespace).stream(TURNS), turn.to_fields())  # type: ignore[arg-type]
    pipe.execute()


def scored(client: redis.Redis, namespace: str) -> list[ScoredV1]:
    out = []
    for _, fields in client.xrange(Keys(namespace).stream(SCORED)):
        msg = decode(fields)
        assert isinstance(msg, ScoredV1)
        out.append(msg)
    return out


def wait_scored(client: redis.Redis, namespace: str, count: int,
                timeout: float = 20) -> list[ScoredV1]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = scored(client, namespace)
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"{len(scored(client, namespace))} of {count} turns scored")


@pytest.fixture
def scorer(redis_server: RedisServer, namespace: str,
           tmp_path: Path) -> Iterator[ServiceProcess]:
    proc = scorer_process(redis_server.url, namespace, tmp_path)
    proc.start()
    yield proc
    proc.stop()


def test_implicit_feedback_scores_without_any_judge(
        scorer: ServiceProcess, redis_server: RedisServer, namespace: str) -> None:
    client = redis_server.client()
    publish(client, namespace, conversation("neg", ["How do I list files in Python?",
                                                    "No, that's wrong. I said Python."]))
    publish(client, namespace, conversation("pos", ["How do I list files in Python?",
                                                    "Thanks, that works perfectly!"]))
    got = {s.turn.id: s for s in wait_scored(client, namespace, 4)}
    assert got["neg-0"].reward is not None and got["neg-0"].reward < 0
    assert got["pos-0"].reward is not None and got["pos-0"].reward > 0
    assert got["neg-0"].follow_up == [{"role": "user",
                                       "content": "No, that's wrong. I said Python."}]
    assert got["neg-0"].trainable and got["pos-0"].components["implicit"] > 0
    # The last turn of each session has no follow-up: no signal, so not a made-up 0.
    assert got["neg-1"].reward is None and not got["neg-1"].trainable
    assert got["neg-1"].reason == "session_done"
    assert scorer.metric("reef_scorer_turns_scored_total") == 4


def test_explicit_feedback_overrides(
        scorer: ServiceProcess, redis_server: RedisServer, namespace: str) -> None:
    client = redis_server.client()
    turns = conversation("fb", ["Write a haiku", "Thanks, lovely!"])
    client.hset(Keys(namespace).feedback("t", "fb"), "turn:chatcmpl-fb-0",
                orjson.dumps({"score": -1.0, "text": "Haikus have 17 syllables."}))
    publish(client, namespace, turns)
    got = {s.turn.id: s for s in wait_scored(client, namespace, 2)}
    assert got["fb-0"].reward == -1.0 and got["fb-0"].components["explicit"] == -1.0
    assert got["fb-0"].components["implicit"] > 0  # kept for analysis, overridden
    assert got["fb-0"].teacher_hint == "Haikus have 17 syllables."


def test_side_turns_and_idle_sessions(redis_server: RedisServer, namespace: str,
                                      tmp_path: Path) -> None:
    proc = scorer_process(redis_server.url, namespace, tmp_path,
                          {"REEF_SESSION_IDLE_SECONDS": "0.5"})
    proc.start()
    try:
        client = redis_server.client()
        turns = conversation("idle", ["Hello there", "What can you do?"], done=False)
        side = TurnV1(id="idle-side", tenant="t", session_id="idle", turn_index=2,
                      turn_type="side", request_model="m", upstream_model="m",
                      messages=[{"role": "user", "content": "heartbeat"}],
                      response_message={"role": "assistant", "content": "ok"})
        publish(client, namespace, [*turns, side])
        got = {s.turn.id: s for s in wait_scored(client, namespace, 3)}
        assert got["idle-side"].reason == "side_turn" and not got["idle-side"].trainable
        assert got["idle-1"].reason == "idle"
    finally:
        proc.stop()


def test_malformed_entries_are_dead_lettered(
        scorer: ServiceProcess, redis_server: RedisServer, namespace: str) -> None:
    client = redis_server.client()
    keys = Keys(namespace)
    client.xadd(keys.stream(TURNS), {"kind": "turn.v1", "data": "{broken"})
    client.xadd(keys.stream(TURNS), {"nonsense": "1"})
    client.xadd(keys.stream(FINALISED), {"kind": "finalised.v1", "data": '{"turn": 3}'})
    bad_id = conversation("bad", ["hi"])[0].model_copy(update={"id": 'x"y'})
    publish(client, namespace, [bad_id])
    publish(client, namespace, conversation("ok", ["hi", "thanks!"]))
    wait_scored(client, namespace, 2)
    deadline = time.monotonic() + 10
    while client.xlen(keys.dead(TURNS)) < 3 or client.xlen(keys.dead(FINALISED)) < 1:
        assert time.monotonic() < deadline, "malformed entries were not dead-lettered"
        time.sleep(0.05)
    reasons = [f[b"dead_reason"] for _, f in client.xrange(keys.dead(TURNS))]
    assert len(reasons) == 3 and all(reasons)
    assert scorer.proc is not None and scorer.proc.poll() is None  # still running


def test_three_scorers_one_killed_midway_score_each_turn_exactly_once(
        redis_server: RedisServer, namespace: str, tmp_path: Path) -> None:
    client = redis_server.client()
    procs = [scorer_process(redis_server.url, namespace, tmp_path / str(i)) for i in range(3)]
    for proc in procs:
        proc.start()
    try:
        sessions = [conversation(f"load{s}", [f"question {s}-{i}" for i in range(10)])
                    for s in range(200)]
        for n in range(0, 200, 20):  # 2,000 turns, arriving in waves
            publish(client, namespace, [t for conv in sessions[n:n + 20] for t in conv])
            if n == 80:
                procs[0].kill()
            time.sleep(0.05)
        got = wait_scored(client, namespace, 2000, timeout=90)
        time.sleep(1.5)  # reclaim of the killed scorer's entries has happened; no extras
        got = scored(client, namespace)
        assert len(got) == 2000
        assert len({s.turn.id for s in got}) == 2000
    finally:
        for proc in procs:
            proc.stop()


@pytest.fixture(scope="module")
def judge() -> Iterator[FakeJudge]:
    server = FakeJudge(free_port())
    server.start()
    yield server
    server.stop()


def judged_scorer(redis_url: str, namespace: str, data_dir: Path,
                  judge: FakeJudge) -> ServiceProcess:
    return scorer_process(redis_url, namespace, data_dir, {
        "REEF_USE_PRM": "true", "REEF_PRM_BASE_URL": judge.base_url,
        "REEF_PRM_MODEL": "judge-model", "REEF_PRM_M": "3", "REEF_USE_IMPLICIT": "false",
        "REEF_JUDGE_TIMEOUT_SECONDS": "1", "REEF_JUDGE_RETRIES": "1"})


def test_judge_scores_with_hindsight_through_the_scorer(
        redis_server: RedisServer, namespace: str, tmp_path: Path, judge: FakeJudge) -> None:
    judge.reset()
    proc = judged_scorer(redis_server.url, namespace, tmp_path, judge)
    proc.start()
    try:
        client = redis_server.client()
        # The same first answer; only what the user said next differs.
        publish(client, namespace, conversation("j-neg", ["Capital of Australia?",
                                                          "That's wrong, it is Canberra."]))
        publish(client, namespace, conversation("j-pos", ["Capital of Australia?",
                                                          "Thank you!"]))
        got = {s.turn.id: s for s in wait_scored(client, namespace, 4)}
        assert (got["j-neg-0"].reward, got["j-neg-0"].votes) == (-1.0, [-1, -1, -1])
        assert (got["j-pos-0"].reward, got["j-pos-0"].votes) == (1.0, [1, 1, 1])
        assert got["j-pos-0"].judge_tokens > 0 and got["j-pos-0"].rationale
        assert any("That's wrong, it is Canberra." in p for p in judge.prompts)
        assert proc.metric("reef_scorer_judge_tokens_total") > 0
    finally:
        proc.stop()


def test_a_failing_judge_leaves_turns_unscored_never_zero(
        redis_server: RedisServer, namespace: str, tmp_path: Path, judge: FakeJudge) -> None:
    judge.reset()
    judge.mode = "http500"
    proc = judged_scorer(redis_server.url, namespace, tmp_path, judge)
    proc.start()
    try:
        client = redis_server.client()
        publish(client, namespace, conversation("j-fail", ["Hi", "Thanks!"]))
        got = {s.turn.id: s for s in wait_scored(client, namespace, 2)}
        assert got["j-fail-0"].reward is None and not got["j-fail-0"].trainable
        assert proc.metric("reef_scorer_judge_errors_total") >= 3
        text = httpx.get(proc.url + "/metrics").text
        assert 'reef_scorer_turns_scored_total{outcome="unscored",source="none"} 2.0' in text
    finally:
        proc.stop()
        judge.reset()
