"""Late feedback: explicit feedback on a turn already scored revises its reward.

End to end: a gateway and a scorer as real processes on a real Redis, the official
``openai`` client as the agent; in process for what needs an exact interleaving (feedback
stored while the judge is busy, replicas racing) and for the skill-miner's credit.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import openai
import orjson
import pytest
import redis
import redis.asyncio as aioredis

from services.scorer.judge import Verdict
from services.scorer.metrics import ScorerMetrics
from services.scorer.revise import ScoreRecord
from services.scorer.service import Scorer
from services.skill_miner.metrics import MinerMetrics
from services.skill_miner.service import SkillMiner
from shared.keys import FEEDBACK, GROUP_FEEDBACK, SCORED, Keys
from shared.messages import FeedbackV1, FinalisedV1, ScoredV1, TurnV1, decode
from shared.settings import Settings
from shared.skills import Credit
from tests.conftest import RedisServer
from tests.fake_upstream import FakeUpstream
from tests.gateway_proc import API_KEY, GatewayProcess
from tests.service_proc import ServiceProcess, scorer_process

NAMESPACE = "latefb"
KEYS = Keys(NAMESPACE)


# --- helpers ------------------------------------------------------------------------------

def wait_for(condition: Callable[[], Any], what: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return result


class Conversation:
    """An agent's session through the gateway."""

    def __init__(self, gateway: GatewayProcess) -> None:
        self.session_id = "s-" + uuid.uuid4().hex[:12]
        self.client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=API_KEY,
                                    max_retries=0)
        self.history: list[dict[str, Any]] = []

    def ask(self, text: str, done: bool = False) -> str:
        """Send a user message; the answer's id."""
        self.history.append({"role": "user", "content": text})
        headers = {"X-Session-Id": self.session_id}
        if done:
            headers["X-Session-Done"] = "true"
        answer = self.client.chat.completions.create(model="fake-text", messages=self.history,
                                                     extra_headers=headers)
        self.history.append({"role": "assistant", "content": answer.choices[0].message.content})
        return answer.id

    def feedback(self, **body: Any) -> dict[str, Any]:
        resp = self.client.post("/feedback", cast_to=httpx.Response,
                                body={"session_id": self.session_id, **body})
        assert resp.status_code == 200, resp.text
        return dict(resp.json())


def scored_in(client: redis.Redis, session_id: str) -> list[ScoredV1]:
    """The session's scored entries, in stream order."""
    found = [decode(f) for _, f in client.xrange(KEYS.stream(SCORED))]
    return [m for m in found if isinstance(m, ScoredV1) and m.turn.session_id == session_id]


def revisions_of(client: redis.Redis, session_id: str, index: int) -> list[ScoredV1]:
    return [s for s in scored_in(client, session_id) if s.turn.turn_index == index]


def feedback_drained(client: redis.Redis) -> bool:
    """The scorer's feedback group has read and acked every event."""
    groups = cast(list[dict[str, Any]], client.xinfo_groups(KEYS.stream(FEEDBACK)))
    group = next((g for g in groups if g["name"] == GROUP_FEEDBACK.encode()), None)
    return group is not None and group["pending"] == 0 and group["lag"] == 0


