"""LoRA adapters over the policy model: read from PEFT directories, chosen per request.

An adapter is what ``peft.PeftModel.save_pretrained`` writes: ``adapter_config.json`` and
``adapter_model.safetensors`` (never the pickled ``.bin``). It is applied by our own small
layer rather than by peft's multi-adapter model, because that makes the hot swap a pointer
switch with nothing to mutate under a running generation:

- Each target ``nn.Linear`` of the base model is replaced, once, by a ``LoraLinear`` that
  computes ``base(x) + (x @ A.T) @ (scale * B).T`` for the adapter of the generation now
  running, and exactly ``base(x)`` when there is none or it does not touch that layer.
  Replacing a module is one attribute store; the wrapper equals the base for every request
  that does not use the new adapter, so it is safe while a generation runs.
- An ``Adapter`` is an immutable bag of tensors. Reading and converting it happens on a
  plain worker thread (``asyncio.to_thread``), not on the event loop and not on the
  generation thread; registering it is a dict store on the event loop.
- A request resolves its adapter when it is accepted and keeps the object until it ends;
  the engine points ``ActiveAdapter.current`` at it for the whole generation. Unloading or
  replacing an adapter only drops the registry's reference (``registry.py``), so in-flight
  requests finish on the weights they started with and the tensors are freed when the
  last of them ends.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
"""Prefix ``save_pretrained`` puts before the base model's module names."""
_UNSUPPORTED = ("use_dora", "lora_bias", "alpha_pattern", "modules_to_save", "target_parameters",
                "layer_replication", "trainable_token_indices", "alora_invocation_tokens",
                "fan_in_fan_out", "use_bdlora", "arrow_config")
"""PEFT options that change the LoRA computation beyond ``B @ A * scale``: refused."""


class AdapterError(ValueError):
    """An adapter cannot be loaded as asked (bad path, config, or shapes): a 400."""

    def __init__(self, message: str, code: str = "lora_invalid", param: str = "lora_path"
                 ) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


@dataclass(frozen=True, slots=True)
class LoraDelta:
    """One layer's low-rank update: ``delta(x) = (x @ a.T) @ b.T``, scale folded into ``b``."""

    a: torch.Tensor
    """``(r, in_features)``."""
    b: torch.Tensor
    """``(out_features, r)``, already multiplied by ``lora_alpha / r``."""


@dataclass(eq=False, slots=True)
class Adapter:
    """A loaded adapter. Its tensors never change; a new version is a new ``Adapter``."""

    name: str
    path: str
    deltas: Mapping[str, LoraDelta]
    """Base-model module name -> update."""
    nbytes: int
    created: int = field(default_factory=lambda: int(time.time()))
    in_use: int = 0
    """Requests holding it, queued or generating (changed on the event loop only)."""


class ActiveAdapter:
    """The adapter of the generation running now; set and read on the generation thread."""

    __slots__ = ("current",)

    def __init__(self) -> None:
        self.current: Adapter | None = None


class LoraLinear(nn.Module):
    """A base ``nn.Linear`` plus the active adapter's update for this layer, if any."""

    def __init__(self, base: nn.Linear, module_name: str, active: ActiveAdapter) -> None:
        super().__init__()
        self.base = base
        self.module_name = module_name
        self.active = active

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base(x)
        adapter = self.active.current
        delta = adapter.deltas.get(self.module_name) if adapter is not None else None
        if delta is None:
            return out
        low = nn.functional.linear(x.to(delta.a.dtype), delta.a)
        return out + nn.functional.linear(low, delta.b).to(out.dtype)


def _read_config(folder: Path) -> dict[str, Any]:
    """``adapter_config.json``, checked for what this server can apply."""
    if not folder.is_dir():
        raise AdapterError(f"no adapter directory at {str(folder)!r}", "lora_not_found")
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
    except FileNotFoundError:
        raise AdapterError(f"{str(folder)!r} holds no {ADAPTER_CONFIG}", "lora_not_found") \
            from None
    except (OSError, ValueError) as exc:
        raise AdapterError(f"cannot read {ADAPTER_CONFIG}: {exc}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise AdapterError(f"{ADAPTER_CONFIG}: peft_type must be LORA")
    unsupported = [key for key in _UNSUPPORTED if config.get(key)]
    if unsupported:
        raise AdapterError(f"{ADAPTER_CONFIG}: unsupported option(s) {', '.join(unsupported)}")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{ADAPTER_CONFIG}: bias must be 'none'")
    if not isinstance(config.get("lora_alpha"), int | float):
        raise AdapterError(f"{ADAPTER_CONFIG}: lora_alpha is missing")
    return config


def _pair_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor,
                                                                            torch.Tensor]]:
    """``module name -> (A, B)`` from PEFT's saved keys."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, _, rest = key.removeprefix(_PEFT_PREFIX).rpartition(".lora_")
        if not module or rest not in ("A.weight", "B.weight"):
            raise AdapterError(f"{ADAPTER_WEIGHTS}: unsupported tensor {key!r}")
        halves.setdefault(module, {})[rest[0]] = tensor
    pairs = {}
    for module, half in halves.items():
        if set(half) != {"A", "B"}:
            raise AdapterError(f"{ADAPTER_WEIGHTS}: {module} lacks lora_A or lora_B")
        pairs[module] = (half["A"], half["B"])
    if not pairs:
        raise AdapterError(f"{ADAPTER_WEIGHTS} holds no LoRA weights")
    return pairs


def _base_linear(model: nn.Module, name: str) -> nn.Linear:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise AdapterError(f"the base model has no module {name!r}: adapter for "
                           "another model?", "lora_mismatch") from None
    if isinstance(module, LoraLinear):
        module = module.base
    if not isinstance(module, nn.Linear):
        raise AdapterError(f"{name} is a {type(module).__name__}; only linear layers "
                           "can take an adapter here", "lora_mismatch")
    return module


def read_adapter(name: str, path: str, model: nn.Module) -> Adapter:
    """Read and check the adapter at ``path`` against ``model``; slow, run it off the loop."""
    folder = Path(path).expanduser()
    config = _read_config(folder)
    try:
        tensors = load_file(folder / ADAPTER_WEIGHTS, device="cpu")
    except FileNotFoundError:
        raise AdapterError(f"{str(folder)!r} holds no {ADAPTER_WEIGHTS}", "lora_not_found") \
            from None
    except (OSError, SafetensorError) as exc:
        raise AdapterError(f"cannot read {ADAPTER_WEIGHTS}: {exc}") from None
    alpha, rslora = float(config["lora_alpha"]), bool(config.get("use_rslora"))
    deltas, nbytes = {}, 0
    for module_name, (a, b) in _pair_tensors(tensors).items():
        base = _base_linear(model, module_name)
        rank = a.shape[0]  # per layer, so rank_pattern needs no parsing
        if a.shape != (rank, base.in_features) or b.shape != (base.out_features, rank):
            raise AdapterError(
                f"{module_name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not "
                f"fit a {base.in_features}->{base.out_features} layer", "lora_mismatch")
        scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        like = base.weight
        delta = LoraDelta(a.to(like.device, like.dtype).contiguous(),
                          (b.float() * scale).to(like.device, like.dtype).contiguous())
        deltas[module_name] = delta
        nbytes += delta.a.nbytes + delta.b.nbytes
    return Adapter(name, str(folder), deltas, nbytes)
