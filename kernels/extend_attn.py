"""Extend kernel (several queries, or one after several new tokens): queries attend (causally, by default) over the
paged cache, which the write kernel has already given the new tokens."""

import torch
import triton
import triton.language as tl

from .decode_attn import flash_extras
from .host import (cdiv, check_cache, check_tail, check_valid, device_guard, launcher, next_pow2, scale_strides,
                   tail_args, upcast_dot)
from .tiles import (LOG2E, TAIL_N, attention_bounds, int4_query, int4_tile_update, kv_tile_scores, lost_span,
                    natural_lse, score_mods, slot_block, softmax_tile_update, tail_tile_update, tile_block_ids, visible)


@triton.jit
def extend_bounds(cache_seqlens_ptr, cache_starts_ptr, b, tok, pid_m, q_len, window, right, capacity,
                  BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    # Queries tok [R] of program pid_m: their slots s, the slots [lo, hi] each may see, and the slots [n_lo, n_hi]
    # the program's tiles must cover (lo and hi grow with the token: from the first token's lo to the last's hi).
    # Not CAUSAL: a query sees up to the row's last token, or up to `right` slots past its own when right >= 0.
    s, lo, hi = attention_bounds(cache_seqlens_ptr, cache_starts_ptr, b, tok, window, capacity)
    _, n_lo, _ = attention_bounds(cache_seqlens_ptr, cache_starts_ptr, b, pid_m * BLOCK_M, window, capacity)
    last = tl.minimum(pid_m * BLOCK_M + BLOCK_M, q_len) - 1
    s_last, _, n_hi = attention_bounds(cache_seqlens_ptr, cache_starts_ptr, b, last, window, capacity)
    if not CAUSAL:
        _, _, row_hi = attention_bounds(cache_seqlens_ptr, cache_starts_ptr, b, q_len - 1, window, capacity)
        hi = tl.where(right >= 0, tl.minimum(s + right, row_hi), row_hi)
        n_hi = tl.where(right >= 0, tl.minimum(row_hi, s_last + right), row_hi)
    return s, lo, hi, n_lo, n_hi


@triton.jit
def lost_queries(bt_row, cache_seqlens_ptr, b, tok, s, lo, right, capacity, q_len, new_lo,
                 BLOCK_SIZE: tl.constexpr, CAUSAL: tl.constexpr):
    # Queries [R] whose output must be NaN because a new token was lost (the write kernel ran first and set the
    # status): the query at a lost token's slot, and every query whose range [lo, hi] meets the lost tokens' span.
    seq0 = tl.load(cache_seqlens_ptr + b)  # query 0's slot; the new tokens hold [seq0 + new_lo, seq0 + q_len)
    lost_lo, lost_hi = lost_span(bt_row, seq0 + new_lo, seq0 + q_len - 1, capacity, BLOCK_SIZE)
    hi = s
    if not CAUSAL:
        hi = tl.where(right >= 0, tl.minimum(s + right, seq0 + q_len - 1), seq0 + q_len - 1)
    _, writable = slot_block(bt_row, s, capacity, BLOCK_SIZE)
    return ((tok >= new_lo) & (writable == 0)) | ((lo <= lost_hi) & (hi >= lost_lo))


@triton.jit
def _extend_attn_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_table_ptr, cache_seqlens_ptr, cache_starts_ptr,
    cache_valid_ptr, out_ptr,
    qk_scale, window, right, capacity, q_len, new_lo, valid_len,
    stride_qb, stride_qt, stride_qh,
    stride_cb, stride_ch, stride_cs, stride_sb, stride_sh, stride_ss, stride_bt, stride_mb,
    stride_ob, stride_ot, stride_oh,
    alibi_ptr, lse_ptr, softcap, stride_ab, stride_eb, stride_eh, stride_et,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, INT8: tl.constexpr,
    UPCAST: tl.constexpr, HAS_HOLES: tl.constexpr, CAUSAL: tl.constexpr,
    ALIBI: tl.constexpr = False, SOFTCAP: tl.constexpr = False, RETURN_LSE: tl.constexpr = False,
):
    # q [B, q_len, nheads, D] -> out [B, q_len, nheads, D]; a program takes BLOCK_M tokens x the GROUP heads of
    # kv head hk, as BLOCK_M * GROUP_PAD rows (row r: token r // GROUP_PAD, head hk * GROUP + r % GROUP_PAD).
    # ALIBI / SOFTCAP / RETURN_LSE: flash_attn_with_kvcache's options, as in the decode kernel (lse [B, nheads, q_len])
    pid_m = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor may pass fp64 scalars
    rows = tl.arange(0, BLOCK_M * GROUP_PAD)
    tok = pid_m * BLOCK_M + rows // GROUP_PAD
    g = rows % GROUP_PAD
    mask_r = (tok < q_len) & (g < GROUP)
    heads = hk * GROUP + g
    s, lo, hi, n_lo, n_hi = extend_bounds(cache_seqlens_ptr, cache_starts_ptr, b, tok, pid_m, q_len, window, right,
                                          capacity, BLOCK_M, CAUSAL)

    b64 = b.to(tl.int64)
    offs_d = tl.arange(0, D_PAD)
    mask_d = offs_d < HEAD_DIM
    heads64 = heads[:, None].to(tl.int64)  # q is a transposed view: stride_qh = q_len * D can pass 2**31 / nheads
    q = tl.load(q_ptr + b64 * stride_qb + tok[:, None].to(tl.int64) * stride_qt + heads64 * stride_qh
                + offs_d[None, :], mask=mask_r[:, None] & mask_d[None, :], other=0.0)  # [R, D_PAD]
    if UPCAST:
        q = q.to(tl.float32)
    m = tl.full([BLOCK_M * GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_M * GROUP_PAD, D_PAD], tl.float32)
    slopes = tl.zeros([BLOCK_M * GROUP_PAD], tl.float32)
    if ALIBI:
        slopes = tl.load(alibi_ptr + b64 * stride_ab + heads, mask=mask_r, other=0.0).to(tl.float32)
        slopes = slopes * LOG2E  # scores are in the log2 domain

    bt_row = block_table_ptr + b64 * stride_bt
    tile_lo = n_lo - n_lo % BLOCK_N
    n_end = n_hi + 1
    offs_n = tl.arange(0, BLOCK_N)
    next_phys = tile_block_ids(bt_row, tile_lo + offs_n, n_end, BLOCK_SIZE)  # one tile ahead
    for start in range(tile_lo, n_end, BLOCK_N):
        slots = start + offs_n
        valid = visible((slots >= n_lo) & (slots < n_end), cache_valid_ptr, b64, slots, stride_mb, valid_len,
                        HAS_HOLES)
        phys = next_phys.to(tl.int64)
        next_phys = tile_block_ids(bt_row, slots + BLOCK_N, n_end, BLOCK_SIZE)
        qk, v, vs = kv_tile_scores(q, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, phys, slots, valid, hk,
                                   offs_d, mask_d, qk_scale, stride_cb, stride_ch, stride_cs, stride_sb,
                                   stride_sh, stride_ss, BLOCK_SIZE, INT8, False)  # [R, BLOCK_N], [BLOCK_N, D_PAD]
        seen = (slots[None, :] >= lo[:, None]) & (slots[None, :] <= hi[:, None]) & valid[None, :]
        qk = score_mods(qk, s, slots, slopes, softcap, ALIBI, SOFTCAP)
        m, l, acc = softmax_tile_update(m, l, acc, tl.where(seen, qk, float("-inf")), v, vs, False, True)

    lse = natural_lse(m, l)
    l = tl.where(l > 0.0, l, 1.0)  # a token that saw nothing (masked out) gives 0
    lost = lost_queries(bt_row, cache_seqlens_ptr, b, tok, s, lo, right, capacity, q_len, new_lo, BLOCK_SIZE, CAUSAL)
    o = tl.where(lost[:, None], float("nan"), acc / l[:, None])
    tl.store(out_ptr + b64 * stride_ob + tok[:, None].to(tl.int64) * stride_ot + heads64 * stride_oh
             + offs_d[None, :], o.to(out_ptr.dtype.element_ty),
             mask=mask_r[:, None] & mask_d[None, :])
    if RETURN_LSE:
        tl.store(lse_ptr + b64 * stride_eb + heads.to(tl.int64) * stride_eh + tok.to(tl.int64) * stride_et,
                 tl.where(lost, float("nan"), lse), mask=mask_r)


