"""Implicit feedback: a reward read from what the user (or a tool) did after a turn.

Pure and local: no LLM, no I/O, about a hundred microseconds per turn. The signals, each
in [-1, 1]:

- ``correction`` (-1): the user says the answer was wrong ("no, ...", "that's wrong",
  "not what I asked", "I said ...", "try again", "doesn't work" ...). Phrases that merely
  contain such words ("no problem", "I have no idea", "what's wrong with my code") do not
  count.
- ``tool_error`` (-0.5 .. -1): results of this turn's tool calls look like failures
  (traceback, exception, non-zero exit, "not found" ...); the share of failed calls sets
  the depth.
- ``retry`` (-1): the follow-up repeats a tool call of this turn that failed.
- ``thanks`` (+0.7 thanks, +1 acceptance such as "perfect", "that works").
- ``reask`` (-0.25 .. -1): the user's next message is (nearly) the same request again;
  lexical similarity by default, any ``similarity`` callable (embeddings) when given.
- ``sentiment`` (-0.4 .. +0.4): VADER's compound score of the start of the user's next
  message, times 0.4: the weakest evidence, so it can never outweigh the others.

Combination, strongest evidence first: a correction, tool error or retry sets the score
(the most negative of them), whatever else was said ("thanks, but that's wrong" is a
correction); otherwise thanks/acceptance; otherwise a re-ask (deepened, never lifted, by
negative sentiment); otherwise the sentiment alone. A follow-up with text but no signal
scores 0.0 with no signals; ``score`` is None only when nothing followed at all.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from shared.messages import TurnV1

SENTIMENT_CHARS = 300
"""VADER reads at most this many characters of the follow-up (its cost grows with length)."""
CUE_CHARS = 400
"""Corrections and thanks are looked for in this many leading characters of the follow-up."""
SIMILARITY_CHARS = 600
"""The request and the follow-up are compared on this many leading characters."""
TOOL_CHARS = 400
"""Tool results are inspected at their start and their end, this many characters each."""

SENTIMENT_WEIGHT = 0.4
"""Sentiment alone moves the score at most this far from 0."""
SENTIMENT_FLOOR = 0.05
"""VADER's own neutrality band: a |compound| below it is no signal."""
REASK_THRESHOLD = 0.6
"""Similarity from which a follow-up counts as the same request asked again."""
REASK_FULL = 0.9
"""Similarity at which a re-ask is as bad as a correction."""
REASK_MIN_WORDS = 2
"""Requests with fewer content words are not compared ("ok", "go on")."""
REASK_MAX_LENGTH_RATIO = 4.0
"""Texts whose lengths differ more than this are not the same request (a pasted log)."""

Similarity = Callable[[str, str], float]
"""A text similarity in [0, 1]: plug an embedding model in here."""


@dataclass(frozen=True, slots=True)
class ImplicitResult:
    """The implicit reward of one turn."""

    score: float | None
    """In [-1, 1]; None when nothing followed the turn (no user text, no tool result)."""
    signals: dict[str, float]
    """The signals that fired, each in [-1, 1] (e.g. ``{"correction": -1.0}``)."""


# The patterns run on lower-cased text (cheaper than IGNORECASE) and each factors its
# word-boundary out of its alternatives, so most positions fail at the first test.

_CORRECTION = re.compile(
    # "No, ..." / "Wrong." at the start, but not "no problem", "no idea", "no thanks" ...
    r"^\W*(?:no|nope|nah|wrong|incorrect)\b(?![\s,.!]+(?:problem|prob|worries|need|rush|doubt|"
    r"biggie|thanks|thank|idea|way|matter|pressure)\b)"
    r"|\b(?:"
    # "that's wrong", "this is still incorrect", "you are wrong", "it's not right"
    r"(?:that|this|it|answer|you)\s*(?:is|was|are|'s|'re)\s+(?:still\s+|completely\s+|"
    r"totally\s+|all\s+|just\s+|simply\s+)?(?:wrong|incorrect|not\s+(?:right|correct|true))\b"
    r"|(?:thats|its|youre)\s+(?:still\s+)?(?:wrong|incorrect)\b"
    r"|that'?s\s+not\s+(?:it|right|correct|true|what|how)\b"
    r"|not\s+what\s+i\s+(?:asked|wanted|meant|said|need|needed)"
    r"|(?:you\s+)?(?:misunderstood|misread)\b|you\s+(?:ignored|forgot|missed)\b"
    r"|wrong\s+(?:answer|again|file|function|language|output|result)\b"
    r"|(?:got|have|had)\s+it\s+wrong\b"
    r"|i\s+(?:said|asked\s+for|told\s+you|already\s+said|meant)\b"
    # "try again", but not "let me / I'll / I want to try again"
    r"|(?=t)(?<!me\s)(?<!i'll\s)(?<!i\swill\s)(?<!i'd\s)(?<!to\s)try\s+again\b"
    r"|(?:does\s*n[o']?t|did\s*n[o']?t|is\s*n[o']?t|still\s+does\s*n[o']?t)\s+work"
    r"|(?:it|that|this)\s+(?:still\s+)?(?:fails|crashes|breaks|is\s+broken)\b"
    r"|still\s+(?:broken|failing|wrong|the\s+same\s+(?:error|problem|issue))\b"
    r"|(?:nonsense|useless)\b|thanks\s+for\s+nothing\b)"
)

