"""Turn finalisation in Redis: pairing turns with their follow-ups, in any arrival order,
exactly once."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from services.scorer.sessions import Sessions, opening_messages
from shared.keys import FINALISED, Keys
from shared.messages import FinalisedV1, TurnV1, decode
from tests.conftest import RedisServer


def make_turn(index: int, session: str = "s1", turn_type: str = "main",
              done: bool = False) -> TurnV1:
    history: list[dict[str, str]] = [{"role": "system", "content": "sys"}]
    for i in range(index):
        history += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
    history.append({"role": "user", "content": f"q{index}"})
    return TurnV1(id=f"turn-{session}-{index}", tenant="t", session_id=session,
                  turn_index=index, turn_type=turn_type,  # type: ignore[arg-type]
                  session_done=done, request_model="m", upstream_model="m", messages=history,
                  response_message={"role": "assistant", "content": f"a{index}"})


@pytest.fixture
async def sessions(redis_server: RedisServer, namespace: str) -> AsyncIterator[Sessions]:
    client = aioredis.from_url(redis_server.url, max_connections=500)
    yield Sessions(client, Keys(namespace), maxlen=100_000, idle_seconds=0.3, ttl_seconds=60)
    await client.aclose()


async def arrive(sessions: Sessions, turn: TurnV1) -> int:
    return await sessions.arrive(turn, turn.model_dump_json().encode())


def finalised(redis_server: RedisServer, namespace: str) -> list[FinalisedV1]:
    out = []
    for _, fields in redis_server.client().xrange(Keys(namespace).stream(FINALISED)):
        msg = decode(fields)
        assert isinstance(msg, FinalisedV1)
        out.append(msg)
    return out


def test_opening_messages_are_what_came_after_the_last_answer() -> None:
    turn = make_turn(2)
    assert opening_messages(turn) == [{"role": "user", "content": "q2"}]
    assert opening_messages(make_turn(0)) == [{"role": "user", "content": "q0"}]


@pytest.mark.parametrize("order", [[0, 1, 2], [2, 0, 1], [1, 2, 0], [2, 1, 0]])
async def test_each_turn_gets_the_next_turns_opening_as_follow_up(
        sessions: Sessions, redis_server: RedisServer, namespace: str, order: list[int]) -> None:
    for i in order:
        await arrive(sessions, make_turn(i))
    got = {f.turn.turn_index: f for f in finalised(redis_server, namespace)}
    assert sorted(got) == [0, 1]  # turn 2 waits for its follow-up
    assert got[0].follow_up == [{"role": "user", "content": "q1"}]
    assert got[1].follow_up == [{"role": "user", "content": "q2"}]
    assert got[0].reason == "next_turn" and got[0].id == "turn-s1-0"


async def test_side_turns_are_skipped_and_finalised_on_arrival(
        sessions: Sessions, redis_server: RedisServer, namespace: str) -> None:
    await arrive(sessions, make_turn(0))
    await arrive(sessions, make_turn(2))  # main turn 0's successor is known only via turn 1
    assert finalised(redis_server, namespace) == []
    await arrive(sessions, make_turn(1, turn_type="side"))
    got = {f.turn.turn_index: f for f in finalised(redis_server, namespace)}
    assert got[1].reason == "side_turn" and got[1].follow_up == []
    assert got[0].reason == "next_turn"
    assert got[0].follow_up == [{"role": "user", "content": "q2"}]


async def test_redelivery_and_session_done_finalise_once(
        sessions: Sessions, redis_server: RedisServer, namespace: str) -> None:
    for turn in (make_turn(0), make_turn(0), make_turn(1, done=True), make_turn(1, done=True)):
        await arrive(sessions, turn)
    got = finalised(redis_server, namespace)
    assert [(f.turn.turn_index, f.reason) for f in got] == [(0, "next_turn"),
                                                            (1, "session_done")]


async def test_idle_sessions_are_swept_once(
        sessions: Sessions, redis_server: RedisServer, namespace: str) -> None:
    await arrive(sessions, make_turn(0, session="idle"))
    assert await sessions.idle_sessions() == []
    await asyncio.sleep(0.4)
    (key,) = await sessions.idle_sessions()
    assert await sessions.sweep(key) == 1
    assert await sessions.sweep(key) == -1  # another replica got there first: nothing
    (fin,) = finalised(redis_server, namespace)
    assert fin.reason == "idle" and fin.follow_up == []


async def test_concurrent_arrivals_in_random_order_finalise_each_turn_exactly_once(
        sessions: Sessions, redis_server: RedisServer, namespace: str) -> None:
    turns = []
    for s in range(5):
        for i in range(40):
            kind = "side" if i % 7 == 3 else "main"
            turns.append(make_turn(i, session=f"c{s}", turn_type=kind, done=i == 39))
    turns += random.sample(turns, 30)  # redeliveries
    random.shuffle(turns)
    await asyncio.gather(*(arrive(sessions, t) for t in turns))
    got = finalised(redis_server, namespace)
    assert len(got) == len({f.id for f in got}) == 200
    for f in got:
        if f.reason == "next_turn":
            nxt = int(f.follow_up[0]["content"][1:])
            skipped = range(f.turn.turn_index + 1, nxt)
            assert all(i % 7 == 3 for i in skipped), (f.turn.turn_index, nxt)