@triton.jit
def _extend_attn_int4_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_table_ptr, cache_seqlens_ptr, cache_starts_ptr,
    cache_valid_ptr, out_ptr,
    qk_scale, window, right, capacity, q_len, new_lo, valid_len,
    stride_qb, stride_qt, stride_qh,
    stride_cb, stride_ch, stride_cs, stride_sb, stride_sh, stride_ss, stride_bt, stride_mb,
    stride_ob, stride_ot, stride_oh,
    k_tail_ptr, v_tail_ptr, stride_tb, stride_th, stride_ts,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HAS_HOLES: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_TAIL: tl.constexpr,
):
    # The int4 twin of _extend_attn_kernel: rows and tiles as there, q and the output in their two halves
    # (tiles.int4_tile_update reads each packed tile without dequantizing it). HAS_TAIL: k_tail, v_tail [B, nheads_k,
    # BLOCK_SIZE, HEAD_DIM] (model dtype) hold each row's last, partial block exact (the write kernel filled it): its
    # slots are read from there (tiles.tail_tile_update, after the int4 tiles).
    pid_m = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    qk_scale = tl.cast(qk_scale, tl.float32)
    HALF: tl.constexpr = HEAD_DIM // 2
    rows = tl.arange(0, BLOCK_M * GROUP_PAD)
    tok = pid_m * BLOCK_M + rows // GROUP_PAD
    g = rows % GROUP_PAD
    mask_r = (tok < q_len) & (g < GROUP)
    heads = hk * GROUP + g
    s, lo, hi, n_lo, n_hi = extend_bounds(cache_seqlens_ptr, cache_starts_ptr, b, tok, pid_m, q_len, window, right,
                                          capacity, BLOCK_M, CAUSAL)

    b64 = b.to(tl.int64)
    offs_h = tl.arange(0, D_PAD // 2)
    mask_h = offs_h < HALF
    heads64 = heads[:, None].to(tl.int64)
    q_row = q_ptr + b64 * stride_qb + tok[:, None].to(tl.int64) * stride_qt + heads64 * stride_qh + offs_h[None, :]
    q_mask = mask_r[:, None] & mask_h[None, :]
    q_lo = tl.load(q_row, mask=q_mask, other=0.0)
    q_hi = tl.load(q_row + HALF, mask=q_mask, other=0.0)
    qsum_lo = tl.sum(q_lo.to(tl.float32), 1)
    qsum_hi = tl.sum(q_hi.to(tl.float32), 1)
    qd_lo, qd_hi, q_inv = int4_query(q_lo, q_hi, q_ptr.dtype.element_ty)  # no bf16 dot, so no UPCAST
    m = tl.full([BLOCK_M * GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M * GROUP_PAD], tl.float32)
    acc_lo = tl.zeros([BLOCK_M * GROUP_PAD, D_PAD // 2], tl.float32)
    acc_hi = tl.zeros([BLOCK_M * GROUP_PAD, D_PAD // 2], tl.float32)

    bt_row = block_table_ptr + b64 * stride_bt
    tile_lo = n_lo - n_lo % BLOCK_N
    n_end = n_hi + 1
    n_main = n_end  # the int4 tiles cover the slots seen here up to n_main
    if HAS_TAIL:  # the row holds seqlens[b] + q_len tokens after the call: its slots from tail_lo on, from the tail
        total = tl.load(cache_seqlens_ptr + b) + q_len
        tail_lo = total - total % BLOCK_SIZE
        n_main = tl.minimum(n_end, tail_lo)
    offs_n = tl.arange(0, BLOCK_N)
    next_phys = tile_block_ids(bt_row, tile_lo + offs_n, n_main, BLOCK_SIZE)
    for start in range(tile_lo, n_main, BLOCK_N):
        slots = start + offs_n
        valid = visible((slots >= n_lo) & (slots < n_main), cache_valid_ptr, b64, slots, stride_mb, valid_len,
                        HAS_HOLES)
        phys = next_phys.to(tl.int64)
        next_phys = tile_block_ids(bt_row, slots + BLOCK_N, n_main, BLOCK_SIZE)
        row = phys * stride_cb + hk * stride_ch + (slots % BLOCK_SIZE) * stride_cs
        srow = phys * stride_sb + hk * stride_sh + (slots % BLOCK_SIZE) * stride_ss
        seen = (slots[None, :] >= lo[:, None]) & (slots[None, :] <= hi[:, None]) & valid[None, :]
        m, l, acc_lo, acc_hi = int4_tile_update(m, l, acc_lo, acc_hi, qd_lo, qd_hi, q_inv, qsum_lo, qsum_hi,
                                                k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, row, srow, offs_h,
                                                mask_h, valid, seen, qk_scale, True)
    if HAS_TAIL:  # the slots [max(n_lo, tail_lo), n_end) seen here (a block at most), from the tail
        # q reloaded (in L1) rather than kept through the int4 loop: ptxas gives the extend kernel ~50 more registers
        # (d128) when this loop runs first, with the int4 tiles' query operands live through it
        qf_lo = tl.load(q_row, mask=q_mask, other=0.0).to(tl.float32)
        qf_hi = tl.load(q_row + HALF, mask=q_mask, other=0.0).to(tl.float32)
        tail_row = b64 * stride_tb + hk * stride_th
        offs_t = tl.arange(0, TAIL_N)
        for start in range(tl.maximum(n_lo, tail_lo), n_end, TAIL_N):
            slots = start + offs_t
            valid = visible(slots < n_end, cache_valid_ptr, b64, slots, stride_mb, valid_len, HAS_HOLES)
            seen = (slots[None, :] >= lo[:, None]) & (slots[None, :] <= hi[:, None]) & valid[None, :]
            trow = tail_row + (slots % BLOCK_SIZE) * stride_ts
            m, l, acc_lo, acc_hi = tail_tile_update(m, l, acc_lo, acc_hi, qf_lo, qf_hi, k_tail_ptr, v_tail_ptr, trow,
                                                    offs_h, mask_h, valid, seen, qk_scale, HALF, True)

    l = tl.where(l > 0.0, l, 1.0)
    lost = lost_queries(bt_row, cache_seqlens_ptr, b, tok, s, lo, right, capacity, q_len, new_lo, BLOCK_SIZE, CAUSAL)
    dst = out_ptr + b64 * stride_ob + tok[:, None].to(tl.int64) * stride_ot + heads64 * stride_oh + offs_h[None, :]
    o_mask = mask_r[:, None] & mask_h[None, :]
    tl.store(dst, tl.where(lost[:, None], float("nan"), acc_lo / l[:, None]).to(out_ptr.dtype.element_ty),
             mask=o_mask)
    tl.store(dst + HALF, tl.where(lost[:, None], float("nan"), acc_hi / l[:, None]).to(out_ptr.dtype.element_ty),
             mask=o_mask)


def extend_config(head_dim: int, elem_size: int = 2, kind: str = "fp"):
    """(rows per program, BLOCK_N, num_warps, num_stages): no register spills on sm_90 (ptxas) for fp16/bf16/int8
    up to d256, nor for fp32 (CUDA-core dots, small tiles); int4 keeps two half-width accumulators: fewer rows."""
    d_pad = next_pow2(head_dim)
    if elem_size == 4:
        return (32 if d_pad <= 128 else 16, 16, 4, 2)
    if kind == "int4":
        return {64: (64, 32, 4, 2), 128: (32, 64, 8, 3)}.get(max(64, d_pad), (32, 32, 8, 2))
    if d_pad <= 64:
        return (64, 64, 4, 3)
    if d_pad <= 128:
        return (64, 64, 8, 3)
    return (64, 32, 8, 2)


def extend_attn(q, k_cache, v_cache, k_scale, v_scale, block_table, cache_seqlens, cache_starts, cache_valid,
                softmax_scale, window, causal=True, new_lo=0, right=-1, alibi_slopes=None, softcap=0.0, lse=None,
                k_tail=None, v_tail=None):
    # query i of row b sits at slot cache_seqlens[b] + i and sees up to it (causal) or up to the last query's slot
    # (up to `right` slots past its own when right >= 0); queries i >= new_lo are new tokens: NaN where their slot
    # could not be written (the write ran first). alibi_slopes, softcap, lse [B, nheads, q_len]: see decode_attn.
    # k_tail, v_tail (int4 caches; None / 0 elements: none): the exact tail, read for the slots from each row's last
    # multiple of BLOCK_SIZE on, the row ending at the last query (cache_seqlens[b] + q_len tokens; written already)
    batch, q_len, nheads, head_dim = q.shape
    nheads_k = k_cache.shape[1]
    assert q.stride(-1) == 1, "q: contiguous last dim"
    assert nheads % nheads_k == 0, (nheads, nheads_k)
    kind = check_cache(k_cache, v_cache, k_scale, v_scale, block_table, cache_seqlens, nheads_k, head_dim)
    assert cache_starts.dtype == torch.int32 and cache_starts.shape[0] >= batch and cache_starts.stride(0) == 1
    assert block_table.shape[0] >= batch and cache_seqlens.shape[0] >= batch
    has_holes = check_valid(cache_valid, batch)
    has_tail = check_tail(k_tail, v_tail, kind, batch, nheads_k, k_cache.shape[2], head_dim, q.dtype)
    group = nheads // nheads_k
    group_pad = next_pow2(group)
    block_r, block_n, num_warps, num_stages = extend_config(head_dim, q.element_size(), kind)
    block_m = max(1, block_r // group_pad)
    out = torch.empty((batch, q_len, nheads, head_dim), dtype=q.dtype, device=q.device)
    extras = flash_extras(q, out, alibi_slopes, softcap, lse, kind, (batch, nheads, q_len))
    if batch * q_len == 0:
        return out
    with device_guard(q):
        args = (q, k_cache, v_cache, k_scale, v_scale, block_table, cache_seqlens, cache_starts, cache_valid, out,
                float(softmax_scale) * LOG2E.value, int(window), int(right), block_table.shape[1] * k_cache.shape[2],
                q_len, int(new_lo), cache_valid.shape[-1] if has_holes else 0,
                q.stride(0), q.stride(1), q.stride(2),
                k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), *scale_strides(k_scale, kind != "fp"),
                block_table.stride(0), cache_valid.stride(0) if has_holes else 0,
                out.stride(0), out.stride(1), out.stride(2))
        common = dict(GROUP=group, GROUP_PAD=group_pad, BLOCK_M=block_m, BLOCK_N=block_n,
                      BLOCK_SIZE=k_cache.shape[2], HEAD_DIM=head_dim, D_PAD=next_pow2(head_dim),
                      HAS_HOLES=has_holes, CAUSAL=bool(causal), num_warps=num_warps, num_stages=num_stages)
        grid = (cdiv(q_len, block_m), nheads_k, batch)
        if kind == "int4":
            launcher(_extend_attn_int4_kernel)[grid](*args, *tail_args(k_tail, v_tail, has_tail, q), HAS_TAIL=has_tail,
                                                     **common)
        else:
            launcher(_extend_attn_kernel)[grid](*args, *extras.attend_args(), INT8=kind == "int8",
                                                UPCAST=upcast_dot(q.dtype), **common, **extras.flags)
    return out
