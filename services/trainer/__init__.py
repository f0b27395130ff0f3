"""The trainer: LoRA RL and on-policy distillation from the ``scored`` stream."""

import os

# Before anything imports torch: spin-waiting OpenMP threads made sampling and training
# ~10x slower on shared cores here; and models are never fetched from a hub.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
