"""The adapters a policy server holds, by name: load, unload, choose one per request.

A request names its weights in ``model``: the base model (its served name, the configured
``model_name``, or no name at all) or a loaded adapter. Any other name is an error the
route answers 404 (``model_not_found``), never the base model: a gateway that asks for an
adapter this replica does not hold must learn it, not get other weights silently.

Loaded adapters are kept in least-recently-used order and the least recently used idle one
is evicted past ``max_loaded``, except the *pinned* ones: the adapters this replica follows
from the ``weights`` stream and that something may still route to (``replica.py`` pins
them), which only that follower unloads.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import nn

from services.policy.lora import ActiveAdapter, Adapter, AdapterError, LoraLinear, read_adapter

log = logging.getLogger(__name__)

MAX_LOADED_ADAPTERS = 8
"""Adapters kept loaded (pinned ones aside); one more evicts the least recently used idle
one."""
_NAME = re.compile(r"[\x21-\x7e]{1,200}")
"""Adapter names: printable ASCII without spaces, since they travel in a response header."""


class AdapterNotFoundError(KeyError):
    """No adapter of that name is loaded: a 404 (``lora_not_found`` on unload,
    ``model_not_found`` on a request)."""


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

    def __init__(self, base_name: str, max_loaded: int = MAX_LOADED_ADAPTERS,
                 base_aliases: Iterable[str] = ()) -> None:
        self.base_name = base_name
        self.base_names = frozenset({base_name, "", *base_aliases})
        """Model names answered by the base model (the empty one: no ``model`` sent)."""
        self.max_loaded = max_loaded
        self.pinned: frozenset[str] = frozenset()
        """Names eviction never picks (set by the replica's follower)."""
        self._adapters: OrderedDict[str, Adapter] = OrderedDict()
        self._loading: set[str] = set()

    def _read_and_install(self, name: str, path: str) -> Adapter:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Adapter]:
        return iter(list(self._adapters.values()))

    def __len__(self) -> int:
        return len(self._adapters)

    def __contains__(self, name: object) -> bool:
        return name in self._adapters

    def get(self, name: str) -> Adapter | None:
        """The adapter loaded as ``name`` (its use is not counted as recent)."""
        return self._adapters.get(name)

    def select(self, model_field: str) -> Adapter | None:
        """The adapter named exactly ``model_field``; None for the base model's names;
        ``AdapterNotFoundError`` for any other name."""
        adapter = self._adapters.get(model_field)
        if adapter is not None:
            self._adapters.move_to_end(model_field)
            return adapter
        if model_field in self.base_names:
            return None
        raise AdapterNotFoundError(model_field)

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
        if name == "base" or name in self.base_names:
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
        candidates = [a for a in self._adapters.values() if a.name not in self.pinned]
        while len(self._adapters) > self.max_loaded and candidates:
            idle = [a for a in candidates if a.in_use == 0]
            # Every candidate busy: evict the least recently used anyway; its requests
            # keep their reference, so they still finish on it (loading never refuses).
            victim = idle[0] if idle else candidates[0]
            candidates.remove(victim)
            del self._adapters[victim.name]
            log.info("policy.lora_evicted name=%s in_use=%d", victim.name, victim.in_use)


class AdapterRegistry(Adapters):
    """PEFT adapters on the local model: reading one wraps the layers it changes (once)
    in ``LoraLinear``; only that wrapping (on loader threads) takes a lock."""

    def __init__(self, model: nn.Module, active: ActiveAdapter, base_name: str,
                 max_loaded: int = MAX_LOADED_ADAPTERS, base_aliases: Iterable[str] = ()
                 ) -> None:
        super().__init__(base_name, max_loaded, base_aliases)
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
