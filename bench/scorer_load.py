"""Turns for the scorer benchmark: conversations as a gateway records them.

Sessions of ``SESSION_TURNS`` main turns; each turn carries the whole history, and the
last one has ``session_done`` so every turn is finalised without waiting for the idle
sweep. What the user does after each answer is drawn (seeded) from ``FOLLOW_UPS``: a
correction, thanks, a re-ask, a neutral next question, or a tool call whose result (ok
or an error) opens the next turn. Sessions arrive in waves of ``WAVE_SESSIONS``,
interleaved turn by turn within a wave, as concurrent agents would send them.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import redis

from shared.keys import TURNS, Keys
from shared.messages import TurnV1, Usage

SESSION_TURNS = 10
WAVE_SESSIONS = 64
"""Sessions in flight at once in the stream's order."""
PIPELINE_CHUNK = 500
"""XADDs sent in one pipeline round trip while loading."""

QUESTIONS = (
    "How do I read a CSV file with pandas and skip the first two rows?",
    "Write a bash one-liner that counts lines in every .py file under src/.",
    "What is the difference between a process and a thread in Python?",
    "Explain how Redis consumer groups deliver entries to several consumers.",
    "Refactor this function so it does not mutate its argument: def f(x): x.append(1)",
    "Which HTTP status should an API return when the request body is invalid JSON?",
    "Summarise the meeting notes I pasted earlier in three bullet points.",
    "Why does my Docker container exit immediately after it starts?",
)
FOLLOW_UPS: dict[str, tuple[float, tuple[str, ...]]] = {
    "neutral": (0.35, ("Now can you also show how to sort the result by date?",
                       "And what happens if the file is empty?",
                       "Ok. Next, add type hints to it.")),
    "thanks": (0.15, ("Thanks, that works perfectly!", "Great, exactly what I needed.",
                      "thx, appreciate it")),
    "correction": (0.15, ("No, that's wrong. I asked for the version that handles empty input.",
                          "That's not what I asked. I said Python 3.12, not 2.7.",
                          "It still doesn't work, same error as before.")),
    "reask": (0.10, ()),
    "tool_ok": (0.15, ('{"ok": true, "stdout": "3 files changed, 42 insertions(+)"}',)),
    "tool_error": (0.10, ("Traceback (most recent call last):\n  File \"main.py\", line 3\n"
                          "ModuleNotFoundError: No module named 'pandas'",
                          "bash: line 1: rg: command not found\nexit code 127")),
}
"""Kind of follow-up -> (share of turns, texts)."""


def conversation(session: str, rng: random.Random, tenant: str = "bench") -> list[TurnV1]:
    """One session's turns, the last marked ``session_done``."""
    history: list[dict[str, Any]] = [
        {"role": "system", "content": "You are a helpful coding assistant. Be concise."},
        {"role": "user", "content": rng.choice(QUESTIONS)}]
    turns: list[TurnV1] = []
    kinds, weights = list(FOLLOW_UPS), [share for share, _ in FOLLOW_UPS.values()]
    for i in range(SESSION_TURNS):
        kind = rng.choices(kinds, weights)[0]
        answer = _answer(session, i, kind)
        turns.append(TurnV1(
            id=f"{session}-{i}", tenant=tenant, session_id=session, turn_index=i,
            session_done=i == SESSION_TURNS - 1, request_model="bench-model",
            upstream_model="bench-model", messages=history, response_message=answer,
            finish_reason="tool_calls" if "tool_calls" in answer else "stop",
            usage=Usage(prompt_tokens=40 * len(history), completion_tokens=60,
                        total_tokens=40 * len(history) + 60),
            latency_seconds=0.4, response_id=f"chatcmpl-{session}-{i}"))
        history = [*history, answer, *_opening(kind, answer, history, rng)]
    return turns


def _answer(session: str, i: int, kind: str) -> dict[str, Any]:
    if kind.startswith("tool"):
        return {"role": "assistant", "content": None, "tool_calls": [{
            "id": f"call-{session}-{i}", "type": "function",
            "function": {"name": "run_shell", "arguments": '{"cmd": "python main.py"}'}}]}
    return {"role": "assistant", "content": (
        f"Here is one way to do it (step {i}). First, open the file and read it line by "
        "line; then filter the rows you need and write them back. ```python\nimport csv\n"
        "with open('data.csv') as f:\n    rows = list(csv.reader(f))[2:]\n```\nThis keeps "
        "memory use low because the file is streamed. Let me know if you need more.")}


def _opening(kind: str, answer: dict[str, Any], history: list[dict[str, Any]],
             rng: random.Random) -> list[dict[str, Any]]:
    """What the next turn brings after ``answer``: the previous turn's follow-up."""
    texts = FOLLOW_UPS[kind][1]
    if kind.startswith("tool"):
        return [{"role": "tool", "tool_call_id": answer["tool_calls"][0]["id"],
                 "content": rng.choice(texts)}]
    if kind == "reask":
        last = next(m["content"] for m in reversed(history) if m["role"] == "user")
        return [{"role": "user", "content": f"Again: {last}"}]
    return [{"role": "user", "content": rng.choice(texts)}]


def turns(count: int, prefix: str, seed: int = 7) -> Iterator[TurnV1]:
    """``count`` turns (a multiple of ``SESSION_TURNS`` rounded up) in arrival order."""
    rng = random.Random(seed)
    sessions = -(-count // SESSION_TURNS)
    for wave in range(0, sessions, WAVE_SESSIONS):
        convs = [conversation(f"{prefix}{s}", rng)
                 for s in range(wave, min(wave + WAVE_SESSIONS, sessions))]
        for i in range(SESSION_TURNS):
            for conv in convs:
                yield conv[i]


def encode(count: int, prefix: str) -> list[dict[str, bytes]]:
    """The stream entries of ``turns(count, prefix)``, built before any clock starts."""
    return [turn.to_fields() for turn in turns(count, prefix)]


def publish(client: redis.Redis, namespace: str, entries: list[dict[str, bytes]]) -> None:
    """XADD every entry to the namespace's turns stream, pipelined."""
    key = Keys(namespace).stream(TURNS)
    for start in range(0, len(entries), PIPELINE_CHUNK):
        pipe = client.pipeline(transaction=False)
        for fields in entries[start:start + PIPELINE_CHUNK]:
            pipe.xadd(key, fields)  # type: ignore[arg-type]
        pipe.execute()
