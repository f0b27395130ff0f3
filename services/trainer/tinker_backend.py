"""The Tinker backend: LoRA training on the Tinker cloud through the ``tinker`` SDK (0.38).

Everything here is written for Reef against the SDK's own API; nothing is taken from
``tinker-cookbook`` (0.6.1 does not install here, and 0.5.8 would downgrade transformers
5.24 -> 5.5.4, which the local backend and the policy server need). The few pieces the
cookbook would have given are written below and say so: datum conversion
(:func:`to_tinker_datum`), the sampler-vs-trainer logprob gap (:func:`sample_train_gap`)
and the local record of the latest checkpoint (:class:`CheckpointRecord`).

SDK calls relied on (``tinker`` 0.38.0; each returns a future, read with ``.result()``):

- ``RestClient(base_url=, api_key=).get_server_capabilities()`` ->
  ``GetServerCapabilitiesResponse.supported_models[].model_name / .trainable``
- ``ServiceClient.create_lora_training_client(base_model=, rank=)`` -> ``TrainingClient``
- ``ServiceClient.create_training_client_from_state_with_optimizer(path)``: resume with the
  Adam state (the SDK deprecates ``TrainingClient.load_state_with_optimizer`` for it)
- ``TrainingClient.forward_backward(data, loss_fn, loss_fn_config)`` /
  ``forward(...)`` -> ``ForwardBackwardOutput``: the summed loss is
  ``metrics["loss:sum"]``; ``loss_fn_outputs[i]["logprobs"]`` are the current policy's
  target logprobs (``TensorData``)
- ``TrainingClient.optim_step(AdamParams(..., grad_clip_norm=))`` ->
  ``OptimStepResponse.metrics`` (Tinker clips the global gradient norm; 0 does not)
- ``TrainingClient.save_state(name)`` -> ``SaveWeightsResponse.path`` (weights + optimizer);
  ``save_weights_for_sampler(name)`` -> ``SaveWeightsForSamplerResponse.path``
- ``ServiceClient.create_sampling_client(model_path=)`` -> ``SamplingClient``
- ``save_state`` / ``save_weights_for_sampler`` take ``ttl_seconds``: every checkpoint is
  saved with ``tinker_checkpoint_ttl_seconds``; ``RestClient.set_checkpoint_ttl_from_tinker_path
  (path, None)`` lifts it for a kept version (:meth:`TinkerBackend.pin`) and
  ``RestClient.delete_checkpoint_from_tinker_path(path)`` deletes one the trainer no longer
  keeps (:meth:`TinkerBackend.delete`), so storage does not grow without bound.

Every method blocks (client creation with the service unreachable blocks ~300 s in the
SDK): the trainer calls them through ``asyncio.to_thread``, never on its event loop.

Privacy: a datum carries the sampled token ids, which cannot be redacted without breaking
the importance ratios, so a turn whose text holds a secret or personal data never becomes
a datum here: the trainer drops it at intake (``shared.redact.sensitive_for_tinker``,
counted as ``reef_trainer_samples_total{fate="sensitive"}``; ``redact_outbound``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import tinker
from tinker import types as ttypes

from services.trainer.backend import (
    LOSS_FNS,
    Checkpoint,
    Datum,
    StepError,
    StepResult,
    ratio_bounds,
)
from shared.settings import ConfigError, Settings

log = logging.getLogger("reef.trainer.tinker")

WIRE_LOSS = {"tis": "cispo"}
"""Reef's losses that Tinker computes under another built-in's name. Truncated importance
sampling, ``-stopgrad(min(r, cap)) * lp * A``, is Tinker's ``cispo``,
``-stopgrad(clip(r, low, high)) * lp * A``, with the thresholds ``[0, cap]``: the ratio is
never below 0, so only the cap acts. The others go by their own names."""
LOSS_KEY = "loss:sum"
"""Where Tinker reports the summed loss in ``ForwardBackwardOutput.metrics``."""
ADAM_BETA1 = 0.9
"""Adam's first-moment decay (Tinker's default)."""
ADAM_BETA2 = 0.95
"""Adam's second-moment decay (Tinker's default, lower than torch's 0.999: RL gradients
are noisy and a shorter memory reacts faster)."""
ADAM_EPS = 1e-12
"""Adam's denominator epsilon (Tinker's default)."""


class TinkerBackendError(StepError):
    """A Tinker call failed or returned something unusable; the message names the call.
    ``transient``: a timeout, a connection failure, a rate limit or a server error."""


def is_transient(exc: BaseException) -> bool:
    """Whether a Tinker SDK error is worth retrying as it is (the request was fine)."""
    if isinstance(exc, tinker.APIConnectionError | tinker.RateLimitError
                  | tinker.InternalServerError):
        return True
    if isinstance(exc, tinker.RequestFailedError):
        return str(exc.category) == "server"
    if isinstance(exc, tinker.APIStatusError):
        return exc.status_code >= 500 or exc.status_code in (408, 409, 429)
    return False


@dataclass(frozen=True, slots=True)
class CheckpointRecord:
    """The latest saved state, kept on local disk so that a restart resumes from it."""

    base_model: str
    step: int
    state_path: str
    sampler_path: str
    name: str


def to_tinker_datum(datum: Datum, loss_fn: str) -> ttypes.Datum:
    """Reef's datum as Tinker's: ``model_input = tokens[:-1]``, ``target_tokens =
    tokens[1:]`` (int64); the policy-gradient losses take the sampler's ``logprobs`` and
    the ``advantages`` (float32, one per target, 0 on the prompt); ``cross_entropy`` takes
    the advantages as its per-token ``weights``. (Written here, not the cookbook's.)"""
    targets = ttypes.TensorData.from_numpy(np.asarray(datum.tokens[1:], dtype=np.int64))
    advantages = ttypes.TensorData.from_numpy(np.asarray(datum.advantages, dtype=np.float32))
    inputs: dict[str, ttypes.TensorData] = {"target_tokens": targets}
    if loss_fn == "cross_entropy":
        inputs["weights"] = advantages
    else:
        inputs["logprobs"] = ttypes.TensorData.from_numpy(
            np.asarray(datum.logprobs, dtype=np.float32))
        inputs["advantages"] = advantages
    return ttypes.Datum(model_input=ttypes.ModelInput.from_ints(datum.tokens[:-1]),
                        loss_fn_inputs=inputs)


def sample_train_gap(datums: list[Datum], train_logprobs: list[list[float]]) -> float | None:
    """Mean of ``sampler logprob - trainer logprob`` over completion tokens (a k1 estimate
    of KL(sampler || trainer)); large values mean the samples are off-policy or the
    sampler and trainer disagree. None when there are no completion tokens."""
    diffs = [s - t for d, lps in zip(datums, train_logprobs, strict=True)
             for s, t, a in zip(d.logprobs, lps, d.advantages, strict=True)
             if s != 0.0 or a != 0.0]
    return sum(diffs) / len(diffs) if diffs else None


def _default_rest_client(settings: Settings) -> Any:
    return tinker.RestClient(base_url=settings.tinker_base_url or None,
                             api_key=_api_key(settings))


def _default_service_client(settings: Settings) -> Any:
    return tinker.ServiceClient(base_url=settings.tinker_base_url or None,
                                api_key=_api_key(settings),
                                user_metadata={"adapter": settings.adapter_name})


def _api_key(settings: Settings) -> str | None:
    """The configured key; None lets the SDK read ``TINKER_API_KEY`` itself."""
    key = settings.tinker_api_key
    return key.get_secret_value() if key is not None else None


class TinkerBackend:
    """:class:`~services.trainer.backend.TrainingBackend` on the Tinker cloud.

    ``rest_client_factory`` / ``service_client_factory`` build the SDK's ``RestClient``
    and ``ServiceClient`` (tests inject in-process fakes with the same methods).
    ``result_timeout_seconds`` bounds each wait on a future (None: wait; Tinker queues
    requests when busy)."""

    def __init__(self, settings: Settings, *,
                 rest_client_factory: Callable[[Settings], Any] = _default_rest_client,
                 service_client_factory: Callable[[Settings], Any] = _default_service_client,
                 result_timeout_seconds: float | None = None) -> None:
        self.settings = settings
        self._rest_factory = rest_client_factory
        self._service_factory = service_client_factory
        self._timeout = result_timeout_seconds
        self._record_path = settings.data_dir / "tinker" / f"{settings.adapter_name}.json"
        self._service: Any = None
        self._rest: Any = None
        self._training: Any = None
        self._base_sampler: Any = None
        self.step = 0
        self._pending_loss = 0.0
        self._pending_metrics: dict[str, float] = {}

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> Checkpoint | None:
        """Check the model is offered, then create the LoRA training client, or recreate
        it with weights and optimizer from the last recorded checkpoint (returned)."""
        self._check_model_available()
        record = self.latest_record()
        self._service = self._service_factory(self.settings)
        if record is None:
            self._training = self._wait(self._service.create_lora_training_client(
                base_model=self.settings.model_name, rank=self.settings.lora_rank),
                "create_lora_training_client")
            log.info("tinker.created", extra={"model": self.settings.model_name})
            return None
        self._training = self._wait(
            self._service.create_training_client_from_state_with_optimizer(record.state_path),
            "create_training_client_from_state_with_optimizer")
        self.step = record.step
        log.info("tinker.resumed", extra={"step": record.step, "path": record.state_path})
        return Checkpoint(step=record.step, state_path=record.state_path,
                          adapter_path=record.sampler_path)

    def _check_model_available(self) -> None:
        self._rest = self._rest_factory(self.settings)
        caps = self._wait(self._rest.get_server_capabilities(), "get_server_capabilities")
        trainable = sorted(m.model_name for m in caps.supported_models
                           if m.model_name and m.trainable is not False)
        if self.settings.model_name not in trainable:
            raise ConfigError(
                f"model_name (REEF_MODEL_NAME) {self.settings.model_name!r} is not a model "
                f"Tinker trains; available: {', '.join(trainable) or 'none'}")

    def close(self) -> None:
        """Finish the Tinker session (saved checkpoints stay)."""
        if self._service is not None:
            self._wait(self._service.close("success"), "close")
            self._service = None

    def restore(self, checkpoint: Checkpoint) -> None:
        """A new training client from ``checkpoint``'s state with its optimizer (what the
        SDK recommends over loading into the current client); recorded, so that a restart
        resumes from it too. Gradients of the old client are gone with it."""
        if self._service is None:
            raise TinkerBackendError("restore needs start() first")
        self._training = self._wait(
            self._service.create_training_client_from_state_with_optimizer(
                checkpoint.state_path), "create_training_client_from_state_with_optimizer")
        self.step = checkpoint.step
        self._pending_loss, self._pending_metrics = 0.0, {}
        self._write_record(CheckpointRecord(
            base_model=self.settings.model_name, step=checkpoint.step,
            state_path=checkpoint.state_path, sampler_path=checkpoint.adapter_path,
            name=checkpoint.state_path.rsplit("/", 1)[-1]))
        log.info("tinker.restored", extra={"step": checkpoint.step})

    def delete(self, checkpoint: Checkpoint) -> None:
        """Delete the checkpoint's state and sampler weights on Tinker (404: already gone)."""
        for path in (checkpoint.state_path, checkpoint.adapter_path):
            try:
                self._wait(self._rest_client().delete_checkpoint_from_tinker_path(path),
                           "delete_checkpoint")
            except TinkerBackendError as exc:
                if not isinstance(exc.__cause__, tinker.NotFoundError):
                    raise

    def pin(self, checkpoint: Checkpoint) -> None:
        """Lift the expiry of the checkpoint's state and sampler weights."""
        for path in (checkpoint.state_path, checkpoint.adapter_path):
            self._wait(self._rest_client().set_checkpoint_ttl_from_tinker_path(path, None),
                       "set_checkpoint_ttl")

    # --- training -----------------------------------------------------------------------

    def forward_backward(self, datums: list[Datum], loss_fn: str) -> float:
        """Accumulate gradients of the summed ``loss_fn``; returns Tinker's ``loss:sum``."""
        if loss_fn not in LOSS_FNS:
            raise ValueError(f"loss_fn {loss_fn!r} is not one of {sorted(LOSS_FNS)}")
        if not datums:
            raise ValueError("forward_backward needs at least one datum")
        data = [to_tinker_datum(d, loss_fn) for d in datums]
        wire = WIRE_LOSS.get(loss_fn, loss_fn)
        out: ttypes.ForwardBackwardOutput = self._wait(
            self._client().forward_backward(data, wire, self._loss_config(loss_fn)),
            "forward_backward")
        loss = _loss_of(out, "forward_backward")
        self._pending_loss += loss
        for key, value in out.metrics.items():
            self._pending_metrics[f"tinker/{key}"] = float(value)
        if loss_fn != "cross_entropy" and _has_logprobs(out, datums):
            gap = sample_train_gap(datums, _output_logprobs(out, datums, "forward_backward"))
            if gap is not None:
                self._pending_metrics["sample_train_logprob_gap"] = gap
        return loss

    def _loss_config(self, loss_fn: str) -> dict[str, float] | None:
        """PPO and CISPO clip the ratio to ``[1 - ppo_clip, 1 + ppo_clip]``; TIS (sent as
        ``cispo``) truncates it to ``[0, tis_cap]``."""
        bounds = ratio_bounds(loss_fn, self.settings.ppo_clip, self.settings.tis_cap)
        if bounds is None:
            return None
        return {"clip_low_threshold": bounds[0], "clip_high_threshold": bounds[1]}

    def optim_step(self, learning_rate: float) -> StepResult:
        """One AdamW step (``beta1``/``beta2``/``eps`` as the module constants, no weight
        decay: Tinker's defaults) on the gradients accumulated since the last step, their
        global norm clipped by Tinker to ``max_grad_norm`` (``grad_clip_norm``)."""
        params = ttypes.AdamParams(learning_rate=learning_rate, beta1=ADAM_BETA1,
                                   beta2=ADAM_BETA2, eps=ADAM_EPS,
                                   grad_clip_norm=self.settings.max_grad_norm)
        resp: ttypes.OptimStepResponse = self._wait(self._client().optim_step(params),
                                                    "optim_step")
        self.step += 1
        metrics = dict(self._pending_metrics)
        metrics.update({f"tinker/optim/{k}": float(v) for k, v in (resp.metrics or {}).items()})
        result = StepResult(step=self.step, loss=self._pending_loss, metrics=metrics)
        self._pending_loss, self._pending_metrics = 0.0, {}
        return result

    def save(self, name: str) -> Checkpoint:
        """Save weights + optimizer (``save_state``) and sampler weights, then record them
        locally so that :meth:`start` resumes from here after a crash."""
        client = self._client()
        ttl = self.settings.tinker_checkpoint_ttl_seconds
        state_future = client.save_state(name, ttl_seconds=ttl)
        sampler_future = client.save_weights_for_sampler(name, ttl_seconds=ttl)
        state: ttypes.SaveWeightsResponse = self._wait(state_future, "save_state")
        sampler: ttypes.SaveWeightsForSamplerResponse = self._wait(
            sampler_future, "save_weights_for_sampler")
        record = CheckpointRecord(base_model=self.settings.model_name, step=self.step,
                                  state_path=state.path, sampler_path=sampler.path, name=name)
        self._write_record(record)
        log.info("tinker.saved", extra={"step": self.step, "path": state.path})
        return Checkpoint(step=self.step, state_path=state.path, adapter_path=sampler.path)

    def logprobs(self, datums: list[Datum]) -> list[list[float]]:
        """Current-policy logprobs per target position, from a forward pass (no gradient)
        of the training client: ``forward(..., "cross_entropy")`` with zero weights, read
        from ``loss_fn_outputs[i]["logprobs"]``. A sampling client's
        ``compute_logprobs`` would need a sampler save first and scores only one sequence
        per call."""
        if not datums:
            return []
        data = [to_tinker_datum(Datum(d.tokens, d.logprobs, [0.0] * len(d.advantages)),
                                "cross_entropy") for d in datums]
        out: ttypes.ForwardBackwardOutput = self._wait(
            self._client().forward(data, "cross_entropy"), "forward")
        return _output_logprobs(out, datums, "forward")

    def base_logprobs(self, datums: list[Datum]) -> list[list[float]]:
        """The base model's logprobs per target position, from a sampling client of the
        base model (created once): ``compute_logprobs`` scores one sequence per call, so
        every call is sent before the first is awaited."""
        if not datums:
            return []
        if self._base_sampler is None:
            if self._service is None:
                raise TinkerBackendError("base_logprobs needs start() first")
            self._base_sampler = self._wait(self._service.create_sampling_client(
                base_model=self.settings.model_name), "create_sampling_client")
        futures = [self._base_sampler.compute_logprobs(ttypes.ModelInput.from_ints(d.tokens))
                   for d in datums]
        result = []
        for datum, future in zip(datums, futures, strict=True):
            scored: list[float | None] = self._wait(future, "compute_logprobs")
            if len(scored) != len(datum.tokens):
                raise TinkerBackendError(f"compute_logprobs returned {len(scored)} logprobs "
                                         f"for {len(datum.tokens)} tokens")
            # The first token has no logprob (nothing precedes it): targets start at 1.
            result.append([0.0 if lp is None else float(lp) for lp in scored[1:]])
        return result

    def sampling_client_for(self, checkpoint: Checkpoint) -> Any:
        """A Tinker ``SamplingClient`` serving ``checkpoint``'s sampler weights (for a
        gateway upstream or an on-policy-distillation teacher)."""
        if self._service is None:
            raise TinkerBackendError("sampling_client_for needs start() first")
        return self._wait(self._service.create_sampling_client(
            model_path=checkpoint.adapter_path), "create_sampling_client")

    # --- the local record ---------------------------------------------------------------

    def latest_record(self) -> CheckpointRecord | None:
        """The recorded latest checkpoint, if any; refuses one made for another model."""
        try:
            raw = json.loads(self._record_path.read_text())
        except FileNotFoundError:
            return None
        record = CheckpointRecord(**raw)
        if record.base_model != self.settings.model_name:
            raise ConfigError(
                f"{self._record_path} records a checkpoint of {record.base_model!r}, but "
                f"model_name is {self.settings.model_name!r}: set model_name back, or move "
                "the file away to start a new adapter")
        return record

    def _write_record(self, record: CheckpointRecord) -> None:
        """Atomically replace the record (a crash leaves the old or the new one)."""
        self._record_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._record_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(record), indent=1))
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self._record_path)

    # --- the SDK boundary ---------------------------------------------------------------

    def _rest_client(self) -> Any:
        if self._rest is None:
            self._rest = self._rest_factory(self.settings)
        return self._rest

    def _client(self) -> Any:
        if self._training is None:
            raise TinkerBackendError("the Tinker training client is not created: call start()")
        return self._training

    def _wait(self, future: Any, call: str) -> Any:
        """The future's result; SDK and server failures become :class:`TinkerBackendError`
        naming the call (the seed system never read its futures)."""
        try:
            return future.result(timeout=self._timeout)
        except TimeoutError as exc:  # concurrent.futures.TimeoutError is this since 3.11
            raise TinkerBackendError(f"Tinker {call} gave no result in "
                                     f"{self._timeout} s", transient=True) from exc
        except tinker.TinkerError as exc:
            raise TinkerBackendError(f"Tinker {call} failed: {exc}",
                                     transient=is_transient(exc)) from exc


