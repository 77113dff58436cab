"""Fused decode kernels (q_len == 1): write the new K/V and attend over the paged cache with split-KV, then reduce."""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .host import (cdiv, check_cache, check_tail, check_valid, device_guard, launcher, next_pow2, scale_strides,
                   sm_count, tail_args, upcast_dot)
from .tiles import (LOG2E, TAIL_N, attention_bounds, int4_query, int4_tile_update, kv_tile_scores, lost_slot,
                    natural_lse, quantize_int8, score_mods, slot_block, softmax_tile_update, store_int4, store_tail,
                    tail_tile_update, tanh_cap, tile_block_ids, visible)

WAVES = 8  # programs aimed at, in units of SMs, when a row is full: enough left at half capacity to fill the GPU
MIN_SPLIT = 128  # tokens per split, at least
MAX_SPLITS = 256


@triton.jit
def split_bounds(cache_seqlens_ptr, cache_starts_ptr, b, split, split_size, window, capacity,
                 BLOCK_N: tl.constexpr, NEW_KV: tl.constexpr):
    # Row b's query (NEW_KV: the new token, at slot cache_seqlens[b]; else the last cached one, attend only) in split
    # `split`: its slot s, the first slot lo it may see, the cached slots [n_lo, n_hi) seen here, the first tile
    # (n_hi when nothing is seen here: no tile at all) and whether this split holds the new token.
    s, lo, _ = attention_bounds(cache_seqlens_ptr, cache_starts_ptr, b, 0 if NEW_KV else -1, window, capacity)
    split_lo = split * split_size
    n_lo = tl.maximum(lo, split_lo)
    n_hi = tl.minimum(tl.minimum(s + 1 - NEW_KV, capacity), split_lo + split_size)
    owner = NEW_KV & (s < capacity) & (s >= split_lo) & (s < split_lo + split_size)
    tile_lo = tl.where(n_hi > n_lo, n_lo - n_lo % BLOCK_N, n_hi)
    return s, lo, n_lo, n_hi, tile_lo, owner


