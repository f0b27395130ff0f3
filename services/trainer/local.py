"""The local training backend: LoRA with transformers + peft on CPU (or CUDA).

Same contract as Tinker (:mod:`services.trainer.backend`): datums of sampled token ids,
logprobs and advantages per target position, losses summed over tokens and datums, AdamW
with Tinker's default hyper-parameters (:data:`ADAM_BETAS`, :data:`ADAM_EPS`,
:data:`ADAM_WEIGHT_DECAY`), the global gradient norm clipped to ``max_grad_norm`` before
each step (Tinker's ``AdamParams.grad_clip_norm``; 0: no clipping).

How a step is computed:

- Datums go through the model in micro-batches (right-padded, with an attention mask) of
  at most ``micro_batch_tokens`` padded tokens, each followed at once by its backward pass,
  so only one micro-batch's activations are alive at a time.
- Logits are computed only at target positions whose advantage is non-zero (the others
  add nothing to any loss), via transformers' ``logits_to_keep`` boolean mask: over
  SmolLM2's 49k vocabulary full fp32 logits are what made the peak memory (~5 GB).
  Log-probs are ``logit[target] - logsumexp(logits)``, whose backward does not keep a
  second vocabulary-sized tensor as ``log_softmax`` would.
- The model stays in eval mode (LoRA dropout is 0 too): a step is deterministic, and
  :meth:`LocalBackend.logprobs` sees exactly the policy that ``forward_backward`` trains.

Checkpoints (:meth:`LocalBackend.save`) are directories ``<state_dir>/<name>/`` written
to a temporary sibling and renamed, holding ``adapter/`` (a PEFT adapter the policy
server loads with ``PeftModel.from_pretrained``), ``state.safetensors`` (AdamW moments
and the torch RNG state: no pickle) and ``trainer_state.json`` (step, LoRA config, base
model, optimizer hyper-parameters). The newest by step is resumed by :meth:`start`.
"""

from __future__ import annotations

import os

# Before torch is imported: spin-waiting OpenMP threads are ~10x slower on shared cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
import logging
import re
import shutil
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import AutoModelForCausalLM

from services.trainer.backend import Checkpoint, Datum, StepResult, ratio_bounds
from services.trainer.losses import LossStats, token_loss
from shared.settings import Settings

log = logging.getLogger(__name__)

ADAM_BETAS = (0.9, 0.95)
"""AdamW betas: Tinker's defaults (``AdamParams``), so both backends train alike."""
ADAM_EPS = 1e-12
"""AdamW epsilon: Tinker's default."""
ADAM_WEIGHT_DECAY = 0.0
"""Decoupled weight decay: Tinker's default (none)."""
INIT_SEED = 0
"""Seed of the LoRA initialisation (the global RNG is left as it was)."""
MICRO_BATCH_TOKENS = 2048
"""Default bound on padded tokens per forward/backward pass."""
PAD_TOKEN_ID = 0
"""Id written at padded positions (masked out, so any valid id will do)."""


class BackendNotStartedError(RuntimeError):
    """A method other than :meth:`LocalBackend.start` was called before it."""


@dataclass(frozen=True, slots=True)
class _Batch:
    """Right-padded model inputs for a micro-batch of datums."""

    input_ids: Tensor
    attention_mask: Tensor
    targets: Tensor
    sampler_logprobs: Tensor
    advantages: Tensor
    real: Tensor
    """True at target positions that exist (not padding)."""


def micro_batches(datums: list[Datum], max_tokens: int) -> Iterator[list[Datum]]:
    """Consecutive groups whose padded size (count x longest input) stays within
    ``max_tokens``; a datum longer than that goes alone."""
    group: list[Datum] = []
    longest = 0
    for datum in datums:
        length = len(datum.tokens) - 1
        if group and (len(group) + 1) * max(longest, length) > max_tokens:
            yield group
            group, longest = [], 0
        group.append(datum)
        longest = max(longest, length)
    if group:
        yield group


