"""`flash_attn_with_kvcache`, drop-in: flash-attention's signature, cache layouts and semantics on hf_kvplug's kernels.

    from hf_kvplug import flash_attn_with_kvcache      # instead of: from flash_attn import flash_attn_with_kvcache

Every argument of flash-attention 2's function is taken and means what it means there: new k/v appended at
`cache_seqlens` (in place) and attended in the same call, rotary embedding of q and the new k, `cache_batch_idx`,
`cache_leftpad`, a contiguous `[batch_size_cache, seqlen_cache, nheads_k, d]` or paged `[num_blocks, page_size,
nheads_k, d]` cache (any page size), MQA/GQA, causal or not with queries aligned to the end of each row, a
`window_size` (left, right), `softcap`, `alibi_slopes`, `num_splits` and `return_softmax_lse`. The caches are viewed,
never copied. fp16, bf16 and fp32 caches in q's dtype; head_dim any size.

Where flash-attention leaves behaviour undefined, this is defined and loud:
  * a new token past the cache (or in an unmapped block, -1) is not written and the queries that would see it get
    NaN; with CPU tensors a ValueError is raised before anything is written;
  * a query that sees no key gets 0 and a log-sum-exp of +inf (as flash-attention reports it);
  * rotary positions past `rotary_cos` raise (asynchronously on CUDA) instead of reading out of bounds;
  * `cache_batch_idx` with `block_table` raises: flash-attention neither supports nor defines the pair.

CUDA tensors run the Triton kernels (the split-KV decode kernel for one query, else the write and extend kernels),
other tensors the PyTorch fast path (`torchpath`); `backend=` or HF_KVPLUG_BACKEND force one, or the reference
(`hf_kvplug.ops`). No backward.
"""

from __future__ import annotations

import torch

from . import ops


