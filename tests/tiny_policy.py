"""A tiny random Llama the policy server can serve in a test (or a benchmark): a Hugging
Face directory with a byte-level tokenizer and a chat template, plus PEFT adapters of it.

Generating a token takes about a millisecond on a CPU, so several replicas and gateways
can run under load on two cores; answers are gibberish, which nothing here reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

POLICY_KEY = "sk-policy-test-key-4e1a"
"""The key the replicas require and the gateways send (``upstream_api_key``)."""
ADAPTERS = 4
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|im_start|>": 0, "<|im_end|>": 1, **{c: i + 2 for i, c in enumerate(alphabet)}}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=core, eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    tok.chat_template = TEMPLATE
    return tok


def make_tiny_policy_model(data_dir: Path, adapters: int = ADAPTERS
                           ) -> tuple[Path, list[Path]]:
    """``data_dir/tiny-llama`` (model and tokenizer) and ``adapters`` LoRA adapters of it
    under ``data_dir/adapters``; made once (reused when present)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir = data_dir / "tiny-llama"
    paths = [data_dir / "adapters" / f"tiny-{i}" for i in range(adapters)]
    if (model_dir / "config.json").is_file() and all(
            (p / "adapter_model.safetensors").is_file() for p in paths):
        return model_dir, paths
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, eos_token_id=1, bos_token_id=0,
                         pad_token_id=1)
    base: Any = LlamaForCausalLM(config)
    base.eval()
    base.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    for seed, path in enumerate(paths):
        lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8,
                                               target_modules=["q_proj", "v_proj"]))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in lora.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        lora.save_pretrained(str(path))
        base = lora.unload()
    return model_dir, paths
