"""The PyTorch reference ops against a dense fp64 oracle: paged layout, left padding, holes, windows, INT8, and the
edges: stale NaN/Inf in hidden slots never leaks, tokens without a slot are never silent."""

from __future__ import annotations

import math

import pytest
import torch

from hf_kvplug import ops
from hf_kvplug.reference import (
    attend_with_kvcache_ref,
    dequantize_int4,
    dequantize_int8,
    gather_kv,
    quantize_int4,
    quantize_int8,
    visible_slots,
    write_kvcache_ref,
)
from oracle import attend_fp64_ref

TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
NO_VALID = torch.empty(0, dtype=torch.uint8)


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


def _status():
    return torch.zeros(1, dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("nheads, nheads_k, head_dim", [(4, 4, 16), (8, 2, 32), (7, 1, 24)])
@pytest.mark.parametrize("q_len, window", [(1, 0), (5, 0), (1, 7), (6, 4)])
@pytest.mark.parametrize("holes", [False, True])
def test_attend_matches_fp64(dtype, nheads, nheads_k, head_dim, q_len, window, holes):
    batch, bs, max_len = 3, 8, 48
    bufs = make_cache(batch, nheads_k, head_dim, bs, max_len, dtype)
    seqlens = torch.tensor([0, 9, 30], dtype=torch.int32)
    starts = torch.tensor([0, 3, 12], dtype=torch.int32)
    valid = NO_VALID
    if holes:  # right padding in row 0's new tokens, a gap in row 1, the new tokens' own slots in row 2
        valid = torch.ones(batch, max_len, dtype=torch.uint8)
        valid[0, q_len - 1] = 0
        valid[1, 4:8] = 0
        valid[2, 30:32] = 0
    # prefill the cache rows with history
    hist = torch.randn(batch, 40, nheads_k, head_dim, dtype=dtype)
    ops.write_kvcache(hist, hist * 0.5, *bufs, torch.zeros(batch, dtype=torch.int32), backend="reference")
    q = torch.randn(batch, q_len, nheads, head_dim, dtype=dtype)
    k = torch.randn(batch, q_len, nheads_k, head_dim, dtype=dtype)
    v = torch.randn(batch, q_len, nheads_k, head_dim, dtype=dtype)
    scale = head_dim ** -0.5
    status = _status()
    out = attend_with_kvcache_ref(q, k, v, *bufs, seqlens, starts, valid, status, scale, window)
    assert int(status) == 0 and torch.isfinite(out).all()
    keys = gather_kv(bufs[0], bufs[2], bufs[4], batch, bufs[4].shape[1], dtype)
    values = gather_kv(bufs[1], bufs[3], bufs[4], batch, bufs[4].shape[1], dtype)
    for b in range(batch):  # the new tokens landed in their slots
        s = int(seqlens[b])
        assert torch.equal(keys[b, :, s:s + q_len], k[b].transpose(0, 1))
    seen = visible_slots(seqlens, starts, valid, batch, q_len, window, keys.shape[2])
    want = attend_fp64_ref(q, keys, values, seen, scale)
    err = (out.double() - want).abs().max().item()
    assert err <= TOL[dtype], f"reference error {err} vs fp64"
    # the registered op (which bounds its read by the real length on CPU) agrees with the unbounded reference;
    # it writes the same K/V into the same slots again, so the cache state is the same
    bufs2 = [t.clone() for t in bufs]
    out_op = ops.attend_with_kvcache(q, k, v, *bufs2, seqlens, starts, scale, window, cache_valid=valid,
                                     backend="reference")
    torch.testing.assert_close(out_op, out, atol=TOL[dtype], rtol=0)


def test_query_that_sees_nothing_gets_zero():
    """A leading padding query (its row starts after it) attends nothing: 0, as SDPA gives a fully masked row."""
    bufs = make_cache(1, 1, 8, 4, 8, torch.float32)
    q, k, v = (torch.randn(1, 4, 1, 8) for _ in range(3))
    out = attend_with_kvcache_ref(q, k, v, *bufs, torch.zeros(1, dtype=torch.int32),
                                  torch.tensor([2], dtype=torch.int32), NO_VALID, _status(), 1.0)
    assert torch.equal(out[0, :2], torch.zeros(2, 1, 8))  # slots 0, 1 are padding
    torch.testing.assert_close(out[0, 2], v[0, 2])  # the first real token sees itself only


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_stale_values_in_hidden_slots_never_leak(int8, poison):
    """NaN/Inf left in slots outside every row's range (past its length, before its start, masked out) change
    nothing: hidden slots are zeroed before the products, not only masked in the scores."""
    batch, hk, d, bs, max_len = 3, 2, 16, 4, 32
    bufs = make_cache(batch, hk, d, bs, max_len, torch.float32, int8=int8)
    ops.write_kvcache(*(torch.randn(batch, 24, hk, d) for _ in range(2)), *bufs, torch.zeros(batch, dtype=torch.int32),
                      backend="reference")
    seqlens = torch.tensor([5, 12, 20], dtype=torch.int32)
    starts = torch.tensor([0, 3, 0], dtype=torch.int32)
    valid = torch.ones(batch, max_len, dtype=torch.uint8)
    valid[2, 6:9] = 0
    q, k, v = torch.randn(batch, 2, 4, d), torch.randn(batch, 2, hk, d), torch.randn(batch, 2, hk, d)
    clean = [t.clone() for t in bufs]
    want = attend_with_kvcache_ref(q, k, v, *clean, seqlens, starts, valid, _status(), d ** -0.5)
    table = bufs[4]
    hidden = [(0, range(7, 32)), (1, range(0, 3)), (1, range(14, 32)), (2, range(6, 9)), (2, range(22, 32))]
    for row, slots in hidden:  # plant the poison in K, V (and the INT8 scales) of every hidden slot
        for s in slots:
            blk, off = int(table[row, s // bs]), s % bs
            for buf in (bufs[2], bufs[3]) if int8 else (bufs[0], bufs[1]):
                buf[blk, :, off] = poison
    got = attend_with_kvcache_ref(q, k, v, *bufs, seqlens, starts, valid, _status(), d ** -0.5)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_int8_round_trip_within_half_step():
    x = torch.randn(5, 3, 64) * torch.linspace(0.01, 10, 5).view(5, 1, 1)
    x[0, 0] = 0
    q, scale = quantize_int8(x)
    assert q.dtype == torch.int8 and scale.shape == (5, 3)
    back = dequantize_int8(q, scale, torch.float32)
    assert ((back - x).abs() <= 0.5 * scale.unsqueeze(-1) + 1e-6).all()
    assert torch.equal(back[0, 0], torch.zeros(64))


@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_int4_round_trip_and_layout(head_dim):
    """Per half of head_dim: codes in [0, 15], error within half a step (plus the fp16 minimum's rounding); byte j
    holds dim j in its low nibble and dim j + D/2 in its high one; a constant half is exact."""
    half = head_dim // 2
    x = torch.randn(5, 3, head_dim) * torch.linspace(0.01, 10, 5).view(5, 1, 1)
    x[..., half:] = x[..., half:] * 3 + 1  # the halves get different ranges and offsets
    x[0, 0, :half] = 0.25
    packed, params = quantize_int4(x)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 3, half)
    assert params.dtype == torch.float16 and params.shape == (5, 3, 4)
    back = dequantize_int4(packed, params, torch.float32)
    p = params.float()
    for h, (s, m) in enumerate([(p[..., 0], p[..., 1]), (p[..., 2], p[..., 3])]):
        xs, bs = x[..., h * half:(h + 1) * half], back[..., h * half:(h + 1) * half]
        slack = 1e-3 * xs.abs().amax(-1, keepdim=True) + 1e-6  # the minimum is stored in fp16
        assert ((bs - xs).abs() <= 0.5 * s.unsqueeze(-1) + slack).all()
        codes = (packed & 15) if h == 0 else (packed >> 4)
        want = torch.round((xs - m.unsqueeze(-1)) / s.unsqueeze(-1)).clamp(0, 15).nan_to_num(0)  # s = 0: code 0
        torch.testing.assert_close(codes.float(), want, atol=1, rtol=0)  # off by one where fp16 rounding moved a tie
    assert torch.equal(back[0, 0, :half], torch.full((half,), 0.25))
    assert params[0, 0, 0] == 0


def test_tokens_without_a_slot_are_never_silent():
    """Past the table, or in an unmapped block (-1): not written, status set, NaN output; the public op on CPU
    tensors raises before writing anything."""
    bufs = make_cache(2, 1, 4, 4, 8, torch.float32, shuffle=False)
    table = bufs[4].clone()
    table[1, 1] = -1  # row 1 maps its first block only
    k = torch.ones(2, 3, 1, 4)
    before = [t.clone() for t in bufs]
    status = _status()
    ok = write_kvcache_ref(k, k, *bufs[:4], table, torch.tensor([6, 2], dtype=torch.int32), status)
    assert ok.tolist() == [[True, True, False], [True, True, False]] and int(status) == 1
    rows = bufs[0].view(2, 2, 1, 4, 4)
    assert torch.equal(rows[0, 1, 0, 2:], torch.ones(2, 4))  # slots 6, 7 written, slot 8 dropped
    assert torch.equal(rows[1, 0, 0, 2:], torch.ones(2, 4))  # slots 2, 3 written, slot 4 (unmapped) dropped
    assert torch.equal(rows[1, 1], before[0].view(2, 2, 1, 4, 4)[1, 1])
    q = torch.randn(2, 3, 1, 4)
    out = attend_with_kvcache_ref(q, k, k, *before[:4], table, torch.tensor([6, 2], dtype=torch.int32),
                                  torch.zeros(2, dtype=torch.int32), NO_VALID, _status(), 1.0)
    assert torch.isnan(out[:, 2]).all() and torch.isfinite(out[:, :2]).all()
    snapshot = [t.clone() for t in before]
    with pytest.raises(ValueError, match="no cache slot"):
        ops.write_kvcache(k, k, *before[:4], table, torch.tensor([6, 2], dtype=torch.int32), backend="reference")
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot))
