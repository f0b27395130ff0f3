"""Implicit feedback: pure unit tests, no I/O."""

from __future__ import annotations

from typing import Any

import pytest

from services.scorer.implicit import ImplicitResult, implicit_reward
from shared.messages import TurnV1

REQUEST = "How do I reverse a list in Python without creating a copy?"
TOOL_CALL = {"id": "call_1", "type": "function",
             "function": {"name": "run_shell", "arguments": '{"cmd": "pytest -q"}'}}


def make_turn(request: str = REQUEST, tool_calls: list[dict[str, Any]] | None = None) -> TurnV1:
    answer: dict[str, Any] = {"role": "assistant", "content": "Use xs.reverse(), in place."}
    if tool_calls:
        answer = {"role": "assistant", "content": None, "tool_calls": tool_calls}
    return TurnV1(tenant="acme", session_id="s1", request_model="m", upstream_model="m",
                  messages=[{"role": "system", "content": "You are a coding assistant."},
                            {"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Hello! How can I help?"},
                            {"role": "user", "content": request}],
                  response_message=answer)


def reply(text: str) -> ImplicitResult:
    return implicit_reward(make_turn(), [{"role": "user", "content": text}])


def tool_result(content: str, call_id: str = "call_1") -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": content}


@pytest.mark.parametrize("text", [
    "No, that's wrong.",
    "That is not what I asked for.",
    "I said without a copy!",
    "Nope. Try again.",
    "It doesn't work, I get an AttributeError.",
    "You misunderstood the question",
    "Thanks, but that's incorrect.",
    "That\u2019s not right",  # a curly apostrophe, as phones type it
    "wrong",
    "It still fails",
])
def test_correction_is_negative(text: str) -> None:
    result = reply(text)
    assert result.score == -1.0
    assert result.signals["correction"] == -1.0


@pytest.mark.parametrize("text", [
    "Thanks!", "Thank you so much", "Perfect, that works.", "great, that works",
    "That did it, much appreciated", "thx",
])
def test_thanks_is_positive(text: str) -> None:
    result = reply(text)
    assert result.score is not None and result.score >= 0.7
    assert "thanks" in result.signals and "correction" not in result.signals


@pytest.mark.parametrize("text", [
    "No problem, now how do I sort it?",
    "No worries. Next: sort the list by length.",
    "I have no idea what a generator is, can you explain?",
    "What's wrong with using slicing here?",
    "Is it wrong to use a global variable for the config?",
    "How do I handle incorrect input in argparse?",
    "Let me try again later with the real data.",
    "Why does my function fail on empty input?",
])
def test_false_positive_phrases_are_not_corrections(text: str) -> None:
    result = reply(text)
    assert "correction" not in result.signals
    assert result.score is not None and result.score > -0.5


def test_thanks_for_nothing_is_not_thanks() -> None:
    result = reply("Thanks for nothing.")
    assert result.score is not None and result.score < 0
    assert "thanks" not in result.signals


@pytest.mark.parametrize("text", [
    REQUEST,
    "how do i reverse a python list without creating a copy",
    "Reverse a list in Python, without creating a copy?",
])
def test_reask_is_negative(text: str) -> None:
    result = reply(text)
    assert result.score is not None and result.score <= -0.5
    assert "reask" in result.signals


def test_a_new_question_is_not_a_reask() -> None:
    result = reply("Now how do I sort a dictionary by its values in Python?")
    assert "reask" not in result.signals


def test_similarity_hook_replaces_the_lexical_measure() -> None:
    seen: list[tuple[str, str]] = []

    def embedding_like(a: str, b: str) -> float:
        seen.append((a, b))
        return 0.95

    result = implicit_reward(make_turn(), [{"role": "user", "content": "flip my list pls"}],
                             similarity=embedding_like)
    assert seen == [(REQUEST, "flip my list pls")]
    assert result.signals["reask"] == -1.0


def test_neutral_follow_up_is_near_zero() -> None:
    result = reply("Now write a unit test for it using pytest and a temporary file.")
    assert result.score is not None and abs(result.score) < 0.2
    assert not {"correction", "thanks", "reask", "tool_error"} & result.signals.keys()


