"""The LLM judge (process reward model): ``prm_m`` votes in {-1, 0, +1} per turn.

The judge sees the turn and what followed it (hindsight, see ``prompts``). It speaks to
any OpenAI-compatible ``/chat/completions`` endpoint, or to an Azure OpenAI deployment.
Votes run in parallel; each call has a total timeout and retries (timeouts, connection
errors, 429 and 5xx) with short exponential backoff; a semaphore bounds the calls in
flight per judge. A turn none of whose votes is valid gets ``score=None``: it is left
unscored, never given a silent 0.

HTTP goes through ``shared.llm_client`` (one aiohttp session per judge; see there why
not httpx).

Prompts and completions are never logged: only event names and error kinds. With
``redact_outbound`` (the default) secrets and personal data in the turn are replaced by
placeholders before it leaves for the judge (``shared.redact``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import orjson

from services.scorer import prompts
from services.scorer.metrics import ScorerMetrics
from shared.llm_client import Endpoint, LLMCallError, LLMClient, reply_text, usage_tokens
from shared.messages import TurnV1
from shared.redact import outbound_redactor
from shared.settings import ConfigError, Settings

log = logging.getLogger(__name__)

RATIONALE_CHARS = 400
"""A verdict's rationale is cut to this many characters."""
HINT_CHARS = 1000
"""A teacher hint is cut to this many characters."""
SPLIT_VOTE_RATIONALE = "The votes were split evenly between +1 and -1."


@dataclass(frozen=True, slots=True)
class Verdict:
    """The judge's decision on one turn."""

    score: int | None
    """Majority of the valid votes, in {-1, 0, 1}; None when no vote was valid (the turn
    is left unscored)."""
    votes: list[int]
    """The valid votes."""
    rationale: str
    """Short; from a vote that agrees with the majority."""
    prompt_tokens: int
    completion_tokens: int
    """Tokens of every call made for this turn (votes and hint): the cost."""
    error: str | None
    """When ``score`` is None: ``timeout``, ``http``, ``connect`` or ``unparseable`` (the
    most frequent among the failed votes)."""
    hint: str | None = None
    """A corrective instruction for on-policy distillation (``teacher_hints`` and a
    score <= 0); None when not asked for or when asking failed."""


@dataclass(frozen=True, slots=True)
class _Vote:
    score: int | None
    rationale: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None


JudgeCallError = LLMCallError
"""One judge call failed; ``kind`` is its metric label (kept under the judge's old name)."""


# --- parsing --------------------------------------------------------------------------

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_MARKUP = str.maketrans("", "", "*`")
_SCORE = re.compile(
    r"(?:\bscore\b[\"']?\s*[:=]\s*[\"']?|\\boxed\{\s*)([+-]?)\s*([01])(?:\.0+)?(?!\.?\d)",
    re.IGNORECASE,
)
_RATIONALE_LABEL = re.compile(r"^\s*(?:rationale|reasoning|explanation)\s*:\s*", re.IGNORECASE)
_JSON_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$", re.IGNORECASE)


def parse_verdict(text: str | None) -> tuple[int, str] | None:
    """The score and rationale in a judge's reply, or None when it holds no valid score.

    Accepts ``Score: 1``, ``Score: +1``, ``score = -1``, ``**Score:** -1.``, ``\\boxed{1}``
    and JSON ``{"score": 1, "rationale": "..."}``. The *last* score in the text counts (a
    rationale may mention others); ``<think>`` blocks are ignored.
    """
    if not text:
        return None
    text = _THINK.sub("", text).translate(_MARKUP).strip()
    from_json = _json_verdict(text)
    if from_json is not None:
        return from_json
    matches = list(_SCORE.finditer(text))
    if not matches:
        return None
    match = matches[-1]
    score = -int(match.group(2)) if match.group(1) == "-" else int(match.group(2))
    rationale = _RATIONALE_LABEL.sub("", text[:match.start()]).strip()
    return score, " ".join(rationale.split())[:RATIONALE_CHARS]


def _json_verdict(text: str) -> tuple[int, str] | None:
    """A reply that is one JSON object with an integer ``score`` in {-1, 0, 1}."""
    body = _JSON_FENCE.sub("", text)
    if not (body.startswith("{") and body.endswith("}")):
        return None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    score = data.get("score") if isinstance(data, dict) else None
    if isinstance(score, bool) or not isinstance(score, int | float) or score not in (-1, 0, 1):
        return None
    rationale = next((str(data[k]) for k in ("rationale", "reason", "explanation") if k in data),
                     "")
    return int(score), " ".join(rationale.split())[:RATIONALE_CHARS]


def majority(votes: Sequence[int]) -> int | None:
    """The most frequent vote; None when there is none.

    A tie is settled as 0 when 0 is among the tied values, else by the sign of the sum of
    the votes. With votes in {-1, 0, 1} that sign is 0 too (+1 and -1 tied cancel out):
    contradictory evidence is no evidence either way.
    """
    if not votes:
        return None
    counts = Counter(votes)
    top = max(counts.values())
    tied = [value for value, n in counts.items() if n == top]
    if len(tied) == 1:
        return tied[0]
    if 0 in tied:
        return 0
    total = sum(votes)
    return (total > 0) - (total < 0)


# --- the judge ------------------------------------------------------------------------