def collate(datums: list[Datum], device: torch.device) -> _Batch:
    """Pad ``datums`` on the right into tensors on ``device``."""
    width = max(len(d.tokens) - 1 for d in datums)

    def pad(rows: Iterable[list[Any]], value: Any, dtype: torch.dtype) -> Tensor:
        padded = [[*row, *[value] * (width - len(row))] for row in rows]
        return torch.tensor(padded, dtype=dtype, device=device)

    real = pad(([True] * (len(d.tokens) - 1) for d in datums), False, torch.bool)
    return _Batch(
        input_ids=pad((d.tokens[:-1] for d in datums), PAD_TOKEN_ID, torch.long),
        attention_mask=real.long(),
        targets=pad((d.tokens[1:] for d in datums), PAD_TOKEN_ID, torch.long),
        sampler_logprobs=pad((d.logprobs for d in datums), 0.0, torch.float32),
        advantages=pad((d.advantages for d in datums), 0.0, torch.float32),
        real=real,
    )


def target_logprobs(model: Any, batch: _Batch, keep: Tensor) -> Tensor:
    """Log-probabilities of the target tokens at the ``keep`` positions (a boolean mask
    over the batch), flattened in row-major order; logits are computed only there."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                logits_to_keep=keep, use_cache=False)
    logits: Tensor = out.logits
    if logits.dim() == 3:  # a model that ignores a boolean logits_to_keep
        logits = logits[keep]
    logits = logits.float()
    targets = batch.targets[keep]
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


# --- checkpoint files ----------------------------------------------------------------------

STATE_FILE = "trainer_state.json"
"""Step, LoRA config, base model and optimizer hyper-parameters (written last)."""
TENSORS_FILE = "state.safetensors"
"""AdamW moments (``optim.<param>.<key>``) and RNG states (``rng.*``)."""
ADAPTER_DIR = "adapter"
"""The PEFT adapter directory inside a checkpoint (what the policy server loads)."""
ADAPTER_WEIGHTS = "adapter_model.safetensors"
STATE_FORMAT = 1
_PARTIAL_PREFIXES = (".tmp-", ".old-")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed (unreadable, or made with another LoRA config)."""


def _read_meta(path: Path) -> dict[str, Any] | None:
    meta = path / STATE_FILE
    if path.name.startswith(".") or not meta.is_file():
        return None
    data: dict[str, Any] = json.loads(meta.read_text())
    return data


def _as_checkpoint(path: Path, meta: dict[str, Any]) -> Checkpoint:
    return Checkpoint(step=int(meta["step"]), state_path=str(path),
                      adapter_path=str(path / ADAPTER_DIR))


def list_checkpoints(state_dir: Path) -> list[Checkpoint]:
    """Complete checkpoints in ``state_dir``, oldest first (by step, then save time)."""
    if not state_dir.is_dir():
        return []
    found: list[tuple[int, float, Checkpoint]] = []
    for path in state_dir.iterdir():
        meta = _read_meta(path) if path.is_dir() else None
        if meta is not None:
            found.append((int(meta["step"]), float(meta["saved_at"]), _as_checkpoint(path, meta)))
    return [c for _, _, c in sorted(found, key=lambda f: (f[0], f[1]))]


def latest_checkpoint(state_dir: Path) -> Checkpoint | None:
    """The checkpoint :meth:`LocalBackend.start` resumes: the newest by step."""
    found = list_checkpoints(state_dir)
    return found[-1] if found else None


def remove_partial_checkpoints(state_dir: Path) -> None:
    """Delete what a save interrupted by a crash left behind."""
    if state_dir.is_dir():
        for path in state_dir.iterdir():
            if path.name.startswith(_PARTIAL_PREFIXES):
                shutil.rmtree(path, ignore_errors=True)


