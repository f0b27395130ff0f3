"""The trainer: LoRA RL and on-policy distillation from the ``scored`` stream."""
