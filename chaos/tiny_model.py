"""``python -m chaos.tiny_model DIR``: a tiny random Llama (vocabulary ``VOCAB``) saved
as a Hugging Face directory, the trainer's model in a chaos run. The trainer runs its
real local backend (transformers + peft, LoRA, checkpoints, resume) on it; only the
model is small, so a step takes milliseconds and a restart seconds."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from chaos.upstream import VOCAB


def build(path: Path) -> None:
    if (path / "config.json").is_file():
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    LlamaForCausalLM(config).save_pretrained(tmp)
    try:
        tmp.rename(path)
    except OSError:  # another run built it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    build(Path(sys.argv[1]))
