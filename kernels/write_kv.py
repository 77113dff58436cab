"""Write kernel: new K/V tokens into their paged-cache slots, quantized to int8 with per-token-head scales if asked
(or to int4, with an exact tail if given)."""

import triton
import triton.language as tl

from .host import check_cache, check_tail, device_guard, launcher, next_pow2, scale_strides, tail_args
from .tiles import quantize_int8, slot_block, store_int4, store_tail


@triton.jit
def _write_kvcache_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_table_ptr, cache_seqlens_ptr,
    status_ptr,
    q_len, capacity,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_cb, stride_ch, stride_cs, stride_sb, stride_sh, stride_ss, stride_bt,
    k_tail_ptr, v_tail_ptr, stride_tb, stride_th, stride_ts,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, INT8: tl.constexpr,
    INT4: tl.constexpr, HAS_STATUS: tl.constexpr, HAS_TAIL: tl.constexpr,
):
    # k, v [B, q_len, nheads_k, D]; caches [num_blocks, nheads_k, BLOCK_SIZE, D]; scales [num_blocks, nheads_k, BS]
    # HAS_TAIL (INT4): k_tail, v_tail [B, nheads_k, BLOCK_SIZE, D] model dtype, each row's last, partial block exact
    pid = tl.program_id(0)
    hk = tl.program_id(1)
    b = (pid // q_len).to(tl.int64)
    i = pid % q_len
    seqlen = tl.load(cache_seqlens_ptr + b)
    s = seqlen + i
    phys, ok = slot_block(block_table_ptr + b * stride_bt, s, capacity, BLOCK_SIZE)
    if ok == 0:  # past the table or in an unmapped block: not written, and said so
        if HAS_STATUS:
            tl.store(status_ptr, 1)
        return
    slot = s % BLOCK_SIZE
    i64, hk64 = i.to(tl.int64), hk.to(tl.int64)  # k, v are transposed views: stride_kh = q_len * D
    k_src = k_ptr + b * stride_kb + i64 * stride_kt + hk64 * stride_kh
    v_src = v_ptr + b * stride_vb + i64 * stride_vt + hk64 * stride_vh
    sdst = phys * stride_sb + hk * stride_sh + slot * stride_ss
    if INT4:  # two values a byte: dims j and j + HEAD_DIM / 2
        offs_h = tl.arange(0, D_PAD // 2)
        mask_h = offs_h < HEAD_DIM // 2
        dst = phys * stride_cb + hk * stride_ch + slot * stride_cs
        store_int4(k_src, k_cache_ptr, k_scale_ptr, dst, sdst, offs_h, mask_h, HEAD_DIM // 2)
        store_int4(v_src, v_cache_ptr, v_scale_ptr, dst, sdst, offs_h, mask_h, HEAD_DIM // 2)
        if HAS_TAIL:  # the row holds seqlen + q_len tokens after the call: its last block (partial, or just
            # filled) is also kept exact
            last = seqlen + q_len - 1
            if s >= last - last % BLOCK_SIZE:
                tdst = b * stride_tb + hk64 * stride_th + slot * stride_ts
                store_tail(k_src, k_tail_ptr + tdst, offs_h, mask_h, HEAD_DIM // 2)
                store_tail(v_src, v_tail_ptr + tdst, offs_h, mask_h, HEAD_DIM // 2)
        return
    offs_d = tl.arange(0, D_PAD)
    mask_d = offs_d < HEAD_DIM
    k = tl.load(k_src + offs_d, mask=mask_d, other=0.0)
    v = tl.load(v_src + offs_d, mask=mask_d, other=0.0)
    dst = phys * stride_cb + hk * stride_ch + slot * stride_cs + offs_d
    if INT8:
        kq, ks = quantize_int8(k.to(tl.float32))
        vq, vs = quantize_int8(v.to(tl.float32))
        tl.store(k_cache_ptr + dst, kq, mask=mask_d)
        tl.store(v_cache_ptr + dst, vq, mask=mask_d)
        tl.store(k_scale_ptr + sdst, ks)
        tl.store(v_scale_ptr + sdst, vs)
    else:
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask_d)
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask_d)


def write_kvcache(k, v, k_cache, v_cache, k_scale, v_scale, block_table, cache_seqlens, status, k_tail=None,
                  v_tail=None):
    # k_tail, v_tail [max_batch, nheads_k, BLOCK_SIZE, D] in k's dtype (int4 caches), or None / 0 elements: the exact
    # tail (rule 4 of hf_kvplug/reference.py), written with the new tokens that land in their row's last block
    batch, q_len, nheads_k, head_dim = k.shape
    assert v.shape == k.shape and k.stride(-1) == 1 and v.stride(-1) == 1, "k, v: [B, q_len, nheads_k, D], last dim 1"
    kind = check_cache(k_cache, v_cache, k_scale, v_scale, block_table, cache_seqlens, nheads_k, head_dim)
    assert block_table.shape[0] >= batch and cache_seqlens.shape[0] >= batch
    has_tail = check_tail(k_tail, v_tail, kind, batch, nheads_k, k_cache.shape[2], head_dim, k.dtype)
    if batch * q_len == 0:
        return
    capacity = block_table.shape[1] * k_cache.shape[2]
    with device_guard(k):
        launcher(_write_kvcache_kernel)[(batch * q_len, nheads_k)](
            k, v, k_cache, v_cache, k_scale, v_scale, block_table, cache_seqlens, status,
            q_len, capacity,
            k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), *scale_strides(k_scale, kind != "fp"),
            block_table.stride(0), *tail_args(k_tail, v_tail, has_tail, k),
            BLOCK_SIZE=k_cache.shape[2], HEAD_DIM=head_dim, D_PAD=next_pow2(head_dim), INT8=kind == "int8",
            INT4=kind == "int4", HAS_STATUS=status.numel() > 0, HAS_TAIL=has_tail,
            num_warps=1 if head_dim <= 128 else 2,
        )