_THANKS = re.compile(
    r"\b(?:thanks|thank\s+you|thank\s+u|thx|tysm|ty|cheers|much\s+appreciated|"
    r"appreciate\s+it)\b"
)
_NOT_THANKS = re.compile(r"\bno,?\s+thank(?:s|\s+you)\b|\bthanks\s+for\s+nothing\b")

_ACCEPTANCE = re.compile(
    r"\b(?:perfect|exactly\s+what\s+i\s+(?:needed|wanted)|spot\s+on|nailed\s+it"
    r"|works\s+(?:now|great|perfectly|like\s+a\s+charm)|(?:that|it)\s+(?:works|worked)"
    r"|that\s+(?:did\s+it|fixed\s+it|solved\s+it)|problem\s+solved"
    r"|that'?s\s+(?:right|correct|exactly\s+it))\b"
)
_NEGATED_ACCEPTANCE = re.compile(r"\b(?:not|n't|never)\s+(?:quite\s+)?perfect\b")

_TOOL_ERROR = re.compile(
    r"traceback \(most recent call last\)"
    r"|^[ \t]*(?:error|fatal|exception|failed|failure)\b(?![ \t]*[:=]?[ \t]*0\b)"
    r"|^[ \t]*[\w.]*(?:error|exception)[ \t]*:"
    r"|^npm err!"
    r"|\"(?:error|exception)\"\s*:(?!\s*(?:null|false|\"\"|\{\}|\[\]))"
    r"|\"(?:ok|success)\"\s*:\s*false"
    r"|\b(?:exit(?:ed)?\s+(?:with\s+)?(?:code|status)\s*[:=]?\s*-?[1-9]"
    r"|return_?code\"?\s*[:=]\s*-?[1-9]"
    r"|non-?zero\s+exit"
    r"|not\s+found\b"
    r"|no\s+such\s+file\s+or\s+directory\b"
    r"|permission\s+denied\b"
    r"|segmentation\s+fault\b"
    r"|timed\s+out\b|timeout\s+expired\b"
    r"|status(?:[\s_]*code)?\"?\s*[:=]?\s*[45]\d\d\b)",
    re.MULTILINE,
)

_WORD = re.compile(r"\w+", re.UNICODE)
_STOPWORD_TEXT = (
    "a an the and or but if then so to of in on at by for with from into about as is are "
    "was were be been being do does did can could would should will shall may might must "
    "i me my we our you your it its this that these those he she they them his her their "
    "what which who whom how why when where please pls just also again now still "
    "not no yes ok okay hi hey hello"
)
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())


@functools.cache
def _analyzer() -> SentimentIntensityAnalyzer:
    """VADER's analyzer, built once (reading its lexicon takes milliseconds)."""
    return SentimentIntensityAnalyzer()


def implicit_reward(turn: TurnV1, follow_up: list[dict[str, Any]], *,
                    similarity: Similarity | None = None) -> ImplicitResult:
    """The implicit reward of ``turn``, from the messages that followed it.

    ``follow_up`` holds the user's next message(s) and the ``tool`` results of this
    turn's tool calls. ``similarity`` replaces the lexical re-ask measure (e.g. cosine of
    sentence embeddings); it must return a value in [0, 1].
    """
    user_text = " ".join(_text(m.get("content")) for m in follow_up
                         if m.get("role") == "user").strip()
    tool_results = _tool_results(turn, follow_up)
    if not user_text and not tool_results:
        return ImplicitResult(score=None, signals={})
    signals: dict[str, float] = {}
    if tool_results:
        _tool_signals(turn, follow_up, tool_results, signals)
    if user_text:
        _user_signals(turn, user_text, similarity, signals)
    return ImplicitResult(score=_combine(signals), signals=signals)


def _combine(signals: dict[str, float]) -> float:
    """One score from the signals, strongest evidence first (see the module docstring)."""
    hard = [signals[k] for k in ("correction", "tool_error", "retry") if k in signals]
    if hard:
        return min(hard)
    if "thanks" in signals:
        return signals["thanks"]
    sentiment = signals.get("sentiment", 0.0)
    if "reask" in signals:
        return min(signals["reask"], sentiment)
    return sentiment


