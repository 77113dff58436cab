"""`hf_kvplug.flash_attn_with_kvcache` against flash-attention's own definition of `flash_attn_with_kvcache`.

The oracle is written here from flash-attention's documentation and test reference (attention over the updated
cache, key padding from cache_seqlens / cache_leftpad, causal and local masks aligned to the bottom right, ALiBi,
softcap, rotary embedding of q and the new k), in fp64. The error rule is flash-attention's: the kernel's error is at
most a small multiple of a same-dtype PyTorch computation's, plus 1e-5. Both backends are checked: the Triton kernels
(the CPU interpreter here, the GPU where there is one) and the PyTorch reference.
"""

import math
import random
import zlib

import pytest
import torch

from hf_kvplug import flash_attn_with_kvcache

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.interpreter


def rotary(x, cos, sin, pos, interleaved):
    """Rotary embedding as flash_attn.layers.rotary.apply_rotary_emb computes it (fp32 math, rounded once to x's
    dtype): x [B, L, H, D] at positions pos [B, L]; the first 2 * cos.shape[1] dims rotate, the rest pass through."""
    rd = 2 * cos.shape[1]
    c, s = cos.float()[pos][:, :, None], sin.float()[pos][:, :, None]
    xr = x[..., :rd].float()
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rot = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], -1).flatten(-2)
    else:
        x1, x2 = xr.chunk(2, -1)
        rot = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], -1)
    return torch.cat([rot.to(x.dtype), x[..., rd:]], -1)


def attention(q, k, v, key_padding_mask, leftpad, causal, window_size, alibi_slopes, softcap, upcast=True):
    """flash-attention's reference: q [B, Lq, H, D], k/v [B, S, Hk, D] (the updated cache rows), key_padding_mask
    [B, S]; positions relative to each row's leftpad, queries aligned to its last valid key. -> (out, lse)."""
    dtype = q.dtype
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    batch, sq, nheads, d = q.shape
    seqlen_k = k.shape[1]
    scores = torch.einsum("bthd,bshd->bhts", q, k / math.sqrt(d))
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    sk = key_padding_mask.sum(-1)[:, None, None, None]  # valid keys per row
    row = torch.arange(sq, device=q.device)[:, None]
    col = torch.arange(seqlen_k, device=q.device) - leftpad[:, None, None, None]  # [B, 1, 1, S], relative
    pos = row + sk - sq  # the query's position among the row's keys
    if alibi_slopes is not None:
        slopes = alibi_slopes.double().reshape(-1, nheads)[:, :, None, None]
        scores = scores - (slopes * (pos - col).abs()).to(scores.dtype)
    masked = ~key_padding_mask[:, None, None, :]
    left, right = window_size
    if causal:
        right = 0
    if right >= 0:
        masked = masked | (col > pos + right)
    if left >= 0:
        masked = masked | (col < pos - left)
    scores = scores.masked_fill(masked, float("-inf"))
    lse = torch.logsumexp(scores.double(), -1)
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    out = torch.einsum("bhts,bshd->bthd", probs, v)
    return out.to(dtype), torch.where(lse == float("-inf"), float("inf"), lse)


# (seqlen_q, seqlen_k, d, layout, mha_type, causal, local, new_kv, rotary, alibi, softcap): one line per case; every
# option meets both query counts (decode kernel and extend kernel), GQA/MQA and an odd head_dim somewhere
CASES = [
    (1, 67, 64, "contiguous", "gqa", True, False, True, 0.0, False, 0.0),
    (1, 67, 59, "batch_idx", "mqa", False, False, True, 1.0, False, 0.0),
    (1, 67, 64, "leftpad", "mha", True, True, True, 0.5, True, 0.0),
    (1, 80, 64, "paged", "gqa", True, False, False, 0.0, True, 0.0),
    (1, 67, 32, "paged", "gqa", False, True, True, 0.0, False, 30.0),
    (1, 67, 64, "contiguous", "mha", True, False, False, 0.0, False, 0.0),
    (4, 67, 64, "contiguous", "gqa", True, False, True, 1.0, False, 0.0),
    (4, 67, 59, "leftpad", "mqa", False, True, True, 0.5, False, 0.0),
    (5, 67, 64, "batch_idx", "gqa", False, False, True, 0.0, True, 0.0),
    (5, 67, 32, "paged", "mha", True, True, True, 1.0, True, 0.0),
    (3, 45, 64, "paged", "mqa", False, True, False, 0.0, False, 0.0),
    (6, 45, 64, "contiguous", "gqa", True, False, True, 0.0, False, 20.0),
    (7, 45, 64, "leftpad", "gqa", False, False, False, 0.0, True, 10.0),
    (20, 9, 32, "contiguous", "mha", True, False, False, 0.0, False, 0.0),  # more queries than keys, attend only
    (7, 45, 64, "contiguous", "gqa", False, (4, 1), True, 0.5, True, 0.0),  # windows that bind on both sides
    (6, 45, 32, "paged", "mha", False, (-1, 2), False, 0.0, False, 0.0),
]


