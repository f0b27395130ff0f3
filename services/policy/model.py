"""Loading the policy model for serving.

What ``settings.model_name`` may name, and the one-time GGUF conversion, are in
``shared.local_model`` (the trainer needs them too); this module loads the result in
float32 on CPU (bf16 matmuls are slow there) and names it for clients.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared.local_model import (
    EMBEDDED_MODEL,
    GgufSource,
    ModelNotFoundError,
    cache_dir,
    prepare,
    resolve,
    served_name,
)

__all__ = ["EMBEDDED_MODEL", "GgufSource", "LoadedModel", "ModelNotFoundError", "cache_dir",
           "load", "resolve", "served_name"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A causal LM with its tokenizer, ready for generation."""

    name: str
    """The name clients see in ``model`` fields and ``GET /v1/models``."""
    path: Path
    """The Hugging Face directory the weights were loaded from."""
    model: Any
    tokenizer: Any
    load_seconds: float
    converted: bool
    """True when this start converted a GGUF file (the slow path)."""


def load(model_name: str, data_dir: Path, device: str = "cpu") -> LoadedModel:
    """Load the model named by ``model_name``, converting a GGUF file on first use."""
    started = time.perf_counter()
    path, converted = prepare(model_name, data_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    # float32 on CPU (bf16 matmuls are slow there); the checkpoint's own dtype elsewhere.
    dtype: Any = torch.float32 if device == "cpu" else "auto"
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.to(device)
    model.eval()
    seconds = time.perf_counter() - started
    log.info("policy.model_loaded path=%s converted=%s seconds=%.2f", path, converted, seconds)
    return LoadedModel(served_name(model_name), path, model, tokenizer, seconds, converted)
