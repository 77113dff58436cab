"""Triton kernels (write, fused decode, extend) against the PyTorch reference, on the CPU interpreter or a GPU."""

import itertools
import os

import pytest
import torch

from hf_kvplug import reference as R
from oracle import attend_fp64_ref

kernels = pytest.importorskip("hf_kvplug.kernels")
from hf_kvplug.kernels import decode_attn as DA  # noqa: E402
from hf_kvplug.kernels import extend_attn as EA  # noqa: E402
from hf_kvplug.kernels.tiles import int4_query, int8_to_float  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.interpreter

# cache dtype name -> (model dtype, cache format)
KINDS = {"fp16": (torch.float16, None), "bf16": (torch.bfloat16, None), "fp32": (torch.float32, None),
         "int8": (torch.float16, "int8"), "int8-bf16": (torch.bfloat16, "int8"),
         "int4": (torch.float16, "int4"), "int4-bf16": (torch.bfloat16, "int4")}
EPS = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HEADS = [(4, 4), (8, 2), (7, 1), (4, 1)]  # MHA, GQA 4:1, 7:1, MQA


class Case:
    """A batch whose rows cover the lengths of interest, in a paged cache with shuffled blocks."""

    def __init__(self, kind, head_dim, heads, block_size, q_len, window=0, seqlens=None, starts=None,
                 max_blocks=None, spare_blocks=3, holes=False):
        self.dtype, self.fmt = KINDS[kind]
        self.int8 = self.fmt is not None  # a quantized cache (int8 or int4)
        self.nheads, self.nheads_k = heads
        self.head_dim, self.block_size, self.q_len, self.window = head_dim, block_size, q_len, window
        bs = block_size
        if seqlens is None:  # lengths after the call: q_len, bs-1, bs, bs+1 and 3*bs+7 (clamped to >= q_len)
            seqlens = [0] + [max(0, n - q_len) for n in (bs - 1, bs, bs + 1, 3 * bs + 7)]
            starts = [2, 3, 0, 5, 9] if starts is None else starts  # left padding; row 0: a padding query
        self.batch = len(seqlens)
        starts = [0] * self.batch if starts is None else starts
        if max_blocks is None:
            max_blocks = -(-(max(seqlens) + q_len) // bs) + 1
        num_blocks = self.batch * max_blocks + spare_blocks
        dev, hk, d = DEVICE, self.nheads_k, head_dim
        self.block_table = torch.randperm(num_blocks, device=dev)[: self.batch * max_blocks]
        self.block_table = self.block_table.view(self.batch, max_blocks).to(torch.int32)
        self.cache_seqlens = torch.tensor(seqlens, dtype=torch.int32, device=dev)
        self.cache_starts = torch.tensor(starts, dtype=torch.int32, device=dev)
        shape = (num_blocks, hk, bs, d)
        if self.fmt is not None:
            quantize = R.quantize_int8 if self.fmt == "int8" else R.quantize_int4
            self.k_cache, self.k_scale = quantize(torch.randn(shape, device=dev))
            self.v_cache, self.v_scale = quantize(torch.randn(shape, device=dev))
        else:
            self.k_cache = torch.randn(shape, device=dev).to(self.dtype)
            self.v_cache = torch.randn(shape, device=dev).to(self.dtype)
            self.k_scale = self.v_scale = torch.empty(0, device=dev)
        # q, k, v as the model makes them: transposed views of [B, H, q_len, D] projections
        self.q = torch.randn(self.batch, self.nheads, q_len, d, device=dev).to(self.dtype).transpose(1, 2)
        self.k = torch.randn(self.batch, hk, q_len, d, device=dev).to(self.dtype).transpose(1, 2)
        self.v = torch.randn(self.batch, hk, q_len, d, device=dev).to(self.dtype).transpose(1, 2)
        self.softmax_scale = d ** -0.5
        self.valid = torch.empty(0, dtype=torch.uint8, device=dev)
        if holes:  # a mask with holes: every third slot masked out, and row 1's newest token
            width = max_blocks * bs - 3
            self.valid = torch.ones(self.batch, width, dtype=torch.uint8, device=dev)
            self.valid[:, 1::3] = 0
            self.valid[1 % self.batch, min(width - 1, seqlens[1 % self.batch] + q_len - 1)] = 0
        self.status = torch.zeros(1, dtype=torch.int32, device=dev)

    def buffers(self):
        """A fresh copy of the cache buffers (k_cache, v_cache, k_scale, v_scale)."""
        return [t.clone() for t in (self.k_cache, self.v_cache, self.k_scale, self.v_scale)]

    def tables(self):
        return self.block_table, self.cache_seqlens

    def run_kernel(self, bufs, status=None):
        return kernels.attend_with_kvcache(self.q, self.k, self.v, *bufs, *self.tables(), self.cache_starts,
                                           self.valid, self.status if status is None else status,
                                           self.softmax_scale, self.window)

    def run_reference(self, bufs, status=None):
        return R.attend_with_kvcache_ref(self.q, self.k, self.v, *bufs, *self.tables(), self.cache_starts,
                                         self.valid, self.status.clone() if status is None else status,
                                         self.softmax_scale, self.window)

    def seen(self, num_slots):
        return R.visible_slots(self.cache_seqlens, self.cache_starts, self.valid, self.batch, self.q_len,
                               self.window, num_slots)

    def oracle(self, bufs):
        """fp64 attention over the cache contents in `bufs` (int8: exactly dequantized)."""
        nb = self.block_table.shape[1]
        keys = R.gather_kv(bufs[0], bufs[2], self.block_table, self.batch, nb, torch.float64)
        values = R.gather_kv(bufs[1], bufs[3], self.block_table, self.batch, nb, torch.float64)
        return attend_fp64_ref(self.q, keys, values, self.seen(keys.shape[2]), self.softmax_scale)

    def written(self, bufs):
        """(k, v, k step, v step) at the new tokens' slots: [B, q_len, nheads_k, D] values (dequantized when
        quantized) and the quantization step per value (None for model-dtype caches)."""
        slots = self.cache_seqlens[: self.batch].long().unsqueeze(1) + torch.arange(self.q_len, device=DEVICE)
        blocks = self.block_table.long().gather(1, slots // self.block_size)
        offs = slots % self.block_size
        if self.fmt is None:
            return bufs[0][blocks, :, offs], bufs[1][blocks, :, offs], None, None
        ks, vs = bufs[2][blocks, :, offs], bufs[3][blocks, :, offs]
        k = R.dequantize(bufs[0][blocks, :, offs], ks, torch.float32)
        v = R.dequantize(bufs[1][blocks, :, offs], vs, torch.float32)
        if self.fmt == "int8":
            return k, v, ks[..., None], vs[..., None]
        half = self.head_dim // 2
        step = lambda p: torch.cat([p[..., 0:1].float().expand(*p.shape[:-1], half),  # noqa: E731
                                    p[..., 2:3].float().expand(*p.shape[:-1], half)], -1)
        return k, v, step(ks), step(vs)


def assert_cache_written(case, got, want):
    """Cache after the kernel write vs after the reference write: bit-exact, or for int8 within rounding."""
    if not case.int8:
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        return
    assert_quantized_close(got, want)
    k_deq, v_deq, k_step, v_step = case.written(got)  # within half a quantization step of what was written
    slack = 1e-3 if case.fmt == "int4" else 1e-7  # int4: the fp16 minimum adds its own rounding
    assert ((k_deq - case.k.float()).abs() <= 0.5 * k_step * (1 + 1e-5) + slack).all()
    assert ((v_deq - case.v.float()).abs() <= 0.5 * v_step * (1 + 1e-5) + slack).all()


def assert_attention_close(case, out, out_pt, oracle, mult=2.0):
    assert out.shape == out_pt.shape and out.dtype == case.dtype and out.is_contiguous()
    assert torch.isfinite(out).all()
    err = (out.double() - oracle).abs().max().item()
    err_pt = (out_pt.double() - oracle).abs().max().item()
    eps = EPS[case.dtype]
    if INTERPRET and case.dtype == torch.bfloat16:  # the interpreter casts fp32 -> bf16 by truncation: 1 ulp
        eps += 2.0 ** -8 * oracle.abs().max().item()
    assert err <= mult * err_pt + eps, f"kernel err {err:.3g} vs torch err {err_pt:.3g}"


def check(case):
    bufs, ref_bufs = case.buffers(), case.buffers()
    out = case.run_kernel(bufs)
    out_pt = case.run_reference(ref_bufs)
    assert_cache_written(case, bufs, ref_bufs)
    assert_attention_close(case, out, out_pt, case.oracle(ref_bufs))
    return out, bufs


# ------------------------------------------------------------------------------------------- case selection

def _cases(q_lens):
    """(kind, head_dim, heads, block_size, window, q_len): a covering subset (every head_dim x heads pair, every
    kind, block size and window) on CPU; on GPU the full product, the part outside the subset marked slow."""
    kinds, dims, blocks, windows = list(KINDS), (64, 128, 80), (16, 32), (0, 11)
    n = max(len(kinds), len(dims) * len(HEADS))
    subset = [(kinds[i % len(kinds)], dims[i % 3], HEADS[(i // 3) % 4], blocks[i % 2], windows[(i // 2) % 2],
               q_lens[i % len(q_lens)]) for i in range(n)]
    if not CUDA:
        return subset
    return subset + [pytest.param(c, marks=pytest.mark.slow, id=_id(c)) for c in
                     itertools.product(kinds, dims, HEADS, blocks, windows, q_lens) if c not in subset]


def _id(c):
    kind, d, (h, hk), bs, w, q_len = c
    return f"{kind}-d{d}-h{h}x{hk}-bs{bs}-w{w}-q{q_len}"


DECODE = _cases((1,))
EXTEND = _cases((2, 5, 19))


@pytest.mark.parametrize("case", DECODE, ids=_id)
def test_decode(case):
    kind, d, heads, bs, window, q_len = case
    check(Case(kind, d, heads, bs, q_len, window))


@pytest.mark.parametrize("case", EXTEND, ids=_id)
def test_extend(case):
    kind, d, heads, bs, window, q_len = case
    check(Case(kind, d, heads, bs, q_len, window))


@pytest.mark.parametrize("kind", ["fp16", "int8", "int4"])
@pytest.mark.parametrize("num_splits", [1, 2, 3, 64])
def test_decode_splits(kind, num_splits, monkeypatch):
    """Any split count gives the same answer: tiles of 16 make many small splits over 5 rows of different lengths."""
    monkeypatch.setattr(DA, "decode_config", lambda head_dim, kind, elem_size=2: (16, 4, 1))
    case = Case(kind, 64, (8, 2), 16, 1, window=0)
    bufs, ref_bufs = case.buffers(), case.buffers()
    out = DA.decode_attn(case.q, case.k, case.v, *bufs, *case.tables(), case.cache_starts, case.valid, case.status,
                         case.softmax_scale, 0, num_splits=num_splits)
    out_pt = case.run_reference(ref_bufs)
    assert_cache_written(case, bufs, ref_bufs)
    assert_attention_close(case, out, out_pt, case.oracle(ref_bufs))


@pytest.mark.parametrize("kind", ["fp16", "int8", "int8-bf16"])
@pytest.mark.parametrize("config", [(32, 8, 2), (64, 4, 4), DA.DecodeConfig(32, 4, 2, v_scale_on_p=False)])
def test_decode_config_override(kind, config):
    """The tuning hook (`config=`, a DecodeConfig or its first three fields) gives the same answer for any config,
    INT8 V scales on the probabilities (the default) or on the V tile."""
    case = Case(kind, 64, (8, 2), 16, 1, window=0)
    bufs, ref_bufs = case.buffers(), case.buffers()
    out = DA.decode_attn(case.q, case.k, case.v, *bufs, *case.tables(), case.cache_starts, case.valid, case.status,
                         case.softmax_scale, 0, num_splits=3, config=config)
    out_pt = case.run_reference(ref_bufs)
    assert_cache_written(case, bufs, ref_bufs)
    assert_attention_close(case, out, out_pt, case.oracle(ref_bufs))


@pytest.mark.parametrize("window", [0, 40])
def test_short_row_in_big_cache(window, monkeypatch):
    """Splits past a row's length (or before its window) do nothing: a row of length 1 beside a long one."""
    monkeypatch.setattr(DA, "decode_config", lambda head_dim, int8, elem_size=2: (16, 4, 1))
    case = Case("fp16", 64, (8, 2), 16, 1, window=window, seqlens=[0, 300, 5], starts=[0, 7, 5], max_blocks=32)
    bufs, ref_bufs = case.buffers(), case.buffers()
    out = DA.decode_attn(case.q, case.k, case.v, *bufs, *case.tables(), case.cache_starts, case.valid, case.status,
                         case.softmax_scale, window, num_splits=32)
    out_pt = case.run_reference(ref_bufs)
    assert_cache_written(case, bufs, ref_bufs)
    assert_attention_close(case, out, out_pt, case.oracle(ref_bufs))
    # rows 0 and 2 start at their own slot: they see only the new token, so out == v
    for row in (0, 2):
        torch.testing.assert_close(out[row], case.v[row].repeat_interleave(4, dim=1), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["fp16", "int8", "int4", "int4-bf16"])
def test_decode_and_extend_agree(kind):
    """The fused decode and write + extend paths, on the same cache state and token, match each other and torch."""
    case = Case(kind, 64, (8, 2), 16, 1, window=0)
    a, b, ref_bufs = case.buffers(), case.buffers(), case.buffers()
    out_decode = case.run_kernel(a)
    kernels.write_kvcache(case.k, case.v, *b, *case.tables(), case.status)
    out_extend = EA.extend_attn(case.q, *b, *case.tables(), case.cache_starts, case.valid, case.softmax_scale, 0)
    out_pt = case.run_reference(ref_bufs)
    oracle = case.oracle(ref_bufs)
    for got in (a, b):
        assert_cache_written(case, got, ref_bufs)
    assert_attention_close(case, out_decode, out_pt, oracle)
    assert_attention_close(case, out_extend, out_pt, oracle)
    torch.testing.assert_close(out_decode, out_extend, rtol=0, atol=4e-3)


@pytest.mark.parametrize("kind", ["fp16", "int8", "bf16", "int4"])
@pytest.mark.parametrize("q_len, window", [(1, 0), (1, 11), (5, 0), (19, 7)])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_masks_with_holes(kind, q_len, window, num_splits, monkeypatch):
    """A slot mask with holes (right padding, gaps, a new token masked out): the kernels follow it exactly as the
    reference, decode split or not and extend; a token whose slots are all masked gets 0."""
    if num_splits is not None:
        if q_len > 1:
            pytest.skip("splits are a decode choice")
        monkeypatch.setattr(DA, "decode_config", lambda head_dim, int8, elem_size=2: (16, 4, 1))
        real = DA.num_splits_for
        monkeypatch.setattr(DA, "num_splits_for", lambda *a, **k: num_splits or real(*a, **k))
    check(Case(kind, 64, (8, 2), 16, q_len, window, holes=True))


@pytest.mark.parametrize("kind", ["fp16", "int8", "int4"])
@pytest.mark.parametrize("q_len", [1, 6])
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_stale_values_in_hidden_slots_never_leak(kind, q_len, poison):
    """NaN/Inf planted in every slot outside each row's visible range (past its length, before its start, masked
    out) changes no output: the kernels never bring hidden slots into the arithmetic."""
    case = Case(kind, 64, (8, 2), 16, q_len, holes=True)
    clean = case.run_kernel(case.buffers())
    bufs = case.buffers()
    seen = case.seen(case.block_table.shape[1] * 16).any(1)  # [B, T]: slots some new token of the row sees
    new = (case.cache_seqlens.unsqueeze(1) <= torch.arange(seen.shape[1], device=DEVICE)) & (
        torch.arange(seen.shape[1], device=DEVICE) < (case.cache_seqlens + q_len).unsqueeze(1))
    for b, t in (~seen & ~new).nonzero().tolist():
        blk, off = int(case.block_table[b, t // 16]), t % 16
        for buf in (bufs[2], bufs[3]) if case.int8 else (bufs[0], bufs[1]):
            buf[blk, :, off] = poison
    got = case.run_kernel(bufs)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, clean, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8", "int4"])
@pytest.mark.parametrize("q_len", [1, 3, 40])
def test_write(kind, q_len):
    case = Case(kind, 80, (4, 2), 16, q_len)
    bufs, ref_bufs = case.buffers(), case.buffers()
    kernels.write_kvcache(case.k, case.v, *bufs, *case.tables(), case.status)
    R.write_kvcache_ref(case.k, case.v, *ref_bufs, *case.tables(), case.status.clone())
    assert_cache_written(case, bufs, ref_bufs)
    assert_untouched(case, bufs, case.buffers())


@triton.jit
def _int8_to_float_kernel(x_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, int8_to_float(tl.load(x_ptr + offs), out_ptr.dtype.element_ty))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    INTERPRET, reason="Triton's interpreter converts int8 -> bf16 wrongly (reinterprets bits); the kernels upcast q "
    "to fp32 there, so K converts to fp32"))])
def test_int8_to_float_exact(dtype):
    """The I2F-free int8 conversion of the INT8 loops gives every one of the 256 values exactly."""
    x = torch.arange(-128, 128, dtype=torch.int16, device=DEVICE).to(torch.int8)
    out = torch.empty(256, dtype=dtype, device=DEVICE)
    _int8_to_float_kernel[(1,)](x, out, N=256)
    assert torch.equal(out, x.to(dtype))


@triton.jit
def _int4_query_kernel(q_ptr, out_ptr, inv_ptr, R: tl.constexpr, DH: tl.constexpr):
    rows, cols = tl.arange(0, R)[:, None], tl.arange(0, DH)[None, :]
    q_lo, q_hi, inv = int4_query(tl.load(q_ptr + rows * 2 * DH + cols), tl.load(q_ptr + rows * 2 * DH + DH + cols),
                                 q_ptr.dtype.element_ty)
    tl.store(out_ptr + rows * 2 * DH + cols, q_lo.to(tl.float32))
    tl.store(out_ptr + rows * 2 * DH + DH + cols, q_hi.to(tl.float32))
    tl.store(inv_ptr + tl.arange(0, R), inv)


def test_int4_query_is_exact_for_bf16_rows_of_any_magnitude():
    """bf16 queries enter the int4 dots as fp16, each row scaled by a power of two (tiles.int4_query): rows whose
    largest |q| lies far past fp16's range, far below it, at 0, or spans 2^-20 of the maximum come back exactly
    (scaled value x inverse == q), with the scaled maximum in [2^14, 2^15)."""
    base = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    rows = base * torch.tensor([1e30, 3e5, 1.0, 1e-6, 1e-30, 0.0])[:, None]
    rows[2, :16] *= 2.0 ** -20  # a row spanning 20 binades
    q = rows.to(torch.bfloat16)
    q = torch.cat([q, q[:2]]).to(DEVICE)  # 8 rows
    out = torch.empty(q.shape, dtype=torch.float32, device=DEVICE)
    inv = torch.empty(8, dtype=torch.float32, device=DEVICE)
    _int4_query_kernel[(1,)](q, out, inv, R=8, DH=16)
    assert torch.equal(out.double() * inv.double()[:, None], q.double())
    amax = out.abs().amax(1)
    nonzero = q.float().abs().amax(1) > 0
    assert ((amax[nonzero] >= 2 ** 14) & (amax[nonzero] < 2 ** 15)).all(), amax
    assert torch.isfinite(out).all() and (inv > 0).all()


def assert_untouched(case, got, before):
    """Every slot but the new tokens' (those within capacity) keeps its value."""
    capacity = case.block_table.shape[1] * case.block_size
    keep = torch.ones(got[0].shape[:3], dtype=torch.bool, device=DEVICE)  # [num_blocks, nheads_k, BS]
    for b in range(case.batch):
        for s in range(int(case.cache_seqlens[b]), min(int(case.cache_seqlens[b]) + case.q_len, capacity)):
            keep[case.block_table[b, s // case.block_size].long(), :, s % case.block_size] = False
    for a, b in zip(got, before):
        if a.numel():
            assert torch.equal(a[keep], b[keep])


@pytest.mark.parametrize("kind", ["fp16", "int8", "int4"])
@pytest.mark.parametrize("q_len", [1, 6])
def test_write_past_capacity(kind, q_len):
    """Tokens past a row's last block are not written and never silent: status set, their outputs NaN; other rows,
    other tokens and unused blocks are untouched and right."""
    case = Case(kind, 64, (4, 2), 16, q_len, seqlens=[62, 10, 64], starts=[0, 0, 50], max_blocks=4)
    bufs, ref_bufs = case.buffers(), case.buffers()
    before = case.buffers()
    out = case.run_kernel(bufs)
    ref_status = torch.zeros_like(case.status)
    out_pt = case.run_reference(ref_bufs, ref_status)
    assert int(case.status) == 1 and int(ref_status) == 1
    if case.int8:
        assert_cache_written_int8_no_oracle(bufs, ref_bufs)
    else:
        assert torch.equal(bufs[0], ref_bufs[0]) and torch.equal(bufs[1], ref_bufs[1])
    assert_untouched(case, bufs, before)  # row 2, full before the call, keeps every block as it was
    slots = case.cache_seqlens.unsqueeze(1) + torch.arange(q_len, device=DEVICE)
    lost = (slots >= 64)[..., None, None].expand_as(out)
    assert torch.isnan(out[lost]).all() and torch.isnan(out_pt[lost]).all()
    torch.testing.assert_close(out.float()[~lost], out_pt.float()[~lost], rtol=0,
                               atol=2e-2 if case.int8 else 4e-3)


@pytest.mark.parametrize("q_len", [1, 4])
def test_unmapped_block_is_never_written(q_len):
    """A block id of -1 (no block mapped) takes no write: status set, the token's output NaN, the pool unchanged."""
    case = Case("fp16", 64, (4, 2), 16, q_len, seqlens=[16, 20], starts=[0, 0], max_blocks=3)
    case.block_table[0, 1] = -1
    bufs, before = case.buffers(), case.buffers()
    out = case.run_kernel(bufs)
    assert int(case.status) == 1
    slots = case.cache_seqlens.unsqueeze(1) + torch.arange(q_len, device=DEVICE)
    lost = ((slots >= 16) & (slots < 32) & (torch.arange(2, device=DEVICE) == 0)[:, None])
    assert torch.isnan(out[lost]).all() and torch.isfinite(out[~lost]).all()
    written = torch.zeros(bufs[0].shape[:3], dtype=torch.bool, device=DEVICE)
    for b in range(2):
        for s in range(int(case.cache_seqlens[b]), int(case.cache_seqlens[b]) + q_len):
            if not (b == 0 and 16 <= s < 32):
                written[case.block_table[b, s // 16].long(), :, s % 16] = True
    assert torch.equal(bufs[0][~written], before[0][~written])


def assert_quantized_close(got, want):
    """Quantized caches after the kernel write vs the reference write: a near-tie may round the other way (fp
    contraction on GPU): one level at most; the scales (int4: scale and minimum, fp16) equal."""
    for a, b in zip(got[:2], want[:2]):
        if a.dtype == torch.uint8:  # int4: both nibbles
            a, b = torch.stack([a & 15, a >> 4]), torch.stack([b & 15, b >> 4])
        assert (a.int() - b.int()).abs().max().item() <= 1
    for a, b in zip(got[2:], want[2:]):
        torch.testing.assert_close(a, b, rtol=1e-6 if a.dtype == torch.float32 else 1e-3, atol=0)


assert_cache_written_int8_no_oracle = assert_quantized_close


def test_prefill_empty_cache_left_padding():
    """Prefill of a left-padded batch into an empty cache: padding queries see nothing (0), no NaN."""
    case = Case("fp16", 128, (8, 2), 32, 37, seqlens=[0, 0], starts=[0, 12])
    check(case)


def test_chunked_prefill_and_verify():
    """Chunks appended to a cache in turns (chunked prefill, then a 4-token verify step) equal one-shot torch."""
    case = Case("int8", 64, (7, 1), 16, 23, seqlens=[0, 0], starts=[0, 3], max_blocks=4)
    bufs, ref_bufs = case.buffers(), case.buffers()
    seqlens = case.cache_seqlens.clone()
    for lo, hi in ((0, 9), (9, 19), (19, 23)):
        sub = lambda t: t[:, lo:hi]  # noqa: E731
        out = kernels.attend_with_kvcache(sub(case.q), sub(case.k), sub(case.v), *bufs, case.block_table, seqlens,
                                          case.cache_starts, case.valid, case.status, case.softmax_scale, 0)
        want = R.attend_with_kvcache_ref(sub(case.q), sub(case.k), sub(case.v), *ref_bufs, case.block_table, seqlens,
                                         case.cache_starts, case.valid, case.status.clone(), case.softmax_scale, 0)
        torch.testing.assert_close(out.float(), want.float(), rtol=0, atol=1e-2)
        seqlens += hi - lo
    assert_cache_written_int8_no_oracle(bufs, ref_bufs)


# ------------------------------------------------------------------------------------------- GPU only

@pytest.mark.parametrize("kind", ["fp16", "bf16", "int8"])
@pytest.mark.parametrize("heads", [(32, 8), (28, 4)])
@pytest.mark.parametrize("seqlens", [[4095, 17, 1000, 2047], [8191]])
@pytest.mark.parametrize("block_size", [16, 64, 256])
@pytest.mark.parametrize("q_len", [1, 5, 300])
@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_model_shapes_gpu(kind, heads, seqlens, block_size, q_len):
    case = Case(kind, 128, heads, block_size, q_len, window=0, seqlens=seqlens, starts=[3] * len(seqlens))
    check(case)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["bf16", "int8-bf16"])
@pytest.mark.parametrize("q_len", [1, 7])
def test_triton_op_compiled_matches_eager(kind, q_len):
    import hf_kvplug.ops  # noqa: F401  (registers torch.ops.hf_kvplug.*)

    case = Case(kind, 128, (8, 2), 16, q_len, window=0)
    op = torch.ops.hf_kvplug.attend_with_kvcache

    def step(q, k, v, k_cache, v_cache, k_scale, v_scale, block_table, cache_seqlens, cache_starts):
        return op(q, k, v, k_cache, v_cache, k_scale, v_scale, block_table, cache_seqlens, cache_starts,
                  case.valid, case.status, case.softmax_scale, 0)

    eager, compiled = case.buffers(), case.buffers()
    args = (case.q, case.k, case.v)
    tables = (case.block_table, case.cache_seqlens, case.cache_starts)
    out_eager = step(*args, *eager, *tables)
    out_compiled = torch.compile(step, fullgraph=True)(*args, *compiled, *tables)
    torch.testing.assert_close(out_compiled, out_eager, rtol=0, atol=0)
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_decode_cuda_graph_replay_follows_lengths():
    """One captured decode replayed at growing lengths: the splits follow the live length, not the capture."""
    case = Case("fp16", 128, (32, 8), 16, 1, seqlens=[5, 100, 0], starts=[0, 0, 0], max_blocks=64)
    bufs = case.buffers()
    ref_bufs = case.buffers()
    seqlens = case.cache_seqlens.clone()
    args = (case.q, case.k, case.v, *bufs, case.block_table, seqlens, case.cache_starts, case.valid, case.status,
            case.softmax_scale, 0)
    kernels.attend_with_kvcache(*args)  # warm up / compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernels.attend_with_kvcache(*args)
    for step in range(3):
        seqlens.copy_(case.cache_seqlens + 200 * step)
        graph.replay()
        want = R.attend_with_kvcache_ref(case.q, case.k, case.v, *ref_bufs, case.block_table, seqlens,
                                         case.cache_starts, case.valid, case.status.clone(), case.softmax_scale, 0)
        torch.testing.assert_close(out.float(), want.float(), rtol=0, atol=4e-3)


# ------------------------------------------- flash_attn_with_kvcache's semantics: any n_new, attend only, non-causal

def flash_oracle(q, keys, values, seqlens, starts, n_new, causal, window, softmax_scale):
    """fp64 attention written from flash_attn_with_kvcache's definition, independently of `R.visible_slots`: row b
    holds seqlens[b] + n_new tokens after the call, query i sits at slot total - q_len + i and sees the slots from
    max(start, slot - window + 1) to its own (causal) or to the row's last; a query that sees nothing gives 0."""
    batch, q_len, nheads, _ = q.shape
    group = nheads // keys.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    for b in range(batch):
        total = int(seqlens[b]) + n_new
        for i in range(q_len):
            pos = total - q_len + i
            hi = pos if causal else total - 1
            lo = max(int(starts[b]), pos - window + 1 if window > 0 else 0, 0)
            if hi < lo:
                continue
            k = keys[b, :, lo:hi + 1].repeat_interleave(group, 0)  # [H, n, D]
            v = values[b, :, lo:hi + 1].repeat_interleave(group, 0)
            probs = (torch.einsum("hd,hnd->hn", q[b, i].double(), k) * softmax_scale).softmax(-1)
            out[b, i] = torch.einsum("hn,hnd->hd", probs, v)
    return out


def _flash_case(kind, heads, q_len, n_new, window=0):
    bs = 16
    seqlens = [0, 1, bs - 1, bs + 3, 3 * bs + 7] if n_new == 0 else [1, 2, bs - 1, bs + 3, 3 * bs + 7]
    case = Case(kind, 64, heads, bs, n_new, window, seqlens=seqlens, starts=[0, 3, 2, 5, 9])  # row 1: all padding
    case.queries = torch.randn(case.batch, q_len, case.nheads, 64, device=DEVICE).to(case.dtype)
    return case


FLASH_SHAPES = [(1, 0), (1, 1), (4, 0), (3, 1), (5, 5), (6, 2), (2, 5)]  # (q_len, n_new)


@pytest.mark.parametrize("kind", ["fp16", "int8", "int4"])
@pytest.mark.parametrize("q_len, n_new", FLASH_SHAPES, ids=[f"q{q}-new{n}" for q, n in FLASH_SHAPES])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_flash_attn_with_kvcache_semantics(kind, q_len, n_new, causal):
    """As flash_attn_with_kvcache: k/v of any length (none: attend only) appended at cache_seqlens, the queries the
    rows' last q_len tokens, causal or not; MHA, GQA and MQA, a window on some. The kernel and the reference match an
    fp64 attention written from that definition, and write exactly the new tokens."""
    i = FLASH_SHAPES.index((q_len, n_new))
    heads = [(6, 6), (6, 3), (6, 1)][i % 3]
    window = 7 if i % 2 else 0
    case = _flash_case(kind, heads, q_len, n_new, window)
    q = case.queries
    bufs, ref_bufs, ref64_bufs = case.buffers(), case.buffers(), case.buffers()
    args = (case.k, case.v)
    out = kernels.attend_with_kvcache(q, *args, *bufs, *case.tables(), case.cache_starts, case.valid, case.status,
                                      case.softmax_scale, window, causal)
    out_pt = R.attend_with_kvcache_ref(q, *args, *ref_bufs, *case.tables(), case.cache_starts, case.valid,
                                       case.status.clone(), case.softmax_scale, window, causal=causal)
    nb = case.block_table.shape[1]

    def oracle(qq, cache):
        keys = R.gather_kv(cache[0], cache[2], case.block_table, case.batch, nb, torch.float64)
        values = R.gather_kv(cache[1], cache[3], case.block_table, case.batch, nb, torch.float64)
        return flash_oracle(qq, keys, values, case.cache_seqlens, case.cache_starts, n_new, causal, window,
                            case.softmax_scale)

    # the reference's semantics, exactly: run it in fp64 over the same cache
    out64 = R.attend_with_kvcache_ref(q.double(), case.k.double(), case.v.double(), *ref64_bufs, *case.tables(),
                                      case.cache_starts, case.valid, case.status.clone(), case.softmax_scale, window,
                                      causal=causal)
    torch.testing.assert_close(out64, oracle(q, ref64_bufs), rtol=1e-9, atol=1e-9)
    assert int(case.status) == 0
    assert_cache_written(case, bufs, ref_bufs)
    assert_untouched(case, bufs, case.buffers())
    case.q = q  # assert_attention_close reads the dtype only
    assert_attention_close(case, out, out_pt, oracle(q, ref_bufs))


@pytest.mark.parametrize("kind", ["fp16", "int8", "int4"])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_attend_only_decode_splits(kind, num_splits, monkeypatch):
    """Attend only with one query (the split-KV decode kernel, nothing written): any split count, rows of every
    length, an empty row giving 0; the cache is left exactly as it was."""
    monkeypatch.setattr(DA, "decode_config", lambda head_dim, kind, elem_size=2: (16, 4, 1))
    case = _flash_case(kind, (8, 2), 1, 0)
    bufs = case.buffers()
    out = DA.decode_attn(case.queries, case.k, case.v, *bufs, *case.tables(), case.cache_starts, case.valid,
                         case.status, case.softmax_scale, 0, num_splits=num_splits)
    for a, b in zip(bufs, case.buffers()):
        assert torch.equal(a, b)
    keys = R.gather_kv(bufs[0], bufs[2], case.block_table, case.batch, case.block_table.shape[1], torch.float64)
    values = R.gather_kv(bufs[1], bufs[3], case.block_table, case.batch, case.block_table.shape[1], torch.float64)
    want = flash_oracle(case.queries, keys, values, case.cache_seqlens, case.cache_starts, 0, True, 0,
                        case.softmax_scale)
    assert torch.equal(out[0], torch.zeros_like(out[0]))  # row 0 holds nothing
    torch.testing.assert_close(out.double(), want, rtol=0, atol=4e-3)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_public_attend_only_and_lost_slots(backend):
    """`ops.attend_with_kvcache(q, None, None, ...)` attends without writing; k/v of another length than q follow the
    same rule; on the CPU a new token with no slot raises before anything is written, whatever the query count."""
    from hf_kvplug import ops
    case = _flash_case("fp16", (6, 3), 3, 0)
    bufs = case.buffers()
    out = ops.attend_with_kvcache(case.queries, None, None, *bufs, *case.tables(), case.cache_starts,
                                  case.softmax_scale, cache_valid=case.valid, backend=backend)
    for a, b in zip(bufs, case.buffers()):
        assert torch.equal(a, b)
    nb = case.block_table.shape[1]
    keys = R.gather_kv(bufs[0], bufs[2], case.block_table, case.batch, nb, torch.float64)
    values = R.gather_kv(bufs[1], bufs[3], case.block_table, case.batch, nb, torch.float64)
    want = flash_oracle(case.queries, keys, values, case.cache_seqlens, case.cache_starts, 0, True, 0,
                        case.softmax_scale)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=4e-3)
    with pytest.raises(ValueError, match="both tensors, or both None"):
        ops.attend_with_kvcache(case.queries, case.k, None, *bufs, *case.tables(), case.cache_starts, 1.0,
                                backend=backend)
    full = _flash_case("fp16", (6, 3), 2, 3)
    seqlens = full.cache_seqlens.clone()
    seqlens[-1] = full.block_table.shape[1] * 16 - 2  # 3 new tokens, room for 2
    bufs = full.buffers()
    with pytest.raises(ValueError, match="no cache slot for 1 of its 3 new tokens"):
        ops.attend_with_kvcache(full.queries, full.k, full.v, *bufs, full.block_table, seqlens, full.cache_starts,
                                1.0, backend=backend)
    for a, b in zip(bufs, full.buffers()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["fp16", "int8"])
@pytest.mark.parametrize("q_len, n_new", [(1, 1), (4, 2), (3, 0)])
def test_flash_attn_paged_layout_as_a_view(kind, q_len, n_new):
    """flash_attn_with_kvcache's paged cache is `[num_blocks, page_size, nheads_k, d]`: its transposed view (any
    strides but the last) is a valid cache here; the kernels and the reference read and write through it exactly as
    through ours."""
    case = _flash_case(kind, (6, 3), q_len, n_new)
    as_flash = lambda bufs: [t.transpose(1, 2).contiguous().transpose(1, 2) if t.numel() else t  # noqa: E731
                             for t in bufs]
    flash = as_flash(case.buffers())
    assert flash[0].stride(2) == case.nheads_k * 64  # slots stride over the heads: flash's page layout
    mine = case.buffers()
    args = (case.queries, case.k, case.v)
    tail = (*case.tables(), case.cache_starts, case.valid, case.status, case.softmax_scale, 0)
    out_flash = kernels.attend_with_kvcache(*args, *flash, *tail)
    out_mine = kernels.attend_with_kvcache(*args, *mine, *tail)
    assert torch.equal(out_flash, out_mine)
    for a, b in zip(flash, mine):
        assert torch.equal(a, b)
    flash_ref = as_flash(case.buffers())
    mine_ref = case.buffers()
    got = R.attend_with_kvcache_ref(*args, *flash_ref, *case.tables(), case.cache_starts, case.valid,
                                    case.status.clone(), case.softmax_scale)
    want = R.attend_with_kvcache_ref(*args, *mine_ref, *case.tables(), case.cache_starts, case.valid,
                                     case.status.clone(), case.softmax_scale)
    assert torch.equal(got, want) and all(torch.equal(a, b) for a, b in zip(flash_ref, mine_ref))


@pytest.mark.parametrize("q_len, n_new, causal", [(4, 4, False), (4, 4, True), (1, 30, True), (2, 30, True)])
def test_lost_new_tokens_reach_every_query_that_sees_them(q_len, n_new, causal):
    """A new token that finds no slot (an unmapped block mid-row) is not silent for the queries that would see it:
    non-causal queries, a query after it when there are more new tokens than queries, and the query at its slot get
    NaN, in the kernel (which never reads block -1) as in the reference; queries before it stay finite."""
    case = _flash_case("fp16", (6, 3), q_len, n_new)
    row, start = 4, 62 if n_new == 4 else 54  # new tokens from block 3 into block 4 (slots 64-79), unmapped
    case.cache_seqlens[row] = start
    case.block_table[row, 4] = -1
    bufs, ref_bufs = case.buffers(), case.buffers()
    status, ref_status = torch.zeros_like(case.status), torch.zeros_like(case.status)
    args = (case.queries, case.k, case.v)
    out = kernels.attend_with_kvcache(*args, *bufs, *case.tables(), case.cache_starts, case.valid, status,
                                      case.softmax_scale, 0, causal)
    out_pt = R.attend_with_kvcache_ref(*args, *ref_bufs, *case.tables(), case.cache_starts, case.valid, ref_status,
                                       case.softmax_scale, causal=causal)
    assert int(status) == 1 and int(ref_status) == 1
    slots = start + n_new - q_len + torch.arange(q_len)
    lost_slots = [t for t in range(start, start + n_new) if 64 <= t < 80]
    assert lost_slots
    want = torch.tensor([not causal or s >= lost_slots[0] for s in slots.tolist()])
    for o in (out, out_pt):
        assert torch.equal(torch.isnan(o[row]).all(-1).all(-1).cpu(), want)
        assert torch.isfinite(o[:row]).all() and torch.isfinite(o[row][~want.to(o.device)]).all()
    torch.testing.assert_close(out[:row].float(), out_pt[:row].float(), rtol=0, atol=4e-3)


@pytest.mark.parametrize("q_len, n_new", [(1, 1), (1, 0), (3, 3)])
def test_an_empty_batch_returns_an_empty_output(q_len, n_new):
    case = _flash_case("fp16", (6, 3), q_len, n_new)
    q, k = case.queries[:0], case.k[:0]
    for run in (kernels.attend_with_kvcache, R.attend_with_kvcache_ref):
        out = run(q, k, k, *case.buffers(), *case.tables(), case.cache_starts, case.valid, case.status.clone(),
                  case.softmax_scale, 0)
        assert out.shape == q.shape
