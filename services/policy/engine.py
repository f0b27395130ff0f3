"""The sampling loop: one forward pass per token over a KV cache, sampled in Python.

Writing the loop ourselves (rather than calling ``generate()``) gives the exact ids that
were sampled, their log-probabilities, and a place to stop when the client goes away.

**Logprobs** are, by default, those of the distribution each token was drawn from (after
temperature, top_k and top_p: vLLM's ``processed_logprobs``), or the model's raw
``log_softmax(logits)`` when a request (or ``policy_logprobs_mode``) asks for
``raw_logprobs``; ``services/policy/sampling.py`` draws the token and says which.

The model is used by one thread at a time: the engine owns a single-worker executor,
so requests queue in arrival order and never block the event loop. That thread also
points ``active.current`` at the request's LoRA adapter (see ``lora.py``) for the whole
of its generation, so switching adapters happens only between generations.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from transformers import DynamicCache

from services.policy.lora import ActiveAdapter, Adapter
from services.policy.sampling import SampledToken, SamplingParams, sample
from services.policy.text import StopTracker

__all__ = ["Delta", "Engine", "PolicyEngine", "SampledToken", "SamplingParams", "fit_context"]

log = logging.getLogger(__name__)

_DONE = object()
"""Queue sentinel: the generation thread has finished."""


@dataclass(frozen=True, slots=True)
class Delta:
    """A piece of one choice's answer: new text and the tokens that produced it.

    Tokens and text need not line up one to one: text can be held back (a possible stop
    string, half a UTF-8 character) while its tokens are already reported.
    """

    index: int
    text: str
    tokens: tuple[SampledToken, ...] = ()
    finish_reason: str | None = None
    """``stop`` or ``length`` on the last delta of a choice, else None."""


class PolicyEngine(Protocol):
    """What the routes need from a sampler: this module's :class:`Engine` (the local
    model) or ``services.policy.tinker_engine.TinkerEngine`` (a Tinker sampling client)."""

    tokenizer: Any
    context_length: int
    """Most tokens of prompt plus answer (0: unknown)."""
    vocab_size: int

    def max_new_tokens_for(self, prompt_length: int, requested: int) -> int: ...

    def logprobs_kind(self, params: SamplingParams) -> Literal["processed", "raw"] | None:
        """What the logprobs reported under ``params`` are of (None: unknown)."""
        ...

    def stream(self, prompt_ids: list[int], params: SamplingParams, n: int,
               cancel: threading.Event, adapter: Adapter | None = None
               ) -> AsyncIterator[Delta]: ...

    async def score(self, ids: list[int], adapter: Adapter | None = None) -> list[float]: ...

    def close(self) -> None: ...


class Engine:
    """Samples answers from a loaded causal LM, one request at a time."""

    def __init__(self, model: Any, tokenizer: Any, threads: int = 0) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.eos_ids = _eos_ids(model, tokenizer)
        self.context_length = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        self.vocab_size = int(model.config.vocab_size)
        self._threads = threads
        self.active = ActiveAdapter()
        """The adapter of the running generation; ``LoraLinear`` layers read it."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy-gen",
                                            initializer=self._init_thread)

    def _init_thread(self) -> None:
        if self._threads > 0:
            torch.set_num_threads(self._threads)

    def close(self) -> None:
        """Stop accepting work; a running generation finishes its current step."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def stream(self, prompt_ids: list[int], params: SamplingParams, n: int,
                     cancel: threading.Event, adapter: Adapter | None = None
                     ) -> AsyncIterator[Delta]:
        """Deltas of ``n`` answers to one prompt, as they are sampled (choice by choice).

        ``adapter`` (None: the base model) is applied to every choice, whatever is loaded
        or unloaded meanwhile. Setting ``cancel`` (or closing this iterator) stops sampling
        after the current step.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def emit(item: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            self.active.current = adapter
            try:
                for index in range(n):
                    if cancel.is_set():
                        break
                    seed = None if params.seed is None else params.seed + index
                    self._generate(prompt_ids, params, index, seed, cancel, emit)
            finally:
                self.active.current = None
                emit(_DONE)

        future = loop.run_in_executor(self._executor, work)
        future.add_done_callback(_retrieve)  # no "exception never retrieved" if abandoned
        try:
            while (item := await queue.get()) is not _DONE:
                yield item
        finally:
            cancel.set()  # also when the consumer went away: stop at the next step
        await future  # re-raises what went wrong on the generation thread

    async def score(self, ids: list[int], adapter: Adapter | None = None) -> list[float]:
        """Log-probability of each token of ``ids`` given the ones before it (one forward
        pass; ``len(ids) - 1`` values), under the base model or ``adapter``."""
        loop = asyncio.get_running_loop()

        def work() -> list[float]:
            self.active.current = adapter
            try:
                return self._score(ids)
            finally:
                self.active.current = None

        return await loop.run_in_executor(self._executor, work)

    @torch.inference_mode()
    def _score(self, ids: list[int]) -> list[float]:
        inputs = torch.tensor([ids], device=self.device)
        logits = self.model(input_ids=inputs).logits[0, :-1].float()
        targets = inputs[0, 1:]
        picked = logits.gather(1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
        return [float(x) for x in picked.cpu()]

    @torch.inference_mode()
    def _generate(self, prompt_ids: list[int], params: SamplingParams, index: int,
                  seed: int | None, cancel: threading.Event,
                  emit: Callable[[Delta], None]) -> None:
        """Sample one answer, emitting deltas as text appears; runs on the executor thread."""
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed if seed is not None else int(torch.seed()))
        tracker = StopTracker(self.tokenizer, params.stop)
        pending: list[SampledToken] = []
        cache = DynamicCache(config=self.model.config)  # grown in place by each forward
        logits = self._forward(prompt_ids, cache)
        text, finish = "", "length"
        started, step = time.perf_counter(), -1
        for step in range(params.max_new_tokens):
            if cancel.is_set():
                log.info("policy.generation_cancelled tokens=%d", step)
                return
            token = sample(logits, params, generator)
            pending.append(token)
            if token.token_id in self.eos_ids:
                text, finish = tracker.flush(), "stop"
                break
            text = tracker.push(token.token_id)
            if tracker.stopped:
                finish = "stop"
                break
            if step + 1 == params.max_new_tokens:
                text += tracker.flush()
                break
            if text:  # tokens whose text is held back ride along with the next delta
                emit(Delta(index, text, tuple(pending)))
                pending, text = [], ""
            logits = self._forward([token.token_id], cache)
        emit(Delta(index, text, tuple(pending), finish))
        seconds = time.perf_counter() - started
        log.debug("policy.generation_done tokens=%d seconds=%.2f tokens_per_second=%.1f",
                  step + 1, seconds, (step + 1) / max(seconds, 1e-9))

    def _forward(self, ids: list[int], cache: DynamicCache) -> torch.Tensor:
        """Next-token logits (float32) after ``ids``; ``cache`` holds what came before."""
        inputs = torch.tensor([ids], device=self.device)
        out = self.model(input_ids=inputs, cache=cache, use_cache=True, logits_to_keep=1)
        logits: torch.Tensor = out.logits[0, -1].float()
        return logits

    def max_new_tokens_for(self, prompt_length: int, requested: int) -> int:
        return fit_context(self.context_length, prompt_length, requested)

    def logprobs_kind(self, params: SamplingParams) -> Literal["processed", "raw"]:
        return params.logprobs_kind


def fit_context(context_length: int, prompt_length: int, requested: int) -> int:
    """``requested`` new tokens capped so that prompt and answer fit ``context_length``
    (0: unknown, no cap)."""
    if context_length <= 0:
        return requested
    return min(requested, context_length - prompt_length)


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Every token id that ends an answer (generation config and tokenizer)."""
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    configured = getattr(config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list):
        ids.update(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)
