"""The miner's LLM: asks for a diagnosis and skills, and insists on valid JSON once.

The endpoint is ``miner_base_url`` + ``miner_model`` (any OpenAI-compatible server) when
set, else the Azure OpenAI deployment shared with the judge (``azure_openai_*``). Calls
ask for ``response_format: json_object``; an endpoint that refuses it (400/422) is asked
again without it, and never with it again by this process. An answer that is not the JSON
asked for is sent back once with what was wrong; a second invalid answer gives up (the
caller counts it ``invalid``). Call failures (after the client's own retries) raise
``LLMCallError``: the caller leaves its stream entry pending so it is retried later.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from services.skill_miner import prompts
from services.skill_miner.metrics import MinerMetrics
from services.skill_miner.proposals import InvalidAnswer, MinerAnswer, parse_answer
from services.skill_miner.trajectory import TurnRecord
from shared.llm_client import Completion, Endpoint, LLMCallError, LLMClient
from shared.settings import ConfigError, Settings
from shared.skills import Skill

log = logging.getLogger("reef.skill_miner")

MAX_TOKENS = 2000
"""Room for a diagnosis and a few skills of ~150 words each."""
TEMPERATURE = 0.3
"""Some variety across sessions, but a stable format."""
JSON_OBJECT = {"type": "json_object"}
_NO_JSON_MODE_STATUSES = (400, 422)


def miner_endpoint(settings: Settings) -> Endpoint:
    """The skill-evolution LLM's endpoint; ``ConfigError`` when none is configured."""
    if settings.miner_base_url:
        if not settings.miner_model:
            raise ConfigError("miner_model (REEF_MINER_MODEL) is empty: name the model of "
                              "miner_base_url")
        key = settings.miner_api_key
        return Endpoint.openai(settings.miner_base_url, settings.miner_model,
                               None if key is None else key.get_secret_value())
    if settings.azure_openai_endpoint and settings.azure_openai_deployment:
        key = settings.azure_openai_api_key or settings.miner_api_key
        return Endpoint.azure(settings.azure_openai_endpoint, settings.azure_openai_deployment,
                              settings.azure_openai_api_version,
                              None if key is None else key.get_secret_value(),
                              model=settings.miner_model)
    raise ConfigError("the skill-miner needs miner_base_url and miner_model "
                      "(REEF_MINER_BASE_URL, REEF_MINER_MODEL), or azure_openai_endpoint and "
                      "azure_openai_deployment")


class ProposalLLM:
    """Asks the miner LLM for proposals; one per process (its client bounds concurrency)."""

    needs_context = True

    def __init__(self, settings: Settings, metrics: MinerMetrics) -> None:
        self._metrics = metrics
        self._client = LLMClient(
            miner_endpoint(settings), timeout=settings.miner_timeout_seconds,
            retries=settings.miner_retries, concurrency=settings.miner_concurrency,
            on_retry=lambda kind: metrics.llm_retries.labels(kind).inc())
        self._json_mode = True

    async def start(self) -> None:
        await self._client.start()

    async def close(self) -> None:
        await self._client.close()

    async def propose(self, session: list[TurnRecord], failing: TurnRecord,
                      existing: list[Skill], max_skills: int) -> MinerAnswer | None:
        """The validated answer for ``failing`` (the last of ``session``, shown with the
        ``existing`` skills it might improve), or None when it was invalid twice; raises
        ``LLMCallError`` when a call fails."""
        messages = prompts.proposal_messages(session, failing, existing, max_skills)
        reply = await self._call(messages)
        try:
            return parse_answer(reply, max_skills)
        except InvalidAnswer as exc:
            error = str(exc)
        log.info("skill_miner.answer_invalid", extra={"attempt": 1})
        reply = await self._call(prompts.retry_messages(messages, reply, error))
        try:
            return parse_answer(reply, max_skills)
        except InvalidAnswer:
            log.warning("skill_miner.answer_invalid", extra={"attempt": 2})
            return None

    async def _call(self, messages: list[dict[str, str]]) -> str | None:
        started = time.perf_counter()
        try:
            completion = await self._complete(messages)
        except LLMCallError as exc:
            self._metrics.llm_errors.labels(exc.kind).inc()
            log.warning("skill_miner.llm_failed", extra={"kind": exc.kind, "status": exc.status})
            raise
        finally:
            self._metrics.llm_seconds.observe(time.perf_counter() - started)
        self._metrics.llm_tokens.labels("prompt").inc(completion.prompt_tokens)
        self._metrics.llm_tokens.labels("completion").inc(completion.completion_tokens)
        return completion.text

    async def _complete(self, messages: list[dict[str, str]]) -> Completion:
        if self._json_mode:
            try:
                return await self._client.complete(messages, max_tokens=MAX_TOKENS,
                                                   temperature=TEMPERATURE,
                                                   response_format=JSON_OBJECT)
            except LLMCallError as exc:
                if exc.status not in _NO_JSON_MODE_STATUSES:
                    raise
                self._json_mode = False
                log.info("skill_miner.json_mode_refused", extra={"status": exc.status})
        return await self._client.complete(messages, max_tokens=MAX_TOKENS,
                                           temperature=TEMPERATURE)


class Proposer(Protocol):
    """What the miner asks for proposals: the LLM (:class:`ProposalLLM`), or the offline
    ``services.skill_miner.corrections.CorrectionsProposer``."""

    needs_context: bool
    """Whether proposals need the session's earlier turns and the related skills (the
    miner skips reading them for a proposer that looks at the failing turn only)."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def propose(self, session: list[TurnRecord], failing: TurnRecord,
                      existing: list[Skill], max_skills: int) -> MinerAnswer | None: ...


def build_proposer(settings: Settings, metrics: MinerMetrics) -> Proposer:
    """The proposer ``miner_backend`` names."""
    if settings.miner_backend == "corrections":
        from services.skill_miner.corrections import CorrectionsProposer

        return CorrectionsProposer()
    return ProposalLLM(settings, metrics)
