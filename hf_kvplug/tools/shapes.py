"""Known model shapes (transformers configs, no weights) for `hf-kvplug plan` / `bench`, and the demo's tiny models.

Every entry is a function returning a fresh config, so callers may edit what they get. The shapes follow the
published checkpoints; `max_position_embeddings` is raised to 128k so long-context sweeps never trip a length check
(RoPE of the default type does not depend on it).
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from transformers import LlamaConfig, Qwen2Config, Qwen3Config


def _rope(theta: float) -> dict:
    return {"rope_type": "default", "rope_theta": float(theta)}


def llama3_8b() -> LlamaConfig:
    """Meta-Llama-3-8B: hidden 4096, 32 layers, 32/8 heads, head_dim 128."""
    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rms_norm_eps=1e-5, rope_parameters=_rope(500000),
                       max_position_embeddings=131072, tie_word_embeddings=False, bos_token_id=128000,
                       eos_token_id=128001)


def qwen25_7b() -> Qwen2Config:
    """Qwen2.5-7B: hidden 3584, 28 layers, 28/4 heads, head_dim 128, q/k/v biases."""
    return Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, rms_norm_eps=1e-6, rope_parameters=_rope(1e6),
                       max_position_embeddings=131072, tie_word_embeddings=False, use_sliding_window=False,
                       bos_token_id=151643, eos_token_id=151643)


def qwen3_8b() -> Qwen3Config:
    """Qwen3-8B: hidden 4096, 36 layers, 32/8 heads, head_dim 128, q/k RMSNorm."""
    return Qwen3Config(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, rms_norm_eps=1e-6,
                       rope_parameters=_rope(1e6), max_position_embeddings=131072, tie_word_embeddings=False,
                       use_sliding_window=False, bos_token_id=151643, eos_token_id=151645)


def tiny() -> LlamaConfig:
    """A 2-layer Llama for tests (hidden 64, 4/2 heads, head_dim 16)."""
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, max_position_embeddings=4096, pad_token_id=0,
                       bos_token_id=1, eos_token_id=None)


SHAPES: dict[str, Callable[[], object]] = {
    "llama3-8b": llama3_8b,
    "qwen2.5-7b": qwen25_7b,
    "qwen3-8b": qwen3_8b,
    "tiny": tiny,
}

DEMO_FAMILIES = ("llama", "qwen2", "qwen3")


def demo_config(family: str = "llama"):
    """The demo's embedded model: hidden 256, 4 layers, 8/2 heads, vocab 1024 (byte-level prompts fit)."""
    common = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096, pad_token_id=0,
                  bos_token_id=1, eos_token_id=None, tie_word_embeddings=False, initializer_range=0.1)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(use_sliding_window=False, **common)
    if family == "qwen3":
        return Qwen3Config(head_dim=32, use_sliding_window=False, **common)
    raise ValueError(f"unknown demo family {family!r}; choose one of {', '.join(DEMO_FAMILIES)}")


class UnknownModelError(ValueError):
    """--model names neither a known shape nor a checkpoint directory."""


def is_known(name: str) -> bool:
    return name in SHAPES


def load_config(name_or_path: str):
    """A known shape's config, or `AutoConfig` from a local checkpoint directory."""
    if name_or_path in SHAPES:
        return SHAPES[name_or_path]()
    if os.path.isdir(name_or_path):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(name_or_path)
    raise UnknownModelError(f"--model {name_or_path!r} is neither a known shape ({', '.join(SHAPES)}) "
                            "nor a local checkpoint directory")


def param_count(config) -> tuple[int, int]:
    """(all parameters, input-embedding parameters not tied to the LM head), counted on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())  # parameters() already counts a tied matrix once
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    untied = 0 if head is not None and head.weight is emb else emb.numel()
    return total, untied


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