@triton.jit
def _decode_attn_kernel(
    q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_table_ptr,
    cache_seqlens_ptr, cache_starts_ptr, cache_valid_ptr, status_ptr, out_ptr, part_o_ptr, part_lse_ptr,
    qk_scale, window, capacity, split_size, valid_len,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
    stride_cb, stride_ch, stride_cs, stride_sb, stride_sh, stride_ss, stride_bt, stride_mb,
    stride_ob, stride_oh, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
    alibi_ptr, lse_ptr, softcap, stride_ab, stride_eb, stride_eh,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, INT8: tl.constexpr, V_SCALE_ON_P: tl.constexpr, SPLIT: tl.constexpr,
    UPCAST: tl.constexpr, HAS_HOLES: tl.constexpr, HAS_STATUS: tl.constexpr, NEW_KV: tl.constexpr,
    ALIBI: tl.constexpr = False, SOFTCAP: tl.constexpr = False, RETURN_LSE: tl.constexpr = False,
):
    # q [B, 1, nheads, D] (all GROUP heads of kv head hk in one program); k, v [B, 1, nheads_k, D] (NEW_KV) or empty
    # caches [num_blocks, nheads_k, BLOCK_SIZE, D]; this program covers slots [split * split_size, +split_size).
    # flash_attn_with_kvcache's options (tiles.score_mods): ALIBI slopes [B or 1, nheads] fp32 at alibi_ptr,
    # SOFTCAP (softcap = cap * log2 e), RETURN_LSE: the unsplit program writes lse [B, nheads] (natural log)
    split = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor may pass fp64 scalars
    s, lo, n_lo, n_hi, tile_lo, owner = split_bounds(cache_seqlens_ptr, cache_starts_ptr, b, split, split_size,
                                                      window, capacity, BLOCK_N, NEW_KV)
    if SPLIT:  # one split alone always writes the output
        if (n_hi <= n_lo) & (owner == 0):
            return  # nothing to see: the reduce kernel only reads splits that overlap [lo, hi]

    b64 = b.to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < GROUP
    heads = hk * GROUP + offs_h
    offs_d = tl.arange(0, D_PAD)
    mask_d = offs_d < HEAD_DIM
    q = tl.load(q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_h[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_H, D_PAD]
    if UPCAST:
        q = q.to(tl.float32)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D_PAD], tl.float32)
    bt_row = block_table_ptr + b64 * stride_bt
    slopes = tl.zeros([BLOCK_H], tl.float32)
    if ALIBI:
        slopes = tl.load(alibi_ptr + b64 * stride_ab + heads, mask=mask_h, other=0.0).to(tl.float32)
        slopes = slopes * LOG2E  # scores are in the log2 domain

    if owner:  # write the new token and start the softmax from it, so it never has to be read back
        phys, writable = slot_block(bt_row, s, capacity, BLOCK_SIZE)
        if writable:
            dst = phys * stride_cb + hk * stride_ch + (s % BLOCK_SIZE) * stride_cs + offs_d
            k_new = tl.load(k_ptr + b64 * stride_kb + hk * stride_kh + offs_d, mask=mask_d, other=0.0)
            v_new = tl.load(v_ptr + b64 * stride_vb + hk * stride_vh + offs_d, mask=mask_d, other=0.0)
            if INT8:
                kq, ks = quantize_int8(k_new.to(tl.float32))
                vq, vs = quantize_int8(v_new.to(tl.float32))
                tl.store(k_cache_ptr + dst, kq, mask=mask_d)
                tl.store(v_cache_ptr + dst, vq, mask=mask_d)
                sdst = phys * stride_sb + hk * stride_sh + (s % BLOCK_SIZE) * stride_ss
                tl.store(k_scale_ptr + sdst, ks)
                tl.store(v_scale_ptr + sdst, vs)
                k_att = kq.to(tl.float32)  # the K scale is folded into the scores, as for cached tokens
                v_att = vq.to(tl.float32) * vs  # exact, as the cached tokens' V (scale on the probabilities)
                score_scale = ks * qk_scale
            else:
                k_new = k_new.to(k_cache_ptr.dtype.element_ty)
                v_new = v_new.to(v_cache_ptr.dtype.element_ty)
                tl.store(k_cache_ptr + dst, k_new, mask=mask_d)
                tl.store(v_cache_ptr + dst, v_new, mask=mask_d)
                k_att = k_new.to(q.dtype).to(tl.float32)
                v_att = v_new.to(q.dtype).to(tl.float32)
                score_scale = qk_scale
            sees_self = visible(s >= lo, cache_valid_ptr, b64, s, stride_mb, valid_len, HAS_HOLES)
            if sees_self:
                m = tl.sum(q.to(tl.float32) * k_att[None, :], 1) * score_scale
                if SOFTCAP:  # ALiBi adds nothing at distance 0
                    m = tanh_cap(m, softcap)
                l = tl.full([BLOCK_H], 1.0, tl.float32)
                acc = acc + v_att[None, :]

    # tiles start at a multiple of BLOCK_N (split_lo is one), so the first slot n_lo lies in the first tile:
    # without holes every tile has a visible slot and the running max is finite after it.
    offs_n = tl.arange(0, BLOCK_N)
    next_phys = tile_block_ids(bt_row, tile_lo + offs_n, n_hi, BLOCK_SIZE)  # one tile ahead
    for start in range(tile_lo, n_hi, BLOCK_N):
        slots = start + offs_n
        valid = visible((slots >= n_lo) & (slots < n_hi), cache_valid_ptr, b64, slots, stride_mb, valid_len,
                        HAS_HOLES)
        phys = next_phys.to(tl.int64)
        next_phys = tile_block_ids(bt_row, slots + BLOCK_N, n_hi, BLOCK_SIZE)
        qk, v, vs = kv_tile_scores(q, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, phys, slots, valid, hk,
                                   offs_d, mask_d, qk_scale, stride_cb, stride_ch, stride_cs, stride_sb,
                                   stride_sh, stride_ss, BLOCK_SIZE, INT8, V_SCALE_ON_P)
        # qk [BLOCK_H, BLOCK_N], v [BLOCK_N, D_PAD], vs [BLOCK_N]
        qk = score_mods(qk, tl.zeros([BLOCK_H], tl.int32) + s, slots, slopes, softcap, ALIBI, SOFTCAP)
        qk = tl.where(valid[None, :], qk, float("-inf"))
        m, l, acc = softmax_tile_update(m, l, acc, qk, v, vs, V_SCALE_ON_P, HAS_HOLES)

    mask_o = mask_h[:, None] & mask_d[None, :]
    l_safe = tl.where(l > 0.0, l, 1.0)  # a row that saw nothing (masked out) gives 0
    if SPLIT:
        tl.store(part_o_ptr + b64 * stride_pb + heads[:, None] * stride_ph + split * stride_ps + offs_d[None, :],
                 acc / l_safe[:, None], mask=mask_o)
        tl.store(part_lse_ptr + b64 * stride_lb + heads * stride_lh + split, m + tl.log2(l_safe), mask=mask_h)
    else:
        # the one program is the owner unless s lies past the table: a token with no slot gets NaN
        lost = lost_slot(bt_row, s, capacity, BLOCK_SIZE, NEW_KV)
        o = tl.where(lost, float("nan"), acc / l_safe[:, None])
        tl.store(out_ptr + b64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=mask_o)
        if RETURN_LSE:
            tl.store(lse_ptr + b64 * stride_eb + heads * stride_eh,
                     tl.where(lost, float("nan"), natural_lse(m, l)), mask=mask_h)
        if HAS_STATUS:
            if lost:
                tl.store(status_ptr, 1)


