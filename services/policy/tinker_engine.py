"""The policy server on the Tinker cloud: the gateway's upstream when weights live there.

With ``policy_backend = "tinker"`` the policy server samples from a Tinker
``SamplingClient`` instead of the local model (the seed system's default), behind the same
routes: ``/v1/chat/completions`` (token ids and logprobs of what was sampled, for the
trainer), ``/v1/completions`` scoring, and vLLM's ``/v1/load_lora_adapter`` /
``/v1/unload_lora_adapter``, whose ``lora_path`` is then the ``tinker://.../sampler_weights/...``
path the trainer publishes in its ``weights`` events. So the gateway drives this server,
the local one and a real vLLM the same way, and hot swaps work unchanged: a load creates a
sampling client for the new path; requests that started on the old one finish on it.

Differences from the local engine, all from the SDK:

- Tinker returns whole sequences, so a streamed answer arrives as one content chunk per
  choice (with OpenAI's ``index``), then the finish chunk; it is still real SSE.
- A request cannot be cancelled once sent; a client that hangs up only stops the stream.
- Prompts are rendered here with the base model's chat template (``tinker_tokenizer``,
  default ``model_name``: a Hugging Face name or a local tokenizer directory).
- **Which logprobs Tinker returns is unknown.** ``SampledSequence.logprobs`` are passed on
  as the sampler gives them; the SDK (0.38.0) documents them only as "log probabilities
  for each generated token", not whether they are of the model's raw distribution or of
  the one the token was drawn from (after ``temperature``, ``top_k``, ``top_p``), and no
  request option picks one. So the answer states the kind as unknown
  (``logprobs_kind: null`` in ``x-reef-sampling``) and ``logprobs_mode`` is ignored here;
  a trainer must not treat them as processed logprobs unless the sampling was plain
  (temperature 1, no cut), where both kinds agree.

Every SDK call returns a future, waited for on a worker thread with ``tinker_timeout_seconds``;
creating the ``ServiceClient`` blocks while the service is unreachable, which is why the
server builds it in its loading thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from services.policy.engine import Delta, SampledToken, SamplingParams, fit_context
from services.policy.lora import Adapter, AdapterError
from services.policy.registry import Adapters
from shared.settings import Settings

log = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class TinkerAdapter(Adapter):
    """A loaded adapter: a sampling client of its sampler weights."""

    client: Any = None


def _wait(future: Any, timeout: float, call: str) -> Any:
    """A Tinker future's result; a timeout or a server error says which call failed."""
    try:
        return future.result(timeout=timeout)
    except TimeoutError:
        raise RuntimeError(f"tinker {call} gave no result in {timeout:.0f}s") from None


class TinkerAdapters(Adapters):
    """Adapters as Tinker sampling clients, created from ``tinker://`` sampler paths."""

    def __init__(self, service: Any, base_name: str, timeout: float,
                 base_aliases: Iterable[str] = ()) -> None:
        super().__init__(base_name, base_aliases=base_aliases)
        self._service = service
        self._timeout = timeout

    def _read_and_install(self, name: str, path: str) -> Adapter:
        if not path.startswith("tinker://"):
            raise AdapterError(f"lora_path must be a tinker:// sampler path on this server, "
                               f"got {path!r}")
        client = _wait(self._service.create_sampling_client(model_path=path), self._timeout,
                       "create_sampling_client")
        return TinkerAdapter(name, path, {}, 0, client=client)


