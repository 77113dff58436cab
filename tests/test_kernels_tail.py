"""The int4 kernels with the exact tail (rule 4 of hf_kvplug/reference.py) against the reference, on the CPU
interpreter or a GPU: each row's last, partial block is written to and read from `k_tail, v_tail` unquantized."""

import pytest
import torch

from hf_kvplug import reference as R
from oracle import attend_fp64_ref
from test_kernels import DEVICE, Case, assert_attention_close, assert_quantized_close

kernels = pytest.importorskip("hf_kvplug.kernels")
from hf_kvplug.kernels import decode_attn as DA  # noqa: E402

pytestmark = pytest.mark.interpreter

BS = 16
# rows' lengths after the call: partial block empty (L % BS == 0), 1 token, many; all in the tail; long; one block
LENGTHS = [16, 17, 31, 5, 55, 32]
STARTS = [0, 3, 0, 2, 9, 0]  # leading padding
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def tail_case(dtype, n_new, q_len=None, lengths=LENGTHS, starts=STARTS, window=0, holes=False, heads=(8, 2),
              head_dim=64, causal=True):
    """An int4 Case for a model of `dtype` whose rows hold `lengths` (>= n_new) tokens after the call, `n_new` of them
    new, with `q_len` queries (default: one per new token, at least one) and exact tails of random values unlike the
    pool's, so that reading one for the other shows: what the call does not write there stands for the partial
    block's older tokens."""
    case = Case("int4", head_dim, heads, BS, max(n_new, 1), window, seqlens=[n - n_new for n in lengths],
                starts=starts, holes=holes)
    case.dtype, case.n_new, case.causal = dtype, n_new, causal
    case.q_len = q_len or max(n_new, 1)
    case.q = torch.randn(case.batch, case.nheads, case.q_len, head_dim, device=DEVICE).to(dtype).transpose(1, 2)
    case.k, case.v = case.k[:, :n_new].to(dtype), case.v[:, :n_new].to(dtype)
    shape = (case.batch, case.nheads_k, BS, head_dim)
    case.tails = [(torch.randn(shape, device=DEVICE) * 2 + 1).to(dtype) for _ in range(2)]  # the pool's are randn
    return case


def run_kernel(case, bufs, tails, status=None, **kw):
    k_tail, v_tail = tails if tails is not None else (None, None)
    return kernels.attend_with_kvcache(case.q, case.k, case.v, *bufs, *case.tables(), case.cache_starts, case.valid,
                                       case.status if status is None else status, case.softmax_scale, case.window,
                                       case.causal, k_tail=k_tail, v_tail=v_tail, **kw)


def run_reference(case, bufs, tails, status=None):
    return R.attend_with_kvcache_ref(case.q, case.k, case.v, *bufs, *case.tables(), case.cache_starts, case.valid,
                                     case.status.clone() if status is None else status, case.softmax_scale,
                                     case.window, causal=case.causal, k_tail=tails[0], v_tail=tails[1])


def tail_bounds(case):
    """([B] first slot read from the tail, [B] row length after the call), int64."""
    lo = R.tail_starts(case.cache_seqlens, case.batch, case.n_new, BS)
    return lo, case.cache_seqlens[: case.batch].long() + case.n_new


def seen_slots(case, num_slots):
    return R.visible_slots(case.cache_seqlens, case.cache_starts, case.valid, case.batch, case.q_len, case.window,
                           num_slots, case.n_new, case.causal)


def tail_oracle(case, bufs, tails):
    """fp64 attention over the pool's contents in `bufs` (dequantized), the tail's in `tails` from each row's tail
    start on."""
    nb = case.block_table.shape[1]
    keys = R.gather_kv(bufs[0], bufs[2], case.block_table, case.batch, nb, torch.float64)
    values = R.gather_kv(bufs[1], bufs[3], case.block_table, case.batch, nb, torch.float64)
    lo, end = tail_bounds(case)
    keys, values = R.overlay_tail(keys, tails[0], lo, end), R.overlay_tail(values, tails[1], lo, end)
    return attend_fp64_ref(case.q, keys, values, seen_slots(case, keys.shape[2]), case.softmax_scale)


def check_tail(case, **kw):
    """Kernel vs reference with the tail: the tails after the call equal (a copy of the inputs), the pools hold what
    the kernel writes without a tail, the output is as close to the fp64 oracle as the reference's, and differs from
    the output without a tail (the tail was read)."""
    bufs, ref_bufs, plain_bufs = case.buffers(), case.buffers(), case.buffers()
    tails, ref_tails = [t.clone() for t in case.tails], [t.clone() for t in case.tails]
    out = run_kernel(case, bufs, tails, **kw)
    out_pt = run_reference(case, ref_bufs, ref_tails)
    plain = run_kernel(case, plain_bufs, None, **kw)
    assert int(case.status) == 0
    for got, want in zip(tails, ref_tails):
        assert torch.equal(got, want)
    for got, want in zip(bufs, plain_bufs):
        assert torch.equal(got, want)
    assert_quantized_close(bufs, ref_bufs)
    assert_attention_close(case, out, out_pt, tail_oracle(case, ref_bufs, ref_tails))
    assert (out.float() - plain.float()).abs().max() > 4 * (out.float() - out_pt.float()).abs().max()
    return out


