"""Tiny random Llama / Qwen2 / Qwen3 models, saved with save_pretrained and loaded back (no downloads)."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

FAMILIES = ("llama", "qwen2", "qwen3")
# The newer families, as their real configs have them: MoE routing, per-layer windows, hybrid linear attention with
# an output gate and partial RoPE (tiny sizes; real ones in comments).
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
HYBRID_FAMILIES = ("qwen3_next", "qwen3_5", "qwen3_5_moe")

_ROOT = tempfile.mkdtemp(prefix="kvplug-models-")  # every saved checkpoint of this test run, removed at exit
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)

# Real sizes in comments: Llama-3-8B hidden 4096, 32 layers, 32/8 heads, d128.
_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, pad_token_id=0,
               eos_token_id=None, bos_token_id=1)


def tiny_config(family: str, **overrides):
    kw = dict(_COMMON, **overrides)
    if family == "llama":
        return LlamaConfig(**kw)
    if family == "qwen2":
        return Qwen2Config(**kw)
    if family == "qwen3":
        return Qwen3Config(head_dim=16, **kw)
    if family == "mistral":
        return MistralConfig(sliding_window=None, **kw)
    if family == "qwen3_sliding":  # Qwen3 with its second layer on a sliding window of 6
        return Qwen3Config(head_dim=16, use_sliding_window=True, sliding_window=6, max_window_layers=1, **kw)
    return _newer_config(family, kw)


def _newer_config(family: str, kw: dict):
    import transformers as tf

    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    # Qwen3-Next-80B / Qwen3.5: 3 gated-DeltaNet layers per full-attention layer, head_dim 256 with 1/4 rotary
    linear = dict(linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                  linear_num_value_heads=4, head_dim=16, num_hidden_layers=kw.get("num_hidden_layers", 2) * 4)
    if family == "mixtral":  # Mixtral-8x7B: 8 experts, top 2, 32/8 heads
        return tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **kw)
    if family == "mixtral_sliding":
        return tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, sliding_window=5, **kw)
    if family == "qwen2_moe":  # Qwen1.5-MoE-A2.7B: 60 experts, top 4, shared expert, qkv bias
        return tf.Qwen2MoeConfig(shared_expert_intermediate_size=64, **moe, **kw)
    if family == "qwen2_moe_sliding":  # even layers below max_window_layers slide
        return tf.Qwen2MoeConfig(shared_expert_intermediate_size=64, use_sliding_window=True, sliding_window=5,
                                 max_window_layers=2, **moe, **kw)
    if family == "qwen3_moe":  # Qwen3-30B-A3B: 128 experts, top 8, 32/4 heads, d128
        return tf.Qwen3MoeConfig(head_dim=16, **moe, **kw)
    if family == "qwen3_moe_sliding":
        return tf.Qwen3MoeConfig(head_dim=16, use_sliding_window=True, sliding_window=5, **moe, **kw)
    if family == "qwen3_next":
        return tf.Qwen3NextConfig(shared_expert_intermediate_size=32, **moe, **linear,
                                  **{k: v for k, v in kw.items() if k != "num_hidden_layers"})
    if family == "qwen3_5":
        from transformers.models.qwen3_5 import Qwen3_5TextConfig
        return Qwen3_5TextConfig(**linear, **{k: v for k, v in kw.items() if k != "num_hidden_layers"})
    if family == "qwen3_5_moe":
        from transformers.models.qwen3_5_moe import Qwen3_5MoeTextConfig
        return Qwen3_5MoeTextConfig(shared_expert_intermediate_size=32, **moe, **linear,
                                    **{k: v for k, v in kw.items() if k != "num_hidden_layers"})
    raise ValueError(family)


@functools.lru_cache(maxsize=None)
def _saved(family: str, dtype_name: str, seed: int, overrides: tuple) -> str:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **dict(overrides)))
    path = tempfile.mkdtemp(prefix=f"{family}-", dir=_ROOT)
    model.to(getattr(torch, dtype_name)).save_pretrained(path, safe_serialization=True)
    return path


def tiny_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0, attn="sdpa", **overrides):
    """A fresh instance loaded from a saved checkpoint (so tests never share patched modules)."""
    path = _saved(family, str(dtype).split(".")[-1], seed, tuple(sorted(overrides.items())))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    model.generation_config.pad_token_id = 0
    return model.eval()
