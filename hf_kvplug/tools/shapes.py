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


def llama31_8b() -> LlamaConfig:
    """Llama-3.1-8B: Llama-3-8B's shape with llama3 RoPE scaling (factor 8, original context 8192) to 128k."""
    config = llama3_8b()
    config.rope_parameters = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    return config


def qwen3_30b_a3b():
    """Qwen3-30B-A3B: hidden 2048, 48 layers, 32/4 heads, head_dim 128, 128 experts (top 8, expert width 768)."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                          num_experts_per_tok=8, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                          head_dim=128, vocab_size=151936, rms_norm_eps=1e-6, rope_parameters=_rope(1e6),
                          max_position_embeddings=131072, tie_word_embeddings=False, use_sliding_window=False,
                          bos_token_id=151643, eos_token_id=151645)


def _qwen3_5_rope(theta: float) -> dict:
    return {"rope_type": "default", "rope_theta": float(theta), "partial_rotary_factor": 0.25}


def qwen35_9b():
    """Qwen3.5-9B (dense, hybrid): hidden 4096, 32 layers of which 8 full attention (every 4th; the rest gated
    DeltaNet), 16/4 heads, head_dim 256, a quarter of it rotary; DeltaNet 16 key / 32 value heads of 128."""
    from transformers.models.qwen3_5 import Qwen3_5TextConfig

    return Qwen3_5TextConfig(hidden_size=4096, intermediate_size=12288, num_hidden_layers=32, num_attention_heads=16,
                             num_key_value_heads=4, head_dim=256, vocab_size=248320, rms_norm_eps=1e-6,
                             rope_parameters=_qwen3_5_rope(1e7), max_position_embeddings=262144,
                             linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128,
                             linear_num_key_heads=16, linear_num_value_heads=32, tie_word_embeddings=False)


def qwen3_next_80b_a3b():
    """Qwen3-Next-80B-A3B: hidden 2048, 48 layers of which 12 full attention, 16/2 heads, head_dim 256, 512 experts
    (top 10, expert width 512) and a shared expert; DeltaNet 16 key / 32 value heads of 128."""
    from transformers import Qwen3NextConfig

    return Qwen3NextConfig(hidden_size=2048, intermediate_size=5120, moe_intermediate_size=512,
                           shared_expert_intermediate_size=512, num_experts=512, num_experts_per_tok=10,
                           num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=2, head_dim=256,
                           vocab_size=151936, rms_norm_eps=1e-6, rope_parameters=_qwen3_5_rope(1e7),
                           max_position_embeddings=262144, linear_conv_kernel_dim=4, linear_key_head_dim=128,
                           linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=32,
                           tie_word_embeddings=False)


def mixtral_8x7b():
    """Mixtral-8x7B: hidden 4096, 32 layers, 32/8 heads, head_dim 128, 8 experts (top 2, width 14336)."""
    from transformers import MixtralConfig

    return MixtralConfig(hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                         rms_norm_eps=1e-5, rope_parameters=_rope(1e6), max_position_embeddings=131072,
                         sliding_window=None, tie_word_embeddings=False)


def mistral_7b() -> object:
    """Mistral-7B-v0.1: hidden 4096, 32 layers, 32/8 heads, head_dim 128, every layer on a 4096-token sliding
    window."""
    from transformers import MistralConfig

    return MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=32000, rms_norm_eps=1e-5, rope_parameters=_rope(1e4),
                         max_position_embeddings=32768, sliding_window=4096, tie_word_embeddings=False)


def _deepseek(**kw):
    """A DeepSeek-V2 / V3 shape: multi-head latent attention (MLA) caches a `kv_lora_rank` latent and a
    `qk_rope_head_dim` rotary key per token and layer. Arithmetic only for `plan` (PlugCache holds no MLA model)."""
    from transformers import DeepseekV2Config, DeepseekV3Config

    cls = DeepseekV3Config if kw.pop("v3", False) else DeepseekV2Config
    return cls(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
               max_position_embeddings=163840, **kw)


def deepseek_v2_lite():
    """DeepSeek-V2-Lite: hidden 2048, 27 layers, 16 heads, MLA latent 512 + rope 64, MoE 64 experts (top 6)."""
    return _deepseek(hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
                     num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None, n_routed_experts=64,
                     num_experts_per_tok=6, first_k_dense_replace=1, vocab_size=102400)


def deepseek_v2():
    """DeepSeek-V2: hidden 5120, 60 layers, 128 heads, MLA latent 512 + rope 64, MoE 160 experts (top 6)."""
    return _deepseek(hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536, num_hidden_layers=60,
                     num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, n_routed_experts=160,
                     num_experts_per_tok=6, first_k_dense_replace=1, vocab_size=102400)


def deepseek_v3():
    """DeepSeek-V3: hidden 7168, 61 layers, 128 heads, MLA latent 512 + rope 64, MoE 256 experts (top 8)."""
    return _deepseek(v3=True, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                     num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536,
                     n_routed_experts=256, num_experts_per_tok=8, first_k_dense_replace=3, vocab_size=129280)


def tiny() -> LlamaConfig:
    """A 2-layer Llama for tests (hidden 64, 4/2 heads, head_dim 16)."""
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, max_position_embeddings=4096, pad_token_id=0,
                       bos_token_id=1, eos_token_id=None)


SHAPES: dict[str, Callable[[], object]] = {
    "llama3-8b": llama3_8b,
    "llama3.1-8b": llama31_8b,
    "qwen2.5-7b": qwen25_7b,
    "qwen3-8b": qwen3_8b,
    "qwen3-30b-a3b": qwen3_30b_a3b,
    "qwen3.5-9b": qwen35_9b,
    "qwen3-next-80b-a3b": qwen3_next_80b_a3b,
    "mixtral-8x7b": mixtral_8x7b,
    "mistral-7b": mistral_7b,
    "deepseek-v2-lite": deepseek_v2_lite,
    "deepseek-v2": deepseek_v2,
    "deepseek-v3": deepseek_v3,
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
    """A known shape's config, or `AutoConfig` from a local checkpoint directory or GGUF model ('smollm2', a .gguf
    file, a directory holding one)."""
    if name_or_path in SHAPES:
        return SHAPES[name_or_path]()
    from .models import gguf_kwargs, resolve_gguf

    gguf = resolve_gguf(name_or_path)
    if gguf is not None:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(**gguf_kwargs(gguf))
    if os.path.isdir(name_or_path):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(name_or_path)
    raise UnknownModelError(f"--model {name_or_path!r} is neither a known shape ({', '.join(SHAPES)}) "
                            "nor a local checkpoint directory nor a GGUF model ('smollm2', a .gguf file)")


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