# each dtype once with a new token in several splits, the other combinations spread over them (CI's time)
DECODE = [("fp16", 1, 1), ("fp16", 1, 3), ("fp16", 0, 3), ("bf16", 1, 3), ("bf16", 0, 1), ("fp32", 1, 3)]


@pytest.mark.parametrize("dtype, n_new, num_splits", DECODE, ids=[f"{d}-{'new' if n else 'attend_only'}-s{s}"
                                                                  for d, n, s in DECODE])
def test_decode_with_tail(dtype, n_new, num_splits, monkeypatch):
    """One query, with a new token (written to the tail when its row's partial block holds it) or attend only, in one
    split or several (tiles of 16: the tail lies in one split, the int4 tiles in others)."""
    monkeypatch.setattr(DA, "decode_config", lambda head_dim, kind, elem_size=2: (16, 4, 1))
    check_tail(tail_case(DTYPES[dtype], n_new), num_splits=num_splits)


@pytest.mark.parametrize("holes, window", [(True, 0), (False, 11), (True, 7)])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_with_tail_masks_and_window(holes, window, num_splits, monkeypatch):
    """Holes in the slot mask (in the tail too, and one row's new token masked out) and a window that starts inside
    the tail on some rows."""
    monkeypatch.setattr(DA, "decode_config", lambda head_dim, kind, elem_size=2: (16, 4, 1))
    check_tail(tail_case(torch.float16, 1, window=window, holes=holes), num_splits=num_splits)


EXTEND = [("fp16", 5, 5), ("bf16", 5, 5), ("fp32", 2, 5), ("fp16", 3, 0), ("bf16", 2, 5)]


@pytest.mark.parametrize("dtype, q_len, n_new", EXTEND, ids=[f"{d}-q{q}-new{n}" for d, q, n in EXTEND])
def test_extend_with_tail(dtype, q_len, n_new):
    """Several queries (5 new tokens crossing a block boundary on some rows; attend only; fewer queries than new
    tokens): the write kernel fills the tail, the extend kernel reads it."""
    check_tail(tail_case(DTYPES[dtype], n_new, q_len))


@pytest.mark.parametrize("causal, holes, window", [(True, False, 0), (False, True, 9)], ids=["causal", "full-holes-w9"])
def test_long_extend_with_tail(causal, holes, window):
    """More new tokens than a block (37 over rows ending with 5, 0, 2 and 15 tokens in their partial block): only the
    last ones land in the tail, and queries read it from programs whose tiles cover the int4 part too. fp16: the tail
    holds new tokens only, whose int4 codes differ from them by less than bf16's rounding of the output."""
    case = tail_case(torch.float16, 37, lengths=[37, 48, 50, 63], starts=[0, 2, 0, 5], window=window, holes=holes,
                     heads=(4, 1), causal=causal)
    check_tail(case)


@pytest.mark.parametrize("dtype, q_len", [("fp16", 1), ("bf16", 5), ("fp32", 5), ("bf16", 37)])
def test_write_with_tail(dtype, q_len):
    """The write kernel alone: the tail receives exactly the new tokens of each row's partial block, in the model
    dtype, and the pool exactly what it receives without a tail."""
    case = tail_case(DTYPES[dtype], q_len, lengths=[37, 48, 50, 63], starts=[0] * 4, heads=(4, 1))
    bufs, ref_bufs, plain_bufs = case.buffers(), case.buffers(), case.buffers()
    tails, ref_tails = [t.clone() for t in case.tails], [t.clone() for t in case.tails]
    kernels.write_kvcache(case.k, case.v, *bufs, *case.tables(), case.status, *tails)
    R.write_kvcache_ref(case.k, case.v, *ref_bufs, *case.tables(), case.status.clone(), *ref_tails)
    kernels.write_kvcache(case.k, case.v, *plain_bufs, *case.tables(), case.status)
    for got, want in zip(tails, ref_tails):
        assert torch.equal(got, want)
    for got, want in zip(bufs, plain_bufs):
        assert torch.equal(got, want)
    assert_quantized_close(bufs, ref_bufs)
    lo, end = tail_bounds(case)
    written = [(b, t) for b in range(case.batch) for t in range(int(end[b]) - q_len, int(end[b])) if t >= lo[b]]
    assert written  # the rows' new tokens in their partial block, none on the row ending with a full block
    for b, t in written:
        assert torch.equal(tails[0][b, :, t % BS], case.k[b, t - int(case.cache_seqlens[b])])


