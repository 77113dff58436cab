"""The PyTorch fast path (`hf_kvplug.torchpath`, the non-CUDA backend "torch") equals the reference, its oracle: the
same cache contents bit for bit after the write, outputs within same-dtype rounding, in every layout a cache gives
it (consecutive blocks per row, rows one after another, shuffled and shared blocks), with windows, left padding,
holes, blind queries, attend-only calls, non-causal queries, INT8 and INT4, and stale NaN / Inf in slots no query
sees."""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

from hf_kvplug import ops, torchpath
from hf_kvplug.reference import attend_with_kvcache_ref, dequantize, quantize

TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.fixture(params=["dequantized", "products"])
def reads(request, monkeypatch):
    """How the fast path reads INT8 / INT4 spans: dequantized, then SDPA (short spans, `DEQUANT_SLOTS`), or through
    two products on the codes (long ones). Every test that reads codes runs both."""
    limit = 1 << 30 if request.param == "dequantized" else 0
    monkeypatch.setattr(torchpath, "DEQUANT_SLOTS", {"int8": limit, "int4": limit})
    return request.param


def _one_read(kv, reads):
    if kv is None and reads == "products":
        pytest.skip("K/V in the model dtype: no codes to read")


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    """The same values, stored heads first (as a PlugCache on the PyTorch path stores them)."""
    return t.transpose(0, 1).contiguous().transpose(0, 1) if t.dim() >= 3 else t


def _cache(batch, nheads_k, head_dim, block_size, max_blocks, dtype, kv, layout, seed, used=None, heads_first=False):
    """Buffers and a block table `[batch, max_blocks]` of `layout`; "adjacent": the first `used` blocks of each row
    follow the previous row's. `heads_first`: the buffers stored heads first."""
    g = torch.Generator().manual_seed(seed)
    nblocks = batch * max_blocks + 3
    storage = {"int8": torch.int8, "int4": torch.uint8}.get(kv, dtype)
    width = head_dim // 2 if kv == "int4" else head_dim
    shape = (nblocks, nheads_k, block_size, width)
    if kv is None:
        k_cache, v_cache = torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)
    else:  # valid codes and scales of random vectors
        codes = [quantize(torch.randn(*shape[:3], head_dim, generator=g), storage) for _ in range(2)]
        (k_cache, k_scale), (v_cache, v_scale) = codes
    if kv is None:
        k_scale = v_scale = torch.empty(0)
    if layout == "runs":  # each row's blocks consecutive, rows apart (a fresh pool, rows mapped ahead)
        table = torch.stack([torch.arange(max_blocks) + 3 + b * max_blocks for b in range(batch)])
    elif layout == "adjacent":
        table = torch.arange(batch * max_blocks).view(batch, max_blocks) + 1
        table[:, :used] = torch.arange(batch * used).view(batch, used) + 1
        table[:, used:] = torch.arange(batch * (max_blocks - used)).view(batch, -1) + 1 + batch * used
    elif layout == "shared":  # every row maps row 0's first blocks (a prompt stored once), then blocks of its own
        table = torch.randperm(nblocks, generator=g)[:batch * max_blocks].view(batch, max_blocks)
        table[:, :2] = table[0, :2].clone()
    else:
        table = torch.randperm(nblocks, generator=g)[:batch * max_blocks].view(batch, max_blocks)
    bufs = [k_cache, v_cache, k_scale, v_scale]
    return [_heads_first(t) if heads_first else t for t in bufs] + [table.to(torch.int32).contiguous()]


CASES = list(itertools.product(
    [torch.float32, torch.bfloat16, torch.float16], [None, "int8", "int4"], ["runs", "adjacent", "shuffled", "shared"],
    [(1, 0, True), (3, 0, True), (1, 5, True), (4, 6, True), (3, 0, False), (3, 5, False), (0, 0, True)]))


@pytest.mark.parametrize("path", ["dense", "blocks", "heads-first"])
@pytest.mark.parametrize("dtype, kv, layout, shape", CASES,
                         ids=[f"{str(d)[6:]}-{kv}-{lay}-L{s[0]}w{s[1]}{'' if s[2] else 'nc'}"
                              for d, kv, lay, s in CASES])
