"""`@triton.jit` tile helpers shared by the kernels: quantization in registers, slot and block lookups, visibility,
the online-softmax update and the int4 tiles. Device code only; the launchers' host helpers are in `host.py`."""

import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # scores run in the log2 domain; launchers use LOG2E.value
TAIL_N: tl.constexpr = tl.constexpr(16)  # slots per tile of the exact tail (a block is a few tiles)


@triton.jit
def round_half_even(y):
    # torch.round semantics for |y| < 2**22 (here |y| <= 127): ties go to the even integer.
    r = tl.floor(y + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(((r - y) == 0.5) & odd, r - 1.0, r)


@triton.jit
def quantize_int8(x):
    # x [D] fp32 (padding lanes 0) -> (q [D] int8, scale) with x ~= q * scale, scale = amax / 127.
    amax = tl.max(tl.abs(x), axis=0)
    scale = tl.math.div_rn(amax, 127.0)
    # as the reference: `127 / amax` in torch is `amax.reciprocal() * 127`
    inv = tl.where(amax > 0.0, tl.math.div_rn(1.0, tl.maximum(amax, 1e-30)) * 127.0, 0.0)
    q = tl.minimum(tl.maximum(round_half_even(x * inv), -127.0), 127.0)
    return q.to(tl.int8), scale


@triton.jit
def attention_bounds(cache_seqlens_ptr, cache_starts_ptr, b, i, window, capacity):
    # Query i of row b (cache_seqlens already shifted so that query 0 sits at slot cache_seqlens[b]; i may be -1):
    # its slot s, the first slot lo it may see (lo > s: none) and hi = s clamped to the table.
    s = tl.load(cache_seqlens_ptr + b) + i
    lo = tl.load(cache_starts_ptr + b)
    lo = tl.where(window > 0, tl.maximum(lo, s - window + 1), lo)
    hi = tl.minimum(s, capacity - 1)
    return s, lo, hi


@triton.jit
def slot_block(block_table_row, s, capacity, BLOCK_SIZE: tl.constexpr):
    # Block id of slot s (int64) and whether the slot can be written: inside the table and in a mapped block.
    inside = (s >= 0) & (s < capacity)
    phys = tl.load(block_table_row + s // BLOCK_SIZE, mask=inside, other=-1).to(tl.int64)
    return tl.maximum(phys, 0), inside & (phys >= 0)


@triton.jit
def lost_span(block_table_row, first, last, capacity, BLOCK_SIZE: tl.constexpr):
    # [lost_lo, lost_hi]: the first and last of the new tokens' slots [first, last] that could not be written (past
    # the table, or in an unmapped block); lost_lo > lost_hi when none was lost (or there are no new tokens).
    lost_lo = tl.maximum(first, capacity)  # past the table: [max(first, capacity), last]
    lost_hi = tl.where(lost_lo <= last, last, -1)
    lost_lo = tl.where(lost_lo <= last, lost_lo, last + 1)
    end = tl.minimum(last, capacity - 1)
    blk_end = tl.where(first <= end, end // BLOCK_SIZE + 1, first // BLOCK_SIZE)
    for blk in range(first // BLOCK_SIZE, blk_end):
        unmapped = tl.load(block_table_row + blk) < 0
        lost_lo = tl.where(unmapped, tl.minimum(lost_lo, tl.maximum(blk * BLOCK_SIZE, first)), lost_lo)
        lost_hi = tl.where(unmapped, tl.maximum(lost_hi, tl.minimum(blk * BLOCK_SIZE + BLOCK_SIZE - 1, end)), lost_hi)
    return lost_lo, lost_hi


@triton.jit
def lost_slot(block_table_row, s, capacity, BLOCK_SIZE: tl.constexpr, NEW_KV: tl.constexpr):
    # Whether the query at slot s is a new token that found no slot (NEW_KV False, attend only: never).
    _, writable = slot_block(block_table_row, s, capacity, BLOCK_SIZE)
    return (writable == 0) & NEW_KV


@triton.jit
def visible(valid, cache_valid_ptr, b64, slots, stride_vb, valid_len, HAS_HOLES: tl.constexpr):
    # `valid` narrowed to the slots the row's mask leaves visible (HAS_HOLES: cache_valid [B, valid_len] uint8).
    if HAS_HOLES:
        bits = tl.load(cache_valid_ptr + b64 * stride_vb + slots, mask=valid & (slots < valid_len), other=0)
        valid = valid & (bits != 0)
    return valid


@triton.jit
def int8_to_float(x, DTYPE: tl.constexpr):
    # Exact int8 -> DTYPE; fp16 and fp32 without I2F, which runs at 16 per SM and clock on sm_80/90 (1/8 of FP32).
    # With I2F, a 128-token d128 INT8 tile cost 128 threads x 328 conversions / 16 = 2.6k clocks of that pipe, about
    # what reading its 33 KiB takes at an H100's bandwidth per SM. Here: the byte x ^ 0x80 is x + 128; OR-ed into
    # the low mantissa bits of 1024.0 (fp16) or 2**23 (fp32) it makes that power of two plus x + 128. bf16 has too
    # few mantissa bits for that, and Triton already lowers int8 -> bf16 without I2F.
    if DTYPE == tl.bfloat16:
        y = x.to(tl.bfloat16)
    elif DTYPE == tl.float16:
        y = ((x.to(tl.uint8, bitcast=True) ^ 0x80).to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - 1152.0
    else:
        y = ((x.to(tl.uint8, bitcast=True) ^ 0x80).to(tl.uint32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
    return y


@triton.jit
def kv_tile_scores(q, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, phys, slots, valid, hk, offs_d, mask_d,
                   qk_scale, stride_cb, stride_ch, stride_cs, stride_sb, stride_sh, stride_ss,
                   BLOCK_SIZE: tl.constexpr, INT8: tl.constexpr, V_SCALE_ON_P: tl.constexpr):
    # One K/V tile of kv head hk gathered through the block ids `phys` [BLOCK_N] of `slots`: scores q @ K^T scaled
    # (log2 domain; INT8 K scale folded in) [rows, BLOCK_N], V [BLOCK_N, D_PAD] and V's per-token scale [BLOCK_N].
    # Model-dtype caches: V in q's dtype, scale 1. INT8 with V_SCALE_ON_P: V holds the exact integers (fp16, or fp32
    # for fp32 q) and the scale goes onto the probabilities (softmax_tile_update); without it, V is dequantized to
    # q's dtype here (the extend kernel: its larger probability tile would cost registers) and the scale is 1.
    row = phys * stride_cb + hk * stride_ch + (slots % BLOCK_SIZE) * stride_cs  # [BLOCK_N]
    kv_mask = valid[:, None] & mask_d[None, :]
    k = tl.load(k_cache_ptr + row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, D_PAD]
    v = tl.load(v_cache_ptr + row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
    if INT8:
        srow = phys * stride_sb + hk * stride_sh + (slots % BLOCK_SIZE) * stride_ss
        ks = tl.load(k_scale_ptr + srow, mask=valid, other=0.0)
        vs = tl.load(v_scale_ptr + srow, mask=valid, other=0.0)
        qk = tl.dot(q, tl.trans(int8_to_float(k, q.dtype)), input_precision="ieee") * (ks * qk_scale)[None, :]
        if V_SCALE_ON_P:
            v = int8_to_float(v, tl.float32 if q.dtype == tl.float32 else tl.float16)
        else:
            v = (int8_to_float(v, tl.float32) * vs[:, None]).to(q.dtype)
            vs = tl.full([v.shape[0]], 1.0, tl.float32)
    else:
        qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision="ieee") * qk_scale
        v = v.to(q.dtype)
        vs = tl.full([v.shape[0]], 1.0, tl.float32)
    return qk, v, vs


@triton.jit
def tanh_cap(x, cap):
    # cap * tanh(x / cap) in fp32, softcap's transform: 1 - 2 / (e^2y + 1) from one exp2 (saturates to +-1, no NaN
    # however large |x|), and for |y| < 1/8, where that subtraction would cancel (an error of cap * 6e-8 on every
    # score), tanh's series to y^7 (truncation under 2e-10 |y|)
    y = x / cap
    y2 = y * y
    series = y * (1.0 + y2 * (-0.3333333333333333 + y2 * (0.13333333333333333 + y2 * -0.05396825396825397)))
    t = tl.exp2(y * 2.8853900817779268)  # e^(2y)
    return cap * tl.where(tl.abs(y) < 0.125, series, 1.0 - 2.0 / (t + 1.0))


@triton.jit
def score_mods(qk, q_slots, slots, slopes, softcap, ALIBI: tl.constexpr, SOFTCAP: tl.constexpr):
    # flash_attn_with_kvcache's score options on log2-domain scores qk [R, BLOCK_N] (softmax scale and log2(e)
    # applied): softcap (`softcap` = cap * log2(e): the same transform in the log2 domain), then ALiBi, minus
    # slope * |query slot - key slot| (slopes [R], times log2(e)); q_slots [R], slots [BLOCK_N]. Neither: qk as is.
    if SOFTCAP:
        qk = tanh_cap(qk, softcap)
    if ALIBI:
        qk = qk - slopes[:, None] * tl.abs(q_slots[:, None] - slots[None, :]).to(tl.float32)
    return qk


@triton.jit
def natural_lse(m, l):
    # log-sum-exp of the scores in natural log from the log2-domain running max m and sum l; +inf for a query that
    # saw nothing (as flash-attention reports it)
    return tl.where(l > 0.0, (m + tl.log2(tl.where(l > 0.0, l, 1.0))) * 0.6931471805599453, float("inf"))


@triton.jit
def tile_block_ids(bt_row, slots, n_end, BLOCK_SIZE: tl.constexpr):
    # Physical block of each slot [BLOCK_N] of a row (0 past n_end, and for an unmapped block: a row's cached slots
    # must all be mapped; a lost new token is reported by NaN, never read out of bounds). The loops load them one
    # tile ahead: K/V addresses then hang on a loop-carried value, not on a load of the same iteration, which lets
    # the pipeliner multi-buffer the K/V tiles (num_stages).
    return tl.maximum(tl.load(bt_row + slots // BLOCK_SIZE, mask=slots < n_end, other=0), 0)


@triton.jit
def softmax_tile_update(m, l, acc, qk, v, vs, V_SCALE_ON_P: tl.constexpr, EMPTY_ROWS: tl.constexpr):
    # Online softmax: fold a tile of log2-domain scores qk [rows, BLOCK_N] (-inf where not seen), V [BLOCK_N, D_PAD]
    # and V's per-token scale vs [BLOCK_N] into the running max m [rows], sum l [rows] and output acc [rows, D_PAD]
    # fp32. V_SCALE_ON_P: the probabilities carry vs / max(vs), in [0, 1] for any V range, and the tile's sum is
    # scaled back by max(vs); else vs is all ones and ignored. EMPTY_ROWS: some rows may have seen nothing yet (all
    # -inf so far); they stay at zero, not NaN. Without it, every row sees a slot in every tile (the decode kernel),
    # and the guard is left out to spare its registers.
    m_new = tl.maximum(m, tl.max(qk, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new) if EMPTY_ROWS else m_new
    alpha = tl.exp2(m - m_use)
    p = tl.exp2(qk - m_use[:, None])
    l = l * alpha + tl.sum(p, 1)
    if V_SCALE_ON_P:
        vmax = tl.maximum(tl.max(vs, 0), 1e-30)
        pv = tl.dot((p * (vs / vmax)[None, :]).to(v.dtype), v, input_precision="ieee")
        acc = acc * alpha[:, None] + pv * vmax
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l, acc


@triton.jit
def quantize_int4_half(x, mask):
    # x [DH] fp32, mask [DH] its real lanes -> (n [DH] fp32 in 0..15, scale, minimum), scale and minimum rounded to
    # fp16 as stored (the reference quantizes with the stored values too).
    lo = tl.min(tl.where(mask, x, float("inf")), axis=0)
    hi = tl.max(tl.where(mask, x, float("-inf")), axis=0)
    scale = tl.math.div_rn(hi - lo, 15.0).to(tl.float16).to(tl.float32)
    minimum = lo.to(tl.float16).to(tl.float32)
    inv = tl.where(scale > 0.0, tl.math.div_rn(1.0, tl.maximum(scale, 1e-30)), 0.0)
    n = tl.minimum(tl.maximum(round_half_even((x - minimum) * inv), 0.0), 15.0)
    return n, scale, minimum


@triton.jit
def nibbles_to_float(n, DTYPE: tl.constexpr):
    # Exact uint16 values 0..255 -> DTYPE (fp16 or fp32) without I2F: OR-ed into the mantissa of a power of two,
    # which is subtracted (it must be: leaving it in and correcting afterwards multiplies the rounding of the other
    # dot operand by it).
    if DTYPE == tl.float16:
        y = (n | 0x6400).to(tl.float16, bitcast=True) - 1024.0
    else:
        y = (n.to(tl.uint32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    return y


@triton.jit
def int4_query(q_lo, q_hi, MODEL_DTYPE: tl.constexpr):
    # The query halves [R, DH] as the int4 dots take them, and what their products are then multiplied by [R] fp32.
    # fp16 and fp32 models: as they are, 1. bf16 models: fp16, each row scaled by a power of two that brings its
    # largest |q| into [2^14, 2^15): bf16 -> fp16 is then exact for every element down to 2^-28 of the row's maximum
    # (below that, a contribution under 2^-22 of the largest one is rounded), and no element overflows. So every
    # int4 dot runs in fp16 (fp32 for fp32 models), whatever the model dtype, on a GPU as on the interpreter.
    inv = tl.full([q_lo.shape[0]], 1.0, tl.float32)
    if MODEL_DTYPE == tl.bfloat16:
        lo32, hi32 = q_lo.to(tl.float32), q_hi.to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(lo32), 1), tl.max(tl.abs(hi32), 1))
        e = tl.maximum((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF, 15)  # amax in [2^(e-127), 2^(e-126))
        scale = ((268 - e) << 23).to(tl.float32, bitcast=True)  # 2^(141 - e)
        inv = ((e - 14) << 23).to(tl.float32, bitcast=True)  # 2^(e - 141)
        q_lo = (lo32 * scale[:, None]).to(tl.float16)
        q_hi = (hi32 * scale[:, None]).to(tl.float16)
    return q_lo, q_hi, inv


@triton.jit
def int4_tile(cache_ptr, scale_ptr, row, srow, offs_h, kv_mask, valid, DTYPE: tl.constexpr):
    # One packed tile [BLOCK_N, DH] -> (low values, high values) [BLOCK_N, DH] as exact integers in DTYPE (fp16 or
    # fp32), and the four params [BLOCK_N] fp32 (0 where not valid). The high nibble is read in place, as 16 x its
    # value (exact: 1024 + 16n < 2048 keeps a unit step in fp16), and its scale carries the 1/16: both nibbles come
    # from the same widened bytes (one extraction per byte pair, one AND-OR and one subtraction per nibble pair).
    packed = tl.load(cache_ptr + row[:, None] + offs_h[None, :], mask=kv_mask, other=0).to(tl.uint16)
    lo = nibbles_to_float(packed & 0xF, DTYPE)
    hi = nibbles_to_float(packed & 0xF0, DTYPE)
    s_lo = tl.load(scale_ptr + srow, mask=valid, other=0.0).to(tl.float32)
    m_lo = tl.load(scale_ptr + srow + 1, mask=valid, other=0.0).to(tl.float32)
    s_hi = tl.load(scale_ptr + srow + 2, mask=valid, other=0.0).to(tl.float32) * 0.0625
    m_hi = tl.load(scale_ptr + srow + 3, mask=valid, other=0.0).to(tl.float32)
    return lo, hi, s_lo, m_lo, s_hi, m_hi


@triton.jit
def online_softmax(m, l, qk, seen, qk_scale, EMPTY_ROWS: tl.constexpr):
    # A tile's unscaled scores qk [rows, N] (`seen`: what each row attends; the rest -inf) folded into the running
    # max m and sum l [rows]: (new max, new sum, the factor alpha [rows] that rescales the accumulators, the tile's
    # probabilities p [rows, N]). EMPTY_ROWS: as softmax_tile_update's.
    qk = tl.where(seen, qk * qk_scale, float("-inf"))
    m_new = tl.maximum(m, tl.max(qk, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new) if EMPTY_ROWS else m_new
    alpha = tl.exp2(m - m_use)
    p = tl.exp2(qk - m_use[:, None])
    return m_new, l * alpha + tl.sum(p, 1), alpha, p


@triton.jit
def int4_tile_update(m, l, acc_lo, acc_hi, q_lo, q_hi, q_inv, qsum_lo, qsum_hi, k_cache_ptr, v_cache_ptr,
                     k_scale_ptr, v_scale_ptr, row, srow, offs_h, mask_h, valid, seen, qk_scale,
                     EMPTY_ROWS: tl.constexpr):
    # One int4 K/V tile folded into the online softmax of the query halves [rows, DH] (int4_query: fp16, or fp32,
    # their products times q_inv [rows]), without dequantizing the tile:
    # q . k = s_lo (q_lo . n_lo) + m_lo sum(q_lo) + (same for the high half); p . v per half is
    # max(s) * ((p s / max(s)) . n) + p . m, with p s / max(s) in [0, 1] in q's dtype (fp16 has 3 more mantissa bits
    # than bf16). `seen` [rows, BLOCK_N] marks what each row attends; qsum_* are the sums of the unscaled halves.
    dt = q_lo.dtype
    kv_mask = valid[:, None] & mask_h[None, :]
    k_lo, k_hi, ks_lo, km_lo, ks_hi, km_hi = int4_tile(k_cache_ptr, k_scale_ptr, row, srow, offs_h, kv_mask, valid,
                                                       dt)
    qk = tl.dot(q_lo, tl.trans(k_lo), input_precision="ieee") * ks_lo[None, :]
    qk += tl.dot(q_hi, tl.trans(k_hi), input_precision="ieee") * ks_hi[None, :]
    qk = qk * q_inv[:, None] + qsum_lo[:, None] * km_lo[None, :] + qsum_hi[:, None] * km_hi[None, :]
    m_new, l, alpha, p = online_softmax(m, l, qk, seen, qk_scale, EMPTY_ROWS)
    v_lo, v_hi, vs_lo, vm_lo, vs_hi, vm_hi = int4_tile(v_cache_ptr, v_scale_ptr, row, srow, offs_h, kv_mask, valid,
                                                       dt)
    top_lo = tl.maximum(tl.max(vs_lo, 0), 1e-30)
    top_hi = tl.maximum(tl.max(vs_hi, 0), 1e-30)
    acc_lo = acc_lo * alpha[:, None] + top_lo * tl.dot((p * (vs_lo / top_lo)[None, :]).to(dt), v_lo,
                                                       input_precision="ieee")
    acc_hi = acc_hi * alpha[:, None] + top_hi * tl.dot((p * (vs_hi / top_hi)[None, :]).to(dt), v_hi,
                                                       input_precision="ieee")
    acc_lo += tl.sum(p * vm_lo[None, :], 1)[:, None]
    acc_hi += tl.sum(p * vm_hi[None, :], 1)[:, None]
    return m_new, l, acc_lo, acc_hi


@triton.jit
def store_int4(x_ptr, cache_ptr, scale_ptr, dst, sdst, offs_h, mask_h, HALF: tl.constexpr):
    # Quantize one token's head x [2 * HALF] (model dtype at x_ptr) to int4 and store it: packed [HALF] bytes at
    # cache_ptr + dst + offs_h, params [4] fp16 at scale_ptr + sdst. Returns the dequantized halves [HALF] fp32 (what
    # a later read gives back).
    x_lo = tl.load(x_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)
    x_hi = tl.load(x_ptr + HALF + offs_h, mask=mask_h, other=0.0).to(tl.float32)
    n_lo, s_lo, m_lo = quantize_int4_half(x_lo, mask_h)
    n_hi, s_hi, m_hi = quantize_int4_half(x_hi, mask_h)
    tl.store(cache_ptr + dst + offs_h, n_lo.to(tl.uint8) | (n_hi.to(tl.uint8) << 4), mask=mask_h)
    tl.store(scale_ptr + sdst, s_lo.to(tl.float16))
    tl.store(scale_ptr + sdst + 1, m_lo.to(tl.float16))
    tl.store(scale_ptr + sdst + 2, s_hi.to(tl.float16))
    tl.store(scale_ptr + sdst + 3, m_hi.to(tl.float16))
    return n_lo * s_lo + m_lo, n_hi * s_hi + m_hi


@triton.jit
def store_tail(x_ptr, tail_ptr, offs_h, mask_h, HALF: tl.constexpr):
    # Copy one token's head x [2 * HALF] (model dtype at x_ptr) as is into the exact tail at tail_ptr. Returns its
    # halves [HALF] fp32: exact, what a later read of the tail gives back.
    x_lo = tl.load(x_ptr + offs_h, mask=mask_h, other=0.0)
    x_hi = tl.load(x_ptr + HALF + offs_h, mask=mask_h, other=0.0)
    tl.store(tail_ptr + offs_h, x_lo.to(tail_ptr.dtype.element_ty), mask=mask_h)
    tl.store(tail_ptr + HALF + offs_h, x_hi.to(tail_ptr.dtype.element_ty), mask=mask_h)
    return x_lo.to(tl.float32), x_hi.to(tl.float32)


@triton.jit
def tail_tile_update(m, l, acc_lo, acc_hi, q_lo, q_hi, k_tail_ptr, v_tail_ptr, trow, offs_h, mask_h, valid, seen,
                     qk_scale, HALF: tl.constexpr, EMPTY_ROWS: tl.constexpr):
    # One tile of the exact tail (`trow` [TAIL_N]: the slots' offsets in k_tail / v_tail, model dtype) folded into the
    # online softmax of the int4 tiles (int4_tile_update: m, l [rows], acc_* [rows, DH]) in fp32: q_lo, q_hi
    # [rows, DH] are the query halves upcast (not int4_query's). fp16 and bf16 values are exact in tf32, so q . k
    # runs on tensor cores with exact products and fp32 sums, and p . v as tf32x3 (p split in two tf32 parts, ~fp32):
    # CUDA-core fp32 dots hold each operand row whole in registers, which spills at d256. fp32 models: ieee.
    kv_mask = valid[:, None] & mask_h[None, :]
    k_row = k_tail_ptr + trow[:, None] + offs_h[None, :]
    k_lo = tl.load(k_row, mask=kv_mask, other=0.0).to(tl.float32)
    k_hi = tl.load(k_row + HALF, mask=kv_mask, other=0.0).to(tl.float32)
    if k_tail_ptr.dtype.element_ty == tl.float32:
        qk = tl.dot(q_lo, tl.trans(k_lo), input_precision="ieee")
        qk += tl.dot(q_hi, tl.trans(k_hi), input_precision="ieee")
    else:
        qk = tl.dot(q_lo, tl.trans(k_lo), input_precision="tf32")
        qk += tl.dot(q_hi, tl.trans(k_hi), input_precision="tf32")
    m_new, l, alpha, p = online_softmax(m, l, qk, seen, qk_scale, EMPTY_ROWS)
    v_row = v_tail_ptr + trow[:, None] + offs_h[None, :]
    v_lo = tl.load(v_row, mask=kv_mask, other=0.0).to(tl.float32)
    v_hi = tl.load(v_row + HALF, mask=kv_mask, other=0.0).to(tl.float32)
    if v_tail_ptr.dtype.element_ty == tl.float32:
        acc_lo = acc_lo * alpha[:, None] + tl.dot(p, v_lo, input_precision="ieee")
        acc_hi = acc_hi * alpha[:, None] + tl.dot(p, v_hi, input_precision="ieee")
    else:
        acc_lo = acc_lo * alpha[:, None] + tl.dot(p, v_lo, input_precision="tf32x3")
        acc_hi = acc_hi * alpha[:, None] + tl.dot(p, v_hi, input_precision="tf32x3")
    return m_new, l, acc_lo, acc_hi