@triton.jit
def _decode_attn_int4_kernel(
    q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_table_ptr,
    cache_seqlens_ptr, cache_starts_ptr, cache_valid_ptr, status_ptr, out_ptr, part_o_ptr, part_lse_ptr,
    qk_scale, window, capacity, split_size, valid_len,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
    stride_cb, stride_ch, stride_cs, stride_sb, stride_sh, stride_ss, stride_bt, stride_mb,
    stride_ob, stride_oh, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
    k_tail_ptr, v_tail_ptr, stride_tb, stride_th, stride_ts,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, SPLIT: tl.constexpr, HAS_HOLES: tl.constexpr,
    HAS_STATUS: tl.constexpr, NEW_KV: tl.constexpr, HAS_TAIL: tl.constexpr,
):
    # The int4 twin of _decode_attn_kernel (same grid, bounds, splits and epilogue): caches hold two values a byte
    # [num_blocks, nheads_k, BLOCK_SIZE, HEAD_DIM / 2] with (scale, minimum) per half; q and the output are handled
    # as their two halves, so no tile is ever dequantized element by element (tiles.int4_tile_update).
    # HAS_TAIL: k_tail, v_tail [B, nheads_k, BLOCK_SIZE, HEAD_DIM] (model dtype) hold each row's last, partial block
    # exact: its slots are read from there (tiles.tail_tile_update, before the int4 tiles) and the new token is
    # written there too.
    split = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor may pass fp64 scalars
    s, lo, n_lo, n_hi, tile_lo, owner = split_bounds(cache_seqlens_ptr, cache_starts_ptr, b, split, split_size,
                                                      window, capacity, BLOCK_N, NEW_KV)
    if SPLIT:
        if (n_hi <= n_lo) & (owner == 0):
            return

    HALF: tl.constexpr = HEAD_DIM // 2
    b64 = b.to(tl.int64)
    offs_g = tl.arange(0, BLOCK_H)
    mask_g = offs_g < GROUP
    heads = hk * GROUP + offs_g
    offs_h = tl.arange(0, D_PAD // 2)
    mask_h = offs_h < HALF
    q_row = q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + offs_h[None, :]
    q_mask = mask_g[:, None] & mask_h[None, :]
    q_lo = tl.load(q_row, mask=q_mask, other=0.0)
    q_hi = tl.load(q_row + HALF, mask=q_mask, other=0.0)
    qsum_lo = tl.sum(q_lo.to(tl.float32), 1)
    qsum_hi = tl.sum(q_hi.to(tl.float32), 1)
    qd_lo, qd_hi, q_inv = int4_query(q_lo, q_hi, q_ptr.dtype.element_ty)  # no bf16 dot, so no UPCAST
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc_lo = tl.zeros([BLOCK_H, D_PAD // 2], tl.float32)
    acc_hi = tl.zeros([BLOCK_H, D_PAD // 2], tl.float32)
    bt_row = block_table_ptr + b64 * stride_bt
    n_main = n_hi  # the int4 tiles cover the slots seen here up to n_main
    if HAS_TAIL:  # the row holds s + 1 tokens after the call: its slots from tail_lo on are read from the tail
        tail_lo = s + 1 - (s + 1) % BLOCK_SIZE
        n_main = tl.minimum(n_hi, tail_lo)
        tile_lo = tl.where(n_main > n_lo, tile_lo, n_main)  # no int4 tile when all slots seen here are the tail's

    if owner:  # quantize and write the new token; start the softmax from its dequantized values (or exact ones)
        phys, writable = slot_block(bt_row, s, capacity, BLOCK_SIZE)
        if writable:
            dst = phys * stride_cb + hk * stride_ch + (s % BLOCK_SIZE) * stride_cs
            sdst = phys * stride_sb + hk * stride_sh + (s % BLOCK_SIZE) * stride_ss
            k_src = k_ptr + b64 * stride_kb + hk * stride_kh
            v_src = v_ptr + b64 * stride_vb + hk * stride_vh
            k_lo, k_hi = store_int4(k_src, k_cache_ptr, k_scale_ptr, dst, sdst, offs_h, mask_h, HALF)
            v_lo, v_hi = store_int4(v_src, v_cache_ptr, v_scale_ptr, dst, sdst, offs_h, mask_h, HALF)
            if HAS_TAIL:  # kept exact (the new token is in its row's last block); attended exact when that block
                # is still partial
                tdst = b64 * stride_tb + hk * stride_th + (s % BLOCK_SIZE) * stride_ts
                k_ex, k_ey = store_tail(k_src, k_tail_ptr + tdst, offs_h, mask_h, HALF)
                v_ex, v_ey = store_tail(v_src, v_tail_ptr + tdst, offs_h, mask_h, HALF)
                if s >= tail_lo:
                    k_lo, k_hi, v_lo, v_hi = k_ex, k_ey, v_ex, v_ey
            sees_self = visible(s >= lo, cache_valid_ptr, b64, s, stride_mb, valid_len, HAS_HOLES)
            if sees_self:
                m = (tl.sum(q_lo.to(tl.float32) * k_lo[None, :], 1)
                     + tl.sum(q_hi.to(tl.float32) * k_hi[None, :], 1)) * qk_scale
                l = tl.full([BLOCK_H], 1.0, tl.float32)
                acc_lo = acc_lo + v_lo[None, :]
                acc_hi = acc_hi + v_hi[None, :]

    if HAS_TAIL:  # the slots [max(n_lo, tail_lo), n_hi) seen here (a block at most), from the tail; before the int4
        # tiles, so that nothing of it stays live through their loop, where registers are scarce
        tail_row = b64 * stride_tb + hk * stride_th
        offs_t = tl.arange(0, TAIL_N)
        for start in range(tl.maximum(n_lo, tail_lo), n_hi, TAIL_N):
            slots = start + offs_t
            valid = visible(slots < n_hi, cache_valid_ptr, b64, slots, stride_mb, valid_len, HAS_HOLES)
            trow = tail_row + (slots % BLOCK_SIZE) * stride_ts
            m, l, acc_lo, acc_hi = tail_tile_update(m, l, acc_lo, acc_hi, q_lo.to(tl.float32), q_hi.to(tl.float32),
                                                    k_tail_ptr, v_tail_ptr, trow, offs_h, mask_h, valid,
                                                    valid[None, :], qk_scale, HALF, HAS_HOLES)

    offs_n = tl.arange(0, BLOCK_N)
    next_phys = tile_block_ids(bt_row, tile_lo + offs_n, n_main, BLOCK_SIZE)  # one tile ahead
    for start in range(tile_lo, n_main, BLOCK_N):
        slots = start + offs_n
        valid = visible((slots >= n_lo) & (slots < n_main), cache_valid_ptr, b64, slots, stride_mb, valid_len,
                        HAS_HOLES)
        phys = next_phys.to(tl.int64)
        next_phys = tile_block_ids(bt_row, slots + BLOCK_N, n_main, BLOCK_SIZE)
        row = phys * stride_cb + hk * stride_ch + (slots % BLOCK_SIZE) * stride_cs
        srow = phys * stride_sb + hk * stride_sh + (slots % BLOCK_SIZE) * stride_ss
        m, l, acc_lo, acc_hi = int4_tile_update(m, l, acc_lo, acc_hi, qd_lo, qd_hi, q_inv, qsum_lo, qsum_hi,
                                                k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, row, srow, offs_h,
                                                mask_h, valid, valid[None, :], qk_scale, HAS_HOLES)

    mask_o = mask_g[:, None] & mask_h[None, :]
    l_safe = tl.where(l > 0.0, l, 1.0)
    if SPLIT:
        dst = part_o_ptr + b64 * stride_pb + heads[:, None] * stride_ph + split * stride_ps + offs_h[None, :]
        tl.store(dst, acc_lo / l_safe[:, None], mask=mask_o)
        tl.store(dst + HALF, acc_hi / l_safe[:, None], mask=mask_o)
        tl.store(part_lse_ptr + b64 * stride_lb + heads * stride_lh + split, m + tl.log2(l_safe), mask=mask_g)
    else:
        lost = lost_slot(bt_row, s, capacity, BLOCK_SIZE, NEW_KV)
        dst = out_ptr + b64 * stride_ob + heads[:, None] * stride_oh + offs_h[None, :]
        tl.store(dst, tl.where(lost, float("nan"), acc_lo / l_safe[:, None]).to(out_ptr.dtype.element_ty),
                 mask=mask_o)
        tl.store(dst + HALF, tl.where(lost, float("nan"), acc_hi / l_safe[:, None]).to(out_ptr.dtype.element_ty),
                 mask=mask_o)
        if HAS_STATUS:
            if lost:
                tl.store(status_ptr, 1)


@triton.jit
def _decode_reduce_kernel(
    part_o_ptr, part_lse_ptr, out_ptr, cache_seqlens_ptr, cache_starts_ptr, block_table_ptr, status_ptr,
    window, capacity, split_size,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh, stride_bt,
    lse_ptr, stride_eb, stride_eh,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CHUNK: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HAS_STATUS: tl.constexpr, NEW_KV: tl.constexpr, RETURN_LSE: tl.constexpr = False,
):
    # part_o [B, nheads, splits, D_PAD] fp32 (normalized), part_lse [B, nheads, splits] fp32 (log2) -> out [B, 1, H, D]
    h = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    s, lo, hi = attention_bounds(cache_seqlens_ptr, cache_starts_ptr, b, 0 if NEW_KV else -1, window, capacity)
    first = lo // split_size
    last = tl.where(hi >= lo, hi // split_size, first - 1)  # the splits [first, last] did work (none if lo > hi)
    offs_d = tl.arange(0, D_PAD)
    mask_d = offs_d < HEAD_DIM
    m = float("-inf")
    l = 0.0
    acc = tl.zeros([D_PAD], tl.float32)
    for c in range(first, last + 1, CHUNK):  # CHUNK splits at a time, loaded in parallel
        js = c + tl.arange(0, CHUNK)
        live = js <= last
        lse = tl.load(part_lse_ptr + b * stride_lb + h * stride_lh + js, mask=live, other=float("-inf"))  # [CHUNK]
        o = tl.load(part_o_ptr + b * stride_pb + h * stride_ph + js[:, None] * stride_ps + offs_d[None, :],
                    mask=live[:, None] & mask_d[None, :], other=0.0)  # [CHUNK, D_PAD]
        m_new = tl.maximum(m, tl.max(lse, 0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # splits that saw nothing (masked out) weigh 0
        alpha = tl.exp2(m - m_use)
        w = tl.exp2(lse - m_use)
        acc = acc * alpha + tl.sum(o * w[:, None], 0)
        l = l * alpha + tl.sum(w, 0)
        m = m_new
    lost = lost_slot(block_table_ptr + b * stride_bt, s, capacity, BLOCK_SIZE, NEW_KV)
    if RETURN_LSE:  # m and l are in log2 units of the split's log2 lse
        tl.store(lse_ptr + b * stride_eb + h * stride_eh, tl.where(lost, float("nan"), natural_lse(m, l)))
    l = tl.where(l > 0.0, l, 1.0)
    o = tl.where(lost, float("nan"), acc / l)  # a new token with no slot gets NaN
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty), mask=mask_d)
    if HAS_STATUS:
        if lost:
            tl.store(status_ptr, 1)


class FlashExtras(NamedTuple):
    """flash_attn_with_kvcache's options as kernel arguments, and the ALIBI / SOFTCAP / RETURN_LSE constexprs."""

    alibi: torch.Tensor  # alibi_ptr
    lse: torch.Tensor  # lse_ptr
    softcap: float  # cap * log2(e)
    stride_ab: int
    lse_strides: tuple  # stride_eb, stride_eh (, stride_et)
    flags: dict

    def attend_args(self) -> tuple:
        """The trailing runtime arguments of the decode and extend kernels."""
        return (self.alibi, self.lse, self.softcap, self.stride_ab, *self.lse_strides)


def flash_extras(q, out, alibi_slopes, softcap, lse, kind: str, lse_shape: tuple) -> FlashExtras:
    """Checks the options and packs them: `alibi_slopes` [nheads] or [B, nheads] fp32; `lse` fp32 of `lse_shape`
    ([B, nheads], or [B, nheads, q_len] for the extend kernel), any strides. Options left off pass q (never read)
    and out (written anyway) as their pointers, so the model's path allocates nothing more per call."""
    batch, nheads = q.shape[0], q.shape[2]
    softcap = float(softcap or 0.0)
    if kind == "int4" and (alibi_slopes is not None or softcap or lse is not None):
        raise NotImplementedError("alibi_slopes, softcap and the log-sum-exp are not implemented for int4 caches")
    if softcap < 0:
        raise ValueError(f"softcap must be >= 0 (0: off), got {softcap}")
    stride_ab = 0
    if alibi_slopes is not None:
        assert alibi_slopes.dtype == torch.float32 and alibi_slopes.stride(-1) == 1, "alibi_slopes: fp32, contiguous"
        assert alibi_slopes.shape in ((nheads,), (batch, nheads)), (alibi_slopes.shape, batch, nheads)
        stride_ab = alibi_slopes.stride(0) if alibi_slopes.dim() == 2 else 0
    if lse is not None:
        assert lse.dtype == torch.float32 and tuple(lse.shape) == tuple(lse_shape), (lse.shape, lse_shape)
    lse_strides = tuple(lse.stride()) if lse is not None else (0,) * len(lse_shape)
    return FlashExtras(q if alibi_slopes is None else alibi_slopes, out if lse is None else lse, softcap * LOG2E.value,
                       stride_ab, lse_strides,
                       dict(ALIBI=alibi_slopes is not None, SOFTCAP=softcap > 0, RETURN_LSE=lse is not None))


class DecodeConfig(NamedTuple):
    """Launch choices of the decode kernel. `v_scale_on_p` (INT8 caches): multiply V's per-token scales into the
    probabilities ([heads, BLOCK_N] multiplies a tile) and feed V's integers to the dot, instead of dequantizing the
    [BLOCK_N, head_dim] V tile."""

    block_n: int
    num_warps: int
    num_stages: int
    v_scale_on_p: bool = True


def decode_config(head_dim: int, kind: str | bool, elem_size: int = 2) -> DecodeConfig:
    """K and V tiles of ~16 KiB each (32 KiB for int8 up to d128), 3 stages.

    Compiled for sm_90 offline (ptxas): fp16 d128 (64, 4, 3) 104 regs / 70 KiB smem; int8 d128 (128, 4, 3) 178 regs
    (Triton 3.9) or 198 (3.6) / 74 KiB; int8 d256 needs tiles of 32 and fp32 tiles of 16 to stay clear of spills.
    """
    d_pad = next_pow2(head_dim)
    if kind == "int4":  # a 128-token tile of d128 is 8 KiB of K and of V
        return DecodeConfig(128 if d_pad <= 128 else 64, 4, 3)
    if kind in (True, "int8"):
        return DecodeConfig(128 if d_pad <= 128 else 32, 4, 3)
    if elem_size == 4:  # fp32 runs its dots on CUDA cores (ieee): small tiles, or registers spill
        return DecodeConfig(16, 4, 2)
    return DecodeConfig(max(16, min(128, 16384 // (d_pad * elem_size))), 4, 3)


def num_splits_for(batch: int, nheads_k: int, capacity: int, block_n: int, device: torch.device,
                   waves: int = WAVES) -> int:
    """Static split count: aims at `waves` x SMs programs for full rows, each split >= MIN_SPLIT tokens."""
    want = cdiv(waves * sm_count(device), batch * nheads_k)
    min_split = MIN_SPLIT if device.type == "cuda" else block_n  # the interpreter: small caches, several splits
    most = max(1, capacity // max(min_split, block_n))
    return max(1, min(want, most, MAX_SPLITS))


def split_layout(capacity: int, num_splits: int, block_n: int) -> tuple[int, int]:
    """(tokens per split, splits launched) for a requested split count: splits hold whole tiles."""
    split_size = cdiv(cdiv(capacity, num_splits), block_n) * block_n
    return split_size, cdiv(capacity, split_size)


def decode_attn(q, k, v, k_cache, v_cache, k_scale, v_scale, block_table, cache_seqlens, cache_starts, cache_valid,
                status, softmax_scale, window, num_splits=None, config=None, alibi_slopes=None, softcap=0.0,
                lse=None, k_tail=None, v_tail=None):
    # num_splits / config (a DecodeConfig, or its first three fields) override the static choices, for tests and
    # tuning
    # k, v [B, 1, nheads_k, D] (the new token, written here), or [B, 0, nheads_k, D]: attend only, the query being the
    # row's last cached token
    # flash_attn_with_kvcache's options (not for int4 caches): alibi_slopes [nheads] or [B, nheads] fp32, softcap > 0,
    # lse: a [B, nheads] fp32 view that receives the log-sum-exp (natural log; written)
    # k_tail, v_tail [max_batch, nheads_k, BLOCK_SIZE, D] in q's dtype (int4 caches only), or None / 0 elements: the
    # exact tail (rule 4 of hf_kvplug/reference.py), read and written
    batch, q_len, nheads, head_dim = q.shape
    nheads_k = k.shape[2]
    new_kv = k.shape[1] == 1
    assert q_len == 1 and k.shape in ((batch, 1, nheads_k, head_dim), (batch, 0, nheads_k, head_dim)), (q.shape,
                                                                                                      k.shape)
    assert v.shape == k.shape, (k.shape, v.shape)
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, "q, k, v: contiguous last dim"
    assert nheads % nheads_k == 0, (nheads, nheads_k)
    kind = check_cache(k_cache, v_cache, k_scale, v_scale, block_table, cache_seqlens, nheads_k, head_dim)
    int8 = kind == "int8"
    assert cache_starts.dtype == torch.int32 and cache_starts.shape[0] >= batch and cache_starts.stride(0) == 1
    assert block_table.shape[0] >= batch and cache_seqlens.shape[0] >= batch
    has_holes = check_valid(cache_valid, batch)
    group = nheads // nheads_k
    block_size = k_cache.shape[2]
    has_tail = check_tail(k_tail, v_tail, kind, batch, nheads_k, block_size, head_dim, q.dtype)
    capacity = block_table.shape[1] * block_size
    d_pad = next_pow2(head_dim)
    config = config or decode_config(head_dim, kind, q.element_size())
    block_n, num_warps, num_stages = config[:3]
    v_scale_on_p = config[3] if len(config) > 3 else True  # a plain 3-tuple: DecodeConfig's default
    if num_splits is None:
        num_splits = num_splits_for(max(batch, 1), nheads_k, capacity, block_n, q.device)
    split_size, num_splits = split_layout(capacity, num_splits, block_n)
    out = torch.empty((batch, 1, nheads, head_dim), dtype=q.dtype, device=q.device)
    extras = flash_extras(q, out, alibi_slopes, softcap, lse, kind, (batch, nheads))
    if batch == 0:
        return out
    if num_splits > 1:
        part_o = torch.empty((batch, nheads, num_splits, d_pad), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch, nheads, num_splits), dtype=torch.float32, device=q.device)
    else:  # one split writes the output itself
        part_o = part_lse = torch.empty((1, 1, 1), dtype=torch.float32, device=q.device)
    qk_scale = float(softmax_scale) * LOG2E.value
    window = int(window)
    has_status = status.numel() > 0
    with device_guard(q):
        args = (q, k, v, k_cache, v_cache, k_scale, v_scale, block_table, cache_seqlens, cache_starts, cache_valid,
                status, out, part_o, part_lse,
                qk_scale, window, capacity, split_size, cache_valid.shape[-1] if has_holes else 0,
                q.stride(0), q.stride(2), k.stride(0), k.stride(2), v.stride(0), v.stride(2),
                k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), *scale_strides(k_scale, kind != "fp"),
                block_table.stride(0), cache_valid.stride(0) if has_holes else 0,
                out.stride(0), out.stride(2), part_o.stride(0), part_o.stride(1), part_o.stride(2),
                part_lse.stride(0), part_lse.stride(1))
        common = dict(GROUP=group, BLOCK_H=max(16, next_pow2(group)), BLOCK_N=block_n, BLOCK_SIZE=block_size,
                      HEAD_DIM=head_dim, D_PAD=d_pad, SPLIT=num_splits > 1, HAS_HOLES=has_holes,
                      HAS_STATUS=has_status, NEW_KV=new_kv, num_warps=num_warps, num_stages=num_stages)
        if kind == "int4":
            launcher(_decode_attn_int4_kernel)[(num_splits, nheads_k, batch)](
                *args, *tail_args(k_tail, v_tail, has_tail, q), HAS_TAIL=has_tail, **common)
        else:
            launcher(_decode_attn_kernel)[(num_splits, nheads_k, batch)](
                *args, *extras.attend_args(), INT8=int8, V_SCALE_ON_P=int8 and v_scale_on_p,
                UPCAST=upcast_dot(q.dtype), **common, **extras.flags)
        if num_splits > 1:
            launcher(_decode_reduce_kernel)[(nheads, batch)](
                part_o, part_lse, out, cache_seqlens, cache_starts, block_table, status,
                window, capacity, split_size,
                part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1),
                out.stride(0), out.stride(2), block_table.stride(0), extras.lse, *extras.lse_strides,
                HEAD_DIM=head_dim, D_PAD=d_pad, CHUNK=min(16, next_pow2(num_splits)), BLOCK_SIZE=block_size,
                HAS_STATUS=has_status, NEW_KV=new_kv, RETURN_LSE=extras.flags["RETURN_LSE"],
                num_warps=2 if d_pad <= 128 else 4,
            )
    return out