class Judge:
    """Scores turns with an LLM; one per scorer process, shared by its workers."""

    def __init__(self, settings: Settings, metrics: ScorerMetrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._redactor = outbound_redactor(settings)
        self._client = LLMClient(
            _endpoint(settings), timeout=settings.judge_timeout_seconds,
            retries=settings.judge_retries, concurrency=settings.judge_concurrency,
            on_retry=lambda kind: metrics.judge_retries.labels(kind).inc())

    async def start(self) -> None:
        """Open the HTTP session (connection pool sized to ``judge_concurrency``)."""
        await self._client.start()

    async def close(self) -> None:
        """Close the HTTP session."""
        await self._client.close()

    async def __aenter__(self) -> Judge:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def judge(self, turn: TurnV1, follow_up: list[dict[str, Any]]) -> Verdict:
        """``prm_m`` votes on ``turn`` in the light of ``follow_up``, and their majority."""
        body = self._body(prompts.judge_messages(turn.messages, turn.response_message,
                                                 follow_up, self._redactor))
        votes = await asyncio.gather(*(self._vote(body)
                                       for _ in range(max(1, self._settings.prm_m))))
        prompt_tokens = sum(v.prompt_tokens for v in votes)
        completion_tokens = sum(v.completion_tokens for v in votes)
        valid = [v.score for v in votes if v.score is not None]
        score = majority(valid)
        if score is None:
            errors = Counter(v.error for v in votes if v.error is not None)
            return Verdict(score=None, votes=[], rationale="", prompt_tokens=prompt_tokens,
                           completion_tokens=completion_tokens,
                           error=errors.most_common(1)[0][0] if errors else "unparseable")
        rationale = next((v.rationale for v in votes if v.score == score), SPLIT_VOTE_RATIONALE)
        hint = None
        if self._settings.teacher_hints and score <= 0:
            hint, hint_prompt, hint_completion = await self._hint(turn, follow_up)
            prompt_tokens += hint_prompt
            completion_tokens += hint_completion
        return Verdict(score=score, votes=valid, rationale=rationale,
                       prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                       error=None, hint=hint)

    async def _vote(self, body: bytes) -> _Vote:
        """One vote: a call (with retries) and its parsed verdict; failures are votes too."""
        started = time.perf_counter()
        try:
            data = await self._call(body)
        except JudgeCallError as exc:
            self._metrics.judge_errors.labels(exc.kind).inc()
            log.warning("judge.vote_failed", extra={"kind": exc.kind, "status": exc.status})
            return _Vote(None, "", 0, 0, exc.kind)
        finally:
            self._metrics.judge_seconds.observe(time.perf_counter() - started)
        prompt_tokens, completion_tokens = self._count_usage(data)
        parsed = parse_verdict(reply_text(data))
        if parsed is None:
            self._metrics.judge_errors.labels("unparseable").inc()
            log.warning("judge.vote_unparseable")
            return _Vote(None, "", prompt_tokens, completion_tokens, "unparseable")
        return _Vote(parsed[0], parsed[1], prompt_tokens, completion_tokens, None)

    async def _hint(self, turn: TurnV1, follow_up: list[dict[str, Any]]
                    ) -> tuple[str | None, int, int]:
        """A teacher hint for a turn that went wrong: (hint or None, prompt, completion)."""
        body = self._body(prompts.hint_messages(turn.messages, turn.response_message,
                                                follow_up, self._redactor))
        try:
            data = await self._call(body)
        except JudgeCallError as exc:
            log.warning("judge.hint_failed", extra={"kind": exc.kind, "status": exc.status})
            return None, 0, 0
        prompt_tokens, completion_tokens = self._count_usage(data)
        text = " ".join(_THINK.sub("", reply_text(data) or "").split())
        return text[:HINT_CHARS] or None, prompt_tokens, completion_tokens

    async def _call(self, body: bytes) -> dict[str, Any]:
        """One chat completion, retried on timeouts, connection errors, 429 and 5xx."""
        return await self._client.post(body)

    def _body(self, messages: list[dict[str, str]]) -> bytes:
        return orjson.dumps({"model": self._client.endpoint.model, "messages": messages,
                             "max_tokens": self._settings.judge_max_tokens,
                             "temperature": self._settings.judge_temperature})

    def _count_usage(self, data: dict[str, Any]) -> tuple[int, int]:
        """The call's tokens from its ``usage`` field, added to the metrics."""
        prompt_tokens, completion_tokens = usage_tokens(data)
        self._metrics.judge_tokens.labels("prompt").inc(prompt_tokens)
        self._metrics.judge_tokens.labels("completion").inc(completion_tokens)
        return prompt_tokens, completion_tokens


def _endpoint(settings: Settings) -> Endpoint:
    """The judge's endpoint (Azure when configured)."""
    if settings.azure_openai_deployment and settings.azure_openai_endpoint:
        key = settings.azure_openai_api_key or settings.prm_api_key
        return Endpoint.azure(settings.azure_openai_endpoint, settings.azure_openai_deployment,
                              settings.azure_openai_api_version,
                              None if key is None else key.get_secret_value(),
                              model=settings.prm_model)
    if not settings.prm_base_url:
        raise ConfigError("the judge needs prm_base_url (REEF_PRM_BASE_URL), or "
                          "azure_openai_endpoint and azure_openai_deployment")
    if not settings.prm_model:
        raise ConfigError("prm_model (REEF_PRM_MODEL) is empty: name the judge's model")
    key = settings.prm_api_key
    return Endpoint.openai(settings.prm_base_url, settings.prm_model,
                           None if key is None else key.get_secret_value())