def _loss_of(out: ttypes.ForwardBackwardOutput, call: str) -> float:
    if LOSS_KEY not in out.metrics:
        raise TinkerBackendError(f"Tinker {call} returned no {LOSS_KEY!r} metric "
                                 f"(metrics: {sorted(out.metrics)})")
    return float(out.metrics[LOSS_KEY])


def _has_logprobs(out: ttypes.ForwardBackwardOutput, datums: list[Datum]) -> bool:
    """Whether every datum's output carries its logprobs (the metric is optional)."""
    return (len(out.loss_fn_outputs) == len(datums)
            and all("logprobs" in output for output in out.loss_fn_outputs))


def _output_logprobs(out: ttypes.ForwardBackwardOutput, datums: list[Datum],
                     call: str) -> list[list[float]]:
    """``loss_fn_outputs[i]["logprobs"]`` as lists, checked one per target position."""
    if len(out.loss_fn_outputs) != len(datums):
        raise TinkerBackendError(f"Tinker {call} returned {len(out.loss_fn_outputs)} outputs "
                                 f"for {len(datums)} datums")
    result: list[list[float]] = []
    for i, (output, datum) in enumerate(zip(out.loss_fn_outputs, datums, strict=True)):
        if "logprobs" not in output:
            raise TinkerBackendError(f"Tinker {call} output {i} has no 'logprobs' "
                                     f"(keys: {sorted(output)})")
        values = [float(v) for v in output["logprobs"].to_numpy().reshape(-1)]
        if len(values) != len(datum.tokens) - 1:
            raise TinkerBackendError(f"Tinker {call} output {i} has {len(values)} logprobs "
                                     f"for {len(datum.tokens) - 1} targets")
        result.append(values)
    return result