def flash_attn_with_kvcache(
    q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None, cache_batch_idx=None,
    cache_leftpad=None, block_table=None, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
    rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False, *, backend: str = "auto",
):
    """flash_attn.flash_attn_with_kvcache on hf_kvplug's kernels (module doc: what is defined where flash's is not).

    Args:
        q: `[batch, seqlen_q, nheads, d]`.
        k_cache, v_cache: `[batch_size_cache, seqlen_cache, nheads_k, d]`, or `[num_blocks, page_size, nheads_k, d]`
            with `block_table`; q's dtype, contiguous last dim, the same strides. **Written in place** when k, v are
            given.
        k, v: `[batch, seqlen_new, nheads_k, d]` new keys and values, appended at `cache_seqlens`; or None.
        rotary_cos, rotary_sin: `[seqlen_ro, rotary_dim / 2]`, with k, v only: k is rotated at positions
            cache_seqlens + j; q at cache_seqlens + i when causal or local, else all of q at cache_seqlens.
            `rotary_interleaved`: pairs (0, 1), (2, 3)... if True, else (i, i + rotary_dim / 2).
        cache_seqlens: int or `[batch]` int32, tokens already cached per row (None: the whole cache).
        cache_batch_idx: `[batch]` int32, the cache row of each batch row (contiguous cache only).
        cache_leftpad: `[batch]` int32, the first cache slot of each row (keys before it are not seen).
        block_table: `[batch, max_blocks_per_seq]` int32 for a paged cache.
        softmax_scale: default `d ** -0.5`.
        causal: causal mask aligned to the bottom right (query i sits at slot seqlen_k - seqlen_q + i).
        window_size: (left, right), -1 for unbounded: query at slot p sees [p - left, p + right] (right is 0 when
            causal).
        softcap: > 0 turns each scaled score x into softcap * tanh(x / softcap).
        alibi_slopes: `[nheads]` or `[batch, nheads]` fp32: -slope * |p - j| is added to the score of key slot j.
            (With causal=True, flash-attention's kernel adds slope * j instead: the same softmax, but its log-sum-exp
            is higher by slope * p than the documented bias gives. This follows the documentation.)
        num_splits: 0 picks the split-KV count for one query; n > 0 asks for n splits (1: none).
        return_softmax_lse: also return `[batch, nheads, seqlen_q]` fp32, the natural log-sum-exp of the scores.
        backend: "auto", "triton" or "reference" (keyword only; not in flash-attention).

    Returns:
        out `[batch, seqlen_q, nheads, d]` in q's dtype, and the log-sum-exp when `return_softmax_lse`.
    """
    batch, seqlen_q, nheads, head_dim = q.shape
    if (k is None) != (v is None):
        raise ValueError("k and v: both tensors, or both None")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache and v_cache must be 4-d and alike: {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype or q.dtype not in (torch.float16, torch.bfloat16,
                                                                               torch.float32):
        raise ValueError(f"q, k_cache and v_cache: one dtype of fp16, bf16, fp32 (got {q.dtype}, {k_cache.dtype}, "
                         f"{v_cache.dtype})")
    if k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("k_cache and v_cache need a contiguous last dimension and the same strides")
    nheads_k = k_cache.shape[2]
    if k_cache.shape[3] != head_dim or nheads % nheads_k:
        raise ValueError(f"cache {tuple(k_cache.shape)} does not fit q {tuple(q.shape)} (heads must divide)")
    device = q.device

    # the cache as hf_kvplug's paged layout [blocks, nheads_k, block_size, d]: a view; a contiguous cache is one
    # block per cache row
    if block_table is not None:
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx with block_table is not defined (flash-attention does not support the "
                             "pair): index the block table instead")
        table = block_table if block_table.dtype == torch.int32 else block_table.to(torch.int32)
        table = table if table.stride(-1) == 1 else table.contiguous()
    else:
        rows = torch.arange(batch, device=device) if cache_batch_idx is None else cache_batch_idx
        table = rows.to(device=device, dtype=torch.int32).reshape(batch, 1).contiguous()
    kc, vc = k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    capacity = table.shape[1] * kc.shape[2]

    if cache_seqlens is None or isinstance(cache_seqlens, int):
        seqlens = torch.full((batch,), capacity if cache_seqlens is None else cache_seqlens, dtype=torch.int32,
                             device=device)
    else:
        seqlens = cache_seqlens.to(device=device, dtype=torch.int32).contiguous()
    starts = (torch.zeros(batch, dtype=torch.int32, device=device) if cache_leftpad is None
              else cache_leftpad.to(device=device, dtype=torch.int32).contiguous())

    # a window side at least the cache's length bounds nothing: flash-attention drops it before it decides whether
    # the call is local (which places q's rotary positions), and so does this
    left, right = (-1 if int(w) >= capacity else int(w) for w in window_size)
    local = left >= 0 or right >= 0
    window = left + 1 if left >= 0 else 0
    if causal or right == 0:  # non-causal with right == 0 is the causal mask
        causal, right = True, -1
    if k is None:
        k = v = q.new_empty((batch, 0, nheads_k, head_dim))
    if rotary_cos is not None:
        if k.shape[1] == 0:
            raise ValueError("rotary_cos / rotary_sin apply to q and the new k: pass k and v with them")
        q, k = _rotate(q, k, rotary_cos, rotary_sin, seqlens, causal or local, rotary_interleaved)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.to(device=device, dtype=torch.float32).contiguous()
    scale = head_dim ** -0.5 if softmax_scale is None else float(softmax_scale)
    return ops.attend_with_kvcache(q, k, v, kc, vc, None, None, table, seqlens, starts, scale, window,
                                   backend=backend, causal=causal, right=right, alibi_slopes=alibi_slopes,
                                   softcap=softcap, return_lse=return_softmax_lse, num_splits=num_splits or None)


def _rotate(q, k, cos, sin, seqlens, per_token: bool, interleaved: bool):
    """Rotary embedding as flash-attention applies it (fp32 math, stored in the input dtype): new key j of row b at
    position seqlens[b] + j; query i at seqlens[b] + i if per_token, else at seqlens[b]."""
    if sin is None or cos.shape != sin.shape or cos.dim() != 2 or 2 * cos.shape[1] > q.shape[-1]:
        raise ValueError(f"rotary_cos and rotary_sin: [seqlen_ro, rotary_dim / 2] alike with rotary_dim <= d "
                         f"(got {tuple(cos.shape)}, {None if sin is None else tuple(sin.shape)})")
    seqlen_q, seqlen_new = q.shape[1], k.shape[1]
    last = seqlens.long().max() + max(seqlen_new, seqlen_q if per_token else 1) - 1
    if last.device.type == "cpu":
        if int(last) >= cos.shape[0]:
            raise ValueError(f"rotary position {int(last)} is past rotary_cos ({cos.shape[0]} positions)")
    else:
        torch._assert_async(last < cos.shape[0], "rotary positions past rotary_cos")
    k_pos = seqlens.long()[:, None] + torch.arange(seqlen_new, device=k.device)
    q_pos = seqlens.long()[:, None] + (torch.arange(seqlen_q, device=q.device) if per_token else
                                       torch.zeros(seqlen_q, dtype=torch.long, device=q.device))
    return _apply_rotary(q, cos, sin, q_pos, interleaved), _apply_rotary(k, cos, sin, k_pos, interleaved)


def _apply_rotary(x, cos, sin, pos, interleaved: bool):
    # x [B, L, H, D], pos [B, L]: the first rotary_dim dims rotated, the rest as they are
    rd = 2 * cos.shape[1]
    pos = pos.clamp(max=cos.shape[0] - 1)  # checked above; keeps the gather in bounds on CUDA
    c, s = cos.float()[pos].unsqueeze(2), sin.float()[pos].unsqueeze(2)  # [B, L, 1, rd / 2]
    xr = x[..., :rd].float()
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rot = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., : rd // 2], xr[..., rd // 2:]
        rot = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)
    return torch.cat([rot.to(x.dtype), x[..., rd:]], dim=-1)
