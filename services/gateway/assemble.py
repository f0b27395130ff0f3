"""The recorded turn's answer, from a whole response or from streamed chunks.

Only the first choice is recorded (agents ask for ``n=1``); the others still reach
the client untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass(slots=True)
class Answer:
    """The assistant message and what was sampled, as the client received it."""

    message: dict[str, Any] = field(default_factory=lambda: {"role": "assistant"})
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    token_ids: list[int] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    prompt_token_ids: list[int] = field(default_factory=list)
    response_id: str | None = None

    def sampled(self) -> dict[str, Any] | None:
        """The ``TokenLogprobs`` of the turn, or None when the upstream sent none."""
        if not (self.token_ids or self.logprobs):
            return None
        return {"token_ids": self.token_ids, "tokens": self.tokens,
                "logprobs": self.logprobs, "prompt_token_ids": self.prompt_token_ids}

    def _add_logprobs(self, logprobs: Any) -> None:
        if not isinstance(logprobs, dict):
            return
        for item in logprobs.get("content") or ():
            if isinstance(item, dict):
                self.tokens.append(str(item.get("token", "")))
                self.logprobs.append(float(item.get("logprob", 0.0)))


def from_response(data: dict[str, Any]) -> Answer:
    """The answer in a non-streamed ``chat.completion``."""
    answer = Answer(usage=data.get("usage"), response_id=data.get("id"))
    answer.prompt_token_ids = list(data.get("prompt_token_ids") or ())
    choices = data.get("choices") or ()
    if choices and isinstance(choices[0], dict):
        choice = choices[0]
        if isinstance(choice.get("message"), dict):
            answer.message = choice["message"]
        answer.finish_reason = choice.get("finish_reason")
        answer.token_ids = list(choice.get("token_ids") or ())
        answer._add_logprobs(choice.get("logprobs"))
    return answer


class StreamAssembler:
    """Builds the answer from ``chat.completion.chunk`` objects, in arrival order."""

    def __init__(self) -> None:
        self.answer = Answer()
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._tools: dict[int, dict[str, Any]] = {}

    def add(self, chunk: dict[str, Any]) -> None:
        """Fold one chunk in."""
        answer = self.answer
        if answer.response_id is None:
            answer.response_id = chunk.get("id")
        if chunk.get("usage"):
            answer.usage = chunk["usage"]
        if chunk.get("prompt_token_ids"):
            answer.prompt_token_ids = list(chunk["prompt_token_ids"])
        for choice in chunk.get("choices") or ():
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                self._add_choice(choice)

    def _add_choice(self, choice: dict[str, Any]) -> None:
        delta = choice.get("delta") or {}
        if delta.get("content"):
            self._content.append(delta["content"])
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if reasoning:
            self._reasoning.append(reasoning)
        for call in delta.get("tool_calls") or ():
            self._add_tool_call(call)
        if choice.get("finish_reason"):
            self.answer.finish_reason = choice["finish_reason"]
        if choice.get("token_ids"):
            self.answer.token_ids.extend(choice["token_ids"])
        self.answer._add_logprobs(choice.get("logprobs"))

    def _add_tool_call(self, call: dict[str, Any]) -> None:
        slot = self._tools.setdefault(int(call.get("index", 0)), {
            "id": None, "type": "function", "function": {"name": "", "arguments": ""}})
        if call.get("id"):
            slot["id"] = call["id"]
        if call.get("type"):
            slot["type"] = call["type"]
        function = call.get("function") or {}
        if function.get("name"):
            slot["function"]["name"] += function["name"]
        if function.get("arguments"):
            slot["function"]["arguments"] += function["arguments"]

    def finish(self) -> Answer:
        """The assembled answer."""
        message: dict[str, Any] = {"role": "assistant",
                                   "content": "".join(self._content) if self._content else None}
        if self._reasoning:
            message["reasoning_content"] = "".join(self._reasoning)
        if self._tools:
            message["tool_calls"] = [self._tools[i] for i in sorted(self._tools)]
        self.answer.message = message
        return self.answer


def strip_unasked(data: dict[str, Any], logprobs: bool, token_ids: bool) -> None:
    """Remove what Reef asked the upstream for but the client did not (in place)."""
    if token_ids:
        data.pop("prompt_token_ids", None)
    for choice in data.get("choices") or ():
        if isinstance(choice, dict):
            if logprobs:
                choice["logprobs"] = None
            if token_ids:
                choice.pop("token_ids", None)


_KINDS = ("processed", "raw")


def sampling_fields(body: dict[str, Any], stated: str | None) -> dict[str, Any]:
    """How the recorded tokens were sampled, for the turn's ``sampled``: what the upstream
    stated (``x-reef-sampling``, Reef's policy server: the kind of its logprobs and the
    effective parameters, defaults included) over what the request sent upstream said
    (``temperature``, ``top_p``, ``top_k``, ``seed``; None where it said nothing). Values
    of the wrong type become None, so a turn always validates."""
    said: dict[str, Any] = {}
    if stated:
        try:
            parsed = orjson.loads(stated)
        except orjson.JSONDecodeError:
            parsed = None
        said = parsed if isinstance(parsed, dict) else {}
    temperature = _number(said.get("temperature", body.get("temperature")))
    top_k = _integer(said.get("top_k", body.get("top_k")))
    kind = said.get("logprobs_kind")
    greedy = said.get("greedy")
    return {
        "logprobs_kind": kind if kind in _KINDS else None,
        "temperature": temperature, "top_p": _number(said.get("top_p", body.get("top_p"))),
        "top_k": top_k, "seed": _integer(said.get("seed", body.get("seed"))),
        "greedy": greedy if isinstance(greedy, bool) else (temperature == 0.0 or top_k == 1),
    }


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else None


def _integer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