def test_fast_path_equals_the_reference(dtype, kv, layout, shape, path, monkeypatch, reads):
    """Every way of attending: a dense copy and SDPA (small calls, and rows whose blocks are not consecutive), the
    blocks read where they lie (rows of consecutive blocks, past DENSE_SLOTS), and buffers stored heads first (a
    PlugCache's on this path): each row's span viewed where it lies and given to SDPA, scattered rows gathered."""
    _one_read(kv, reads)
    if path == "blocks" and layout not in ("runs", "adjacent"):
        pytest.skip("scattered blocks are always gathered into a dense copy")
    monkeypatch.setattr(torchpath, "DENSE_SLOTS", 0 if path == "blocks" else 1 << 30)
    heads_first = path == "heads-first"
    q_len, window, causal = shape
    n_new = q_len if q_len else 0
    q_len = q_len or 2  # attend only: two queries, nothing written
    if kv == "int4" and dtype != torch.float32:
        pytest.skip("one dtype is enough for INT4's code path")
    batch, nheads, nheads_k, head_dim, bs, max_blocks = 3, 6, 2, 16, 4, 6
    seed = zlib.crc32(repr((str(dtype), kv, layout, shape)).encode()) % 1000  # the same in every process
    g = torch.Generator().manual_seed(seed)
    bufs = _cache(batch, nheads_k, head_dim, bs, max_blocks, dtype, kv, layout, seed, used=-(-(13 + n_new) // bs),
                  heads_first=heads_first)
    lengths = torch.tensor([7, 12, 16], dtype=torch.int32)
    if layout in ("runs", "adjacent"):  # all rows hold the same count, as a PlugCache's do
        lengths = torch.full((batch,), 13, dtype=torch.int32)
    starts = torch.tensor([0, 2, 5], dtype=torch.int32)
    valid = torch.ones(batch, max_blocks * bs, dtype=torch.uint8)
    valid[1, 4:7] = 0  # a hole
    valid[2, int(lengths[2]):] = 0  # the new tokens of row 2 hidden: right padding
    q = torch.randn(batch, q_len, nheads, head_dim, generator=g).to(dtype)
    k = torch.randn(batch, n_new, nheads_k, head_dim, generator=g).to(dtype)
    v = torch.randn(batch, n_new, nheads_k, head_dim, generator=g).to(dtype)
    for holes in (False, True):
        ref = [t.clone() for t in bufs]
        cv = valid if holes else torch.empty(0, dtype=torch.uint8)
        status = torch.zeros(1, dtype=torch.int32)
        want = attend_with_kvcache_ref(q, k, v, *ref, lengths, starts, cv, status, 0.3, window, causal=causal)
        first = max(0, int(lengths.min()) + n_new - q_len - window + 1) if window else 0
        span = (first, int(lengths.max()) + n_new)
        # from the tensors alone, and with what a PlugCache's host knows (its rows, and one length for all rows)
        hosts = [{}] + ([{"rows": bufs[4].tolist(), "length": 13}] if layout in ("runs", "adjacent") else [])
        for host in hosts:
            mine = [t.clone() for t in bufs]
            plan = torchpath.plan(mine[4], lengths, starts, cv, batch, q_len, n_new, window, causal, bs, nheads_k,
                                  span, strides=torchpath.slot_strides(mine[0]), **host)
            assert (plan.runs is not None) == (layout in ("runs", "adjacent"))
            assert plan.adjacent == (layout == "adjacent" and not window)  # a window reads from a later block
            consecutive = layout in ("runs", "adjacent")
            assert plan.mode == ("dense" if not consecutive else "spans" if heads_first else path)
            assert (plan.spacing is not None) == consecutive  # each layout's rows are evenly spaced
            got = torchpath.attend(q, k, v, *mine[:4], plan, 0.3)
            for a, b in zip(mine[:4], ref[:4]):
                assert torch.equal(a, b)  # the same bytes written
            tol = TOL[dtype] * (8 if kv else 1)
            torch.testing.assert_close(got, want, atol=tol, rtol=tol)
            # queries that see nothing: all 0 in both (an element may round to 0 on its own in bf16)
            assert torch.equal((got == 0).all(-1), (want == 0).all(-1))


@pytest.mark.parametrize("path", ["dense", "blocks", "heads-first"])
@pytest.mark.parametrize("kv", [None, "int8", "int4"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_stale_values_in_hidden_slots_never_leak(kv, value, path, monkeypatch, reads):
    """NaN / Inf in slots past a row's length, before its start and in a hole: never in any output (K and V)."""
    _one_read(kv, reads)
    monkeypatch.setattr(torchpath, "DENSE_SLOTS", 0 if path == "blocks" else 1 << 30)
    batch, nheads, nheads_k, head_dim, bs, max_blocks = 2, 4, 2, 8, 4, 5
    bufs = _cache(batch, nheads_k, head_dim, bs, max_blocks, torch.float32, kv, "runs", 1,
                  heads_first=path == "heads-first")
    lengths = torch.full((batch,), 9, dtype=torch.int32)
    starts = torch.tensor([0, 3], dtype=torch.int32)
    valid = torch.ones(batch, max_blocks * bs, dtype=torch.uint8)
    valid[0, 5] = 0
    table = bufs[4]
    for buf in bufs[:2]:
        poison = value if kv is None else 255 if kv == "int4" else 127
        for b, slot in ((0, 5), (1, 1), (0, 11), (1, 14)):  # the hole, before row 1's start, past the lengths
            buf[table[b, slot // bs], :, slot % bs] = poison
    for scale in bufs[2:4]:
        if scale.numel():
            for b, slot in ((0, 5), (1, 1), (0, 11), (1, 14)):
                scale[table[b, slot // bs], :, slot % bs] = value
    q = torch.randn(batch, 1, nheads, head_dim)
    k, v = torch.randn(batch, 1, nheads_k, head_dim), torch.randn(batch, 1, nheads_k, head_dim)
    plan = torchpath.plan(table, lengths, starts, valid, batch, 1, 1, 0, True, bs, nheads_k, (0, 10),
                          strides=torchpath.slot_strides(bufs[0]))
    assert plan.mode == ("spans" if path == "heads-first" else path)
    out = torchpath.attend(q, k, v, *bufs[:4], plan, 0.5)
    assert torch.isfinite(out).all()


def test_ops_dispatch_takes_the_fast_path_on_the_cpu(monkeypatch):
    """backend auto on CPU tensors runs the fast path (and a planless call builds its plan); 'reference' forces the
    oracle; both give the same output."""
    bufs = _cache(2, 2, 8, 4, 4, torch.float32, None, "shuffled", 3)
    lengths = torch.tensor([5, 9], dtype=torch.int32)
    starts = torch.zeros(2, dtype=torch.int32)
    q, k, v = torch.randn(2, 1, 4, 8), torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8)
    calls = []
    real = torchpath.attend
    monkeypatch.setattr(torchpath, "attend", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    mine, ref = [t.clone() for t in bufs], [t.clone() for t in bufs]
    got = ops.attend_with_kvcache(q, k, v, *mine, lengths, starts, 0.4)
    want = ops.attend_with_kvcache(q, k, v, *ref, lengths, starts, 0.4, backend="reference")
    assert calls == [1]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="no cache slot"):  # a new token without a slot: raised before any write
        ops.attend_with_kvcache(q, k, v, *mine, torch.tensor([5, 16], dtype=torch.int32), starts, 0.4)


def test_buffers_in_another_layout_go_to_the_reference():
    """flash-attention's paged layout `[blocks, block_size, nheads_k, D]`, viewed `[blocks, nheads_k, block_size, D]`
    (what `hf_kvplug.flash` passes): neither layout the fast path indexes, so `ops` runs the reference (writes
    included) and gives its result."""
    g = torch.Generator().manual_seed(5)
    flash = [torch.randn(6, 4, 2, 8, generator=g) for _ in range(2)]
    table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    lengths, starts = torch.tensor([5, 7], dtype=torch.int32), torch.zeros(2, dtype=torch.int32)
    q, k, v = torch.randn(2, 1, 4, 8, generator=g), torch.randn(2, 1, 2, 8, generator=g), torch.randn(2, 1, 2, 8,
                                                                                                     generator=g)
    empty = torch.empty(0)
    mine, ref = [t.clone() for t in flash], [t.clone() for t in flash]
    assert not torchpath.paged_layout(mine[0].transpose(1, 2))
    got = ops.attend_with_kvcache(q, k, v, *(t.transpose(1, 2) for t in mine), empty, empty, table, lengths, starts,
                                  0.4)
    want = ops.attend_with_kvcache(q, k, v, *(t.transpose(1, 2) for t in ref), empty, empty, table, lengths,
                                   starts, 0.4, backend="reference")
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert all(torch.equal(a, b) for a, b in zip(mine, ref))


@pytest.mark.parametrize("kv, exact", [(None, False), ("int8", False), ("int4", True)])
def test_a_step_with_grad_survives_the_next_write(kv, exact, reads):
    """A decode step run with grad keeps copies of what it read, not views of the pool: the next step's write (in
    place) leaves its backward intact, and the gradient is the reference's (INT4: with its exact tail too)."""
    _one_read(kv, reads)
    batch, nheads, nheads_k, head_dim, bs, max_blocks = 2, 4, 2, 8, 4, 5
    lengths, starts = torch.full((batch,), 9, dtype=torch.int32), torch.zeros(batch, dtype=torch.int32)
    grads = []
    for fast in (True, False):
        bufs = _cache(batch, nheads_k, head_dim, bs, max_blocks, torch.float32, kv, "runs", 2, heads_first=True)
        g = torch.Generator().manual_seed(1)
        q = torch.randn(batch, 1, nheads, head_dim, generator=g).requires_grad_()
        k, v = (torch.randn(batch, 1, nheads_k, head_dim, generator=g) for _ in range(2))
        tails = [torch.randn(batch, nheads_k, bs, head_dim, generator=g) for _ in range(2)] if exact else [None] * 2
        if fast:
            plan = torchpath.plan(bufs[4], lengths, starts, None, batch, 1, 1, 0, True, bs, nheads_k, (0, 10),
                                  rows=bufs[4].tolist(), length=9, strides=torchpath.slot_strides(bufs[0]))
            assert plan.mode == "spans" and plan.tail
            out = torchpath.attend(q, k, v, *bufs[:4], plan, 0.5, *tails)
        else:
            out = attend_with_kvcache_ref(q, k, v, *bufs[:5], lengths, starts, torch.empty(0, dtype=torch.uint8),
                                          torch.zeros(1, dtype=torch.int32), 0.5, k_tail=tails[0], v_tail=tails[1])
        for buf in bufs[:2] + (tails if exact else []):  # the next step writes the pool (and tail) in place
            buf[:, :, -1].fill_(3)
        out.square().sum().backward()
        grads.append(q.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", ["runs", "adjacent"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_decode_step_lane_is_the_general_path(dtype, layout):
    """The step a PlugCache decodes most (one query a row, K/V in the model dtype, each row's span a view ending with
    its new token, every slot seen) runs in one frame (`_decode_step`): the same bytes written and the same output
    bits as the general path (`_spans`, `_write_tail`, `_attend_rows`), and the reference's within rounding."""
    batch, nheads, nheads_k, head_dim, bs, max_blocks, length = 3, 6, 2, 16, 4, 6, 13
    bufs = _cache(batch, nheads_k, head_dim, bs, max_blocks, dtype, None, layout, 5, used=4, heads_first=True)
    lengths, starts = torch.full((batch,), length, dtype=torch.int32), torch.zeros(batch, dtype=torch.int32)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(batch, 1, nheads, head_dim, generator=g).to(dtype)
    k, v = (torch.randn(batch, 1, nheads_k, head_dim, generator=g).to(dtype) for _ in range(2))
    ref = [t.clone() for t in bufs]
    want = attend_with_kvcache_ref(q, k, v, *ref, lengths, starts, torch.empty(0, dtype=torch.uint8),
                                   torch.zeros(1, dtype=torch.int32), 0.3)
    for lead_free in (True, False):
        lane, general = [t.clone() for t in bufs], [t.clone() for t in bufs]
        plan = torchpath.plan(lane[4], lengths, starts, None, batch, 1, 1, 0, True, bs, nheads_k, (0, length + 1),
                              rows=bufs[4].tolist(), length=length, strides=torchpath.slot_strides(lane[0]),
                              lead_free=lead_free)
        assert plan.tail and plan.spacing is not None and plan.bias is None and plan.blind is None
        got = torchpath.attend(q, k, v, *lane[:4], plan, 0.3)
        keys, values = torchpath._spans(general[0], plan), torchpath._spans(general[1], plan)
        torchpath._write_tail(k, v, keys, values, [None], [None], "fp")
        same = torchpath._attend_rows(q, list(zip(keys, values, [None], [None])), plan, 0.3, "fp")
        for a, b, c in zip(lane[:2], general[:2], ref[:2]):
            assert torch.equal(a, b) and torch.equal(a, c)
        assert torch.equal(got, same)
        torch.testing.assert_close(got, want, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("layout", ["runs", "adjacent", "shuffled", "shared", "short"])
def test_the_decode_step_plan_is_the_general_plan(layout):
    """`plan` works out a PlugCache's decode step (one token a row, from slot 0, no mask) in a few host operations
    (`_step_plan`); the plan is the one the general code gives (`lead_free=False` takes it: the starts are read and
    found 0), field by field, for rows consecutive or not, evenly spaced or not, with blocks missing or not."""
    bs, nheads_k, max_blocks = 4, 2, 6
    for batch, length in itertools.product([1, 2, 3], [0, 3, 4, 5, 11, 12, 23]):
        bufs = _cache(batch, nheads_k, 8, bs, max_blocks, torch.float32, None, "adjacent" if layout == "short"
                      else layout, batch * 100 + length, used=3, heads_first=True)
        table = bufs[4]
        rows = table.tolist()
        if layout == "short":  # a row that maps fewer blocks than the step reads (its table says -1 past them)
            rows[-1] = rows[-1][:length // bs]
            table[-1, length // bs:] = -1
        lengths, starts = torch.full((batch,), length, dtype=torch.int32), torch.zeros(batch, dtype=torch.int32)
        plans = [torchpath.plan(table, lengths, starts, None, batch, 1, 1, 0, True, bs, nheads_k, (0, length + 1),
                                rows=rows, length=length, strides=torchpath.slot_strides(bufs[0]), lead_free=free)
                 for free in (True, False)]
        for name, a, b in zip(torchpath.Plan._fields, *plans):
            assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b), (name, batch, length, a, b)
        if layout == "runs":  # (the step's own route was taken: rows consecutive and evenly spaced)
            assert torchpath._step_plan(rows, batch, length, bs, max_blocks) is not None and plans[0].step


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_views_of_a_slab_are_each_layers_decode_step(dtype):
    """The views of a slab (every layer's K and V in one storage, `KV.allocate_group`) taken once for a step plan
    (`step_views`) are the ones each layer's `_decode_step` takes: the same bytes written in every layer, and the
    same output bits."""
    count, batch, nheads, nheads_k, head_dim, bs, max_blocks, length = 3, 2, 4, 2, 8, 4, 5, 9
    nblocks = batch * max_blocks
    g = torch.Generator().manual_seed(4)
    slab = torch.randn(2 * count, nheads_k, nblocks, bs, head_dim, generator=g).to(dtype)
    table = (torch.arange(batch * max_blocks).view(batch, max_blocks)).to(torch.int32)  # rows one after another
    lengths, starts = torch.full((batch,), length, dtype=torch.int32), torch.zeros(batch, dtype=torch.int32)
    plan = torchpath.plan(table, lengths, starts, None, batch, 1, 1, 0, True, bs, nheads_k, (0, length + 1),
                          rows=table.tolist(), length=length, strides=(bs, nblocks * bs), lead_free=True)
    assert plan.step
    mine, theirs = slab.clone(), slab.clone()
    new, spans = torchpath.step_views(mine, plan)
    for i in range(count):
        q = torch.randn(batch, 1, nheads, head_dim, generator=g).to(dtype)
        k, v = (torch.randn(batch, 1, nheads_k, head_dim, generator=g).to(dtype) for _ in range(2))
        got = torchpath.attend_step(q, k, v, new[i], new[count + i], spans[i], spans[count + i], 0.3)
        k_cache, v_cache = theirs[i].transpose(0, 1), theirs[count + i].transpose(0, 1)
        want = torchpath.attend(q, k, v, k_cache, v_cache, torch.empty(0), torch.empty(0), plan, 0.3)
        assert torch.equal(got, want)
    assert torch.equal(mine, theirs) and not torch.equal(mine, slab)


@pytest.mark.parametrize("kv, exact", [(None, False), ("int8", False), ("int4", False), ("int4", True)])
@pytest.mark.parametrize("layout", ["runs", "adjacent", "shuffled"])
@pytest.mark.parametrize("heads_first", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_write_on_the_cpu_is_the_references(dtype, heads_first, layout, kv, exact, monkeypatch):
    """`ops.write_kvcache` on CPU tensors takes the PyTorch path (`torchpath.write_new`: a prefill's write into a
    PlugCache) and writes the reference's bytes: K/V or codes, scales, and the exact tail's positions, for rows of one
    length or of several, new tokens that fill blocks or cross into the next, and none."""
    batch, nheads_k, head_dim, bs, max_blocks = 3, 2, 16, 4, 6
    fast = []
    real = torchpath.write_new
    monkeypatch.setattr(torchpath, "write_new", lambda *a, **k: fast.append(1) or real(*a, **k))
    for lengths, n_new in (([0, 0, 0], 9), ([5, 5, 5], 3), ([2, 7, 4], 5), ([4, 4, 4], 4), ([3, 3, 3], 0)):
        bufs = _cache(batch, nheads_k, head_dim, bs, max_blocks, dtype, kv, layout, 4, used=4, heads_first=heads_first)
        g = torch.Generator().manual_seed(n_new)
        k, v = (torch.randn(batch, n_new, nheads_k, head_dim, generator=g).to(dtype) for _ in range(2))
        tails = [torch.randn(batch, nheads_k, bs, head_dim, generator=g).to(dtype) for _ in range(2)] if exact else []
        seqlens = torch.tensor(lengths, dtype=torch.int32)
        mine, ref = ([t.clone() for t in bufs[:4] + tails] for _ in range(2))
        fast.clear()
        for out, backend in ((mine, "auto"), (ref, "reference")):
            ops.write_kvcache(k, v, *out[:4], bufs[4], seqlens, backend=backend,
                              **(dict(k_tail=out[4], v_tail=out[5]) if exact else {}))
        assert len(fast) == 1
        for a, b in zip(mine, ref):
            assert torch.equal(a.nan_to_num(), b.nan_to_num()), (lengths, n_new)


def test_the_int8_quantizer_and_the_dequantization_are_the_references():
    """The fast path's INT8 quantizer (`_quantize_int8`, fewer ops) writes the reference's codes and scales bit for
    bit, and `_dequantize` (short spans' reads) gives the reference's values for INT8 and INT4, in every model dtype,
    for vectors of every scale, zeros of both signs, subnormal magnitudes, values past fp16's range, infinities and
    NaN (the NaN elements' own codes aside, which no read uses: their scale is NaN)."""
    g = torch.Generator().manual_seed(1)
    for trial in range(60):
        x = torch.randn(4, 6, 64, generator=g) * 10 ** torch.empty(4, 6, 1).uniform_(-45, 40, generator=g)
        x[0, 0], x[0, 1], x[0, 3] = 0.0, 1.5, -0.0
        x[0, 4, ::2] = -0.0
        x[1, 0, 3], x[1, 1, 40], x[1, 2, 5] = float("inf"), -float("inf"), float("nan")
        x[1, 3], x[2, 0], x[2, 1], x[2, 2] = 65504 * 3, -1e-7, 1e-40, 3e-31
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            (want, want_s), (got, got_s) = quantize(x.to(dtype), torch.int8), torchpath._quantize_int8(x.to(dtype))
            into = torch.empty_like(want), torch.empty_like(want_s)  # the decode step's: written through views
            assert torchpath._quantize_int8(x.to(dtype), into) is None
            for codes, scales in ((got, got_s), into):
                nan = want_s.isnan()
                assert torch.equal(nan, scales.isnan()) and torch.equal(want_s[~nan], scales[~nan]), (trial, dtype)
                assert torch.equal(want[~nan], codes[~nan]), (trial, dtype)
            for storage, kind in ((torch.int8, "int8"), (torch.uint8, "int4")):
                codes, params = quantize(x.to(dtype), storage)
                ref = dequantize(codes, params, torch.float32)
                assert torch.equal(ref.nan_to_num(), torchpath._dequantize(codes, params, kind).nan_to_num())


def test_the_int4_quantizer_is_the_references():
    """The fast path's INT4 quantizer (`_quantize_int4`, fewer ops) writes the reference's codes and parameters bit
    for bit, in every model dtype, for vectors of every scale, constant halves, signed zeros, subnormal spreads,
    values past fp16's range, infinities and NaN (the NaN payload aside, and the codes of a NaN half, which no
    read uses)."""
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        x = torch.randn(4, 6, 64, generator=g) * 10 ** torch.empty(4, 6, 1).uniform_(-40, 40, generator=g)
        x[0, 0], x[0, 1], x[0, 2, :32], x[0, 3] = 0.0, 1.5, 7.0, -0.0
        x[0, 4, ::2] = -0.0  # zeros of both signs in one half
        x[1, 0, 3], x[1, 1, 40], x[1, 2, 5] = float("inf"), -float("inf"), float("nan")
        x[1, 3], x[1, 4, :32] = 65504 * 3, 1e-8 * torch.arange(32)
        x[2, 0] = -1e-7
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            (want, want_p), (got, got_p) = quantize(x.to(dtype), torch.uint8), torchpath._quantize_int4(x.to(dtype))
            into = torch.empty_like(want), torch.empty_like(want_p)  # the decode step's: written through views
            assert torchpath._quantize_int4(x.to(dtype), into) is None
            for got, got_p in ((got, got_p), into):
                nan = want_p.isnan()
                assert torch.equal(nan, got_p.isnan()), (trial, dtype)
                assert torch.equal(want_p.view(torch.int16)[~nan], got_p.view(torch.int16)[~nan]), (trial, dtype)
                read = ~nan.view(*nan.shape[:-1], 2, 2).any(-1)  # [..., 2]: halves whose codes a read uses
                lo_ok, hi_ok = read.unbind(-1)
                assert torch.equal((want & 15)[lo_ok], (got & 15)[lo_ok]) and torch.equal((want >> 4)[hi_ok],
                                                                                           (got >> 4)[hi_ok])


@pytest.mark.parametrize("kv, exact", [("int4", True), ("int4", False), ("int8", False)])
@pytest.mark.parametrize("layout, window", [("runs", 0), ("adjacent", 0), ("runs", 6), ("runs", 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_codes_decode_step_is_the_general_path(dtype, layout, window, kv, exact, reads):
    """An INT8 or INT4 cache's decode step (one query a row, each row's span a view ending with its new token, every
    slot seen, one length for all rows) runs in one frame of few ops (`_decode_step_codes`): the same bytes written
    as the general path (`_spans`, `_write_tail`, the exact tail's write and read, `_attend_rows`) and the
    reference, the general path's output within rounding, the reference's within the dtype's, with INT4's exact
    tail (rows whose last block is partial, holds one token, or just filled) and without, with windows, and with no
    slot read from the codes."""
    batch, nheads, nheads_k, head_dim, bs, max_blocks = 3, 6, 2, 16, 4, 6
    for length in (2, 12, 13, 14, 15):  # (a row of 3 tokens, or a window of 2, reads no codes)
        bufs = _cache(batch, nheads_k, head_dim, bs, max_blocks, dtype, kv, layout, length, used=4,
                      heads_first=True)
        lengths, starts = torch.full((batch,), length, dtype=torch.int32), torch.zeros(batch, dtype=torch.int32)
        g = torch.Generator().manual_seed(length)
        q = torch.randn(batch, 1, nheads, head_dim, generator=g).to(dtype)
        k, v = (torch.randn(batch, 1, nheads_k, head_dim, generator=g).to(dtype) for _ in range(2))
        tails = [torch.randn(batch, nheads_k, bs, head_dim, generator=g).to(dtype) for _ in range(2)]
        for t in tails:  # a tail's positions past the rows' end are never read
            t[:, :, (length + 1) % bs or bs:] = float("nan")
        tails = tails if exact else [None, None]
        first = max(0, length - window + 1) if window else 0  # the new token's query sees [first, length]
        plan = torchpath.plan(bufs[4], lengths, starts, None, batch, 1, 1, window, True, bs, nheads_k,
                              (first, length + 1), rows=bufs[4].tolist(), length=length,
                              strides=torchpath.slot_strides(bufs[0]), lead_free=True)
        assert plan.step and plan.t0 == first
        lane, lane_t = [t.clone() for t in bufs], [None if t is None else t.clone() for t in tails]
        got = torchpath.attend(q, k, v, *lane[:4], plan, 0.3, *lane_t)
        general, general_t = [t.clone() for t in bufs], [None if t is None else t.clone() for t in tails]
        keys, values, ks, vs = (torchpath._spans(t, plan) for t in general[:4])
        torchpath._write_tail(k, v, keys, values, ks, vs, kv)
        ex = None
        if exact:
            torchpath._write_exact(k, v, *general_t, plan)
            ex = torchpath._exact(*general_t, plan)
        same = torchpath._attend_rows(q, list(zip(keys, values, ks, vs)), plan, 0.3, kv, ex)
        ref, ref_t = [t.clone() for t in bufs], [None if t is None else t.clone() for t in tails]
        want = attend_with_kvcache_ref(q, k, v, *ref, lengths, starts, torch.empty(0, dtype=torch.uint8),
                                       torch.zeros(1, dtype=torch.int32), 0.3, window, k_tail=ref_t[0],
                                       v_tail=ref_t[1])
        for a, b, c in zip(lane[:4] + lane_t, general[:4] + general_t, ref[:4] + ref_t):
            assert (a is None and b is None and c is None) or (
                torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.nan_to_num(), c.nan_to_num()))
        assert got.isfinite().all() and not got.is_inference()  # (computed in inference mode, handed back plain)
        close = 1e-5 if dtype == torch.float32 else TOL[dtype]  # (a bf16 output may round one ulp apart)
        torch.testing.assert_close(got.float(), same.float(), atol=close, rtol=close)
        torch.testing.assert_close(got, want, atol=TOL[dtype] * 8, rtol=TOL[dtype] * 8)


TAIL_CASES = list(itertools.product(
    [torch.float32, torch.bfloat16], ["int8", "int4"], ["runs", "shuffled"],
    [(1, 0, True), (2, 0, True), (3, 0, True), (4, 0, True), (6, 3, True), (3, 0, False), (0, 0, True)]))


@pytest.mark.parametrize("dtype, kv, layout, shape", TAIL_CASES,
                         ids=[f"{str(d)[6:]}-{kv}-{lay}-L{s[0]}w{s[1]}{'' if s[2] else 'nc'}"
                              for d, kv, lay, s in TAIL_CASES])
def test_the_exact_tail_equals_the_reference(dtype, kv, layout, shape, reads):
    """A quantized cache's exact tail (`reference`, rule 4): the new tokens in a row's last, partial block go to the
    tail too, and those slots are read from it, on the fast path as in the reference, with rows of one length (a
    PlugCache's, whose host knows it) or of several, new tokens that fill a block or cross into the next, windows,
    holes and non-causal queries. The tail's positions past a row's end hold NaN, which must never be read."""
    q_len, window, causal = shape
    n_new = q_len if q_len else 0
    q_len = q_len or 2
    batch, nheads, nheads_k, head_dim, bs, max_blocks = 3, 6, 2, 16, 4, 6
    seed = zlib.crc32(repr(("tail", str(dtype), kv, layout, shape)).encode()) % 1000
    g = torch.Generator().manual_seed(seed)
    bufs = _cache(batch, nheads_k, head_dim, bs, max_blocks, dtype, kv, layout, seed, heads_first=True)
    same = layout == "runs"
    lengths = torch.full((batch,), 13, dtype=torch.int32) if same else torch.tensor([7, 12, 16], dtype=torch.int32)
    starts = torch.tensor([0, 2, 5], dtype=torch.int32)
    valid = torch.ones(batch, max_blocks * bs, dtype=torch.uint8)
    valid[1, 12:14] = 0  # a hole in the partial block
    tails = [torch.randn(batch, nheads_k, bs, head_dim, generator=g).to(dtype) for _ in range(2)]
    for t in tails:  # what a row's tail holds past its end is never read
        for b in range(batch):
            t[b, :, (int(lengths[b]) + n_new) % bs:] = float("nan")
    q = torch.randn(batch, q_len, nheads, head_dim, generator=g).to(dtype)
    k = torch.randn(batch, n_new, nheads_k, head_dim, generator=g).to(dtype)
    v = torch.randn(batch, n_new, nheads_k, head_dim, generator=g).to(dtype)
    for holes in (False, True):
        ref, ref_tails = [t.clone() for t in bufs], [t.clone() for t in tails]
        cv = valid if holes else torch.empty(0, dtype=torch.uint8)
        status = torch.zeros(1, dtype=torch.int32)
        want = attend_with_kvcache_ref(q, k, v, *ref, lengths, starts, cv, status, 0.3, window, causal=causal,
                                       k_tail=ref_tails[0], v_tail=ref_tails[1])
        assert want.isfinite().all()
        first = max(0, int(lengths.min()) + n_new - q_len - window + 1) if window else 0
        span = (first, int(lengths.max()) + n_new)
        hosts = [{}] + ([{"rows": bufs[4].tolist(), "length": 13}] if same else [])
        for host in hosts:
            mine, my_tails = [t.clone() for t in bufs], [t.clone() for t in tails]
            plan = torchpath.plan(mine[4], lengths, starts, cv, batch, q_len, n_new, window, causal, bs, nheads_k,
                                  span, strides=torchpath.slot_strides(mine[0]), **host)
            got = torchpath.attend(q, k, v, *mine[:4], plan, 0.3, *my_tails)
            for a, b in zip(mine[:4] + my_tails, ref[:4] + ref_tails):
                assert torch.equal(a.nan_to_num(), b.nan_to_num())  # the same bytes written, the tails' too
            torch.testing.assert_close(got, want, atol=TOL[dtype] * 8, rtol=TOL[dtype] * 8)
    if not ((lengths + n_new) % bs).any():
        return  # every row's last block is full: nothing is read from the tail
    # the tail matters: reading the codes instead gives another output
    plain = attend_with_kvcache_ref(q, k, v, *[t.clone() for t in bufs], lengths, starts, cv,
                                    torch.zeros(1, dtype=torch.int32), 0.3, window, causal=causal)
    assert not torch.equal(plain, want)
