"""The plugged attention forward shared by every supported model (differences come from the patcher's table)."""

from __future__ import annotations

import sys

from .cache import PlugCache


def _cache_arg(args, kwargs):
    if "past_key_values" in kwargs:
        return kwargs["past_key_values"]
    return args[3] if len(args) > 3 else None  # forward(hidden_states, position_embeddings, attention_mask, pkv)


def plug_attention_forward(self, *args, **kwargs):
    """Bound per attention module by `hf_kvplug.patch`: the fused path with a PlugCache, the original otherwise."""
    cache = _cache_arg(args, kwargs)
    if not isinstance(cache, PlugCache):
        return self._kvplug_original_forward(*args, **kwargs)
    return _plugged_forward(self, cache, *args, **kwargs)


def _plugged_forward(self, cache, hidden_states, position_embeddings=None, attention_mask=None,
                     past_key_values=None, **kwargs):
    # attention_mask is ignored on purpose: the cache bounds each row by its lengths, left padding and window.
    if kwargs.get("use_cache", True) is False:
        raise ValueError("use_cache=False cannot be combined with a PlugCache: drop past_key_values or use_cache=False")
    if len(cache.layers) != self.config.num_hidden_layers:
        raise ValueError(f"PlugCache has {len(cache.layers)} layers but the model has "
                         f"{self.config.num_hidden_layers}: it was built for another model")
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q = self.q_proj(hidden_states).view(hidden_shape)
    k = self.k_proj(hidden_states).view(hidden_shape)
    v = self.v_proj(hidden_states).view(hidden_shape)
    if self._kvplug_qk_norm:  # Qwen3: per-head RMSNorm before RoPE
        q, k = self.q_norm(q), self.k_norm(k)
    cos, sin = position_embeddings
    # Looked up at call time so a RoPE swapped into the modeling module (e.g. Liger's) is honoured.
    rope = sys.modules[type(self).__module__].apply_rotary_pos_emb
    q, k = rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    out = cache.attend(self.layer_idx, q.transpose(1, 2), k.transpose(1, 2), v, kwargs.get("position_ids"),
                       self.scaling)
    return self.o_proj(out.reshape(*input_shape, -1)), None