# --- fixtures -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gateway(redis_server: RedisServer, upstream: FakeUpstream,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(redis_server.url, upstream.base_url, NAMESPACE,
                        tmp_path_factory.mktemp("gateway"))
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def scorer(redis_server: RedisServer,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    # Explicit feedback is weighed with the other sources: the revision recombines them.
    proc = scorer_process(redis_server.url, NAMESPACE, tmp_path_factory.mktemp("scorer"),
                          {"REEF_EXPLICIT_OVERRIDES": "false"})
    proc.start()
    yield proc
    proc.stop()


# --- end to end ---------------------------------------------------------------------------

def test_feedback_after_scoring_supersedes_once_per_revision(
        gateway: GatewayProcess, scorer: ServiceProcess, redis_server: RedisServer) -> None:
    client, chat = redis_server.client(), Conversation(gateway)
    first = chat.ask("How do I reverse a list in Python?")
    chat.ask("Thanks, that works perfectly!", done=True)
    wait_for(lambda: len(scored_in(client, chat.session_id)) == 2, "both turns scored")
    [original] = revisions_of(client, chat.session_id, 0)
    implicit = original.components["implicit"]
    assert original.reward == implicit > 0 and original.revision == 0
    applied = scorer.metric('reef_scorer_late_feedback_total{outcome="applied"}')

    chat.feedback(response_id=first, score=-1.0, text="It reversed a copy.")
    one = wait_for(lambda: revisions_of(client, chat.session_id, 0)[1:], "revision 1")[0]
    chat.feedback(response_id=first, score=0.5)
    two = wait_for(lambda: revisions_of(client, chat.session_id, 0)[2:], "revision 2")[0]

    assert (one.id, one.revision, one.previous_reward) == (
        f"{original.turn.id}:r1", 1, original.reward)
    assert one.reward == pytest.approx((implicit - 1.0) / 2)  # recombined, not overridden
    assert one.components == {**original.components, "explicit": -1.0}
    assert one.teacher_hint == "It reversed a copy."
    assert one.turn == original.turn and one.follow_up == original.follow_up
    assert (two.id, two.revision, two.previous_reward) == (
        f"{original.turn.id}:r2", 2, one.reward)
    assert two.reward == pytest.approx((implicit + 0.5) / 2) and two.teacher_hint is None

    # Replayed (or redelivered) events change nothing: one entry per revision.
    for _, fields in client.xrange(KEYS.stream(FEEDBACK)):
        client.xadd(KEYS.stream(FEEDBACK), fields)  # type: ignore[arg-type]
    wait_for(lambda: feedback_drained(client), "the replayed events handled")
    assert [s.id for s in revisions_of(client, chat.session_id, 0)] == [
        original.turn.id, f"{original.turn.id}:r1", f"{original.turn.id}:r2"]
    assert len(revisions_of(client, chat.session_id, 1)) == 1
    assert scorer.metric('reef_scorer_late_feedback_total{outcome="applied"}') == applied + 2


def test_session_feedback_revises_the_turns_without_feedback_of_their_own(
        gateway: GatewayProcess, scorer: ServiceProcess, redis_server: RedisServer) -> None:
    client, chat = redis_server.client(), Conversation(gateway)
    first = chat.ask("Write a haiku about Redis.")
    chat.ask("Thanks, lovely!", done=True)
    wait_for(lambda: len(scored_in(client, chat.session_id)) == 2, "both turns scored")
    chat.feedback(response_id=first, rating="up")
    wait_for(lambda: revisions_of(client, chat.session_id, 0)[1:], "turn 0 revised")
    assert revisions_of(client, chat.session_id, 1)[0].reward is None  # no follow-up

    chat.feedback(rating="down")  # the whole session
    last = wait_for(lambda: revisions_of(client, chat.session_id, 1)[1:], "turn 1 revised")[0]
    assert (last.revision, last.reward, last.previous_reward) == (1, -1.0, None)
    assert last.trainable
    wait_for(lambda: feedback_drained(client), "the session event handled")
    assert len(revisions_of(client, chat.session_id, 0)) == 2  # its own "up" still wins


def test_feedback_right_after_the_answer_counts_in_the_first_score(
        gateway: GatewayProcess, scorer: ServiceProcess, redis_server: RedisServer) -> None:
    client, chat = redis_server.client(), Conversation(gateway)
    first = chat.ask("What is the capital of Australia?")
    chat.feedback(response_id=first, score=-0.5)  # no 404: the turn is already recorded
    chat.ask("Thanks, that works perfectly!", done=True)
    wait_for(lambda: len(scored_in(client, chat.session_id)) == 2, "both turns scored")
    wait_for(lambda: feedback_drained(client), "the event handled")
    [scored] = revisions_of(client, chat.session_id, 0)
    assert scored.components["explicit"] == -0.5 and scored.revision == 0
    assert scored.reward == pytest.approx((scored.components["implicit"] - 0.5) / 2)


# --- in process: exact interleavings --------------------------------------------------

@pytest.fixture
async def aredis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(port=redis_server.port)
    yield client
    await client.aclose()


class FeedbackWhileJudging:
    """A judge during whose call the user's feedback arrives."""

    def __init__(self, arrive: Callable[[TurnV1], Any]) -> None:
        self.arrive = arrive

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def judge(self, turn: TurnV1, follow_up: list[dict[str, Any]]) -> Verdict:
        await self.arrive(turn)
        return Verdict(score=1, votes=[1, 1, 1], rationale="Fine.", prompt_tokens=9,
                       completion_tokens=3, error=None)


def finalised(session: str, index: int = 0) -> FinalisedV1:
    turn = TurnV1(id=f"{session}-{index}", tenant="t", session_id=session, turn_index=index,
                  request_model="m", upstream_model="m",
                  messages=[{"role": "user", "content": "Sort this list."}],
                  response_message={"role": "assistant", "content": "Sorted."},
                  response_id=f"chatcmpl-{session}-{index}")
    return FinalisedV1(turn=turn, reason="session_done")


async def store_feedback(client: aioredis.Redis, keys: Keys, session: str, field: str,
                         score: float) -> None:
    await client.hset(keys.feedback("t", session), field, orjson.dumps(
        {"score": score, "text": None, "created_at": time.time(), "id": "fb-x"}))


async def test_feedback_stored_while_the_turn_is_judged_is_not_lost(
        redis_server: RedisServer, namespace: str, aredis: aioredis.Redis) -> None:
    settings = Settings(profile="dev", redis_url=redis_server.url, namespace=namespace)
    keys, outcomes = Keys(namespace), []

    async def arrive(turn: TurnV1) -> None:
        # After the scorer read the (empty) feedback, before its first score is out: the
        # event finds nothing scored yet.
        await store_feedback(aredis, keys, turn.session_id, "index:0", -1.0)
        outcomes.append(await scorer.revisions.revise("t", turn.session_id, 0))

    scorer = Scorer(settings, aredis, ScorerMetrics.create(),
                    judge=cast(Any, FeedbackWhileJudging(arrive)))
    assert await scorer.on_finalised([(finalised("race"), "1-0")]) == [None]
    assert outcomes == [["not_scored"]]
    entries = [decode(f) for _, f in await aredis.xrange(keys.stream(SCORED))]
    first, revised = cast(list[ScoredV1], entries)
    assert (first.reward, first.revision, "explicit" in first.components) == (1.0, 0, False)
    assert (revised.revision, revised.reward, revised.previous_reward) == (1, -1.0, 1.0)
    assert revised.judge_tokens == 0 and revised.votes == first.votes

    # Replicas racing on the next feedback: one revision, once.
    await store_feedback(aredis, keys, "race", "session", 0.5)
    await store_feedback(aredis, keys, "race", "index:0", 0.25)
    raced = await asyncio.gather(*(scorer.revisions.revise_turn("t", "race", "0")
                                   for _ in range(6)))
    assert sorted(raced) == ["applied", *["unchanged"] * 5]
    assert len(await aredis.xrange(keys.stream(SCORED))) == 3
    assert scorer.metrics.registry.get_sample_value(
        "reef_scorer_revisions_published_total") == 2


async def test_too_late_and_trimmed_turns_are_counted_not_revised(
        redis_server: RedisServer, namespace: str, aredis: aioredis.Redis) -> None:
    settings = Settings(profile="dev", redis_url=redis_server.url, namespace=namespace,
                        feedback_window_seconds=3600)
    keys, metrics = Keys(namespace), ScorerMetrics.create()
    scorer = Scorer(settings, aredis, metrics)
    await scorer.on_finalised([(finalised("old"), "1-0"), (finalised("gone"), "1-1")])
    record_key = keys.session_scored("t", "old")
    old = ScoreRecord.model_validate_json(cast(bytes, await aredis.hget(record_key, "0")))
    await aredis.hset(record_key, "0", old.model_copy(
        update={"scored_at": time.time() - 3601}).model_dump_json())
    gone = ScoreRecord.model_validate_json(
        cast(bytes, await aredis.hget(keys.session_scored("t", "gone"), "0")))
    await aredis.xdel(keys.stream(SCORED), gone.entry)
    for session in ("old", "gone"):
        await store_feedback(aredis, keys, session, "session", -1.0)
        event = FeedbackV1(tenant="t", session_id=session, target="session")
        await scorer.revisions.on_feedback(event, "1-0")
    assert len(await aredis.xrange(keys.stream(SCORED))) == 1  # "old"'s first score only
    sample = metrics.registry.get_sample_value
    assert sample("reef_scorer_late_feedback_total", {"outcome": "too_late"}) == 1
    assert sample("reef_scorer_late_feedback_total", {"outcome": "entry_gone"}) == 1
    assert sample("reef_scorer_revisions_published_total") == 0


# --- the skill-miner: credit at the newest reward -----------------------------------------

def scored_turn(turn_id: str, index: int, reward: float, revision: int = 0,
                previous: float | None = None, skill_ids: list[str] | None = None
                ) -> ScoredV1:
    turn = TurnV1(id=turn_id, tenant="acme", session_id="s", turn_index=index,
                  request_model="m", upstream_model="m",
                  messages=[{"role": "user", "content": "Fix my config file."}],
                  response_message={"role": "assistant", "content": "Edit it."},
                  skill_ids=skill_ids or [])
    message_id = turn_id if revision == 0 else f"{turn_id}:r{revision}"
    return ScoredV1(id=message_id, turn=turn, reward=reward, components={"explicit": reward},
                    revision=revision, previous_reward=previous)


async def test_skill_credit_moves_to_the_newest_reward(
        redis_server: RedisServer, namespace: str, aredis: aioredis.Redis,
        tmp_path: Path) -> None:
    settings = Settings(profile="dev", redis_url=redis_server.url, namespace=namespace,
                        miner_backend="corrections", skill_update_threshold=0.0,
                        data_dir=tmp_path)
    miner = SkillMiner(settings, aredis, MinerMetrics.create())
    await miner.start()
    store = miner.store
    used, sibling = [(await store.create("acme", name=name, description=f"{name} skill.",
                                         body="Do the thing.", category="coding",
                                         status="active")).id
                     for name in ("check-paths", "read-the-docs")]
    try:
        steps = [scored_turn("t0", 0, 0.5, skill_ids=[used]),
                 scored_turn("t0", 0, -0.5, 1, 0.5, skill_ids=[used]),
                 scored_turn("t0", 0, -0.5, 1, 0.5, skill_ids=[used]),   # redelivered
                 scored_turn("t0", 0, 0.5, skill_ids=[used]),            # late, older
                 scored_turn("t0", 0, -1.0, 2, -0.5, skill_ids=[used]),
                 scored_turn("t1", 1, 0.25), scored_turn("t1", 1, 0.75, 1, 0.25)]
        for number, message in enumerate(steps):
            await miner.on_scored(message, f"1-{number}")
        credit = {s.id: s.credit for s in await store.list("acme")}
        assert credit[used] == Credit(with_count=1, with_reward_sum=-1.0)
        assert credit[sibling] == Credit(without_count=1, without_reward_sum=-1.0)
        baseline = await aredis.hgetall(Keys(namespace).skill_baseline("acme"))
        assert {k: float(v) for k, v in baseline.items()} == {b"count": 1.0,
                                                              b"reward_sum": 0.75}
        mined = miner.metrics.registry.get_sample_value
        assert sum(mined("reef_skill_miner_turns_mined_total", {"result": r}) or 0
                   for r in ("proposed", "nothing", "invalid")) == 1  # t0 mined once
        [kept] = [r for r in await miner.trajectories.up_to("acme", "s", 5) if r.turn_id == "t0"]
        assert (kept.revision, kept.reward) == (2, -1.0)
    finally:
        await miner.close()