def _random_case(seed: int) -> tuple:
    """A case drawn at random over every option above (more head dims, lengths, windows and caps), for coverage beyond
    the hand-picked lines; the same rule holds it."""
    r = random.Random(seed)
    sq = r.choice([1, 1, 1, 2, 3, 5, 8, 17])
    local = r.choice([False, False, True, (r.randint(0, 10), r.randint(0, 5)), (-1, r.randint(0, 3)),
                      (r.randint(0, 8), -1)])
    new_kv = r.random() < 0.6
    return (sq, r.randint(sq + 2, 96), r.choice([16, 32, 59, 64, 80, 128]),
            r.choice(["contiguous", "batch_idx", "leftpad", "paged"]), r.choice(["mha", "gqa", "mqa"]),
            r.random() < 0.5, local, new_kv, r.choice([0.0, 0.0, 0.5, 1.0]) if new_kv else 0.0, r.random() < 0.25,
            r.choice([0.0, 0.0, 0.0, 5.0, 30.0]))


CASES += [_random_case(seed) for seed in range(16)]


def _ids(case):
    sq, sk, d, layout, mha, causal, local, new_kv, rot, alibi, cap = case
    window = f"-w{local[0]}.{local[1]}" if isinstance(local, tuple) else ""
    return (f"q{sq}-k{sk}-d{d}-{layout}-{mha}-{'causal' if causal else 'full'}{'-local' if local else ''}{window}"
            f"{'-new' if new_kv else ''}{f'-rot{rot}' if rot else ''}{'-alibi' if alibi else ''}"
            f"{f'-cap{cap:g}' if cap else ''}")


