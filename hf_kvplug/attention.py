"""The plugged attention forward shared by every supported model (differences come from the patcher's table)."""

from __future__ import annotations

import sys

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from . import compat
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


def rope_one_pass(q, k, cos, sin, rotate_half) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's RoPE, `x * cos + rotate_half(x) * sin`, on `q [B, L, nheads, D]` and `k [B, L, nheads_k, D]` in one
    pass over both (`cos, sin [B, L, D]`): `(q [B, nheads, L, D], k [B, L, nheads_k, D])`, views of one tensor. Each
    element goes through the same operations as in `apply_rotary_pos_emb`, so the same bits, in 13 aten ops (views
    included) where calling it took 19 (and, from transformers 5.25, a hub-kernel dispatch around it, which runs the
    same function outside a kernelized model's own forward, as in the plugged one)."""
    nheads = q.shape[2]
    qk = torch.cat((q, k), 2)
    qk = qk * cos.unsqueeze(2) + rotate_half(qk) * sin.unsqueeze(2)
    return qk[:, :, :nheads].transpose(1, 2), qk[:, :, nheads:]


def one_pass_rope(module):
    """The modeling module's `apply_rotary_pos_emb` if a plugged decode step of attention `module` may apply it in
    one pass (`rope_one_pass`): its family's RoPE is Llama's over the whole head (`Family.whole_head_rope`) and, tried
    here on random vectors in fp32, bf16 and fp16, it gives the same bits as the one pass. Else None: the step calls
    it as stock does."""
    modeling = sys.modules[type(module).__module__]
    fn, rotate_half = getattr(modeling, "apply_rotary_pos_emb", None), getattr(modeling, "rotate_half", None)
    head_dim = getattr(module, "head_dim", None)
    if not module._kvplug_family.whole_head_rope or fn is None or rotate_half is None or not head_dim:
        return None
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            q, k = torch.randn(2, 1, 3, head_dim, generator=g), torch.randn(2, 1, 2, head_dim, generator=g)
            cos, sin = torch.randn(2, 1, head_dim, generator=g), torch.randn(2, 1, head_dim, generator=g)
            q, k, cos, sin = (x.to(dtype) for x in (q, k, cos, sin))
            want_q, want_k = fn(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            got_q, got_k = rope_one_pass(q, k, cos, sin, rotate_half)
            if not (torch.equal(want_q, got_q) and torch.equal(want_k.transpose(1, 2), got_k)):
                return None
    return fn


def _wants_weights(module, kwargs, rows) -> bool:
    """Stock returns attention weights only from eager attention, and only when asked. Found once per forward, by
    its first attention layer (`ForwardState.weights`): every layer sees the same config and keyword arguments, and
    reading the config costs microseconds a layer."""
    compiling = torch.compiler.is_compiling()
    if rows.weights is not None and not compiling:
        return rows.weights
    config = module.config
    if config._attn_implementation != "eager":
        wanted = False
    else:
        asked = kwargs.get("output_attentions")
        wanted = bool(getattr(config, "output_attentions", False) if asked is None else asked)
    if not compiling:
        rows.weights_decided(wanted)
    return wanted


def _plugged_forward(self, cache, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    # attention_mask serves only the prefill; after it the cache bounds each row by its lengths and the mask it
    # recorded (HF builds a q x q mask for a PlugCache, see PlugLayer.get_mask_sizes). A cache passed together with
    # use_cache=False is used all the same, as stock models use it.
    if len(cache.layers) != self._kvplug_num_layers:
        raise ValueError(f"PlugCache has {len(cache.layers)} layers but the model has "
                         f"{self._kvplug_num_layers}: it was built for another model")
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
    if (input_shape[1] == 1 and self._kvplug_rope is not None and modeling.apply_rotary_pos_emb is self._kvplug_rope
            and cos.shape[-1] == self.head_dim and q.dtype == k.dtype and not cache.layer(self.layer_idx).fresh):
        q, k = rope_one_pass(q, k, cos, sin, modeling.rotate_half)  # a decode step: the same bits, fewer ops
    else:
        q, k = modeling.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        k = k.transpose(1, 2)  # [B, L, nheads_k, D], as the cache stores it
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
        out, weights = attend(self, q, k.transpose(1, 2), v.transpose(1, 2), attention_mask, dropout=0.0,
                              scaling=self.scaling, **kwargs)
        layer.write(k, v, rows.leaders)
    elif _wants_weights(self, kwargs, rows):  # output_attentions: the model's eager attention over the gathered K/V
        out, weights = layer.attend_dense(self, q, k, v, modeling.eager_attention_forward, rows.length, rows.holes)
    else:
        out = layer.attend(q.transpose(1, 2), k, v, self.scaling, rows.holes)
    out = out.reshape(*input_shape, -1)
    if gate is not None:
        out = out * torch.sigmoid(gate)
    return self.o_proj(out), weights
