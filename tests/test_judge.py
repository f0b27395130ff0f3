"""The LLM judge against a fake judge over real HTTP, and its verdict parsing."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest

from services.scorer import prompts
from services.scorer.judge import Judge, Verdict, majority, parse_verdict
from services.scorer.metrics import ScorerMetrics
from shared.messages import TurnV1
from shared.settings import ConfigError, Settings
from tests.conftest import free_port
from tests.fake_judge import FakeJudge

SECRET_REQUEST = "How do I reverse the list [4, 8, 15] for patient Jane Roe?"
CORRECTION = [{"role": "user", "content": "No, that's wrong: I wanted it in place."}]
THANKS = [{"role": "user", "content": "Thank you, that is what I needed."}]


@pytest.fixture(scope="module")
def server() -> Iterator[FakeJudge]:
    fake = FakeJudge(free_port())
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def fake(server: FakeJudge) -> FakeJudge:
    server.reset()
    return server


def settings_for(fake: FakeJudge, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "profile": "dev", "use_prm": True, "prm_base_url": fake.base_url,
        "prm_model": "fake-judge", "prm_m": 3, "judge_timeout_seconds": 5.0,
        "judge_retries": 2, "azure_openai_endpoint": "", "azure_openai_deployment": ""}
    values.update(overrides)
    return Settings(**values)


def make_turn() -> TurnV1:
    return TurnV1(
        tenant="acme", session_id="s1", request_model="m", upstream_model="m",
        messages=[{"role": "system", "content": "You are helpful."},
                  {"role": "user", "content": SECRET_REQUEST}],
        response_message={"role": "assistant", "content": "Use reversed(xs), a new iterator."})


async def run_judge(settings: Settings, follow_up: list[dict[str, Any]] | None = None,
                    metrics: ScorerMetrics | None = None) -> Verdict:
    async with Judge(settings, metrics or ScorerMetrics.create()) as judge:
        return await judge.judge(make_turn(), CORRECTION if follow_up is None else follow_up)


def sample(metrics: ScorerMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


# --- against the fake judge -------------------------------------------------------------

async def test_hindsight_follow_up_decides_the_verdict(fake: FakeJudge) -> None:
    settings = settings_for(fake)
    wrong = await run_judge(settings, CORRECTION)
    right = await run_judge(settings, THANKS)
    silent = await run_judge(settings, [])
    assert (wrong.score, wrong.votes, wrong.error) == (-1, [-1, -1, -1], None)
    assert right.score == 1 and "helped" in right.rationale
    assert silent.score == 0
    assert all(prompts.FOLLOW_UP_HEADING in p for p in fake.prompts)
    assert "I wanted it in place" in fake.prompts[0]
    assert prompts.NOTHING_FOLLOWED in fake.prompts[-1]


async def test_votes_run_in_parallel(fake: FakeJudge) -> None:
    fake.latency = 0.3
    started = time.perf_counter()
    verdict = await run_judge(settings_for(fake, prm_m=3))
    elapsed = time.perf_counter() - started
    assert len(verdict.votes) == 3 and fake.calls == 3
    assert elapsed < 0.75, elapsed  # sequential would take 0.9 s
    assert fake.max_in_flight == 3


async def test_garbage_is_unparseable_not_zero(fake: FakeJudge) -> None:
    fake.mode = "garbage"
    metrics = ScorerMetrics.create()
    verdict = await run_judge(settings_for(fake), metrics=metrics)
    assert (verdict.score, verdict.votes, verdict.error) == (None, [], "unparseable")
    assert fake.calls == 3  # a valid HTTP answer is not retried
    assert sample(metrics, "reef_scorer_judge_errors_total", kind="unparseable") == 3
    assert verdict.prompt_tokens == 300  # the failed votes still cost tokens


async def test_server_errors_are_retried_then_unscored(fake: FakeJudge) -> None:
    fake.mode = "http500"
    metrics = ScorerMetrics.create()
    verdict = await run_judge(settings_for(fake, judge_retries=2), metrics=metrics)
    assert (verdict.score, verdict.error) == (None, "http")
    assert fake.calls == 3 * 3
    assert sample(metrics, "reef_scorer_judge_retries_total", kind="http") == 6
    assert sample(metrics, "reef_scorer_judge_errors_total", kind="http") == 3


async def test_hanging_judge_times_out(fake: FakeJudge) -> None:
    fake.mode = "hang"
    metrics = ScorerMetrics.create()
    started = time.perf_counter()
    verdict = await run_judge(settings_for(fake, judge_timeout_seconds=0.2, judge_retries=1),
                              metrics=metrics)
    assert (verdict.score, verdict.error) == (None, "timeout")
    assert time.perf_counter() - started < 1.5
    assert fake.calls == 3 * 2
    assert sample(metrics, "reef_scorer_judge_errors_total", kind="timeout") == 3
    assert sample(metrics, "reef_scorer_judge_seconds_count") == 3


async def test_flaky_judge_succeeds_after_retries(fake: FakeJudge) -> None:
    fake.mode = "flaky"
    verdict = await run_judge(settings_for(fake, judge_retries=3), CORRECTION)
    assert (verdict.score, verdict.votes, verdict.error) == (-1, [-1, -1, -1], None)
    assert fake.calls > 3


async def test_unreachable_judge_is_a_connect_error(fake: FakeJudge) -> None:
    settings = settings_for(fake, prm_base_url=f"http://127.0.0.1:{free_port()}/v1",
                            judge_retries=1)
    verdict = await run_judge(settings)
    assert (verdict.score, verdict.error) == (None, "connect")


async def test_azure_deployment_path_and_api_key(fake: FakeJudge) -> None:
    settings = settings_for(fake, prm_base_url="", prm_model="",
                            azure_openai_endpoint=fake.azure_endpoint,
                            azure_openai_deployment="judge-dep",
                            azure_openai_api_key=fake.azure_key)
    verdict = await run_judge(settings, THANKS)
    assert verdict.score == 1
    assert fake.azure_calls == 3 and fake.deployments == ["judge-dep"] * 3


async def test_azure_wrong_key_is_not_retried(fake: FakeJudge) -> None:
    settings = settings_for(fake, azure_openai_endpoint=fake.azure_endpoint,
                            azure_openai_deployment="judge-dep", azure_openai_api_key="nope")
    verdict = await run_judge(settings)
    assert (verdict.score, verdict.error) == (None, "http")
    assert fake.calls == 0  # three 401s, refused before they count as calls


async def test_bearer_key_is_sent(server: FakeJudge) -> None:
    server.reset()
    server.bearer = "sk-judge"
    try:
        ok = await run_judge(settings_for(server, prm_api_key="sk-judge"), THANKS)
        bad = await run_judge(settings_for(server, prm_api_key="sk-other"), THANKS)
    finally:
        server.bearer = None
    assert ok.score == 1
    assert (bad.score, bad.error) == (None, "http")


async def test_tokens_are_counted(fake: FakeJudge) -> None:
    fake.prompt_tokens, fake.completion_tokens = 250, 30
    metrics = ScorerMetrics.create()
    verdict = await run_judge(settings_for(fake), metrics=metrics)
    assert (verdict.prompt_tokens, verdict.completion_tokens) == (750, 90)
    assert sample(metrics, "reef_scorer_judge_tokens_total", direction="prompt") == 750
    assert sample(metrics, "reef_scorer_judge_tokens_total", direction="completion") == 90


async def test_concurrency_limit_is_respected(fake: FakeJudge) -> None:
    fake.latency = 0.05
    settings = settings_for(fake, prm_m=3, judge_concurrency=4)
    async with Judge(settings, ScorerMetrics.create()) as judge:
        verdicts = await asyncio.gather(*(judge.judge(make_turn(), THANKS) for _ in range(10)))
    assert all(v.score == 1 for v in verdicts)
    assert fake.calls == 30
    assert fake.max_in_flight == 4


async def test_teacher_hint_only_when_the_turn_went_wrong(fake: FakeJudge) -> None:
    settings = settings_for(fake, teacher_hints=True)
    wrong = await run_judge(settings, CORRECTION)
    right = await run_judge(settings, THANKS)
    assert wrong.hint == fake.hint_text
    assert wrong.prompt_tokens == 4 * fake.prompt_tokens  # three votes and the hint
    assert right.hint is None
    assert fake.hint_calls == 1


async def test_failed_hint_is_no_hint(fake: FakeJudge) -> None:
    fake.mode = "flaky"  # odd calls fail; no retries
    settings = settings_for(fake, teacher_hints=True, prm_m=1, judge_retries=0)
    verdict = await run_judge(settings, CORRECTION)  # call 1: 500
    assert verdict.score is None
    verdict = await run_judge(settings, CORRECTION)  # call 2: ok, hint = call 3: 500
    assert (verdict.score, verdict.hint, verdict.error) == (-1, None, None)


async def test_prompts_and_completions_are_not_logged(
        fake: FakeJudge, caplog: pytest.LogCaptureFixture) -> None:
    fake.mode = "flaky"
    caplog.set_level(logging.DEBUG)
    await run_judge(settings_for(fake, teacher_hints=True, judge_retries=0), CORRECTION)
    fake.mode = "garbage"
    await run_judge(settings_for(fake), CORRECTION)
    text = " ".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "judge.vote_failed" in text and "judge.vote_unparseable" in text
    for private in ("Jane Roe", "in place", "weather", "You are helpful"):
        assert private not in text


def test_missing_endpoint_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="prm_base_url"):
        Judge(Settings(profile="dev", use_prm=True, prm_base_url="", azure_openai_endpoint="",
                       azure_openai_deployment=""), ScorerMetrics.create())


# --- parsing and majority (no I/O) -----------------------------------------------------------

@pytest.mark.parametrize(("text", "score"), [
    ("The answer helped.\nScore: 1", 1),
    ("Score: +1", 1),
    ("score = -1", -1),
    ("Reasoning...\n**Score:** -1.", -1),
    ("Score: **0**", 0),
    ("Score: `-1`", -1),
    ("SCORE:1.0", 1),
    ("The final answer is \\boxed{1}", 1),
    ("\\boxed{-1}", -1),
    ('{"score": 1, "rationale": "fine"}', 1),
    ('```json\n{"score": -1, "reason": "wrong"}\n```', -1),
    ('Here you go: {"score": 0}', 0),
    ("A score: 1 would be too generous here.\nScore: -1", -1),
    ("<think>Score: 1 maybe</think>The user complained.\nScore: -1", -1),
    ("Score: -0", 0),
])
def test_parse_verdict_formats(text: str, score: int) -> None:
    parsed = parse_verdict(text)
    assert parsed is not None and parsed[0] == score


@pytest.mark.parametrize("text", [
    None, "", "I don't know.", "Score: 2", "Score: 10", "Score: 0.5", "score: high",
    "Scores: 1", '{"score": 3}', '{"score": true}',
])
def test_parse_verdict_rejects(text: str | None) -> None:
    assert parse_verdict(text) is None


def test_parse_verdict_rationale() -> None:
    parsed = parse_verdict("Rationale: the user   corrected it.\nScore: -1")
    assert parsed == (-1, "the user corrected it.")
    assert parse_verdict('{"score": 1, "rationale": "helped"}') == (1, "helped")


@pytest.mark.parametrize(("votes", "expected"), [
    ([], None), ([1], 1), ([1, 1, -1], 1), ([-1, 0, -1], -1), ([1, 0], 0), ([1, -1], 0),
    ([-1, 0], 0), ([1, -1, 0], 0), ([1, 1, -1, -1, 0], 0), ([0, 0, 1], 0),
])
def test_majority(votes: list[int], expected: int | None) -> None:
    assert majority(votes) == expected
