"""The PyTorch reference ops against a dense fp64 oracle: paged layout, left padding, windows, INT8."""

from __future__ import annotations

import math

import pytest
import torch

from hf_kvplug import ops
from hf_kvplug.reference import (
    attend_fp64_ref,
    attend_with_kvcache_ref,
    attention_bounds,
    dequantize_int8,
    gather_kv,
    quantize_int8,
)

TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def make_cache(batch, nheads_k, head_dim, block_size, max_len, dtype, int8=False, shuffle=True):
    max_blocks = math.ceil(max_len / block_size)
    nblocks = batch * max_blocks
    storage = torch.int8 if int8 else dtype
    shape = (nblocks, nheads_k, block_size, head_dim)
    k_cache, v_cache = torch.zeros(shape, dtype=storage), torch.zeros(shape, dtype=storage)
    scale_shape = shape[:3] if int8 else (0,)
    k_scale, v_scale = torch.zeros(scale_shape), torch.zeros(scale_shape)
    perm = torch.randperm(nblocks) if shuffle else torch.arange(nblocks)  # any block table must work
    block_table = perm.view(batch, max_blocks).to(torch.int32)
    return k_cache, v_cache, k_scale, v_scale, block_table


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("nheads, nheads_k, head_dim", [(4, 4, 16), (8, 2, 32), (7, 1, 24)])
@pytest.mark.parametrize("q_len, window", [(1, 0), (5, 0), (1, 7), (6, 4)])
def test_attend_matches_fp64(dtype, nheads, nheads_k, head_dim, q_len, window):
    batch, bs, max_len = 3, 8, 48
    bufs = make_cache(batch, nheads_k, head_dim, bs, max_len, dtype)
    seqlens = torch.tensor([0, 9, 30], dtype=torch.int32)
    starts = torch.tensor([0, 3, 12], dtype=torch.int32)
    # prefill the cache rows with history
    hist = torch.randn(batch, 40, nheads_k, head_dim, dtype=dtype)
    ops.write_kvcache(hist, hist * 0.5, *bufs, torch.zeros(batch, dtype=torch.int32), backend="reference")
    q = torch.randn(batch, q_len, nheads, head_dim, dtype=dtype)
    k = torch.randn(batch, q_len, nheads_k, head_dim, dtype=dtype)
    v = torch.randn(batch, q_len, nheads_k, head_dim, dtype=dtype)
    scale = head_dim ** -0.5
    out = attend_with_kvcache_ref(q, k, v, *bufs, seqlens, starts, scale, window)
    keys = gather_kv(bufs[0], bufs[2], bufs[4], batch, bufs[4].shape[1], dtype)
    values = gather_kv(bufs[1], bufs[3], bufs[4], batch, bufs[4].shape[1], dtype)
    for b in range(batch):  # the new tokens landed in their slots
        s = int(seqlens[b])
        assert torch.equal(keys[b, :, s:s + q_len], k[b].transpose(0, 1))
    s, lo = attention_bounds(seqlens, starts, batch, q_len, window)
    want = attend_fp64_ref(q, keys, values, lo, s, scale)
    err = (out.double() - want).abs().max().item()
    assert err <= TOL[dtype], f"reference error {err} vs fp64"
    # the registered op (which bounds its read by the real length on CPU) agrees with the unbounded reference;
    # it writes the same K/V into the same slots again, so the cache state is the same
    bufs2 = [t.clone() for t in bufs]
    out_op = ops.attend_with_kvcache(q, k, v, *bufs2, seqlens, starts, scale, window, backend="reference")
    torch.testing.assert_close(out_op, out, atol=TOL[dtype], rtol=0)


def test_padding_query_sees_itself_only():
    bufs = make_cache(1, 1, 8, 4, 8, torch.float32)
    q = torch.randn(1, 4, 1, 8)
    k = torch.randn(1, 4, 1, 8)
    v = torch.randn(1, 4, 1, 8)
    out = attend_with_kvcache_ref(q, k, v, *bufs, torch.zeros(1, dtype=torch.int32), torch.tensor([2], dtype=torch.int32),
                                  1.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, :2], v[0, :2])  # slots 0, 1 are padding: each attends to itself


def test_int8_round_trip_within_half_step():
    x = torch.randn(5, 3, 64) * torch.linspace(0.01, 10, 5).view(5, 1, 1)
    x[0, 0] = 0
    q, scale = quantize_int8(x)
    assert q.dtype == torch.int8 and scale.shape == (5, 3)
    back = dequantize_int8(q, scale, torch.float32)
    assert ((back - x).abs() <= 0.5 * scale.unsqueeze(-1) + 1e-6).all()
    assert torch.equal(back[0, 0], torch.zeros(64))


def test_writes_past_capacity_are_dropped():
    bufs = make_cache(2, 1, 4, 4, 8, torch.float32, shuffle=False)
    k = torch.ones(2, 3, 1, 4)
    before = bufs[0].clone()
    ops.write_kvcache(k, k, *bufs, torch.tensor([6, 0], dtype=torch.int32), backend="reference")
    rows = bufs[0].view(2, 2, 1, 4, 4)
    assert torch.equal(rows[0, 1, 0, 2:], torch.ones(2, 4))  # slots 6, 7 written, slot 8 dropped
    assert torch.equal(rows[1, 0, 0, :3], torch.ones(3, 4)) and torch.equal(rows[1, 1], before.view(2, 2, 1, 4, 4)[1, 1])