@pytest.mark.parametrize("backend", ["triton", "reference", "auto"])  # auto: the PyTorch fast path off CUDA
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_flash_attn_with_kvcache(case, dtype, backend):
    seqlen_q, seqlen_k, d, layout, mha_type, causal, local, new_kv, rotary_fraction, alibi, softcap = case
    if backend == "triton" and dtype == torch.bfloat16 and not CUDA and (d % 16 or seqlen_q > 1):
        pytest.skip("the Triton interpreter's bf16 casts truncate: one bf16 layout per kernel is enough here")
    gen = torch.Generator().manual_seed(zlib.crc32(_ids(case).encode()))
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)  # noqa: E731
    batch, nheads = 3, 6
    nheads_k = {"mha": 6, "gqa": 2, "mqa": 1}[mha_type]
    batch_cache = 2 * batch if layout == "batch_idx" else batch
    rotary_dim = int(rotary_fraction * d) // 16 * 16
    seqlen_new = max(1, seqlen_q - 2) if new_kv else 0
    q = rand(batch, seqlen_q, nheads, d)
    k_new, v_new = (rand(batch, seqlen_new, nheads_k, d), rand(batch, seqlen_new, nheads_k, d)) if new_kv else (None,
                                                                                                             None)
    # lengths: an empty row (when nothing is appended it attends nothing), a short one, one at the end of the cache
    room = seqlen_k - (seqlen_q if (causal or local) and rotary_dim else seqlen_new)  # cos covers every position
    cache_seqlens = torch.tensor([0 if new_kv else 1, min(5, room), room], dtype=torch.int32, device=DEVICE)
    page = 16
    if layout == "paged":
        nblocks = math.ceil(seqlen_k / page)
        num_blocks = nblocks * batch + 3
        k_paged, v_paged = rand(num_blocks, page, nheads_k, d), rand(num_blocks, page, nheads_k, d)
        block_table = torch.randperm(num_blocks, generator=gen)[: batch * nblocks].view(batch, nblocks)
        block_table = block_table.to(device=DEVICE, dtype=torch.int32)
        idx = block_table.long().flatten()
        k_rows = k_paged[idx].reshape(batch, nblocks * page, nheads_k, d)[:, :seqlen_k]
        v_rows = v_paged[idx].reshape(batch, nblocks * page, nheads_k, d)[:, :seqlen_k]
    else:
        k_cache, v_cache = rand(batch_cache, seqlen_k, nheads_k, d), rand(batch_cache, seqlen_k, nheads_k, d)
        block_table = None
    batch_idx = (torch.randperm(batch_cache, generator=gen)[:batch].to(device=DEVICE, dtype=torch.int32)
                 if layout == "batch_idx" else None)
    leftpad = None
    if layout == "leftpad":
        leftpad = torch.stack([torch.randint(0, max(1, int(n)), (), generator=gen) for n in cache_seqlens])
        leftpad = leftpad.to(device=DEVICE, dtype=torch.int32)
    if layout != "paged":
        rows = batch_idx.long() if batch_idx is not None else torch.arange(batch, device=DEVICE)
        k_rows, v_rows = k_cache[rows], v_cache[rows]
    window_size = local if isinstance(local, tuple) else (-1, -1)
    if local is True:  # as flash-attention's test draws them
        window_size = tuple(int(w) for w in torch.randint(0, seqlen_k, (2,), generator=gen))
    slopes = torch.rand(batch, nheads, generator=gen).to(DEVICE) * 0.3 if alibi else None
    cos = sin = None
    q_ro, k_ro = q, k_new
    if rotary_dim:
        angle = torch.rand(seqlen_k, rotary_dim // 2, generator=gen).to(DEVICE) * 2 * math.pi
        cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
        interleaved = rotary_fraction == 1.0
        base = cache_seqlens.long()[:, None]
        q_pos = base + torch.arange(seqlen_q, device=DEVICE) * int(causal or window_size != (-1, -1))
        q_ro = rotary(q, cos, sin, q_pos.expand(batch, seqlen_q), interleaved)
        k_ro = rotary(k_new, cos, sin, base + torch.arange(seqlen_new, device=DEVICE), interleaved)

    # the cache rows as flash-attention's test expects them after the call
    k_ref, v_ref = k_rows.clone(), v_rows.clone()
    arange = torch.arange(seqlen_k, device=DEVICE)
    if new_kv:
        update = (arange >= cache_seqlens[:, None]) & (arange < cache_seqlens[:, None] + seqlen_new)
        k_ref[update] = k_ro.reshape(-1, nheads_k, d)
        v_ref[update] = v_new.reshape(-1, nheads_k, d)
    key_padding_mask = arange < cache_seqlens[:, None] + seqlen_new
    lp = torch.zeros(batch, dtype=torch.long, device=DEVICE) if leftpad is None else leftpad.long()
    key_padding_mask &= arange >= lp[:, None]
    want, want_lse = attention(q_ro, k_ref, v_ref, key_padding_mask, lp, causal, window_size, slopes, softcap)
    same_dtype, _ = attention(q_ro, k_ref, v_ref, key_padding_mask, lp, causal, window_size, slopes, softcap,
                              upcast=False)

    out, lse = flash_attn_with_kvcache(
        q, k_paged if layout == "paged" else k_cache, v_paged if layout == "paged" else v_cache, k_new, v_new,
        rotary_cos=cos, rotary_sin=sin, cache_seqlens=cache_seqlens, cache_batch_idx=batch_idx,
        cache_leftpad=leftpad, block_table=block_table, causal=causal, window_size=window_size, softcap=softcap,
        rotary_interleaved=rotary_fraction == 1.0, alibi_slopes=slopes, return_softmax_lse=True, backend=backend)

    if layout == "paged":
        idx = block_table.long().flatten()
        k_got = k_paged[idx].reshape(batch, -1, nheads_k, d)[:, :seqlen_k]
        v_got = v_paged[idx].reshape(batch, -1, nheads_k, d)[:, :seqlen_k]
    else:
        k_got, v_got = k_cache[rows], v_cache[rows]
    torch.testing.assert_close(k_got, k_ref, rtol=1e-3, atol=1e-3)  # rotary rounds once, in the model dtype
    assert torch.equal(v_got, v_ref)
    err = (out.double() - want.double()).abs().max().item()
    pt_err = (same_dtype.double() - want.double()).abs().max().item()
    assert err <= (5 if alibi else 3) * pt_err + 1e-5, (err, pt_err)
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), finite.cpu() if lse.device.type == "cpu" else finite)
    assert (lse[~finite] == float("inf")).all()  # a query that sees nothing: +inf, as flash-attention
    torch.testing.assert_close(lse[finite].double(), want_lse[finite], rtol=0, atol=2e-3)


