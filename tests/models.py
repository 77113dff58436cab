"""Tiny random Llama / Qwen2 / Qwen3 models, saved with save_pretrained and loaded back (no downloads)."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

FAMILIES = ("llama", "qwen2", "qwen3")

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
