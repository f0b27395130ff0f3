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
  replacing an adapter only drops the registry's reference, so in-flight requests finish on
  the weights they started with and the tensors are freed when the last of them ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

log = logging.getLogger(__name__)

MAX_LOADED_ADAPTERS = 8
"""Adapters kept loaded; loading one more evicts the least recently used idle one."""
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
"""Prefix ``save_pretrained`` puts before the base model's module names."""
_NAME = re.compile(r"[\x21-\x7e]{1,200}")
"""Adapter names: printable ASCII without spaces, since they travel in a response header."""
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


class AdapterNotFoundError(KeyError):
    """No adapter of that name is loaded: a 404 on unload."""


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


@contextmanager
def holding(adapter: Adapter | None) -> Iterator[None]:
    """Count a request on ``adapter`` while it is queued or generating (event loop only)."""
    if adapter is None:
        yield
        return
    adapter.in_use += 1
    try:
        yield
    finally:
        adapter.in_use -= 1


class Adapters:
    """The loaded adapters by name, in least-recently-used order; how an adapter is read
    is the subclass's (``_read_and_install``, called on a worker thread).

    ``load``, ``unload`` and ``select`` run on the event loop, so the registry needs no
    lock of its own.
    """

    def __init__(self, base_name: str, max_loaded: int = MAX_LOADED_ADAPTERS) -> None:
        self.base_name = base_name
        self.max_loaded = max_loaded
        self._adapters: OrderedDict[str, Adapter] = OrderedDict()
        self._loading: set[str] = set()

    def _read_and_install(self, name: str, path: str) -> Adapter:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Adapter]:
        return iter(list(self._adapters.values()))

    def __len__(self) -> int:
        return len(self._adapters)

    def select(self, model_field: str) -> Adapter | None:
        """The adapter named exactly ``model_field``, else None (the base model)."""
        adapter = self._adapters.get(model_field)
        if adapter is not None:
            self._adapters.move_to_end(model_field)
        return adapter

    async def load(self, name: str, path: str, replace: bool = False) -> Adapter:
        """Load ``path`` as ``name``; with ``replace``, a loaded ``name`` is superseded."""
        self._check_name(name, replace)
        self._loading.add(name)
        started = time.perf_counter()
        try:
            adapter = await asyncio.to_thread(self._read_and_install, name, path)
        finally:
            self._loading.discard(name)
        self._adapters.pop(name, None)
        self._adapters[name] = adapter
        self._evict()
        log.info("policy.lora_loaded name=%s bytes=%d layers=%d seconds=%.3f", name,
                 adapter.nbytes, len(adapter.deltas), time.perf_counter() - started)
        return adapter

    def _check_name(self, name: str, replace: bool) -> None:
        if not _NAME.fullmatch(name):
            raise AdapterError("lora_name must be 1-200 printable ASCII characters, no spaces",
                               param="lora_name")
        if name in ("base", self.base_name):
            raise AdapterError(f"'{name}' names the base model; choose another lora_name",
                               param="lora_name")
        if name in self._loading:
            raise AdapterError(f"The lora adapter '{name}' is being loaded.",
                               "lora_already_loaded", "lora_name")
        if name in self._adapters and not replace:
            raise AdapterError(f"The lora adapter '{name}' has already been loaded.",
                               "lora_already_loaded", "lora_name")

    def unload(self, name: str) -> Adapter:
        """Forget ``name``; requests already holding it finish on it, then it is freed."""
        adapter = self._adapters.pop(name, None)
        if adapter is None:
            raise AdapterNotFoundError(name)
        log.info("policy.lora_unloaded name=%s in_use=%d", name, adapter.in_use)
        return adapter

    def _evict(self) -> None:
        while len(self._adapters) > self.max_loaded:
            idle = [a for a in self._adapters.values() if a.in_use == 0]
            # Every adapter busy: evict the least recently used anyway; its requests
            # keep their reference, so they still finish on it (loading never refuses).
            victim = idle[0] if idle else next(iter(self._adapters.values()))
            del self._adapters[victim.name]
            log.info("policy.lora_evicted name=%s in_use=%d", victim.name, victim.in_use)


class AdapterRegistry(Adapters):
    """PEFT adapters on the local model: reading one wraps the layers it changes (once)
    in ``LoraLinear``; only that wrapping (on loader threads) takes a lock."""

    def __init__(self, model: nn.Module, active: ActiveAdapter, base_name: str,
                 max_loaded: int = MAX_LOADED_ADAPTERS) -> None:
        super().__init__(base_name, max_loaded)
        self.model = model
        self.active = active
        self._wrap_lock = threading.Lock()

    def _read_and_install(self, name: str, path: str) -> Adapter:
        adapter = read_adapter(name, path, self.model)
        with self._wrap_lock:
            for module_name in adapter.deltas:
                self._wrap(module_name)
        return adapter

    def _wrap(self, module_name: str) -> None:
        """Put a ``LoraLinear`` around one base layer (once): a single attribute store."""
        parent_name, _, child = module_name.rpartition(".")
        parent = self.model.get_submodule(parent_name)
        module = getattr(parent, child)
        if not isinstance(module, LoraLinear):
            setattr(parent, child, LoraLinear(module, module_name, self.active))