class TinkerEngine:
    """Samples and scores through Tinker sampling clients (see the module docstring)."""

    def __init__(self, base: Any, tokenizer: Any, *, context_length: int = 0,
                 timeout: float = 300.0) -> None:
        self.base = base
        """The base model's sampling client."""
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.vocab_size = len(tokenizer)
        self._timeout = timeout

    def close(self) -> None:
        return None

    def max_new_tokens_for(self, prompt_length: int, requested: int) -> int:
        return fit_context(self.context_length, prompt_length, requested)

    def logprobs_kind(self, params: SamplingParams) -> Literal["processed", "raw"] | None:
        """Unknown: see the module docstring."""
        return None

    def _client(self, adapter: Adapter | None) -> Any:
        return adapter.client if isinstance(adapter, TinkerAdapter) else self.base

    async def stream(self, prompt_ids: list[int], params: SamplingParams, n: int,
                     cancel: threading.Event, adapter: Adapter | None = None
                     ) -> AsyncIterator[Delta]:
        """One delta per choice, each the whole sampled sequence."""
        from tinker import types

        client = self._client(adapter)
        future = client.sample(
            types.ModelInput.from_ints(prompt_ids), num_samples=n,
            sampling_params=types.SamplingParams(
                max_tokens=params.max_new_tokens, temperature=params.temperature,
                top_p=params.top_p, top_k=params.top_k if params.top_k > 0 else -1,
                seed=params.seed, stop=list(params.stop) or None),
            topk_sample_logprobs=params.top_logprobs)
        response = await asyncio.to_thread(_wait, future, self._timeout, "sample")
        for index, sequence in enumerate(response.sequences):
            if cancel.is_set():
                return
            tokens = list(sequence.tokens)
            logprobs = list(sequence.logprobs or [])
            if len(logprobs) != len(tokens):
                raise RuntimeError(f"tinker sample returned {len(tokens)} tokens but "
                                   f"{len(logprobs)} logprobs")
            top = list(sequence.topk_logprobs or []) if params.top_logprobs else []
            sampled = tuple(
                SampledToken(t, float(lp), tuple(top[i] or ()) if i < len(top) else ())
                for i, (t, lp) in enumerate(zip(tokens, logprobs, strict=True)))
            text = _cut_at_stop(self.tokenizer.decode(tokens, skip_special_tokens=True),
                                params.stop)
            yield Delta(index, text, sampled, finish_reason=sequence.stop_reason)

    async def score(self, ids: list[int], adapter: Adapter | None = None) -> list[float]:
        """Logprob of each token after the first (``compute_logprobs``)."""
        from tinker import types

        future = self._client(adapter).compute_logprobs(types.ModelInput.from_ints(ids))
        values: list[float | None] = await asyncio.to_thread(
            _wait, future, self._timeout, "compute_logprobs")
        return [0.0 if v is None else float(v) for v in values[1:]]


def _cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    """``text`` up to the first stop string (the sampler includes the one it stopped on)."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return text if cut < 0 else text[:cut]


def _default_service_client(settings: Settings) -> Any:
    import tinker

    key = settings.tinker_api_key
    return tinker.ServiceClient(base_url=settings.tinker_base_url or None,
                                api_key=None if key is None else key.get_secret_value())


def _default_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


@dataclass
class TinkerServing:
    """What the policy server loads in ``policy_backend = "tinker"`` mode."""

    engine: TinkerEngine
    adapters: TinkerAdapters
    service: Any = field(repr=False, default=None)


def load(settings: Settings, served_name: str, *,
         service_factory: Callable[[Settings], Any] = _default_service_client,
         tokenizer_factory: Callable[[str], Any] = _default_tokenizer) -> TinkerServing:
    """Connect to Tinker and create the base model's sampling client (blocking: call it
    on a worker thread)."""
    service = service_factory(settings)
    timeout = settings.tinker_timeout_seconds
    base = _wait(service.create_sampling_client(base_model=settings.model_name), timeout,
                 "create_sampling_client")
    tokenizer = tokenizer_factory(settings.tinker_tokenizer or settings.model_name)
    engine = TinkerEngine(base, tokenizer, context_length=settings.tinker_context_length,
                          timeout=timeout)
    log.info("policy.tinker_ready model=%s", settings.model_name)
    adapters = TinkerAdapters(service, served_name, timeout, base_aliases=(settings.model_name,))
    return TinkerServing(engine, adapters, service)