def _user_signals(turn: TurnV1, text: str, similarity: Similarity | None,
                  signals: dict[str, float]) -> None:
    """Corrections, thanks, re-asks and sentiment in the user's next message."""
    head = text[:CUE_CHARS].lower().replace("\u2019", "'")  # phones type curly apostrophes
    if _CORRECTION.search(head):
        signals["correction"] = -1.0
    if _ACCEPTANCE.search(head) and not _NEGATED_ACCEPTANCE.search(head):
        signals["thanks"] = 1.0
    elif _THANKS.search(head) and not _NOT_THANKS.search(head):
        signals["thanks"] = 0.7
    request = _request_text(turn)
    if request:
        reask = _reask(request, text, similarity)
        if reask < 0.0:
            signals["reask"] = reask
    compound = float(_analyzer().polarity_scores(text[:SENTIMENT_CHARS])["compound"])
    if abs(compound) >= SENTIMENT_FLOOR:
        signals["sentiment"] = round(SENTIMENT_WEIGHT * compound, 4)


def _reask(request: str, follow_up: str, similarity: Similarity | None) -> float:
    """A negative value when the follow-up asks the request again, else 0.0."""
    if similarity is not None:
        sim = similarity(request, follow_up)
    else:
        a, b = request[:SIMILARITY_CHARS], follow_up[:SIMILARITY_CHARS]
        if max(len(a), len(b)) > REASK_MAX_LENGTH_RATIO * min(len(a), len(b)):
            return 0.0
        sim = _lexical_similarity(a, b)
    if sim < REASK_THRESHOLD:
        return 0.0
    depth = 0.25 + 0.75 * (sim - REASK_THRESHOLD) / (REASK_FULL - REASK_THRESHOLD)
    return -min(1.0, round(depth, 4))


def _lexical_similarity(a: str, b: str) -> float:
    """Cosine similarity of the two texts' sets of content words (0 when either is short)."""
    wa, wb = _content_words(a), _content_words(b)
    if len(wa) < REASK_MIN_WORDS or len(wb) < REASK_MIN_WORDS:
        return 0.0
    return len(wa & wb) / math.sqrt(len(wa) * len(wb))


def _content_words(text: str) -> frozenset[str]:
    """Lower-cased words without stopwords, with a crude plural/-ing fold."""
    words = set()
    for word in _WORD.findall(text.lower()):
        if word in _STOPWORDS:
            continue
        if len(word) > 4 and word.endswith("ing"):
            word = word[:-3]
        elif len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
            word = word[:-1]
        words.add(word)
    return frozenset(words)


def _tool_signals(turn: TurnV1, follow_up: list[dict[str, Any]],
                  results: list[dict[str, Any]], signals: dict[str, float]) -> None:
    """Failed tool calls of this turn, and a repeat of a failed call in the follow-up."""
    failed = [m for m in results if _looks_failed(_text(m.get("content")))]
    if not failed:
        return
    signals["tool_error"] = -round(0.5 + 0.5 * len(failed) / len(results), 4)
    failed_ids = {m.get("tool_call_id") for m in failed}
    failed_calls = {_call_key(c) for c in _tool_calls(turn.response_message)
                    if c.get("id") in failed_ids}
    for message in follow_up:
        if message.get("role") == "assistant" and any(
                _call_key(c) in failed_calls for c in _tool_calls(message)):
            signals["retry"] = -1.0
            return


def _looks_failed(content: str) -> bool:
    """Whether a tool result reads like an error (checked at its start and its end)."""
    if len(content) > 2 * TOOL_CHARS:
        content = content[:TOOL_CHARS] + "\n" + content[-TOOL_CHARS:]
    return _TOOL_ERROR.search(content.lower()) is not None


def _tool_results(turn: TurnV1, follow_up: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The follow-up's tool messages that answer this turn's calls (all tool messages when
    the calls carry no ids)."""
    ids = {c.get("id") for c in _tool_calls(turn.response_message)} - {None}
    tools = [m for m in follow_up if m.get("role") == "tool"]
    if ids:
        tools = [m for m in tools if m.get("tool_call_id") in ids]
    return tools


def _tool_calls(message: dict[str, Any]) -> list[dict[str, Any]]:
    calls = message.get("tool_calls") or []
    return [c for c in calls if isinstance(c, dict)]


def _call_key(call: dict[str, Any]) -> tuple[str, str]:
    fn = call.get("function") or {}
    return str(fn.get("name", "")), str(fn.get("arguments", "")).replace(" ", "")


def _request_text(turn: TurnV1) -> str:
    """The turn's request: the last user message sent upstream."""
    for message in reversed(turn.messages):
        if message.get("role") == "user":
            return _text(message.get("content"))
    return ""


def _text(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(_parts(content))
    return ""


def _parts(parts: Iterable[Any]) -> Iterable[str]:
    for part in parts:
        if isinstance(part, dict) and isinstance(part.get("text"), str):
            yield part["text"]
        elif isinstance(part, str):
            yield part
