"""Pure-PyTorch reference of every cache operation: the CPU path for users and the oracle for the Triton kernels.

Cache layout (per layer), shared by the reference and the kernels:
  k_cache, v_cache  [num_blocks, nheads_k, BLOCK_SIZE, head_dim]   model dtype, or int8
  k_scale, v_scale  [num_blocks, nheads_k, BLOCK_SIZE] float32     per token and head (int8 only; else 0 elements)
  block_table       [max_batch, max_blocks] int32                   row b's slot s lives in block block_table[b, s // BS]
  cache_seqlens     [max_batch] int32                               slots filled in row b before this call
  cache_starts      [batch] int32                                   first valid slot of row b (left padding)

Semantics of `attend_with_kvcache` for rows b < batch and new tokens i < q_len, with s_i = cache_seqlens[b] + i:
  1. K/V of token i are written to slot s_i (quantized when the cache is int8; writes past the row's capacity are
     dropped);
  2. out[b, i] attends over slots [lo_i, s_i] of the updated cache, where
     lo_i = max(cache_starts[b], s_i - window + 1) (window <= 0 means none), and lo_i = s_i if that exceeds s_i
     (a padding query sees only itself, which keeps it finite).
cache_seqlens is not advanced: the caller does that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INT8_MAX = 127.0


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-vector int8: `x [..., D]` -> (`q [..., D]` int8, `scale [...]` float32), x ~= q * scale."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    scale = amax / INT8_MAX
    inv = torch.where(amax > 0, INT8_MAX / amax.clamp_min(1e-30), torch.zeros_like(amax))
    q = torch.round(xf * inv.unsqueeze(-1)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.unsqueeze(-1)).to(dtype)


def _slots(cache_seqlens: torch.Tensor, batch: int, q_len: int) -> torch.Tensor:
    return cache_seqlens[:batch].long().unsqueeze(1) + torch.arange(q_len, device=cache_seqlens.device)


def write_kvcache_ref(k, v, k_cache, v_cache, k_scale, v_scale, block_table, cache_seqlens,
                      may_overflow: bool = True) -> None:
    """Writes `k, v [B, q_len, nheads_k, D]` into slots cache_seqlens[b] + i of rows b < B, in place.

    `may_overflow=False` is a promise (checked by the caller) that every slot fits, which skips the masking.
    """
    batch, q_len = k.shape[:2]
    bs = k_cache.shape[2]
    capacity = block_table.shape[1] * bs
    slots = _slots(cache_seqlens, batch, q_len).to(k.device)
    valid = slots < capacity
    # A dropped write re-writes the old value of slot (s % capacity): history this call does not touch as long as
    # q_len <= capacity, so no two writes of one call collide (index_put_ is undefined for duplicate indices).
    slots = torch.where(valid, slots, slots % capacity)
    blocks = block_table[:batch].long().gather(1, slots // bs)  # [B, q_len]
    offs = slots % bs
    keep = valid.view(batch, q_len, 1, 1)
    for new, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        if cache.dtype == torch.int8:
            new, s = quantize_int8(new)
            if may_overflow:
                s = torch.where(keep[..., 0], s, scale[blocks, :, offs])
            scale[blocks, :, offs] = s
        new = new.to(cache.dtype)
        if may_overflow:
            new = torch.where(keep, new, cache[blocks, :, offs])
        cache[blocks, :, offs] = new


def gather_kv(cache, scale, block_table, batch: int, num_blocks: int, dtype: torch.dtype) -> torch.Tensor:
    """Row-contiguous view of the first `num_blocks` blocks of rows < batch: [B, nheads_k, num_blocks * BS, D]."""
    blocks = block_table[:batch, :num_blocks].long()
    x = cache[blocks]  # [B, nb, Hk, BS, D]
    if cache.dtype == torch.int8:
        x = dequantize_int8(x, scale[blocks], dtype)
    b, nb, hk, bs, d = x.shape
    return x.to(dtype).permute(0, 2, 1, 3, 4).reshape(b, hk, nb * bs, d)


def attention_bounds(cache_seqlens, cache_starts, batch: int, q_len: int, window: int):
    """Per new token: its slot `s` and the first slot `lo` it attends to, both [B, q_len] int64."""
    s = _slots(cache_seqlens, batch, q_len)
    lo = cache_starts[:batch].long().to(s.device).unsqueeze(1).expand_as(s)
    if window > 0:
        lo = torch.maximum(lo, s - window + 1)
    return s, torch.minimum(lo, s)


def attend_with_kvcache_ref(
    q, k, v, k_cache, v_cache, k_scale, v_scale, block_table, cache_seqlens, cache_starts,
    softmax_scale: float, window: int = 0, num_blocks: int | None = None, may_overflow: bool = True,
) -> torch.Tensor:
    """Reference of the fused write + attention. `q [B, q_len, nheads, D]` -> out `[B, q_len, nheads, D]`.

    `num_blocks` bounds how many blocks per row are read (None: all). Callers pass the blocks actually in use when
    they know it on the host, which keeps the work proportional to the cached tokens.
    """
    batch, q_len, nheads, _ = q.shape
    write_kvcache_ref(k, v, k_cache, v_cache, k_scale, v_scale, block_table, cache_seqlens, may_overflow)
    nb = block_table.shape[1] if num_blocks is None else max(1, min(num_blocks, block_table.shape[1]))
    keys = gather_kv(k_cache, k_scale, block_table, batch, nb, q.dtype)
    values = gather_kv(v_cache, v_scale, block_table, batch, nb, q.dtype)
    s, lo = attention_bounds(cache_seqlens, cache_starts, batch, q_len, window)
    t = torch.arange(keys.shape[2], device=q.device)
    mask = (t >= lo.unsqueeze(-1)) & (t <= s.unsqueeze(-1))  # [B, q_len, T]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), keys, values, attn_mask=mask.unsqueeze(1), scale=softmax_scale,
        enable_gqa=nheads != keys.shape[1],
    )
    return out.transpose(1, 2).contiguous()


def attend_fp64_ref(q, keys, values, lo, s, softmax_scale):
    """Oracle for tests: dense fp64 attention of `q [B, L, H, D]` over row-contiguous `keys/values [B, Hk, T, D]`."""
    b, L, h, d = q.shape
    hk = keys.shape[1]
    qf = q.double().transpose(1, 2)  # [B, H, L, D]
    kf = keys.double().repeat_interleave(h // hk, dim=1)
    vf = values.double().repeat_interleave(h // hk, dim=1)
    scores = qf @ kf.transpose(-1, -2) * softmax_scale  # [B, H, L, T]
    t = torch.arange(keys.shape[2], device=q.device)
    mask = (t >= lo.unsqueeze(-1)) & (t <= s.unsqueeze(-1))
    scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
    return (scores.softmax(-1) @ vf).transpose(1, 2)
