"""The Tinker backend at the SDK boundary: the Tinker cloud cannot be reached here, so the
SDK's ``RestClient`` / ``ServiceClient`` / ``TrainingClient`` are replaced by in-process
fakes with the same method signatures (checked against the installed SDK) that take and
return the SDK's own types and futures (``tinker.types.*``, ``AwaitableConcurrentFuture``).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

tinker = pytest.importorskip("tinker")

from tinker import types as ttypes  # noqa: E402
from tinker.lib.public_interfaces.api_future import AwaitableConcurrentFuture  # noqa: E402
from tinker.types.get_server_capabilities_response import SupportedModel  # noqa: E402
from tinker.types.request_error_category import RequestErrorCategory  # noqa: E402

from services.trainer.backend import Checkpoint, Datum, TrainingBackend  # noqa: E402
from services.trainer.tinker_backend import (  # noqa: E402
    TinkerBackend,
    TinkerBackendError,
    to_tinker_datum,
)
from shared.settings import ConfigError, Settings  # noqa: E402

MODEL = "Qwen/Qwen3-4B-Instruct-2507"


def done(value: Any) -> AwaitableConcurrentFuture[Any]:
    """A resolved future, as the SDK returns them."""
    future: Future[Any] = Future()
    future.set_result(value)
    return AwaitableConcurrentFuture(future)


def failed(exc: BaseException) -> AwaitableConcurrentFuture[Any]:
    future: Future[Any] = Future()
    future.set_exception(exc)
    return AwaitableConcurrentFuture(future)


def server_error(message: str = "worker lost") -> Exception:
    return tinker.RequestFailedError(message, "req-1", RequestErrorCategory.Server)


class Cloud:
    """What the fakes share: the call log, the models offered, scripted replies."""

    def __init__(self, models: list[str] | None = None) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.models = [MODEL, "moonshotai/Kimi-K2.6"] if models is None else models
        self.loss = 3.25
        self.fail: dict[str, Exception] = {}
        self.run = 0

    def log(self, call: str, /, **kwargs: Any) -> AwaitableConcurrentFuture[Any] | None:
        self.calls.append((call, kwargs))
        return failed(self.fail[call]) if call in self.fail else None

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


class FakeRestClient:
    def __init__(self, cloud: Cloud) -> None:
        self.cloud = cloud

    def get_server_capabilities(self) -> Any:
        caps = ttypes.GetServerCapabilitiesResponse(supported_models=[
            SupportedModel(model_name=m, trainable=True, sampleable=True)
            for m in self.cloud.models] + [
            SupportedModel(model_name="sample-only/Model", trainable=False)])
        return self.cloud.log("get_server_capabilities") or done(caps)

    def delete_checkpoint_from_tinker_path(self, tinker_path: str) -> Any:
        return self.cloud.log("delete_checkpoint", path=tinker_path) or done(None)

    def set_checkpoint_ttl_from_tinker_path(self, tinker_path: str,
                                            ttl_seconds: int | None) -> Any:
        return (self.cloud.log("set_checkpoint_ttl", path=tinker_path, ttl=ttl_seconds)
                or done(None))


class FakeTrainingClient:
    def __init__(self, cloud: Cloud, run: str) -> None:
        self.cloud = cloud
        self.run = run

    def _output(self, data: list[Any]) -> ttypes.ForwardBackwardOutput:
        # The "current policy" gives every target logprob -1.5.
        outputs = [{"logprobs": ttypes.TensorData.from_numpy(
            np.full(d.loss_fn_inputs["target_tokens"].shape, -1.5, dtype=np.float32))}
            for d in data]
        return ttypes.ForwardBackwardOutput(
            loss_fn_output_type="ArrayRecord", loss_fn_outputs=outputs,
            metrics={"loss:sum": self.cloud.loss, "clock_cycle:unique": 7.0})

    def forward_backward(self, data: list[Any], loss_fn: Any,
                         loss_fn_config: Any = None) -> Any:
        return (self.cloud.log("forward_backward", data=data, loss_fn=loss_fn,
                               loss_fn_config=loss_fn_config) or done(self._output(data)))

    def forward(self, data: list[Any], loss_fn: Any, loss_fn_config: Any = None) -> Any:
        return (self.cloud.log("forward", data=data, loss_fn=loss_fn,
                               loss_fn_config=loss_fn_config) or done(self._output(data)))

    def optim_step(self, optim_params: Any = None, *, adam_params: Any = None) -> Any:
        return (self.cloud.log("optim_step", params=optim_params or adam_params)
                or done(ttypes.OptimStepResponse(metrics={"grad_norm:mean": 0.5})))

    def save_state(self, name: str, ttl_seconds: int | None = None, overwrite: bool = False,
                   user_metadata: dict[str, str] | None = None) -> Any:
        return (self.cloud.log("save_state", name=name, ttl=ttl_seconds) or done(
            ttypes.SaveWeightsResponse(path=f"tinker://{self.run}/weights/{name}")))

    def save_weights_for_sampler(self, name: str, ttl_seconds: int | None = None,
                                 user_metadata: dict[str, str] | None = None) -> Any:
        return (self.cloud.log("save_weights_for_sampler", name=name, ttl=ttl_seconds) or done(
            ttypes.SaveWeightsForSamplerResponse(
                path=f"tinker://{self.run}/sampler_weights/{name}")))


class FakeServiceClient:
    def __init__(self, cloud: Cloud) -> None:
        self.cloud = cloud

    def _new_run(self) -> FakeTrainingClient:
        self.cloud.run += 1
        return FakeTrainingClient(self.cloud, f"run-{self.cloud.run}")

    def create_lora_training_client(
            self, base_model: str, rank: int = 32, seed: int | None = None,
            train_mlp: bool = True, train_attn: bool = True, train_unembed: bool = True,
            user_metadata: dict[str, str] | None = None, optimizer: Any = None) -> Any:
        return (self.cloud.log("create_lora_training_client", base_model=base_model, rank=rank)
                or done(self._new_run()))

    def create_training_client_from_state_with_optimizer(
            self, path: str, base_model: str | None = None,
            user_metadata: dict[str, str] | None = None,
            weights_access_token: str | None = None) -> Any:
        return (self.cloud.log("create_training_client_from_state_with_optimizer", path=path)
                or done(self._new_run()))

    def create_sampling_client(self, model_path: str | None = None,
                               base_model: str | None = None, retry_config: Any = None,
                               record_stability_info: bool = False) -> Any:
        if base_model is not None:
            return (self.cloud.log("create_sampling_client", base_model=base_model)
                    or done(FakeSamplingClient(self.cloud, base_model)))
        return (self.cloud.log("create_sampling_client", model_path=model_path)
                or done(("sampling-client", model_path)))

    def close(self, status: Any, detail: str | None = None) -> Any:
        return self.cloud.log("close", status=status) or done(None)


class FakeSamplingClient:
    def __init__(self, cloud: Cloud, base_model: str | None) -> None:
        self.cloud = cloud
        self.base_model = base_model

    def compute_logprobs(self, prompt: ttypes.ModelInput,
                         prompt_logprobs_last_n: int | None = None) -> Any:
        tokens = prompt.to_ints()
        return (self.cloud.log("compute_logprobs", tokens=tokens)
                or done([None, *(-0.1 * t for t in tokens[1:])]))


# --- fixtures ----------------------------------------------------------------------------

@pytest.fixture
def cloud() -> Cloud:
    return Cloud()


@pytest.fixture
def make_backend(cloud: Cloud, tmp_path: Path) -> Callable[..., TinkerBackend]:
    def make(**overrides: Any) -> TinkerBackend:
        fields: dict[str, Any] = {"profile": "dev", "backend": "tinker", "model_name": MODEL,
                                  "lora_rank": 16, "data_dir": tmp_path, "adapter_name": "reef"}
        settings = Settings(**{**fields, **overrides})
        return TinkerBackend(settings,
                             rest_client_factory=lambda s: FakeRestClient(cloud),
                             service_client_factory=lambda s: FakeServiceClient(cloud))
    return make


def sample_datums() -> list[Datum]:
    return [Datum.from_sample([11, 12, 13], [21, 22], [-0.5, -0.25], 1.5),
            Datum.from_sample([31, 32], [41, 42, 43], [-1.0, -2.0, -3.0], [-1.0, 0.5, 2.0])]


# --- the fakes are the SDK's shape --------------------------------------------------------

@pytest.mark.parametrize(("fake", "real", "method"), [
    (FakeRestClient, tinker.RestClient, "get_server_capabilities"),
    (FakeRestClient, tinker.RestClient, "delete_checkpoint_from_tinker_path"),
    (FakeRestClient, tinker.RestClient, "set_checkpoint_ttl_from_tinker_path"),
    (FakeServiceClient, tinker.ServiceClient, "create_lora_training_client"),
    (FakeServiceClient, tinker.ServiceClient,
     "create_training_client_from_state_with_optimizer"),
    (FakeServiceClient, tinker.ServiceClient, "create_sampling_client"),
    (FakeServiceClient, tinker.ServiceClient, "close"),
    (FakeSamplingClient, tinker.SamplingClient, "compute_logprobs"),
    (FakeTrainingClient, tinker.TrainingClient, "forward_backward"),
    (FakeTrainingClient, tinker.TrainingClient, "forward"),
    (FakeTrainingClient, tinker.TrainingClient, "optim_step"),
    (FakeTrainingClient, tinker.TrainingClient, "save_state"),
    (FakeTrainingClient, tinker.TrainingClient, "save_weights_for_sampler"),
])
def test_fakes_have_the_sdk_signatures(fake: type, real: type, method: str) -> None:
    def shape(cls: type) -> list[tuple[str, Any, Any]]:
        params = inspect.signature(getattr(cls, method)).parameters.values()
        return [(p.name, p.kind, p.default) for p in params]
    assert shape(fake) == shape(real)


def test_backend_satisfies_the_protocol(make_backend: Callable[..., TinkerBackend]) -> None:
    backend: TrainingBackend = make_backend()
    assert callable(backend.start)


# --- datums, key by key and shape by shape -------------------------------------------------

@pytest.mark.parametrize("loss_fn", ["importance_sampling", "ppo", "cispo"])
def test_policy_gradient_datums_match_tinker_loss_inputs(loss_fn: str) -> None:
    datum = Datum.from_sample([11, 12, 13], [21, 22], [-0.5, -0.25], 1.5)
    td = to_tinker_datum(datum, loss_fn)
    assert isinstance(td, tinker.types.Datum)
    assert td.model_input.to_ints() == [11, 12, 13, 21]  # tokens[:-1]
    assert td.model_input.length == len(datum.tokens) - 1
    assert set(td.loss_fn_inputs) == {"target_tokens", "logprobs", "advantages"}
    targets, lps, advs = (td.loss_fn_inputs[k] for k in ("target_tokens", "logprobs",
                                                          "advantages"))
    assert all(isinstance(t, tinker.types.TensorData) for t in (targets, lps, advs))
    assert (targets.dtype, lps.dtype, advs.dtype) == ("int64", "float32", "float32")
    assert targets.shape == lps.shape == advs.shape == [4]
    assert targets.tolist() == [12, 13, 21, 22]  # tokens[1:]
    # Aligned with the targets; 0 on the prompt (targets 12, 13 are prompt tokens).
    assert lps.tolist() == [0.0, 0.0, -0.5, -0.25]
    assert advs.tolist() == [0.0, 0.0, 1.5, 1.5]
    assert td.loss_fn_inputs["target_tokens"].to_numpy().dtype == np.int64


def test_cross_entropy_datums_take_advantages_as_weights() -> None:
    datum = Datum.from_sample([1, 2], [3], [-0.1], 2.0)
    td = to_tinker_datum(datum, "cross_entropy")
    assert set(td.loss_fn_inputs) == {"target_tokens", "weights"}
    assert td.loss_fn_inputs["weights"].dtype == "float32"
    assert td.loss_fn_inputs["weights"].tolist() == [0.0, 2.0]
    assert td.loss_fn_inputs["target_tokens"].tolist() == [2, 3]


# --- the call order and what is read back ----------------------------------------------------

def test_a_step_calls_tinker_in_order_and_reads_every_result(
        cloud: Cloud, make_backend: Callable[..., TinkerBackend]) -> None:
    backend = make_backend(loss_fn="ppo", ppo_clip=0.2)
    assert backend.start() is None
    datums = sample_datums()
    cloud.loss = 7.125
    loss = backend.forward_backward(datums, "ppo")
    result = backend.optim_step(5e-4)
    checkpoint = backend.save("step-000001")

    assert cloud.names() == ["get_server_capabilities", "create_lora_training_client",
                             "forward_backward", "optim_step", "save_state",
                             "save_weights_for_sampler"]
    create, fwd, optim = cloud.calls[1][1], cloud.calls[2][1], cloud.calls[3][1]
    assert create == {"base_model": MODEL, "rank": 16}
    assert fwd["loss_fn"] == "ppo"
    assert fwd["loss_fn_config"] == pytest.approx(
        {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2})
    assert all(isinstance(d, tinker.types.Datum) for d in fwd["data"])
    assert [d.model_input.length for d in fwd["data"]] == [4, 4]
    params = optim["params"]
    assert isinstance(params, tinker.types.AdamParams)
    assert (params.learning_rate, params.beta1, params.beta2, params.eps) == (
        5e-4, 0.9, 0.95, 1e-12)

    assert loss == 7.125  # read from the future's loss:sum, not assumed
    assert result.step == 1 and result.loss == 7.125
    assert result.metrics["tinker/loss:sum"] == 7.125
    assert result.metrics["tinker/optim/grad_norm:mean"] == 0.5
    # sampler logprobs minus the fake's -1.5 over the 5 completion tokens
    assert result.metrics["sample_train_logprob_gap"] == pytest.approx(
        (sum([-0.5, -0.25, -1.0, -2.0, -3.0]) + 5 * 1.5) / 5)
    assert checkpoint == Checkpoint(step=1, state_path="tinker://run-1/weights/step-000001",
                                    adapter_path="tinker://run-1/sampler_weights/step-000001")


def test_tis_is_tinker_s_cispo_with_the_thresholds_zero_and_the_cap(
        cloud: Cloud, make_backend: Callable[..., TinkerBackend]) -> None:
    """Truncated IS, -stopgrad(min(r, cap)) * lp * A, is Tinker's cispo,
    -stopgrad(clip(r, low, high)) * lp * A, with low 0 (a ratio is never below it)."""
    backend = make_backend(tis_cap=3.0)
    backend.start()
    backend.forward_backward(sample_datums(), "tis")
    fwd = cloud.calls[-1][1]
    assert fwd["loss_fn"] == "cispo"
    assert fwd["loss_fn_config"] == {"clip_low_threshold": 0.0, "clip_high_threshold": 3.0}
    assert set(fwd["data"][0].loss_fn_inputs) == {"target_tokens", "logprobs", "advantages"}


@pytest.mark.parametrize(("overrides", "clip"), [({}, 1.0), ({"max_grad_norm": 0.3}, 0.3),
                                                  ({"max_grad_norm": 0.0}, 0.0)])
def test_the_optimiser_clips_the_gradient_norm(
        cloud: Cloud, make_backend: Callable[..., TinkerBackend], overrides: dict[str, Any],
        clip: float) -> None:
    backend = make_backend(**overrides)
    backend.start()
    backend.forward_backward(sample_datums(), "tis")
    backend.optim_step(1e-4)
    assert cloud.calls[-1][1]["params"].grad_clip_norm == clip  # Tinker: 0 = no clipping


def test_importance_sampling_sends_no_loss_config(
        cloud: Cloud, make_backend: Callable[..., TinkerBackend]) -> None:
    backend = make_backend()
    backend.start()
    backend.forward_backward(sample_datums(), "importance_sampling")
    assert cloud.calls[-1][1]["loss_fn_config"] is None


def test_losses_accumulate_until_the_optimizer_step(
        cloud: Cloud, make_backend: Callable[..., TinkerBackend]) -> None:
    backend = make_backend()
    backend.start()
    cloud.loss = 1.0
    backend.forward_backward(sample_datums(), "importance_sampling")
    cloud.loss = 2.5
    backend.forward_backward(sample_datums(), "importance_sampling")
    assert backend.optim_step(1e-4).loss == 3.5
    cloud.loss = 0.25
    backend.forward_backward(sample_datums(), "importance_sampling")
    second = backend.optim_step(1e-4)
    assert (second.step, second.loss) == (2, 0.25)


def test_logprobs_come_from_a_forward_pass(
        cloud: Cloud, make_backend: Callable[..., TinkerBackend]) -> None:
    backend = make_backend()
    backend.start()
    datums = sample_datums()
    assert backend.logprobs(datums) == [[-1.5] * 4, [-1.5] * 4]
    name, call = cloud.calls[-1]
    assert name == "forward" and call["loss_fn"] == "cross_entropy"
    assert all(d.loss_fn_inputs["weights"].tolist() == [0.0] * 4 for d in call["data"])
    assert "optim_step" not in cloud.names()


def test_base_logprobs_come_from_a_base_model_sampling_client(
        cloud: Cloud, make_backend: Callable[..., TinkerBackend]) -> None:
    backend = make_backend()
    backend.start()
    datums = sample_datums()
    expected = [[-0.1 * t for t in d.tokens[1:]] for d in datums]
    assert backend.base_logprobs(datums) == expected
    assert backend.base_logprobs(datums[:1]) == expected[:1]
    calls = [(n, c) for n, c in cloud.calls if n in ("create_sampling_client",
                                                      "compute_logprobs")]
    assert calls[0] == ("create_sampling_client", {"base_model": MODEL})  # created once
    assert [c["tokens"] for n, c in calls[1:]] == [d.tokens for d in [*datums, datums[0]]]
    assert "forward_backward" not in cloud.names() and "optim_step" not in cloud.names()


def test_sampling_client_for_a_checkpoint(
        cloud: Cloud, make_backend: Callable[..., TinkerBackend]) -> None:
    backend = make_backend()
    backend.start()
    checkpoint = backend.save("step-000000")
    assert backend.sampling_client_for(checkpoint) == (
        "sampling-client", "tinker://run-1/sampler_weights/step-000000")


# --- errors ---------------------------------------------------------------------------------

def test_an_unknown_model_fails_naming_the_available_ones(
        cloud: Cloud, make_backend: Callable[..., TinkerBackend]) -> None:
    backend = make_backend(model_name="Qwen/Qwen3-4B")
    with pytest.raises(ConfigError) as err:
        backend.start()
    message = str(err.value)
    assert "'Qwen/Qwen3-4B'" in message and "model_name" in message
    assert MODEL in message and "moonshotai/Kimi-K2.6" in message
    assert "sample-only/Model" not in message  # offered, but not trainable
    assert cloud.names() == ["get_server_capabilities"]  # no training client was created


@pytest.mark.parametrize("call", ["forward_backward", "optim_step", "save_state",
                                  "save_weights_for_sampler"])
def test_a_server_error_in_a_future_propagates(
        cloud: Cloud, make_backend: Callable[..., TinkerBackend], call: str) -> None:
    backend = make_backend()
    backend.start()
    cloud.fail[call] = server_error("worker lost")
    with pytest.raises(TinkerBackendError, match=f"Tinker {call} failed: worker lost") as err:
        backend.forward_backward(sample_datums(), "importance_sampling")
        backend.optim_step(1e-4)
        backend.save("step-000001")
    assert isinstance(err.value.__cause__, tinker.RequestFailedError)
    assert backend.step == (1 if call.startswith("save") else 0)
    assert not (Path(backend.settings.data_dir) / "tinker" / "reef.json").exists()


def test_a_failed_client_creation_propagates(
        cloud: Cloud, make_backend: Callable[..., TinkerBackend]) -> None:
    cloud.fail["create_lora_training_client"] = server_error("no capacity")
    with pytest.raises(TinkerBackendError, match="create_lora_training_client failed"):
        make_backend().start()


def test_a_missing_loss_metric_is_an_error(
        cloud: Cloud, make_backend: Callable[..., TinkerBackend],
        monkeypatch: pytest.MonkeyPatch) -> None:
    backend = make_backend()
    backend.start()
    empty = ttypes.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord",
                                         loss_fn_outputs=[], metrics={})
    monkeypatch.setattr(FakeTrainingClient, "forward_backward",
                        lambda self, data, loss_fn, loss_fn_config=None: done(empty))
    with pytest.raises(TinkerBackendError, match="no 'loss:sum'"):
        backend.forward_backward(sample_datums(), "importance_sampling")


def test_training_before_start_and_unknown_losses_are_refused(
        make_backend: Callable[..., TinkerBackend]) -> None:
    backend = make_backend()
    with pytest.raises(TinkerBackendError, match="start"):
        backend.optim_step(1e-4)
    backend.start()
    with pytest.raises(ValueError, match="dro"):
        backend.forward_backward(sample_datums(), "dro")


# --- resume after a crash -----------------------------------------------------------------

def test_resume_after_a_crash_loads_the_recorded_state_with_optimizer(
        cloud: Cloud, make_backend: Callable[..., TinkerBackend], tmp_path: Path) -> None:
    first = make_backend()
    first.start()
    for step in (1, 2):
        first.forward_backward(sample_datums(), "importance_sampling")
        first.optim_step(1e-4)
        saved = first.save(f"step-{step:06d}")
    first.forward_backward(sample_datums(), "importance_sampling")
    first.optim_step(1e-4)  # step 3 trained, then the process dies before saving
    record = json.loads((tmp_path / "tinker" / "reef.json").read_text())
    assert record["step"] == 2 and record["state_path"] == saved.state_path

    cloud.calls.clear()
    second = make_backend()  # a new process: same settings and data_dir, fresh clients
    resumed = second.start()
    assert resumed == saved
    assert cloud.names() == ["get_server_capabilities",
                             "create_training_client_from_state_with_optimizer"]
    assert cloud.calls[1][1] == {"path": "tinker://run-1/weights/step-000002"}
    second.forward_backward(sample_datums(), "importance_sampling")
    assert second.optim_step(1e-4).step == 3  # the lost step is trained again
    assert second.save("step-000003").state_path == "tinker://run-2/weights/step-000003"


def test_checkpoints_expire_unless_pinned_and_are_deleted_for_good(
        cloud: Cloud, make_backend: Callable[..., TinkerBackend]) -> None:
    """Before: every step saved state and sampler weights with no TTL and nothing deleted
    them, so storage grew without bound."""
    backend = make_backend(tinker_checkpoint_ttl_seconds=86_400)
    backend.start()
    saved = backend.save("v000001")
    saves = [kw for name, kw in cloud.calls if name.startswith("save_")]
    assert [kw["ttl"] for kw in saves] == [86_400, 86_400]
    backend.pin(saved)
    backend.delete(saved)
    assert [(n, kw) for n, kw in cloud.calls if n in ("set_checkpoint_ttl", "delete_checkpoint")
            ] == [("set_checkpoint_ttl", {"path": saved.state_path, "ttl": None}),
                  ("set_checkpoint_ttl", {"path": saved.adapter_path, "ttl": None}),
                  ("delete_checkpoint", {"path": saved.state_path}),
                  ("delete_checkpoint", {"path": saved.adapter_path})]
    gone = httpx.Response(404, request=httpx.Request("DELETE", "https://tinker.invalid"))
    cloud.fail["delete_checkpoint"] = tinker.NotFoundError("not found", response=gone,
                                                            body=None)
    backend.delete(saved)  # already gone: fine
    cloud.fail["delete_checkpoint"] = server_error()
    with pytest.raises(TinkerBackendError) as err:
        backend.delete(saved)
    assert err.value.transient


def test_restore_starts_a_client_from_the_state_and_records_it(
        cloud: Cloud, make_backend: Callable[..., TinkerBackend], tmp_path: Path) -> None:
    backend = make_backend()
    backend.start()
    live = backend.save("v000000")
    backend.forward_backward(sample_datums(), "importance_sampling")
    backend.optim_step(1e-4)
    backend.save("v000001")  # a refused candidate
    backend.forward_backward(sample_datums(), "importance_sampling")  # a half step
    backend.restore(live)
    assert cloud.calls[-1] == ("create_training_client_from_state_with_optimizer",
                               {"path": live.state_path})
    assert backend.step == 0
    record = json.loads((tmp_path / "tinker" / "reef.json").read_text())
    assert record["state_path"] == live.state_path  # a restart resumes the live state
    backend.forward_backward(sample_datums(), "importance_sampling")
    assert backend.optim_step(1e-4).loss == cloud.loss  # the half step's loss is gone


@pytest.mark.parametrize(("error", "transient"), [
    (server_error(), True),
    (tinker.RequestFailedError("bad datum", "req-2", RequestErrorCategory.User), False),
    (tinker.APIConnectionError(request=httpx.Request("POST", "https://tinker.invalid")), True),
])
def test_errors_say_whether_a_retry_can_help(
        cloud: Cloud, make_backend: Callable[..., TinkerBackend], error: Exception,
        transient: bool) -> None:
    backend = make_backend()
    backend.start()
    cloud.fail["forward_backward"] = error
    with pytest.raises(TinkerBackendError) as err:
        backend.forward_backward(sample_datums(), "importance_sampling")
    assert err.value.transient is transient


def test_a_record_for_another_model_is_refused(
        make_backend: Callable[..., TinkerBackend]) -> None:
    first = make_backend()
    first.start()
    first.save("step-000000")
    with pytest.raises(ConfigError, match="records a checkpoint of") as err:
        make_backend(model_name="moonshotai/Kimi-K2.6").start()
    assert MODEL in str(err.value)


def test_close_finishes_the_session(cloud: Cloud,
                                    make_backend: Callable[..., TinkerBackend]) -> None:
    backend = make_backend()
    backend.start()
    backend.close()
    assert cloud.calls[-1] == ("close", {"status": "success"})


def test_a_future_that_never_resolves_times_out_clearly(
        cloud: Cloud, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(profile="dev", backend="tinker", model_name=MODEL, data_dir=tmp_path)
    backend = TinkerBackend(settings, rest_client_factory=lambda s: FakeRestClient(cloud),
                            service_client_factory=lambda s: FakeServiceClient(cloud),
                            result_timeout_seconds=0.05)
    backend.start()
    monkeypatch.setattr(FakeTrainingClient, "optim_step",
                        lambda self, optim_params=None, *, adam_params=None:
                        AwaitableConcurrentFuture(Future()))
    with pytest.raises(TinkerBackendError, match=r"optim_step gave no result in 0\.05 s"):
        backend.optim_step(1e-4)
    assert backend.step == 0


# --- the real SDK clients: built only in start(), with Reef's settings ------------------------

def test_the_sdk_clients_are_built_in_start_with_the_configured_key_and_url(
        cloud: Cloud, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[tuple[str, dict[str, Any]]] = []

    def rest(**kwargs: Any) -> FakeRestClient:
        built.append(("RestClient", kwargs))
        return FakeRestClient(cloud)

    def service(**kwargs: Any) -> FakeServiceClient:
        built.append(("ServiceClient", kwargs))
        return FakeServiceClient(cloud)

    # Constructing tinker.RestClient against an unreachable service blocks for minutes:
    # the backend must not build one before start() (which the trainer runs in a thread).
    monkeypatch.setattr(tinker, "RestClient", rest)
    monkeypatch.setattr(tinker, "ServiceClient", service)
    settings = Settings(profile="dev", backend="tinker", model_name=MODEL, data_dir=tmp_path,
                        tinker_api_key="tml-test-key", tinker_base_url="https://tinker.test")
    backend = TinkerBackend(settings)
    assert built == []
    backend.start()
    assert built == [
        ("RestClient", {"base_url": "https://tinker.test", "api_key": "tml-test-key"}),
        ("ServiceClient", {"base_url": "https://tinker.test", "api_key": "tml-test-key",
                           "user_metadata": {"adapter": "reef"}})]


def test_without_a_configured_key_the_sdk_reads_its_own(
        cloud: Cloud, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(tinker, "RestClient",
                        lambda **kw: seen.append(kw) or FakeRestClient(cloud))
    monkeypatch.setattr(tinker, "ServiceClient", lambda **kw: FakeServiceClient(cloud))
    monkeypatch.delenv("TINKER_API_KEY", raising=False)
    monkeypatch.delenv("REEF_TINKER_API_KEY", raising=False)
    TinkerBackend(Settings(profile="dev", model_name=MODEL, data_dir=tmp_path)).start()
    assert seen == [{"base_url": None, "api_key": None}]  # TINKER_API_KEY, then stored creds