def _lora_meta(config: LoraConfig) -> dict[str, Any]:
    modules = config.target_modules
    names = [modules] if isinstance(modules, str) else sorted(modules or [])
    return {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": names}


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], Any]:
    state = optimizer.state_dict()
    tensors = {f"optim.{index}.{key}": value.detach().cpu().contiguous()
               for index, values in state["state"].items()
               for key, value in values.items()}
    return tensors, state["param_groups"]


def _optimizer_state(tensors: dict[str, Tensor], groups: list[dict[str, Any]]) -> dict[str, Any]:
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in groups]
    return {"state": state, "param_groups": groups}


def _rng_tensors(device: torch.device) -> dict[str, Tensor]:
    tensors = {"rng.cpu": torch.get_rng_state()}
    if device.type == "cuda":
        for index, value in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{index}"] = value
    return tensors


def _restore_rng(tensors: dict[str, Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _device_of(model: Any) -> torch.device:
    device: torch.device = next(p.device for p in model.parameters() if p.requires_grad)
    return device


def save_checkpoint(state_dir: Path, name: str, model: Any, optimizer: torch.optim.Optimizer,
                    step: int, lora: LoraConfig, base_model: str) -> Checkpoint:
    """Write a checkpoint to a temporary sibling, then rename it to ``state_dir/name``."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"checkpoint name {name!r}: letters, digits, '.', '_', '-' only")
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        model.save_pretrained(tmp / ADAPTER_DIR)
        tensors, groups = _optimizer_tensors(optimizer)
        save_file({**tensors, **_rng_tensors(_device_of(model))}, tmp / TENSORS_FILE)
        meta = {"format": STATE_FORMAT, "name": name, "step": step, "saved_at": time.time(),
                "base_model": base_model, "lora": _lora_meta(lora), "param_groups": groups}
        (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1))
        _replace_dir(tmp, state_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _as_checkpoint(state_dir / name, meta)


def _replace_dir(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``, moving an existing ``target`` out of the way first
    (a directory cannot be renamed over a non-empty one)."""
    old = target.with_name(f".old-{target.name}-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(source, target)
    shutil.rmtree(old, ignore_errors=True)


def restore_checkpoint(checkpoint: Checkpoint, model: Any, optimizer: torch.optim.Optimizer,
                       lora: LoraConfig) -> int:
    """Load a checkpoint's adapter weights, AdamW state and RNG; return its step."""
    path = Path(checkpoint.state_path)
    meta = _read_meta(path)
    if meta is None or meta.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of format {STATE_FORMAT}")
    if meta["lora"] != _lora_meta(lora):
        raise CheckpointError(
            f"{path} was trained with LoRA {meta['lora']}, the settings ask for "
            f"{_lora_meta(lora)}: restore the settings or move {path.parent} away")
    weights = load_file(path / ADAPTER_DIR / ADAPTER_WEIGHTS, device=str(_device_of(model)))
    result: Any = set_peft_model_state_dict(model, weights)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{path}: adapter weights do not fit the model "
                              f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
    tensors = load_file(path / TENSORS_FILE)
    try:
        optimizer.load_state_dict(_optimizer_state(tensors, meta["param_groups"]))
    except ValueError as exc:
        raise CheckpointError(f"{path}: optimizer state does not fit: {exc}") from exc
    _restore_rng(tensors)
    return int(meta["step"])


class LocalBackend:
    """:class:`~services.trainer.backend.TrainingBackend` on a local Hugging Face model.

    ``base_model_dir`` is a Hugging Face model directory (the policy server's converted
    cache ``<data_dir>/models/<name>`` for the embedded model). Checkpoints are kept until
    :meth:`delete` (the trainer decides which to keep). ``threads`` > 0 sets torch's
    intra-op threads. Methods are serialised by a lock, so the trainer may call them from
    worker threads.
    """

    def __init__(self, settings: Settings, base_model_dir: Path, state_dir: Path, *,
                 threads: int = 0,
                 micro_batch_tokens: int = MICRO_BATCH_TOKENS) -> None:
        self.settings = settings
        self.base_model_dir = Path(base_model_dir)
        self.state_dir = Path(state_dir)
        self.threads = threads
        self.micro_batch_tokens = micro_batch_tokens
        self.device = torch.device(settings.trainer_device)
        self.step = 0
        self._model: Any = None
        self._optimizer: torch.optim.AdamW | None = None
        self._stats = LossStats()
        self._loss_fn: str = settings.loss_fn
        self._lock = threading.RLock()

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> Checkpoint | None:
        """Load the base model and a fresh LoRA adapter, then resume the newest checkpoint
        in ``state_dir`` (weights, AdamW state, step, RNG) if there is one (returned)."""
        with self._lock:
            if self._model is not None:
                raise RuntimeError("LocalBackend.start() was already called")
            started = time.perf_counter()
            if self.threads > 0:
                torch.set_num_threads(self.threads)
            self._model = self._build_model()
            params = [p for p in self._model.parameters() if p.requires_grad]
            self._optimizer = torch.optim.AdamW(
                params, lr=self.settings.learning_rate, betas=ADAM_BETAS, eps=ADAM_EPS,
                weight_decay=ADAM_WEIGHT_DECAY)
            remove_partial_checkpoints(self.state_dir)
            latest = latest_checkpoint(self.state_dir)
            if latest is not None:
                self.step = restore_checkpoint(latest, self._model, self._optimizer,
                                               self._lora_config())
            log.info("trainer.local_started base=%s device=%s resumed_step=%s seconds=%.2f",
                     self.base_model_dir, self.device, latest and latest.step,
                     time.perf_counter() - started)
            return latest

    def _lora_config(self) -> LoraConfig:
        return LoraConfig(
            r=self.settings.lora_rank, lora_alpha=self.settings.lora_alpha,
            target_modules=list(self.settings.lora_target_modules), lora_dropout=0.0,
            bias="none", task_type="CAUSAL_LM")

    def _build_model(self) -> Any:
        # float32 everywhere: bf16 matmuls are slow on CPU, and exact resumption is simpler.
        base = AutoModelForCausalLM.from_pretrained(self.base_model_dir, dtype=torch.float32)
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # peft 0.21 calls a transformers 5 method deprecated in favour of another name.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing",
                                    category=FutureWarning)
            torch.manual_seed(INIT_SEED)
            model = get_peft_model(base, self._lora_config())
        model.to(self.device)
        model.eval()
        return model

    @property
    def model(self) -> Any:
        """The PEFT model being trained (for evaluation and tests)."""
        if self._model is None:
            raise BackendNotStartedError("call start() first")
        return self._model

    # --- training ------------------------------------------------------------------------

    def forward_backward(self, datums: list[Datum], loss_fn: str) -> float:
        """Accumulate the gradients of the loss summed over tokens and datums; return it."""
        loss_of = token_loss(loss_fn)
        low, high = ratio_bounds(loss_fn, self.settings.ppo_clip,
                                 self.settings.tis_cap) or (0.0, float("inf"))
        with self._lock:
            model = self.model
            total = 0.0
            # A datum whose advantages are all 0 adds nothing: it never reaches the model.
            active = [d for d in datums if any(d.advantages)]
            for group in micro_batches(active, self.micro_batch_tokens):
                batch = collate(group, self.device)
                keep = batch.real & (batch.advantages != 0)
                logprobs = target_logprobs(model, batch, keep)
                old, advantages = batch.sampler_logprobs[keep], batch.advantages[keep]
                loss = loss_of(logprobs, old, advantages, low, high).sum()
                loss.backward()  # type: ignore[no-untyped-call]
                value = float(loss.detach())
                self._stats.add(value, logprobs, old, low, high)
                total += value
                del logprobs, loss
            self._loss_fn = loss_fn
            return total

    def optim_step(self, learning_rate: float) -> StepResult:
        """One AdamW step on the gradients accumulated since the last step, their global
        norm first clipped to ``max_grad_norm`` (the metric ``grad_norm`` is the norm
        before clipping; ``grad_clipped`` is 1 when it was clipped)."""
        with self._lock:
            optimizer = self._require_optimizer()
            grad_norm, clipped = self._clip_gradients(optimizer)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            self.step += 1
            stats, self._stats = self._stats, LossStats()
            metrics = {**stats.metrics(self._loss_fn), "grad_norm": grad_norm,
                       "grad_clipped": float(clipped), "learning_rate": learning_rate}
            return StepResult(step=self.step, loss=stats.loss, metrics=metrics)

    def _clip_gradients(self, optimizer: torch.optim.Optimizer) -> tuple[float, bool]:
        """The global L2 norm of the accumulated gradients, and whether it was scaled down
        to ``max_grad_norm`` (``torch.nn.utils.clip_grad_norm_``; 0 leaves it as it is)."""
        params = [p for group in optimizer.param_groups for p in group["params"]
                  if p.grad is not None]
        if not params:
            return 0.0, False
        limit = self.settings.max_grad_norm
        if limit > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(params, limit))
            return norm, norm > limit
        grads = [torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(grads))), False

    def _require_optimizer(self) -> torch.optim.AdamW:
        if self._optimizer is None:
            raise BackendNotStartedError("call start() first")
        return self._optimizer

    def logprobs(self, datums: list[Datum]) -> list[list[float]]:
        """Current-policy logprobs of every target token (prompt positions included)."""
        with self._lock, torch.no_grad():
            return self._score(datums)

    def base_logprobs(self, datums: list[Datum]) -> list[list[float]]:
        """The base model's logprobs of every target token: the same forward pass with the
        LoRA layers switched off (peft's ``disable_adapter``)."""
        with self._lock, torch.no_grad(), self.model.disable_adapter():
            return self._score(datums)

    def _score(self, datums: list[Datum]) -> list[list[float]]:
        """Logprobs of every target token under the model as it is now (no gradient)."""
        result: list[list[float]] = []
        for group in micro_batches(datums, self.micro_batch_tokens):
            batch = collate(group, self.device)
            flat = target_logprobs(self.model, batch, batch.real).cpu().tolist()
            offset = 0
            for datum in group:
                n = len(datum.tokens) - 1
                result.append(flat[offset:offset + n])
                offset += n
        return result

    # --- checkpoints ---------------------------------------------------------------------

    def save(self, name: str) -> Checkpoint:
        """Save the adapter, AdamW state, step and RNG to ``<state_dir>/<name>/`` atomically."""
        with self._lock:
            return save_checkpoint(
                self.state_dir, name, self.model, self._require_optimizer(), self.step,
                self._lora_config(), base_model=str(self.base_model_dir))

    def restore(self, checkpoint: Checkpoint) -> None:
        """Load a checkpoint's adapter weights, AdamW state, step and RNG; drop the
        gradients and loss statistics gathered since the last step."""
        with self._lock:
            optimizer = self._require_optimizer()
            optimizer.zero_grad(set_to_none=True)
            self.step = restore_checkpoint(checkpoint, self.model, optimizer,
                                           self._lora_config())
            self._stats = LossStats()

    def delete(self, checkpoint: Checkpoint) -> None:
        """Remove a checkpoint directory (one already gone is fine)."""
        path = Path(checkpoint.state_path)
        if path.parent.resolve() != self.state_dir.resolve():
            raise CheckpointError(f"{path} is not a checkpoint of {self.state_dir}")
        with self._lock:
            shutil.rmtree(path, ignore_errors=True)

    def pin(self, checkpoint: Checkpoint) -> None:
        """Local checkpoints never expire: nothing to do."""

    def close(self) -> None:
        """Drop the model and optimizer (their memory goes back to the process)."""
        with self._lock:
            self._model, self._optimizer = None, None

    def checkpoints(self) -> list[Checkpoint]:
        """Complete checkpoints in ``state_dir``, oldest first."""
        return list_checkpoints(self.state_dir)