@pytest.mark.parametrize("q_len, n_new", [(1, 1), (6, 6), (2, 6)])
def test_lost_token_is_not_written_to_tail(q_len, n_new):
    """A new token in an unmapped block finds no slot: status set, the queries that would see it NaN as in the
    reference, and neither the pool nor the tail written for it (the tail keeps the caller's values there)."""
    lost = 1 if n_new == 1 else 3
    case = tail_case(torch.float16, n_new, q_len, lengths=[17, 31, 48 + lost], starts=[0, 3, 2])
    row = 2  # its last `lost` new tokens in block 3 (slots 48-63), unmapped: its partial block
    case.block_table[row, 3] = -1
    bufs, ref_bufs = case.buffers(), case.buffers()
    tails, ref_tails = [t.clone() for t in case.tails], [t.clone() for t in case.tails]
    status, ref_status = torch.zeros_like(case.status), torch.zeros_like(case.status)
    out = run_kernel(case, bufs, tails, status)
    out_pt = run_reference(case, ref_bufs, ref_tails, ref_status)
    assert int(status) == 1 and int(ref_status) == 1
    for got, want, before in zip(tails, ref_tails, case.tails):
        assert torch.equal(got, want)
        assert torch.equal(got[row], before[row])  # the row's partial block is block 3: nothing written there
    assert torch.equal(torch.isnan(out), torch.isnan(out_pt))
    assert torch.isnan(out[row, -1]).all() and torch.isfinite(out[:row]).all()
    finite = torch.isfinite(out_pt)
    torch.testing.assert_close(out[finite].float(), out_pt[finite].float(), rtol=0, atol=4e-3)
    assert_quantized_close(bufs, ref_bufs)


GARBAGE = [(1, 1, 1, False), (1, 1, 3, True), (1, 0, 3, False), (6, 6, None, True), (3, 0, None, False)]


@pytest.mark.parametrize("q_len, n_new, num_splits, holes", GARBAGE)
def test_tail_garbage_never_leaks(q_len, n_new, num_splits, holes, monkeypatch):
    """NaN in every tail position whose slot no token of the row sees (past the row's end, the whole tail of a row
    ending with a full block, before its start, masked out) changes no output: only the slots a query reads enter
    the arithmetic."""
    monkeypatch.setattr(DA, "decode_config", lambda head_dim, kind, elem_size=2: (16, 4, 1))
    case = tail_case(torch.float16, n_new, q_len, lengths=[16, 17, 31, 7, 55, 32], holes=holes,
                     starts=[0, 3, 0, 2, 9, 2])
    lo, end = tail_bounds(case)
    seen = seen_slots(case, case.block_table.shape[1] * BS).any(1)  # [B, T]: slots some query of the row sees
    dirty = [t.clone() for t in case.tails]
    for b in range(case.batch):
        for t in range(int(lo[b]), int(lo[b]) + BS):
            if t >= end[b] or not seen[b, t]:
                for tail in dirty:
                    tail[b, :, t % BS] = float("nan")
    kw = dict(num_splits=num_splits) if q_len == 1 else {}
    clean = run_kernel(case, case.buffers(), [t.clone() for t in case.tails], **kw)
    ref_tails = [t.clone() for t in dirty]
    run_reference(case, case.buffers(), ref_tails)
    got = run_kernel(case, case.buffers(), dirty, **kw)
    assert torch.isfinite(got).all()
    assert torch.equal(got, clean)
    for a, b in zip(dirty, ref_tails):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("kind", ["fp16", "int8"])
def test_tail_refused_without_int4(kind):
    """Only int4 caches keep an exact tail; int4 refuses ALiBi, softcap and the log-sum-exp, with a tail as without."""
    case = Case(kind, 64, (4, 2), BS, 1)
    tails = [torch.zeros(case.batch, 2, BS, 64, dtype=case.dtype, device=DEVICE) for _ in range(2)]
    with pytest.raises(NotImplementedError, match="int4 caches only"):
        kernels.attend_with_kvcache(case.q, case.k, case.v, *case.buffers(), *case.tables(), case.cache_starts,
                                    case.valid, case.status, case.softmax_scale, 0, k_tail=tails[0], v_tail=tails[1])
    with pytest.raises(NotImplementedError, match="int4 caches only"):
        kernels.write_kvcache(case.k, case.v, *case.buffers(), *case.tables(), case.status, *tails)
    int4 = tail_case(torch.float16, 1)
    with pytest.raises(NotImplementedError, match="softcap"):
        run_kernel(int4, int4.buffers(), int4.tails, softcap=5.0)