def test_sentiment_is_damped() -> None:
    result = reply("This is terrible and annoying, I hate it.")
    assert result.score is not None and -0.5 < result.score < -0.1
    assert set(result.signals) == {"sentiment"}


@pytest.mark.parametrize("follow_up", [
    [], [{"role": "user", "content": "   "}], [{"role": "assistant", "content": "more"}],
    [{"role": "user", "content": None}],
])
def test_no_follow_up_is_none(follow_up: list[dict[str, Any]]) -> None:
    assert implicit_reward(make_turn(), follow_up) == ImplicitResult(score=None, signals={})


@pytest.mark.parametrize("content", [
    "Traceback (most recent call last):\n  File \"t.py\", line 1\nValueError: boom",
    "bash: pytset: command not found",
    "Process exited with code 2",
    '{"ok": false, "error": "permission denied"}',
    "ERROR: could not open requirements.txt",
    "cat: x.txt: No such file or directory",
    "HTTP status 503 from upstream",
])
def test_tool_error_is_negative(content: str) -> None:
    result = implicit_reward(make_turn(tool_calls=[TOOL_CALL]), [tool_result(content)])
    assert result.score == -1.0
    assert result.signals["tool_error"] == -1.0


@pytest.mark.parametrize("content", [
    "12 passed in 0.31s", '{"ok": true, "error": null, "rows": 3}',
    "def f():\n    try:\n        pass\n    except ValueError:\n        raise", "exit code 0",
])
def test_successful_tool_result_is_not_an_error(content: str) -> None:
    result = implicit_reward(make_turn(tool_calls=[TOOL_CALL]), [tool_result(content)])
    assert result.score == 0.0 and result.signals == {}


def test_tool_error_share_and_foreign_results() -> None:
    calls = [TOOL_CALL, {**TOOL_CALL, "id": "call_2"}]
    follow_up = [tool_result("Error: disk full"), tool_result("done", "call_2"),
                 tool_result("Error: not ours", "call_9")]
    result = implicit_reward(make_turn(tool_calls=calls), follow_up)
    assert result.signals["tool_error"] == -0.75  # one of this turn's two calls failed


def test_tool_error_dominates_thanks() -> None:
    follow_up = [tool_result("Segmentation fault (core dumped)"),
                 {"role": "user", "content": "thanks!"}]
    result = implicit_reward(make_turn(tool_calls=[TOOL_CALL]), follow_up)
    assert result.score == -1.0 and result.signals["thanks"] > 0


def test_retry_of_a_failed_call() -> None:
    follow_up = [tool_result("fatal: not a git repository"),
                 {"role": "assistant", "content": None,
                  "tool_calls": [{**TOOL_CALL, "id": "call_2"}]}]
    result = implicit_reward(make_turn(tool_calls=[TOOL_CALL]), follow_up)
    assert result.signals["retry"] == -1.0


@pytest.mark.parametrize("text", [
    "Ça ne marche pas 😞", "日本語で答えてください", "Спасибо!", "👍", "ñandú — ¿qué?",
    "\u0000\ufffd\U0001f600" * 50,
])
def test_non_ascii_does_not_crash(text: str) -> None:
    result = implicit_reward(make_turn(request="Wie kehre ich eine Liste um? 🙂"),
                             [{"role": "user", "content": text}])
    assert result.score is None or -1.0 <= result.score <= 1.0


def test_content_parts_and_long_text() -> None:
    parts = [{"type": "text", "text": "No, that's wrong."}, {"type": "image_url",
                                                           "image_url": {"url": "x"}}]
    assert implicit_reward(make_turn(), [{"role": "user", "content": parts}]).score == -1.0
    long = "Here is the log you asked for:\n" + "INFO all good here\n" * 5000
    result = reply(long)
    assert result.score is not None and -1.0 <= result.score <= 1.0


def test_scores_stay_in_range() -> None:
    texts = ["No!!! WRONG!!! terrible awful horrible", "THANK YOU!!! PERFECT!!! love it",
             REQUEST + " " + REQUEST]
    for text in texts:
        result = reply(text)
        assert result.score is not None and -1.0 <= result.score <= 1.0
        assert all(-1.0 <= v <= 1.0 for v in result.signals.values())