def test_flash_api_errors():
    q = torch.randn(2, 1, 4, 32, device=DEVICE, dtype=torch.float16)
    cache = torch.randn(2, 16, 2, 32, device=DEVICE, dtype=torch.float16)
    new = torch.randn(2, 1, 2, 32, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="both tensors, or both None"):
        flash_attn_with_kvcache(q, cache, cache.clone(), new)
    with pytest.raises(ValueError, match="one dtype"):
        flash_attn_with_kvcache(q.float(), cache, cache.clone())
    with pytest.raises(ValueError, match="cache_batch_idx with block_table"):
        flash_attn_with_kvcache(q, cache, cache.clone(), block_table=torch.zeros(2, 1, dtype=torch.int32),
                                cache_batch_idx=torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="pass k and v"):
        flash_attn_with_kvcache(q, cache, cache.clone(), rotary_cos=torch.ones(16, 8), rotary_sin=torch.ones(16, 8))
    if not CUDA:  # on the CPU: raised before anything is written
        k_cache, v_cache = cache.clone(), cache.clone()
        with pytest.raises(ValueError, match="rotary position 16 is past rotary_cos"):
            flash_attn_with_kvcache(q, k_cache, v_cache, new, new, rotary_cos=torch.ones(16, 8, dtype=q.dtype),
                                    rotary_sin=torch.ones(16, 8, dtype=q.dtype), cache_seqlens=16 - 0, causal=True)
        with pytest.raises(ValueError, match="no cache slot"):
            flash_attn_with_kvcache(q, k_cache, v_cache, new, new, cache_seqlens=16)
        assert torch.equal(k_cache, cache) and torch.equal(v_cache, cache)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_flash_api_num_splits_and_int_seqlens(num_splits):
    """num_splits is honoured by the split-KV decode kernel (same result and log-sum-exp, any count, softcap on); an
    int cache_seqlens and cache_seqlens=None (the whole cache) mean what they mean in flash-attention."""
    q = torch.randn(2, 1, 4, 64, device=DEVICE, dtype=torch.float16)
    k_cache = torch.randn(2, 300, 2, 64, device=DEVICE, dtype=torch.float16)
    v_cache = torch.randn_like(k_cache)
    got, lse = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=300, num_splits=num_splits,
                                       return_softmax_lse=True, softcap=15.0, backend="triton")
    whole = flash_attn_with_kvcache(q, k_cache, v_cache, softcap=15.0, backend="reference")
    mask = torch.ones(2, 300, dtype=torch.bool, device=DEVICE)
    want, want_lse = attention(q, k_cache, v_cache, mask, torch.zeros(2, dtype=torch.long, device=DEVICE), False,
                               (-1, -1), None, 15.0)
    torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=2e-3)
    torch.testing.assert_close(whole.double(), want.double(), rtol=0, atol=2e-3)
    torch.testing.assert_close(lse.double(), want_lse, rtol=0, atol=2e-3)  # the reduce kernel's lse when split


@pytest.mark.parametrize("q_len", [1, 4])
@pytest.mark.parametrize("cap", [50.0, 1e3, 1e6])
def test_softcap_accurate_for_any_cap(q_len, cap):
    """fp32 caches: the kernels' softcap (tanh from exp2, its series near 0) stays at fp32 accuracy for caps far
    above the scores (where 1 - 2 / (e^2y + 1) alone would cancel), in the output and the log-sum-exp."""
    gen = torch.Generator().manual_seed(q_len)
    q = (torch.randn(2, q_len, 4, 64, generator=gen) * 3).to(DEVICE)
    k_cache = torch.randn(2, 128, 2, 64, generator=gen).to(DEVICE)
    v_cache = torch.randn(2, 128, 2, 64, generator=gen).to(DEVICE)
    seqlens = torch.tensor([100, 128], dtype=torch.int32, device=DEVICE)
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, causal=True, softcap=cap,
                                       return_softmax_lse=True, backend="triton")
    mask = torch.arange(128, device=DEVICE) < seqlens[:, None]
    want, want_lse = attention(q, k_cache, v_cache, mask, torch.zeros(2, dtype=torch.long, device=DEVICE), True,
                               (-1, -1), None, cap)
    torch.testing.assert_close(out.double(), want.double(), rtol=0, atol=2e-5)
    torch.testing.assert_close(lse.double(), want_lse, rtol=0, atol=2e-5)


def test_a_window_as_long_as_the_cache_is_no_window():
    """As flash-attention: a window side at least the cache's length is dropped before the call is judged local, so
    non-causal queries keep one rotary position (cache_seqlens), exactly as with no window."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 4, 32, generator=gen).half().to(DEVICE)
    k_new, v_new = (torch.randn(2, 3, 2, 32, generator=gen).half().to(DEVICE) for _ in range(2))
    cache = torch.randn(2, 40, 2, 32, generator=gen).half().to(DEVICE)
    angle = torch.rand(40, 8, generator=gen).to(DEVICE) * 6.28
    cos, sin = angle.cos().half(), angle.sin().half()
    outs = []
    for window in ((-1, -1), (40, -1), (-1, 55), (40, 40)):
        k_cache, v_cache = cache.clone(), cache.clone()
        outs.append(flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, rotary_cos=cos, rotary_sin=sin,
                                            cache_seqlens=torch.tensor([5, 20], dtype=torch.int32, device=DEVICE),
                                            window_size=window, rotary_interleaved=False, backend="triton"))
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
