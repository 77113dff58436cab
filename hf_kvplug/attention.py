"""The plugged attention forward shared by every supported model (differences come from the patcher's table)."""

from __future__ import annotations

import sys

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from . import compat, rope
from .cache import PlugCache


def plug_attention_forward(self, *args, **kwargs):
    """Bound per attention module by `hf_kvplug.patch`: the fused path with a PlugCache, the original otherwise."""
    # forward(hidden_states, position_embeddings, attention_mask, cache | past_key_values, **kwargs)
    cache = compat.cache_from_call(args, kwargs, 3)
    if not isinstance(cache, PlugCache):
        return self._kvplug_original_forward(*args, **kwargs)
    for name in compat.CACHE_KWARGS:
        kwargs.pop(name, None)
    return _plugged_forward(self, cache, *args[:3], **kwargs)


def _attends_eagerly(module, kwargs, rows, dtype: torch.dtype) -> bool:
    """Whether this step runs the model's own eager attention over the layer's gathered K/V, as stock runs it: for a
    model loaded with `attn_implementation="eager"` when it asks for the weights (`output_attentions`), and, on eager
    code, in every step of a half-precision one: its eager attention rounds the scores and the probabilities to the
    model dtype, which the fused step (fp32 inside) cannot reproduce, and the tokens would part. In fp32 both compute
    in fp32 and differ by a rounding, as with sdpa, so the fused step serves it. Inside a compiled graph only for the
    weights (the fused step keeps the graph's shapes fixed). Found once per forward, by its first attention layer
    (`ForwardState.eager`): every layer sees the same config, keyword arguments and dtype, and reading the config
    costs microseconds a layer."""
    compiling = torch.compiler.is_compiling()
    if rows.eager is not None and not compiling:
        return rows.eager
    config = module.config
    if config._attn_implementation != "eager":
        eager = False
    else:
        asked = kwargs.get("output_attentions")
        eager = bool(getattr(config, "output_attentions", False) if asked is None else asked) or (
            not compiling and dtype != torch.float32)
    if not compiling:
        rows.eager_decided(eager)
    return eager


def _plugged_forward(self, cache, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    # attention_mask serves only the prefill; after it the cache bounds each row by its lengths and the mask it
    # recorded (HF builds a q x q mask for a PlugCache, see PlugLayer.get_mask_sizes). A cache passed together with
    # use_cache=False is used all the same, as stock models use it.
    if len(cache.layers) != self._kvplug_num_layers:
        raise ValueError(f"PlugCache has {len(cache.layers)} layers but the model has "
                         f"{self._kvplug_num_layers}: it was built for another model")
    if self.training and getattr(self, "attention_dropout", 0.0):  # (before anything is written)
        raise ValueError(f"a PlugCache attends without dropout, and this model is in training mode with "
                         f"attention_dropout={self.attention_dropout}: call model.eval() for generation, or use a "
                         "stock cache (or none) to train")
    family = self._kvplug_family
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    gate = None
    if family.output_gate:  # Qwen3-Next / Qwen3.5: per head, the query then its output gate
        q, gate = torch.chunk(self.q_proj(hidden_states).view(*input_shape, -1, 2 * self.head_dim), 2, dim=-1)
        gate = gate.reshape(*input_shape, -1)
    else:
        q = self.q_proj(hidden_states).view(hidden_shape)
    k = self.k_proj(hidden_states).view(hidden_shape)
    v = self.v_proj(hidden_states).view(hidden_shape)
    if family.qk_norm:  # Qwen3 and descendants: per-head RMSNorm before RoPE
        q, k = self.q_norm(q), self.k_norm(k)
    cos, sin = position_embeddings
    # Looked up at call time so a RoPE (or eager attention) swapped into the modeling module is honoured.
    modeling = sys.modules[type(self).__module__]
    probed, plug = self._kvplug_rope, cache.layer(self.layer_idx)
    rotated = False  # q and k carry a quantized cache's key rotation (else the layer applies it)
    if (input_shape[1] == 1 and probed is not None and modeling.apply_rotary_pos_emb is probed[0]
            and modeling.rotate_half is probed[1] and cos.shape[-1] == self.head_dim and q.dtype == k.dtype
            and not plug.fresh):
        dev = plug.dev
        if dev.rotation is None:
            q, k = rope.one_pass(q, k, *dev.rope_tables(cos, sin))  # a decode step: the same bits, fewer ops
        else:  # and the rotation in the same product
            q, k = rope.one_pass_rotated(q, k, dev.rope_rotated(cos, sin))
            rotated = True
    else:
        q, k = modeling.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, L, heads, D], as the cache stores K
    layer = cache.enter(self.layer_idx, k)  # checks; the forward's host work if nothing did it (a layer called alone)
    rows = cache.state
    weights = None
    if layer.fresh:
        # First forward into an empty cache (the prefill): the model's own attention over the fresh K/V with the
        # mask HF built (q x q, as for a DynamicCache), exactly as stock; the K/V are stored only once it succeeded,
        # so that an error in it (say, out of memory) leaves the layer empty.
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                       modeling.eager_attention_forward)
        if family.passes_window:
            kwargs["sliding_window"] = layer.window
        out, weights = attend(self, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_mask,
                              dropout=0.0, scaling=self.scaling, **kwargs)
        layer.write(k, v, rows.leaders)
    elif _attends_eagerly(self, kwargs, rows, q.dtype):  # the model's eager attention over the gathered K/V, as stock's
        out, weights = layer.attend_dense(self, q.transpose(1, 2), k, v, modeling.eager_attention_forward,
                                          rows.length, rows.holes, rotated)
    else:
        out = layer.attend(q, k, v, self.scaling, rows.holes, rotated)
    out = out.reshape(*input_shape, -1)
    if gate is not None:
        out = out * torch.sigmoid(gate)
    return self.o_proj(out), weights
