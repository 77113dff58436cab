"""The fast PyTorch path of `attend_with_kvcache` for every device but CUDA (the CPU today; MPS and XPU tensors take it
too): the semantics of `reference.attend_with_kvcache_ref`, which stays the oracle (tests hold the two equal), in
far fewer and cheaper tensor ops.

What makes it cheap:
  * a `Plan` says where a call's rows read and write: the blocks to read (only those the queries can see, from the
    first slot of a window to the last token), the slot of each new token, and which of those slots each query
    attends. It is the same for every layer of a group of layers in one forward, so the cache builds it once per
    forward, in its host work (`ForwardHost.begin_forward`), where the rows' lengths and blocks are known;
  * K and V are read where they lie. A PlugCache on this path stores its pools heads first (`KV.allocate`): each
    KV head's blocks follow one another, so a row whose blocks are consecutive (what a fresh pool gives each row
    `generate()` maps ahead) is one `[nheads_k, slots, head_dim]` view per buffer, exactly its span, and PyTorch's
    SDPA attends over it, each KV head's queries as its rows (no GQA expansion); rows spaced evenly in the pool are
    one strided view, one SDPA call. In the kernels' layout (blocks first) such a row is attended block by block
    (`[blocks x nheads_k]` small products, summed); other rows (shared, forked or ring blocks) are gathered once, in
    SDPA's layout. INT8 and INT4 codes become floats on the way: a short span's are dequantized and go to SDPA (few
    ops), a long one's go through two products with the scales and minima applied as the kernels apply them (less
    memory read; `DEQUANT_SLOTS`);
  * a slot no query sees never reaches an output: its score is -inf, and its V is zeroed whenever the output would
    not be finite otherwise (a NaN or Inf an earlier request left there), as the reference zeroes it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .reference import INT4_MAX, INT8_MAX, has_tail, quantize, query_ranges, write_tail_from, write_tail_ref


# Up to this many slots over all rows, a call gathers K and V into one dense copy and runs PyTorch's SDPA: a few ops,
# where per-op overhead outweighs the copy. Beyond it, rows whose blocks are consecutive are read where they lie.
DENSE_SLOTS = 1024

KINDS = {torch.int8: "int8", torch.uint8: "int4"}  # storage dtype -> codes (else K/V in the model dtype)

# Up to this many slots a row, a call dequantizes INT8 / INT4 codes and attends the floats with PyTorch's SDPA (few
# ops, where per-op overhead outweighs the copy); past it, two products on the codes (`_scores`, `_values`) apply
# the scales to scores and probabilities, which reads less memory.
DEQUANT_SLOTS = {"int8": 1024, "int4": 512}


class Plan(NamedTuple):
    """Where one call on a paged cache reads and writes, for rows < `batch` and `q_len` queries.

    mode: "dense": gather the slots into one dense copy and run SDPA (small calls, and rows whose blocks are
        scattered); "spans": each row's consecutive blocks, stored heads first, are one span per KV head, viewed
        where it lies and attended by SDPA; "blocks": each row's consecutive blocks, stored blocks first, read where
        they lie block by block.
    nb: blocks read per row (logical blocks [fb, fb + nb)); the slots read are [t0, t0 + slots): exactly the span
        (dense, spans), whole blocks (blocks).
    runs: per row, the first physical block of its `nb` consecutive blocks, when every row's are consecutive; then
        `adjacent` says whether the rows' runs follow each other (one view holds them all, blocks), and `spacing`
        whether they are evenly spaced, by that many blocks (one strided view holds them all, spans), or None.
    flat: `[batch * nheads_k * slots]` int64 (dense only): the slots as rows of the buffer's storage (`_slot_rows`),
        ordered `[batch, nheads_k, slots]`, so one `index_select` gathers them in SDPA's layout.
    wflat: `[batch * n_new * nheads_k]` int64, the rows of the storage each new token's K (or V) goes to, ordered as
        the new tokens `[batch, n_new, nheads_k]`; None when nothing is written, or when `tail`: the new tokens are
        the last slots of every row's span (spans, a PlugCache's rows of one length), written through its views.
    bias: the additive mask (0 / -inf, fp32), or None where every query sees every slot. dense and spans: SDPA's
        `[batch, 1, q_len, slots]`; blocks: `[batch * nb * nheads_k, q_len, block_size]`, laid out as the scores of
        the blocks (`[batch, nb, nheads_k, group, q_len, block_size]`, the same for every query of a group), so
        that one `baddbmm` adds it.
    blind: `[batch, 1, q_len, 1]` bool, the queries that see no slot (their output is 0), or None: none.
    ends: each row's length once the new tokens are in: an int when the host knows it is every row's (a
        PlugCache's), else `[batch]` int64. It places the exact tail's slots (`reference`, rule 4).
    step: the call is the step a PlugCache decodes most, as far as the plan says (one query a row, every row's span
        one strided view ending with its new token, no slot hidden): `attend` then takes `_decode_step` for K/V in
        the model dtype.
    """

    batch: int
    q_len: int
    mode: str
    fb: int
    nb: int
    t0: int
    slots: int
    runs: list[int] | None
    adjacent: bool
    spacing: int | None
    flat: torch.Tensor | None
    wflat: torch.Tensor | None
    tail: bool
    bias: torch.Tensor | None
    blind: torch.Tensor | None
    ends: int | torch.Tensor
    step: bool = False


def slot_strides(buf: torch.Tensor) -> tuple[int, int]:
    """The (block, head) strides of a paged buffer `[num_blocks, nheads_k, block_size, ...]`, counted in slots:
    `(nheads_k * block_size, block_size)` blocks first (the kernels' layout), `(block_size, num_blocks *
    block_size)` heads first (the PyTorch path's, `KV.allocate`)."""
    s0, s1, s2 = buf.stride()[:3]
    return s0 // s2, s1 // s2


def paged_layout(buf: torch.Tensor) -> bool:
    """Whether `buf [num_blocks, nheads_k, block_size, ...]` is stored in a layout this path reads and writes:
    contiguous blocks first (the kernels') or heads first (a PlugCache's on this path). Other views (say
    flash-attention's `[blocks, block_size, nheads_k, D]` transposed) go to the reference."""
    n, hk, bs, *tail = buf.shape
    row = math.prod(tail)
    inner = tuple(math.prod(tail[i + 1:]) for i in range(len(tail)))  # a slot's values, contiguous
    return buf.stride() in ((hk * bs * row, bs * row, row, *inner), (bs * row, n * bs * row, row, *inner))


def _slot_rows(buf: torch.Tensor) -> torch.Tensor:
    """The buffer's storage as one row per slot, `[num_blocks * nheads_k * block_size, ...]` (a view; slot t of
    block i, head h is row `i * sb + h * sh + t` for `slot_strides`). Either `paged_layout`; anything else is
    refused."""
    if not paged_layout(buf):
        raise ValueError(f"a paged buffer must be contiguous, blocks first or heads first (strides {buf.stride()})")
    n, hk, bs, *tail = buf.shape
    return buf.as_strided((n * hk * bs, *tail), (buf.stride(2), *buf.stride()[3:]))


def plan(block_table, cache_seqlens, cache_starts, cache_valid, batch: int, q_len: int, n_new: int, window: int,
         causal: bool, block_size: int, nheads_k: int, span: tuple[int, int],
         rows: list[list[int]] | None = None, length: int | None = None,
         strides: tuple[int, int] | None = None, lead_free: bool = False) -> Plan:
    """The plan of a call whose queries see slots within `span = (first, end)`: host-known bounds, the first slot any
    query may see and one past the row's last token. `strides`: the buffers' `slot_strides` (default blocks first).
    What the host knows makes it cheaper: `rows`, its copy of the table's rows (logical block i of row b is
    rows[b][i]; a PlugCache's paging), says which rows are consecutive and where new tokens go; `length`, the tokens
    every row holds before the call (a PlugCache's rows hold the same count), gives the queries' slots; `lead_free`,
    that every `cache_starts` is 0 (`DeviceState.lead_free`). Without them the CPU reads the tensors (free there).
    Every new token must have a mapped slot (the caller made sure: the cache maps them before the forward; on the
    CPU `ops` checks first)."""
    device, bs = block_table.device, block_size
    cpu = device.type == "cpu"
    sb, sh = strides if strides is not None else (nheads_k * bs, bs)
    if (cpu and sb == bs and q_len == n_new == 1 and not window and cache_valid is None and lead_free
            and rows is not None and length is not None and tuple(span) == (0, length + 1) and batch):
        step = _step_plan(rows, batch, length, bs, block_table.shape[1])
        if step is not None:
            return step
    first = max(0, span[0])
    fb = first // bs
    nb = max(1, min(-(-span[1] // bs), block_table.shape[1]) - fb)
    fb = min(fb, block_table.shape[1] - nb)
    ids = None  # [B, nb] physical blocks, read from the table where the host's rows do not say
    if rows is None or not all(len(r) >= fb + nb for r in rows[:batch]):
        ids = block_table[:batch, fb:fb + nb].long().clamp(min=0)  # an unmapped block reads block 0, unseen
        rows = [[-1] * fb + r for r in ids.tolist()] if cpu else None  # free to read here
    runs = _runs(rows, batch, fb, nb) if rows is not None else None
    if runs is None:
        mode = "dense"
    elif sb == bs:  # heads first: a row's consecutive blocks are one span per head
        mode = "spans"
    else:
        mode = "dense" if batch * nb * bs <= DENSE_SLOTS else "blocks"
    if mode == "blocks":  # whole blocks
        t0, t1 = fb * bs, (fb + nb) * bs
    else:  # exactly the span
        t0 = max(first, fb * bs)
        t1 = max(t0 + 1, min(span[1], (fb + nb) * bs))
    # a PlugCache's rows hold `length` tokens each: a span ends with the new ones, written through its views
    tail = mode == "spans" and length is not None and t1 == length + n_new and t1 - t0 >= n_new
    wflat = (_write_rows(block_table, cache_seqlens, batch, n_new, bs, nheads_k, sb, sh, rows, length)
             if n_new and not tail else None)
    seen = _seen(cache_seqlens, cache_starts, cache_valid, batch, q_len, n_new, window, causal, t0, t1, length,
                 lead_free)
    blind = bias = flat = None
    if seen is not None:
        blind = ~seen.any(-1)  # [B, 1, L]
        if cpu and not bool(blind.any()):  # free on the CPU: most calls have no blind query
            blind = None
        if cpu and bool(seen.all()):  # free on the CPU: no slot to hide
            seen = None
    if mode == "dense":
        if ids is None:
            ids = torch.tensor([r[fb:fb + nb] for r in rows[:batch]], dtype=torch.long, device=device)
        # every slot of the row's blocks as a row of the storage, ordered [B, Hk, nb * bs]; then the span's
        at = (ids.view(batch, 1, nb, 1) * sb + (torch.arange(nheads_k, device=device) * sh).view(1, nheads_k, 1, 1)
              + torch.arange(bs, device=device))
        flat = at.view(batch, nheads_k, nb * bs)[:, :, t0 - fb * bs:t1 - fb * bs].reshape(-1)
    if seen is None:
        pass
    elif mode == "blocks":
        hidden = (~seen).reshape(batch, 1, q_len, nb, bs).permute(0, 3, 1, 2, 4)  # [B, nb, 1, L, BS]
        bias = torch.zeros((batch, nb, nheads_k, q_len, bs), device=device).masked_fill_(hidden, float("-inf"))
        bias = bias.view(batch * nb * nheads_k, q_len, bs)
    else:
        bias = torch.zeros(seen.shape, device=device).masked_fill_(~seen, float("-inf"))
    spacing = _spacing(runs) if runs is not None else None
    adjacent = runs is not None and (batch == 1 or spacing == nb)  # runs one after another: spaced by a run
    ends = length + n_new if length is not None else cache_seqlens[:batch].long().to(device) + n_new
    step = q_len == 1 and tail and spacing is not None and bias is None and blind is None
    return Plan(batch, q_len, mode, fb, nb, t0, t1 - t0, runs, adjacent, spacing, flat, wflat, tail, bias,
                None if blind is None else blind.unsqueeze(-1), ends, step)


def _step_plan(rows: list[list[int]], batch: int, length: int, block_size: int, max_blocks: int) -> Plan | None:
    """`plan` for the step a PlugCache decodes most, in a few host operations: one new token and query per row of
    `length` tokens (a span from slot 0, no window, no slot mask, no row starting past slot 0), K/V stored heads
    first, on the CPU. None where a row's blocks are not consecutive (or not all mapped): `plan` then works it
    out in general. Tests hold the two equal."""
    end = length + 1
    nb = -(-end // block_size)
    if nb > max_blocks:
        return None
    runs = _runs(rows, batch, 0, nb)
    if runs is None:
        return None
    spacing = _spacing(runs)
    return Plan(batch, 1, "spans", 0, nb, 0, end, runs, batch == 1 or spacing == nb, spacing, None, None, True, None,
                None, end, spacing is not None)


def _spacing(runs: list[int]) -> int | None:
    """The step by which the rows' runs follow each other evenly (0 for one row), or None."""
    n = len(runs)
    step = runs[1] - runs[0] if n > 1 else 0
    if step >= 0 and runs == (list(range(runs[0], runs[0] + n * step, step)) if step else [runs[0]] * n):
        return step
    return None


def _write_rows(block_table, cache_seqlens, batch, n_new, bs, nheads_k, sb, sh, rows, length) -> torch.Tensor:
    """`[batch * n_new * nheads_k]`: the row of the storage (`_slot_rows`) each new token's K / V goes to (block *
    sb + head * sh + slot in the block)."""
    device = block_table.device
    if rows is not None and length is not None and batch * n_new <= 64:  # a decode step: on the host
        return torch.tensor([rows[b][s // bs] * sb + h * sh + s % bs for b in range(batch)
                             for s in range(length, length + n_new) for h in range(nheads_k)], device=device)
    new = cache_seqlens[:batch].long().unsqueeze(1) + torch.arange(n_new, device=device)  # [B, n_new] slots
    return _storage_rows(new, block_table[:batch].long().gather(1, new // bs), bs, nheads_k, sb, sh)


class WritePlan(NamedTuple):
    """Where a prefill's new tokens go (`ForwardHost._plan`, `DeviceState.writes`): `batch` rows written (a shared
    prompt's leaders, or every row) of `q_len` tokens each, at the rows of the storage `wflat [batch * q_len *
    nheads_k]` (`write_rows`)."""

    batch: int
    q_len: int
    wflat: torch.Tensor


def write_rows(block_table, rows: list[int], length: int, n_new: int, bs: int, nheads_k: int,
               strides: tuple[int, int]) -> torch.Tensor:
    """`[len(rows) * n_new * nheads_k]` int64: the rows of the storage (`_slot_rows`, for buffers of `slot_strides`
    `strides`) where slots [length, length + n_new) of the table's `rows` lie, ordered as the new tokens `[rows,
    n_new, nheads_k]`: `write`'s `wflat`. Every one of those slots must be mapped."""
    device = block_table.device
    slots = torch.arange(length, length + n_new, device=device).expand(len(rows), n_new)
    table = block_table[:len(rows)] if rows == list(range(len(rows))) else \
        block_table[torch.tensor(rows, device=device)]
    return _storage_rows(slots, table.long().gather(1, slots // bs), bs, nheads_k, *strides)


def _storage_rows(slots, blocks, bs: int, nheads_k: int, sb: int, sh: int) -> torch.Tensor:
    """`[B * n_new * nheads_k]`: the rows of the storage (`_slot_rows`) of slots `[B, n_new]` in their blocks."""
    heads = torch.arange(nheads_k, device=slots.device) * sh
    return ((blocks * sb + slots % bs).unsqueeze(-1) + heads).reshape(-1)


def _seen(cache_seqlens, cache_starts, cache_valid, batch, q_len, n_new, window, causal, t0, t1,
          length, lead_free: bool = False) -> torch.Tensor | None:
    """`[batch, 1, q_len, t1 - t0]` bool: which of slots [t0, t1) each query attends (`reference`'s rules); None
    when the host sees that every query attends every slot."""
    device = cache_starts.device
    holes = cache_valid is not None and cache_valid.numel()
    if length is not None and not holes and device.type == "cpu":
        s = length + n_new - q_len  # the first query's slot
        lo = s + q_len - window if window > 0 else t0  # the last query's window starts last
        if (lo <= t0 and (s if causal else length + n_new - 1) >= t1 - 1
                and (lead_free or not bool(cache_starts[:batch].any()))):
            return None  # every query sees every slot (a decode step without padding): no tensor to build
    t = torch.arange(t0, t1, device=device)
    if length is None:
        lo, hi = query_ranges(cache_seqlens, cache_starts, batch, q_len, window, n_new, causal)
        seen = (t >= lo.unsqueeze(-1)) & (t <= hi.unsqueeze(-1))  # [B, L, T]
    else:  # every row's queries sit at the same slots: the window and causal bounds are the host's
        s = [length + n_new - q_len + i for i in range(q_len)]
        hi = s if causal else [length + n_new - 1] * q_len
        lo = [x - window + 1 for x in s] if window > 0 else [t0] * q_len
        seen = t >= cache_starts[:batch, None, None]  # [B, 1, T]
        if max(lo) > t0 or min(hi) < t1 - 1:  # some query's range leaves out some of the slots
            lo_t, hi_t = (torch.tensor(x, device=device).unsqueeze(-1) for x in (lo, hi))
            seen = seen & (t >= lo_t) & (t <= hi_t)  # [B, L, T]
        seen = seen.expand(batch, q_len, t1 - t0)
    if holes:
        valid = cache_valid[:batch, t0:t1].bool()
        if valid.shape[1] < t1 - t0:  # slots past the valid map are never seen
            valid = torch.nn.functional.pad(valid, (0, t1 - t0 - valid.shape[1]))
        seen = seen & valid.unsqueeze(1)
    return seen.unsqueeze(1)


def _runs(rows, batch: int, first: int, nb: int) -> list[int] | None:
    runs = []
    for row in rows[:batch]:
        part = row[first:first + nb]
        if len(part) < nb or part[0] < 0 or part != list(range(part[0], part[0] + nb)):
            return None
        runs.append(part[0])
    return runs


def write(k, v, k_cache, v_cache, k_scale, v_scale, wflat: torch.Tensor) -> None:
    """Write `k, v [B, n_new, nheads_k, D]` at the rows of the storage `wflat` names (`Plan.wflat`), quantized for
    int8 / int4 caches, in place."""
    rows = k.shape[0] * k.shape[1] * k.shape[2]
    new = (k.reshape(rows, -1), v.reshape(rows, -1))  # [B * n_new * Hk, D] each
    if k_cache.dtype != k.dtype:  # K and V quantized in one pass
        new, s = _quantize(torch.stack(new), k_cache.dtype)
        for scale, part in zip((k_scale, v_scale), s):
            _slot_rows(scale).index_copy_(0, wflat, part)
    for cache, part in zip((k_cache, v_cache), new):
        _slot_rows(cache).index_copy_(0, wflat, part)


def write_new(k, v, k_cache, v_cache, k_scale, v_scale, slots, blocks, k_tail=None, v_tail=None) -> None:
    """`reference.write_kvcache_ref` for new tokens `k, v [B, n_new, nheads_k, D]` whose slots and blocks `[B,
    n_new]` (`reference.slot_blocks`) are all mapped (on the CPU `ops.write_kvcache` checks that first), buffers in
    a `paged_layout`, K/V in the cache's dtype or codes: the same bytes written, in place, in a few ops (a
    prefill's write into a PlugCache): one `index_copy_` per buffer (K and V quantized together), and the exact
    tail's positions (one copy per buffer where every row starts at the same slot)."""
    batch, n_new, nheads_k = k.shape[:3]
    if not batch or not n_new:
        return
    write(k, v, k_cache, v_cache, k_scale, v_scale,
          _storage_rows(slots, blocks, k_cache.shape[2], nheads_k, *slot_strides(k_cache)))
    if has_tail(k_tail):
        starts = slots[:, 0]
        _tail_write(k, v, k_tail, v_tail, int(starts[0]) if bool((starts == starts[0]).all()) else starts)  # (CPU)


def _blocks(buf: torch.Tensor, p: Plan) -> list[torch.Tensor]:
    """The plan's blocks of `buf [num_blocks, ...]` (every row's consecutive): one `[batch * nb, ...]` view when the
    rows' runs follow each other, else one `[nb, ...]` view per row."""
    if p.adjacent:
        return [buf[p.runs[0]:p.runs[0] + p.batch * p.nb]]
    return [buf[r:r + p.nb] for r in p.runs]


class Exact(NamedTuple):
    """The exact tail's part of a call (`reference`, rule 4): the plan's slot columns [c0, slots) whose K/V come
    from the tail, as `k, v [B, Hk, slots - c0, D]` (views of the tail where every row's part is the same, else
    gathered) and `use` `[B, 1, 1, slots - c0]` bool, or None: every column of every row."""

    c0: int
    k: torch.Tensor
    v: torch.Tensor
    use: torch.Tensor | None


def _exact(k_tail, v_tail, p: Plan) -> Exact | None:
    """Where the plan's rows read their exact tail, or None: no slot of theirs does."""
    bs = k_tail.shape[2]
    t0, t1 = p.t0, p.t0 + p.slots
    if isinstance(p.ends, int):  # every row alike: the columns [lo, end) are tail positions [lo % bs, ...)
        lo = max(p.ends - p.ends % bs, t0)
        if lo >= min(p.ends, t1):
            return None
        at = slice(lo % bs, lo % bs + min(p.ends, t1) - lo)
        return Exact(lo - t0, k_tail[:p.batch, :, at], v_tail[:p.batch, :, at], None)
    ends = p.ends
    lo = ends - ends % bs
    c0 = max(0, int(lo.min()) - t0) if p.batch else p.slots  # the CPU: free to read
    if c0 >= p.slots:
        return None
    t = torch.arange(t0 + c0, t1, device=ends.device)
    use = ((t >= lo[:, None]) & (t < ends[:, None]))[:, None, None, :]  # [B, 1, 1, w]
    hide = ~use.transpose(2, 3)  # positions a row does not read: zeroed (they may hold anything)
    k, v = (x[:p.batch].index_select(2, t % bs).masked_fill(hide, 0) for x in (k_tail, v_tail))
    return Exact(c0, k, v, use)


def _write_exact(k, v, k_tail, v_tail, p: Plan) -> None:
    """Rule 4's write through the plan: the new tokens that land in their row's last block, into the tail (every
    new token has a slot: the plan's caller made sure)."""
    _tail_write(k[:p.batch], v[:p.batch], k_tail, v_tail, p.ends - k.shape[1])


def _tail_write(k, v, k_tail, v_tail, before: int | torch.Tensor) -> None:
    """Rule 4's write for new tokens `k, v [B, n_new, nheads_k, D]` that all have a slot, row b's from slot
    `before[b]`: one copy per buffer when `before` is an int (every row starts there), else the reference's."""
    if isinstance(before, int):
        write_tail_from(k, v, k_tail, v_tail, before)
        return
    ok = torch.ones(k.shape[:2], dtype=torch.bool, device=k_tail.device)
    write_tail_ref(k, v, k_tail, v_tail, before, ok)


def attend(q, k, v, k_cache, v_cache, k_scale, v_scale, p: Plan, softmax_scale: float, k_tail=None,
           v_tail=None) -> torch.Tensor:
    """Write the new K/V (if any) and attend `q [B, L, nheads, D]` over the plan's slots: `[B, L, nheads, D]` in q's
    dtype, with `reference.attend_with_kvcache_ref`'s semantics (K/V in the model dtype attended in it, as SDPA
    does; codes in fp32). `k_tail, v_tail`: the exact tail of quantized caches (rule 4; spans and dense plans)."""
    exact = has_tail(k_tail)
    if exact and (p.mode == "blocks" or k_cache.dtype == q.dtype):
        raise ValueError("the exact tail is read on this path for quantized caches stored heads first or gathered "
                         "(a PlugCache's), not for this call: use the reference")
    grad = torch.is_grad_enabled() and (q.requires_grad or k is not None and (k.requires_grad or v.requires_grad)
                                        or k_cache.requires_grad or v_cache.requires_grad)  # (K/V written with grad)
    if (p.step and not exact and k_cache.dtype == q.dtype and k is not None and q.shape[1] == 1 and not grad
            and k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()):
        return _decode_step(q, k, v, k_cache, v_cache, p, softmax_scale)
    kind = KINDS.get(k_cache.dtype, "fp")
    if (p.step and kind != "fp" and k is not None and k.shape[1] == q.shape[1] == 1 and not grad
            and isinstance(p.ends, int)):
        return _decode_step_codes(q, k, v, k_cache, v_cache, k_scale, v_scale, p, softmax_scale,
                                  *((k_tail, v_tail) if exact else (None, None)))
    if p.mode == "blocks":
        if p.wflat is not None:
            write(k, v, k_cache, v_cache, k_scale, v_scale, p.wflat)
        return _attend_blocks(q, k_cache, v_cache, k_scale, v_scale, p, softmax_scale, kind)
    read = _spans if p.mode == "spans" else _gathered
    if p.wflat is not None:
        write(k, v, k_cache, v_cache, k_scale, v_scale, p.wflat)
    keys, values = read(k_cache, p), read(v_cache, p)
    scales = (read(k_scale, p), read(v_scale, p)) if kind != "fp" else ([None] * len(keys),) * 2
    if p.tail and k is not None and k.shape[1]:
        _write_tail(k, v, keys, values, *scales, kind)
    ex = None
    if exact:
        if k is not None and k.shape[1]:
            _write_exact(k, v, k_tail, v_tail, p)
        ex = _exact(k_tail, v_tail, p)
    parts = list(zip(keys, values, *scales))
    if torch.is_grad_enabled() and q.requires_grad:  # autograd keeps what it reads: copies, not views of the pool
        parts = [tuple(None if x is None else x.clone() for x in part) for part in parts]  # (written next step)
        ex = None if ex is None else Exact(ex.c0, ex.k.clone(), ex.v.clone(), ex.use)
    return _attend_rows(q, parts, p, softmax_scale, kind, ex)


def _decode_step(q, k, v, k_cache, v_cache, p: Plan, softmax_scale: float) -> torch.Tensor:
    """`attend` for the step a PlugCache decodes most (what `_spans`, `_write_tail` and `_attend_rows` do for it, in
    one frame, the same ops on the same views, so the same bits): one query per row, K/V in its dtype and laid out
    alike, every row's span one strided view (`p.spacing`) ending with the new token (`p.tail`), every slot seen (no
    bias or blind query)."""
    n = k.shape[1]  # the new tokens, the span's last slots (K and V laid out alike, heads first)
    views = [_span_slots(buf, p, p.slots - n, n, True, False) for buf in (k_cache, v_cache)]
    views += [_span_slots(buf, p, 0, p.slots, False, False) for buf in (k_cache, v_cache)]
    return attend_step(q, k, v, *views, softmax_scale)


def _decode_step_codes(q, k, v, k_cache, v_cache, k_scale, v_scale, p: Plan, softmax_scale: float, k_tail=None,
                       v_tail=None) -> torch.Tensor:
    """`attend` for an INT8 or INT4 cache's decode step (the step `_decode_step` takes in the model dtype: one new
    token and query a row, every row's span one strided view ending with it, every slot seen, one length for all
    rows): the views of each buffer (`CodeViews`), then `attend_step_codes` on them. `k_tail, v_tail`: INT4's exact
    tail, or None."""
    parts = zip(*(_code_parts(*bufs, p, False) for bufs in ((k_cache, k_scale, k_tail), (v_cache, v_scale, v_tail))))
    return attend_step_codes(q, k, v, CodeViews(p.batch, *(None if k_part is None else (k_part, v_part)
                                                           for k_part, v_part in parts)), softmax_scale)


class CodeViews(NamedTuple):
    """Where an INT8 or INT4 layer's decode step writes and reads, each field K's and V's: one view `[2, ...]` (a
    slab's, `code_step_views`) or a pair (one layer's buffers, `_decode_step_codes`). The new token's codes `[B, 1,
    Hk, D]` (int8) or `[B, 1, Hk, D/2]` (int4), scales `[B, 1, Hk]` (int8) or parameters `[B, 1, Hk, 4]` (int4), and
    exact values `[B, 1, Hk, D]` (INT4's exact tail; None: none); the codes `[B, Hk, c0, ...]` and scales or
    parameters `[B, Hk, c0, ...]` of the span's slots [t0, lo) read from the pool, and the exact values `[B * Hk, w,
    D]` of its slots [lo, end) read from the tail (None: none; `reference`, rule 4)."""

    batch: int
    new: torch.Tensor | tuple
    new_params: torch.Tensor | tuple
    new_exact: torch.Tensor | tuple | None
    codes: torch.Tensor | tuple
    params: torch.Tensor | tuple
    exact: torch.Tensor | tuple | None

    # the step reads its rows' last block, the new token's, from the exact tail (the block is not full after it):
    # nothing reads that token's codes before the block fills, so they may be written later (`PlugLayer.unwritten`)
    codes_can_wait = property(lambda self: self.exact is not None)


def code_step_views(codes: torch.Tensor, scales: torch.Tensor, tails: torch.Tensor | None, p: Plan) -> list[CodeViews]:
    """The views `_decode_step_codes` takes of each layer's buffers, for all the layers of a slab at once (one view
    and one `unbind` per kind, K's and V's together): `codes` `[2 * count, nheads_k, num_blocks, block_size, width]`
    and `scales` `[2 * count, nheads_k, num_blocks, block_size(, 4)]` hold layer i's K at i and its V at count + i
    (`KV.allocate_group`), `tails` `[2 * count, max_batch, nheads_k, block_size, head_dim]` its exact tail's alike
    (`Tail.allocate_group`), or None; `p` a step plan with one length for all rows. Returns each layer's, ordered as
    the slab."""
    assert p.step and isinstance(p.ends, int) and codes.dim() == 5, "code step views: a step plan over a slab"
    parts = [None if x is None else x.unbind(0) for x in _code_parts(codes, scales, tails, p, True)]
    return [CodeViews(p.batch, *(None if x is None else x[i] for x in parts)) for i in range(codes.shape[0] // 2)]


def _code_parts(codes, scales, tails, p: Plan, slab: bool) -> tuple:
    """`CodeViews`' six kinds of view of one buffer each (`slab`: of a slab's, `[count, 2, ...]`, layer i's K and V
    at i): the new token's codes, scales and exact values, then the codes and scales read from the pool and the
    exact values read from the tail."""
    bs, end = codes.shape[3 if slab else 2], p.ends
    lo = max(end - end % bs, p.t0) if tails is not None else end  # the first slot read from the tail
    c0, w = lo - p.t0, end - lo
    return (_span_slots(codes, p, p.slots - 1, 1, True, slab), _span_slots(scales, p, p.slots - 1, 1, True, slab),
            None if tails is None else _tail_slots(tails, p.batch, (end - 1) % bs, 1, True),
            _span_slots(codes, p, 0, c0, False, slab), _span_slots(scales, p, 0, c0, False, slab),
            None if tails is None or not w else _tail_slots(tails, p.batch, lo % bs, w))


def attend_step_codes(q, k, v, views: CodeViews, softmax_scale: float, codes: bool = True) -> torch.Tensor:
    """An INT8 or INT4 layer's decode step on its views (`CodeViews`): the new token's codes and scales (and exact
    values) written through them, in place (`codes=False`: its exact values only, where `views.codes_can_wait`),
    then `q [B, 1, nheads, D]` attends each row's span: `[B, 1, nheads, D]`. The arithmetic of every INT8 / INT4
    read on this path (a short span dequantized and attended by SDPA over all rows at once, `_dequantized_span`; a
    long one through `_int8_scores`, `_int8_values`, `_int4_scores`, `_int4_values`, the exact tail's slots as
    `_exact_pass` adds them), so the same bits as the general path, in few ops, batched over rows and KV heads. For a
    call without autograd (the caller checks): its ops run in inference mode, which spares each the bookkeeping
    autograd does even under no_grad (about 0.2 ms a step of the benchmark's 4-layer INT4 model), and the output is
    an ordinary tensor: a short span's SDPA runs after it, outside (its inputs may be inference tensors, and its
    output is then ordinary without a copy)."""
    assert codes or views.codes_can_wait, "a step's codes wait only where the step reads its token from the tail"
    with torch.inference_mode():
        out = _codes_step(q, k, v, views, softmax_scale, codes)
    if isinstance(out, tuple):  # (query, keys, values) of a short span
        out = torch.nn.functional.scaled_dot_product_attention(*out, scale=softmax_scale)
        return out.view(q.shape).to(q.dtype)
    return out.to(q.dtype, copy=True)


def _codes_step(q, k, v, views: CodeViews, softmax_scale: float, codes: bool) -> torch.Tensor | tuple:
    batch, _, nheads, head_dim = q.shape
    held = views.codes[0] if isinstance(views.codes, tuple) else views.codes  # K's, or K's and V's: [(2,) B, Hk, c0, .]
    nheads_k, c0 = held.shape[-3], held.shape[-2]
    n, group = batch * nheads_k, nheads // nheads_k
    kind = KINDS[held.dtype]
    int4 = kind == "int4"
    new = torch.stack((k, v))
    if codes:
        (_quantize_int4 if int4 else _quantize_int8)(new, (views.new, views.new_params))  # [2, B, 1, Hk, ...] each
    if views.new_exact is not None:
        _put(views.new_exact, new)
    k_exact, v_exact = (None, None) if views.exact is None else _pair(views.exact)
    if c0 + (0 if k_exact is None else k_exact.shape[1]) <= DEQUANT_SLOTS[kind]:
        keys, values = _dequantized_span(views, kind, batch, nheads_k, head_dim)
        return _f32(q.reshape(batch, nheads_k, group, head_dim)), keys, values  # (SDPA: the caller's)
    qf = _f32(q.reshape(n, group, head_dim)) * softmax_scale
    k_codes, v_codes = _pair(views.codes)
    if int4:
        k_params, v_params = _pair_params(views.params, n)
        s = _int4_scores(qf, k_codes, k_params)
    else:
        k_params, v_params = _pair(views.params)
        s = _int8_scores(qf, k_codes, k_params)
    if k_exact is not None:
        s = torch.cat([s, torch.bmm(qf, _f32(k_exact).transpose(1, 2))], -1)
    probs = torch.softmax(s, -1)
    out = (_int4_values if int4 else _int8_values)(probs[..., :c0], v_codes, v_params)
    if v_exact is not None:
        out.add_(torch.bmm(probs[..., c0:], _f32(v_exact)))
    return out.view(batch, 1, nheads, head_dim)


def _dequantized_span(views: CodeViews, kind: str, batch: int, nheads_k: int, head_dim: int) -> tuple:
    """A short span's K and V as fp32 `[B, Hk, slots, D]` each (`_dequantize`, then the exact tail's slots): a slab's
    views dequantize K's and V's together, in one pass."""
    if isinstance(views.codes, tuple):
        kv = [_dequantize(c, s, kind) for c, s in zip(views.codes, views.params)]
        if views.exact is not None:  # the span's last slots, from the tail
            kv = [torch.cat((x, _f32(t.view(batch, nheads_k, -1, head_dim))), 2)
                  for x, t in zip(kv, views.exact)]
        return tuple(kv)
    kv = _dequantize(views.codes, views.params, kind)  # [2, B, Hk, c0, D]
    if views.exact is not None:
        kv = torch.cat((kv, _f32(views.exact.view(2, batch, nheads_k, -1, head_dim))), 3)
    return kv.unbind(0)


def _f32(x: torch.Tensor) -> torch.Tensor:
    """`x` as fp32: itself where it is (a decode step's `.to` dispatches an op even then)."""
    return x if x.dtype == torch.float32 else x.to(torch.float32)


def _pair(x) -> tuple:
    """A `CodeViews` field as (K's, V's)."""
    return x if isinstance(x, tuple) else x.unbind(0)


def _put(dst, src: torch.Tensor) -> None:
    """Write `src [2, ...]` (K's, V's) through a `CodeViews` field, in place."""
    if isinstance(dst, tuple):
        dst[0].copy_(src[0])
        dst[1].copy_(src[1])
    else:
        dst.copy_(src)


def _pair_params(params, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An INT4 `CodeViews` parameters field as (K's, V's), each `_params`' fp32 `[N, 4, T]` (a slab's in one
    conversion)."""
    if isinstance(params, tuple):
        return _params(params[0], n), _params(params[1], n)
    return _params(params, 2 * n).unflatten(0, (2, n)).unbind(0)


def _int8_scores(qx, codes, ks) -> torch.Tensor:
    """`qx [..., R, D]` (fp32, scaled) against the INT8 keys `codes [..., T, D]` with their scales `ks [..., T]`: the
    scores `[N, R, T]` fp32, N the leading dims' product, as every INT8 read on this path computes them (q . codes
    as floats, times the key's scale)."""
    n = math.prod(codes.shape[:-2])
    rows, slots = qx.shape[-2], codes.shape[-2]
    return torch.bmm(qx.reshape(n, rows, qx.shape[-1]), _floats(codes).view(n, slots, codes.shape[-1]).transpose(
        1, 2)).mul_(ks.reshape(n, 1, slots))


def _int8_values(pr, codes, vs) -> torch.Tensor:
    """The probabilities `pr [..., R, T]` times the INT8 values `codes [..., T, D]` with their scales `vs [..., T]`:
    `[N, R, D]` fp32, N the leading dims' product, as every INT8 read on this path computes them ((pr x the values'
    scales) . codes as floats)."""
    n = math.prod(codes.shape[:-2])
    rows, slots = pr.shape[-2:]
    return torch.bmm(pr.reshape(n, rows, slots) * vs.reshape(n, 1, slots),
                     _floats(codes).view(n, slots, codes.shape[-1]))


def _int4_scores(qx, codes, kp) -> torch.Tensor:
    """`qx [..., R, D]` (fp32, scaled) against the INT4 keys `codes [..., T, D/2]` with their parameters `kp [N, 4,
    T]` (`_params`): the scores `[N, R, T]` fp32, N the leading dims' product. Every INT4 read on this path computes
    them so, the same bits whichever way its slots were read: per half, q . codes as floats, times the half's scale;
    then the minima's terms, (sum of q's half) . minimum, in one product."""
    n = kp.shape[0]
    rows, head_dim = qx.shape[-2:]
    half = head_dim // 2
    qf = qx.reshape(n, rows, head_dim)
    s = torch.bmm(qf[..., :half], _plane(codes, n, False).transpose(1, 2)).mul_(kp[:, 0:1])
    s.addcmul_(torch.bmm(qf[..., half:], _plane(codes, n, True).transpose(1, 2)), kp[:, 2:3])
    return torch.baddbmm(s, qf.view(n, rows, 2, half).sum(-1), kp[:, 1::2])


def _int4_values(pr, codes, vp) -> torch.Tensor:
    """The probabilities `pr [..., R, T]` times the INT4 values `codes [..., T, D/2]` with their parameters `vp [N,
    4, T]` (`_params`): `[N, R, D]` fp32, N the leading dims' product, as every INT4 read on this path computes
    them: per half, (pr x the half's scales) . codes as floats, then the minima's terms, pr . minimum, added."""
    n = vp.shape[0]
    rows, slots = pr.shape[-2:]
    pc = pr.reshape(n, rows, slots)
    out = torch.cat([torch.bmm(pc * vp[:, 0:1], _plane(codes, n, False)),
                     torch.bmm(pc * vp[:, 2:3], _plane(codes, n, True))], -1)
    out.view(n, rows, 2, codes.shape[-1]).add_(torch.bmm(pc, vp[:, 1::2].transpose(1, 2)).unsqueeze(-1))
    return out


def _span_slots(buf, p: Plan, first: int, count: int, new: bool, slab: bool) -> torch.Tensor:
    """Slots [first, first + count) of each row's span in `buf` (stored heads first, rows evenly spaced: a step
    plan's), as `[B, Hk, count, ...]`, or `new`: `[B, count, Hk, ...]` (the new tokens' order). `slab`: `buf` is a
    slab's `[2 * layers, Hk, num_blocks, block_size, ...]`, and the views lead with `[layers, 2]` (`_layers_lead`)."""
    lead, (s1, s0, s2), dims = (_layers_lead(buf), buf.stride()[1:4], 4) if slab else \
        (((), ()), (buf.stride(1), buf.stride(0), buf.stride(2)), 3)
    step, skip = _span_offsets(p, s0, s2, buf.shape[dims - 1])
    size, stride = (p.batch, count, buf.shape[1]) if new else (p.batch, buf.shape[1], count), \
        (step, s2, s1) if new else (step, s1, s2)
    return buf.as_strided((*lead[0], *size, *buf.shape[dims:]), (*lead[1], *stride, *buf.stride()[dims:]),
                          buf.storage_offset() + skip + first * s2)


def _params(params, n: int) -> torch.Tensor:
    """INT4 parameters `[..., T, 4]` as fp32 `[N, 4, T]` (scale and minimum of each half, by slot), N the leading
    dims' product."""
    return params.to(torch.float32, memory_format=torch.contiguous_format).view(n, params.shape[-2], 4).transpose(1, 2)


def _plane(codes, n: int, high: bool) -> torch.Tensor:
    """One nibble of `codes [..., T, D/2]` as fp32 `[N, T, D/2]`, N the leading dims' product: dims [0, D/2), or
    [D/2, D) if `high`."""
    return _floats(codes >> 4 if high else codes & 15).view(n, *codes.shape[-2:])


def _tail_slots(tail, batch: int, first: int, count: int, new: bool = False) -> torch.Tensor:
    """Positions [first, first + count) of rows < batch of an exact tail `[max_batch, Hk, BS, D]` (contiguous), as
    `[batch * Hk, count, D]`, or `new`: `[batch, count, Hk, D]`; of a slab's tails `[2 * layers, max_batch, ...]`,
    led by `[layers, 2]` (`_layers_lead`)."""
    lead = _layers_lead(tail) if tail.dim() == 5 else ((), ())
    s0, s1, s2 = tail.stride()[-4:-1]
    hk, d = tail.shape[-3], tail.shape[-1]
    size, stride = ((batch, count, hk, d), (s0, s2, s1, 1)) if new else ((batch * hk, count, d), (s1, s2, 1))
    return tail.as_strided((*lead[0], *size), (*lead[1], *stride), tail.storage_offset() + first * s2)


def _layers_lead(slab: torch.Tensor) -> tuple[tuple[int, int], tuple[int, int]]:
    """(size, stride) of the leading dims `[layers, 2]` by which a view of a slab `[2 * layers, ...]` (layer i's K at
    i, its V at layers + i) gives each layer's K and V together."""
    count, stride = slab.shape[0] // 2, slab.stride(0)
    return (count, 2), (stride, count * stride)


def _span_offsets(p: Plan, s0: int, s2: int, block_size: int) -> tuple[int, int]:
    """(stride between rows, offset of the first row's span) in a buffer stored heads first with block stride `s0`
    and slot stride `s2`, for a plan whose rows' runs are evenly spaced (`p.spacing`)."""
    return p.spacing * s0, p.runs[0] * s0 + (p.t0 - p.fb * block_size) * s2


class StepViews(NamedTuple):
    """Where a layer's decode step in the model dtype writes and reads (`step_views`): the new token's slot in K and
    in V `[B, 1, Hk, D]`, then the spans of K and V `[B, Hk, slots, D]` (`attend_step`)."""

    k_new: torch.Tensor
    v_new: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor

    batch = property(lambda self: self.keys.shape[0])
    codes_can_wait = False  # (no codes)


def step_views(slab: torch.Tensor, p: Plan) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """The views `_decode_step` takes of each layer's buffers, for all the layers of a slab at once (one view and
    one `unbind` each): `slab` `[2 * count, nheads_k, num_blocks, block_size, head_dim]` holds layer i's K at i and
    its V at count + i (`KV.allocate_group`); `p` a step plan (`Plan.step`). Returns (where each buffer takes the
    new token, `[batch, 1, nheads_k, head_dim]`; each buffer's spans, `[batch, nheads_k, slots, head_dim]`), both
    ordered as the slab."""
    assert p.step and slab.is_contiguous() and slab.dim() == 5, "step views: a step plan over a contiguous slab"
    n, nheads_k, _, block_size, head_dim = slab.shape
    sl, s1, s0, s2 = slab.stride()[:4]  # per buffer, head, block, slot
    step, skip = _span_offsets(p, s0, s2, block_size)
    at = slab.storage_offset()
    new = slab.as_strided((n, p.batch, 1, nheads_k, head_dim), (sl, step, s2, s1, 1), at + skip + (p.slots - 1) * s2)
    spans = slab.as_strided((n, p.batch, nheads_k, p.slots, head_dim), (sl, step, s1, s2, 1), at + skip)
    return new.unbind(0), spans.unbind(0)


def attend_step(q, k, v, k_new, v_new, keys, values, softmax_scale: float) -> torch.Tensor:
    """The decode step on views: `k, v [B, n, nheads_k, D]` into `k_new, v_new` (views of the buffers where the new
    tokens go, in place), then `q [B, 1, nheads, D]` attends `keys, values [B, nheads_k, slots, D]` (spans ending
    with the new tokens, every slot seen) with PyTorch's SDPA, each KV head's queries as its rows: `[B, 1, nheads,
    D]`. For a call without autograd (the caller checks: q, k, v and the buffers need no grad): with grad enabled it
    runs under no_grad, since autograd refuses in-place writes to `step_views`' views (`unbind`'s) and reads of them
    after one there."""
    if torch.is_grad_enabled():
        with torch.no_grad():
            return attend_step(q, k, v, k_new, v_new, keys, values, softmax_scale)
    k_new.copy_(k)
    v_new.copy_(v)
    batch, _, nheads, head_dim = q.shape
    nheads_k = keys.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.reshape(batch, nheads_k, nheads // nheads_k, head_dim), keys, values, scale=softmax_scale)
    return out.reshape(batch, 1, nheads, head_dim)


def _write_tail(k, v, keys, values, k_scales, v_scales, kind: str) -> None:
    """Write `k, v [B, n_new, nheads_k, D]` as the last n_new slots of the rows' spans (`Plan.tail`), through the
    span views, quantized for int8 / int4 caches: the same bytes `write` stores, with no index to compute."""
    n = k.shape[1]
    new, sc = (k, v), None
    if kind != "fp":  # K and V quantized in one pass
        new, sc = _quantize(torch.stack(new), keys[0].dtype)
    b, whole = 0, len(keys) == 1
    for kb, vb, ks, vs in zip(keys, values, k_scales, v_scales):
        rows = kb.shape[0]
        for buf, part in ((kb, new[0]), (vb, new[1])) + (((ks, sc[0]), (vs, sc[1])) if sc is not None else ()):
            _last(buf, n).copy_(part if whole else part[b:b + rows])
        b += rows


def _quantize(x: torch.Tensor, storage: torch.dtype):
    """`reference.quantize`, with INT8 and INT4 in fewer ops (`_quantize_int8`, `_quantize_int4`)."""
    if storage == torch.int8:
        return _quantize_int8(x)
    return _quantize_int4(x) if storage == torch.uint8 else quantize(x, storage)


def _quantize_int8(x: torch.Tensor, out: tuple | None = None):
    """`reference.quantize_int8` in 11 aten ops where it takes 14 (12 and 15 for half precision), writing through views:
    the same codes and scales, bit for bit (tests hold the two equal). The same arithmetic: the largest magnitude (one
    norm instead of abs and max), scale = amax / 127, codes round(x * inv) with inv = 127 / amax computed as the
    reference computes it (the reciprocal of amax clamped to 1e-30, times 127), 0 where amax is NaN; where amax is 0
    every x is +-0, so its codes are 0 whatever inv is. The reference's clamp to [-127, 127] changes nothing and is left
    out: for amax >= 1e-30, |x| <= amax and inv = 127 / amax to two roundings, so |x * inv| <= 127 (1 + 2^-24)^3 <
    127.5; below, inv is about 1.27e32 and |x| < 1e-30; a NaN stays NaN through both. `out`: (codes, scales)
    destinations (tensors or `CodeViews` pairs) written in place, the codes converted by the copy (what
    `.to(torch.int8)` does), and None returned; else `(codes, scales)`."""
    xf = _f32(x)
    amax = torch.linalg.vector_norm(xf, float("inf"), -1)
    inv = amax.clamp_min(1e-30).reciprocal_().mul_(INT8_MAX).nan_to_num_(nan=0.0)
    codes = torch.mul(xf, inv.unsqueeze(-1)).round_()
    if out is None:
        return codes.to(torch.int8), amax / INT8_MAX
    _put(out[0], codes)
    _put(out[1], amax.div_(INT8_MAX))
    return None


def _quantize_int4(x: torch.Tensor, out: tuple | None = None):
    """`reference.quantize_int4` in 23 aten ops where it takes 30 (24 and 31 for half precision), writing through views:
    the same codes and parameters, bit for bit (NaN payloads aside; tests hold the two equal). A decode step quantizes a
    few vectors a layer, so the ops' count is its cost. The same arithmetic: the halves' minima and maxima, s = (max -
    min) / 15 and the minimum kept in fp16, codes round((x - m) / s) clamped to [0, 15] (1 / s is 0 where s is 0, or
    NaN), the high half's code times 16 added to the low half's (the high nibble; as bytes, so that a NaN half's code
    leaves the other half's whole). `out`: (codes, parameters) destinations (tensors or `CodeViews` pairs) written in
    place, and None returned; else `(codes, parameters)`."""
    halves = _f32(x).unflatten(-1, (2, x.shape[-1] // 2))
    lo, hi = halves.amin(-1), halves.amax(-1)
    params = torch.stack([(hi - lo) / INT4_MAX, lo], -1).half()  # [..., 2, 2]: (scale, minimum) of each half
    s, m = params.float().unbind(-1)
    inv = s.reciprocal().nan_to_num_(nan=0.0, posinf=0.0)
    n = (halves - m.unsqueeze(-1)).mul_(inv.unsqueeze(-1)).round_().clamp_(0, INT4_MAX).to(torch.uint8)
    low, high = n.unbind(-2)
    codes = torch.add(low, high, alpha=16)
    if out is None:
        return codes, params.flatten(-2)
    _put(out[0], codes)
    _put(out[1], params.flatten(-2))
    return None


def _last(view: torch.Tensor, n: int) -> torch.Tensor:
    """The last `n` slots of a span view `[b, Hk, slots, ...]`, as `[b, n, Hk, ...]` (the new tokens' order): one
    view, so a write needs no transpose or slices."""
    st = view.stride()
    return view.as_strided((view.shape[0], n, view.shape[1], *view.shape[3:]), (st[0], st[2], st[1], *st[3:]),
                           view.storage_offset() + (view.shape[2] - n) * st[2])


def _gathered(buf, p: Plan) -> list[torch.Tensor]:
    """The plan's slots of `buf` gathered into one `[B, Hk, slots, ...]` copy (one `index_select`), codes as codes."""
    return [_slot_rows(buf).index_select(0, p.flat).view(p.batch, buf.shape[1], p.slots, *buf.shape[3:])]


def _spans(buf, p: Plan) -> list[torch.Tensor]:
    """The plan's span of each row of `buf` (heads first, the row's blocks consecutive) as `[b, Hk, slots, ...]`
    views where it lies: one for all rows when their runs are evenly spaced, else one per row."""
    s0, s1, s2 = buf.stride()[:3]
    assert s0 == buf.shape[2] * s2, "spans need each head's blocks to follow one another (heads first)"
    tail, tail_strides = buf.shape[3:], buf.stride()[3:]
    skip = (p.t0 - p.fb * buf.shape[2]) * s2  # the span's first slot in the row's first block read

    def view(run: int, rows: int, step: int) -> torch.Tensor:
        return buf.as_strided((rows, buf.shape[1], p.slots, *tail), (step * s0, s1, s2, *tail_strides),
                              buf.storage_offset() + run * s0 + skip)

    if p.spacing is not None:
        return [view(p.runs[0], p.batch, p.spacing)]
    return [view(r, 1, 0) for r in p.runs]


def _attend_rows(q, parts, p: Plan, softmax_scale: float, kind: str, ex: Exact | None = None) -> torch.Tensor:
    """Attention of `q [B, L, nheads, D]` over `parts`, the plan's slots as `(k, v, k_scale, v_scale)` tensors
    `[b, Hk, slots, ...]` of consecutive rows (views of the spans, or one gathered copy): `[B, L, nheads, D]`.

    Each KV head's queries are the rows of its SDPA call, ordered (group, query), so there is no GQA expansion; K/V
    in the model dtype go to SDPA in it, as stock attends, codes through two products with their scales applied
    to the scores and probabilities (short spans: dequantized, then SDPA). The same arithmetic whichever way the
    slots were read, so a fork, a copy or a loaded file (whose blocks may lie elsewhere) gives the same bits as the
    cache it came from. `ex`: the columns read from the exact tail instead (quantized caches)."""
    batch, q_len, nheads, head_dim = q.shape
    nheads_k = parts[0][0].shape[1]
    group = nheads // nheads_k
    rows = group * q_len
    ct = q.dtype if kind == "fp" else torch.float32
    if q_len == 1:  # a decode step: [B, 1, nheads, D] is already [B, Hk, group, D]
        qh = q.reshape(batch, nheads_k, group, head_dim).to(ct)
    else:
        qh = q.view(batch, q_len, nheads_k, group, head_dim).permute(0, 2, 3, 1, 4).reshape(batch, nheads_k, rows,
                                                                                           head_dim).to(ct)
    bias = p.bias  # [B, 1, L, T], the same for every query of a group
    if bias is not None:
        bias = bias.to(ct)
        if group > 1 and q_len > 1:
            bias = bias.unsqueeze(2).expand(-1, -1, group, -1, -1).reshape(batch, 1, rows, p.slots)
    blind = None if p.blind is None else p.blind.unsqueeze(2).expand(-1, -1, group, -1, -1).reshape(
        batch, 1, rows, 1)
    out = _rows_pass(qh, parts, softmax_scale, kind, bias, blind, False, ex)
    if bias is not None and not _finite(out):
        # a slot no query sees held NaN / Inf (an earlier request's): again, with its K and V zeroed, as the reference
        out = _rows_pass(qh, parts, softmax_scale, kind, bias, blind, True, ex)
    if q_len > 1:
        out = out.view(batch, nheads_k, group, q_len, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(batch, q_len, nheads, head_dim).to(q.dtype)


def _rows_pass(qh, parts, softmax_scale: float, kind: str, bias, blind, safe: bool,
               ex: Exact | None = None) -> torch.Tensor:
    """`qh [B, Hk, R, D]` over `parts` (`_attend_rows`): `[B, Hk, R, D]`. `safe`: the K and V of slots no query
    sees zeroed (their scores -inf). `ex`: columns whose K/V come from the exact tail (codes only)."""
    hidden = torch.isinf(bias) if safe else None  # [B, 1, R or 1, T]
    short = kind != "fp" and parts[0][0].shape[2] <= DEQUANT_SLOTS[kind]  # dequantized, then SDPA (as the step)
    if kind != "fp" and not short and qh.shape[0] > 1:  # row by row: each row's codes as floats stay in the CPU's
        parts = [tuple(None if x is None else x[i:i + 1] for x in part) for part in parts  # caches between the two
                 for i in range(part[0].shape[0])]  # products
    outs, b, whole = [], 0, len(parts) == 1
    for kb, vb, ks, vs in parts:
        n = kb.shape[0]
        qb = qh if whole else qh[b:b + n]
        bn = bias if bias is None or whole else bias[b:b + n]
        unseen = None
        if hidden is not None:
            unseen = hidden[b:b + n].all(2).unsqueeze(-1)  # [n, 1, T, 1]: no query sees it
            kb, vb = kb.masked_fill(unseen, 0), vb.masked_fill(unseen, 0)
            ks, vs = (None if x is None else x.masked_fill(unseen if x.dim() == 4 else unseen.squeeze(-1), 0)
                      for x in (ks, vs))
        if short:  # a short span: its codes as floats, then SDPA over all its rows at once, as a decode step calls it
            if ex is not None and ex.use is None:  # (columns [c0, T) are every row's tail's)
                kb, vb, ks, vs = (x[:, :, :ex.c0] for x in (kb, vb, ks, vs))
            kb, vb = _dequantize(kb, ks, kind), _dequantize(vb, vs, kind)
            if ex is not None:
                kb, vb = _with_exact(kb, vb, ex, b, n, unseen)
            outs.append(torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, attn_mask=bn,
                                                                         scale=softmax_scale))
        elif kind == "fp":
            outs.append(torch.nn.functional.scaled_dot_product_attention(
                qb, kb.to(qb.dtype), vb.to(qb.dtype), attn_mask=bn, scale=softmax_scale))
        elif ex is not None:
            outs.append(_exact_pass(qb * softmax_scale, kb, vb, ks, vs, kind, bn,
                                    None if hidden is None else hidden[b:b + n], unseen, ex, b, n))
        else:
            scores = _scores(qb * softmax_scale, kb, ks, kind, qh.shape[-1], bn)  # [n, Hk, R, T]
            if hidden is not None:
                scores.masked_fill_(hidden[b:b + n], float("-inf"))
            outs.append(_values(torch.softmax(scores, -1), vb, vs, kind))
        b += n
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    return out if blind is None else out.masked_fill(blind, 0.0)


def _dequantize(codes, params, kind: str) -> torch.Tensor:
    """Codes `[..., T, Dc]` with their scales `[..., T]` (int8) or parameters `[..., T, 4]` (int4) as fp32 `[..., T,
    D]`: code x scale, or per half code x s + m, the reference's dequantization bit for bit. Every read of a short
    span on this path attends these (`DEQUANT_SLOTS`)."""
    if kind == "int8":  # (int8 codes times fp32 scales: fp32, the codes converted exactly)
        return torch.mul(codes, params.unsqueeze(-1))
    p = params.to(torch.float32).unflatten(-1, (2, 2))  # [..., T, half, (scale, minimum)]
    planes = torch.stack((codes & 15, codes >> 4), -2)  # [..., T, half, D/2], uint8
    # code x s + m in one op (the codes promoted to fp32 exactly): a 4-bit code times an fp16 scale is exact in fp32,
    # so a fused product-add (as addcmul may run) rounds once, where the reference's product and sum round once too
    s, m = p.split(1, -1)  # (one op where two slices take two)
    return torch.addcmul(m, planes, s).flatten(-2)


def _with_exact(keys, values, ex: Exact, b: int, n: int, unseen) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized `keys, values` of rows [b, b + n) with the exact tail's columns after theirs: `[n, Hk, ex.c0,
    D]` (every row's columns [c0, T) the tail's) or `[n, Hk, T, D]` (where `ex.use` says). `unseen [n, 1, T, 1]`:
    slots no query sees, their tail values zeroed (`_rows_pass`' safe pass)."""
    c0 = ex.c0
    kt, vt = ex.k[b:b + n].to(torch.float32), ex.v[b:b + n].to(torch.float32)
    if unseen is not None:
        kt, vt = kt.masked_fill(unseen[:, :, c0:], 0), vt.masked_fill(unseen[:, :, c0:], 0)
    if ex.use is not None:  # rows of several lengths: a column is the tail's where `use` says, else the codes'
        use = ex.use[b:b + n].transpose(2, 3)  # [n, 1, w, 1]
        kt, vt = torch.where(use, kt, keys[:, :, c0:]), torch.where(use, vt, values[:, :, c0:])
    return torch.cat((keys[:, :, :c0], kt), 2), torch.cat((values[:, :, :c0], vt), 2)


def _exact_pass(qs, kb, vb, ks, vs, kind: str, bias, hidden, unseen, ex: Exact, b: int, n: int) -> torch.Tensor:
    """`_rows_pass`'s codes for rows [b, b + n), with the columns [ex.c0, T) the exact tail's (where `ex.use` says;
    every row's, when None): their codes never enter the arithmetic (0 x an infinite scale would be NaN, where the
    reference never reads them), and nothing autograd keeps is written in place. `hidden [n, 1, R or 1, T]`,
    `unseen [n, 1, T, 1]`: the safe pass's (`_rows_pass`)."""
    c0, head_dim = ex.c0, qs.shape[-1]
    vt = ex.v[b:b + n] if unseen is None else ex.v[b:b + n].masked_fill(unseen[:, :, c0:], 0)
    use = None if ex.use is None else ex.use[b:b + n]  # [n, 1, 1, w]
    ts = torch.matmul(qs, ex.k[b:b + n].to(qs.dtype).transpose(-1, -2))  # [n, Hk, R, w]
    if bias is not None:
        ts = ts + bias[..., c0:]
    if use is None:  # the codes of columns [0, c0), then the tail's
        kb, vb, ks, vs = (x[:, :, :c0] for x in (kb, vb, ks, vs))
        scores = torch.cat([_scores(qs, kb, ks, kind, head_dim, None if bias is None else bias[..., :c0]), ts], -1)
    else:  # rows of several lengths: a column is the tail's where `use` says, and its codes are zeroed
        col = torch.nn.functional.pad(use.transpose(2, 3), (0, 0, c0, 0))  # [n, 1, T, 1]
        kb, vb = kb.masked_fill(col, 0), vb.masked_fill(col, 0)
        ks, vs = (x.masked_fill(col if x.dim() == 4 else col.squeeze(-1), 0) for x in (ks, vs))
        scores = _scores(qs, kb, ks, kind, head_dim, bias)
        scores = torch.cat([scores[..., :c0], torch.where(use, ts, scores[..., c0:])], -1)
    if hidden is not None:
        scores = scores.masked_fill(hidden, float("-inf"))
    probs = torch.softmax(scores, -1)
    pt = probs[..., c0:] if use is None else probs[..., c0:] * use
    tail = torch.matmul(pt, vt.to(probs.dtype))
    if use is None:  # (the sum `attend_step_codes` takes)
        return _values(probs[..., :c0], vb, vs, kind) + tail
    return _values(torch.cat([probs[..., :c0], probs[..., c0:].masked_fill(use, 0)], -1), vb, vs, kind) + tail


def _attend_blocks(q, k_cache, v_cache, k_scale, v_scale, p: Plan, softmax_scale: float, kind: str) -> torch.Tensor:
    out = _blocks_pass(q, k_cache, v_cache, k_scale, v_scale, p, softmax_scale, kind, safe=False)
    if p.bias is not None and not _finite(out):
        # a slot no query sees held NaN / Inf (an earlier request's), which the additive mask cannot hide: again,
        # with those scores replaced and their V zeroed, as the reference
        out = _blocks_pass(q, k_cache, v_cache, k_scale, v_scale, p, softmax_scale, kind, safe=True)
    batch, q_len, nheads, head_dim = q.shape
    nheads_k = k_cache.shape[1]
    out = out.view(batch, nheads_k, nheads // nheads_k, q_len, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(batch, q_len, nheads, head_dim).to(q.dtype)


def _blocks_pass(q, k_cache, v_cache, k_scale, v_scale, p: Plan, softmax_scale: float, kind: str,
                 safe: bool) -> torch.Tensor:
    """The attention over the plan's blocks read where they lie: `[B, Hk, R, D]` fp32, each KV head's rows R ordered
    (group, query). `safe`: hidden slots' scores set to -inf and their V to 0 (else the bias is added)."""
    batch, q_len, nheads, head_dim = q.shape
    nheads_k, block_size = k_cache.shape[1], k_cache.shape[2]
    group = nheads // nheads_k
    rows = group * q_len
    qh = (q.to(torch.float32) * softmax_scale).view(batch, q_len, nheads_k, group, head_dim).permute(0, 2, 3, 1, 4)
    qh = qh.reshape(batch, 1, nheads_k, rows, head_dim)
    bias, hidden = p.bias, None  # bias [B * nb * Hk, L, BS], the same for each query's group
    if bias is not None and group > 1 and q_len > 1:
        bias = bias.unsqueeze(1).expand(-1, group, -1, -1).reshape(-1, rows, block_size)
    if safe:
        hidden, bias = torch.isinf(bias), None  # [B * nb * Hk, R or 1, BS]
    keys = _blocks(k_cache, p)
    per = len(keys) == p.batch and p.batch > 1  # one piece per row
    scales = _blocks(k_scale, p) if kind != "fp" else [None] * len(keys)
    parts, start = [], 0
    for i, (kb, ks) in enumerate(zip(keys, scales)):
        qi = qh[i:i + 1] if per else qh  # [b, 1, Hk, R, D]
        n = kb.shape[0] // qi.shape[0]  # blocks per row in this piece
        m = kb.shape[0] * nheads_k
        qx = qi.expand(-1, n, -1, -1, -1).reshape(-1, rows, head_dim)  # [b * nb * Hk, R, D]
        parts.append(_scores(qx, kb.flatten(0, 1), None if ks is None else ks.flatten(0, 1), kind, head_dim,
                             None if bias is None else bias[start:start + m]))
        start += m
    scores = torch.cat(parts) if len(parts) > 1 else parts[0]  # [B * nb * Hk, R, BS]
    if hidden is not None:
        scores.masked_fill_(hidden, float("-inf"))
    scores = scores.view(batch, p.nb, nheads_k, rows, block_size)
    top = scores.amax(dim=(1, 4), keepdim=True)  # the softmax over every slot of a row: its blocks and their slots
    probs = torch.exp_(scores.sub_(top))
    total = probs.sum(dim=(1, 4)).unsqueeze(-1)  # [B, Hk, R, 1]: divides the output, not every probability
    out = _attend_values(probs.view(-1, rows, block_size), v_cache, v_scale, p, kind, batch, nheads_k, rows,
                         head_dim, None if hidden is None else hidden.all(1, keepdim=True))
    out = out.div_(total)
    if p.blind is not None:  # [B, 1, L, 1]: the queries that see nothing, in each KV head's rows (group, query)
        out = out.masked_fill(p.blind.unsqueeze(2).expand(-1, -1, group, -1, -1).reshape(batch, 1, rows, 1), 0.0)
    return out


def _scores(qx, keys, ks, kind: str, head_dim: int, bias) -> torch.Tensor:
    """`qx [..., R, D] . keys [..., T, Dc]` (N = blocks x KV heads, or rows x KV heads): `[..., R, T]` fp32, scales
    applied, plus `bias` (broadcast to it) when given."""
    if kind == "int4":
        s = _int4_scores(qx, keys, _params(ks, math.prod(keys.shape[:-2]))).view(*keys.shape[:-2], qx.shape[-2],
                                                                                 keys.shape[-2])
    elif kind == "int8":
        s = _int8_scores(qx, keys, ks).view(*keys.shape[:-2], qx.shape[-2], keys.shape[-2])
    elif bias is not None and qx.dim() == 3:
        return torch.baddbmm(bias, qx, keys.to(qx.dtype).transpose(1, 2))
    else:
        s = torch.matmul(qx, keys.to(qx.dtype).transpose(-1, -2))
    return s if bias is None else s.add_(bias)


def _attend_values(probs, v_cache, v_scale, p: Plan, kind: str, batch: int, nheads_k: int, rows: int, head_dim: int,
                   hidden=None) -> torch.Tensor:
    """`probs [B * nb * Hk, R, BS] @ V`, summed over each row's blocks: `[B, Hk, R, D]`. `hidden [B * nb * Hk, 1,
    BS]`: slots whose V is zeroed first."""
    values = _blocks(v_cache, p)
    scales = _blocks(v_scale, p) if kind != "fp" else [None] * len(values)
    parts, start = [], 0
    for vals, vs in zip(values, scales):
        n = vals.shape[0] * nheads_k
        vals, vs = vals.flatten(0, 1), None if vs is None else vs.flatten(0, 1)  # [n, BS, Dc], [n, BS(, 4)]
        if hidden is not None:  # over the head_dim (or the scale / minimum pairs)
            h = hidden[start:start + n].transpose(1, 2)  # [n, BS, 1]
            vals = vals.masked_fill(h, 0)
            vs = None if vs is None else vs.masked_fill(h if vs.dim() == 3 else h.squeeze(-1), 0)
        parts.append(_values(probs[start:start + n], vals, vs, kind))
        start += n
    out = torch.cat(parts) if len(parts) > 1 else parts[0]  # [B * nb * Hk, R, D]
    return out.view(batch, p.nb, nheads_k, rows, head_dim).sum(1)


def _floats(codes: torch.Tensor) -> torch.Tensor:
    """Codes as fp32, contiguous (a span view's copy would otherwise keep its heads-first order, which a batched
    product copies once more)."""
    return codes.to(torch.float32, memory_format=torch.contiguous_format)


def _values(pr, vals, vs, kind: str) -> torch.Tensor:
    """`pr [..., R, T] @ vals [..., T, Dc]` with V's scales: `[..., R, D]`."""
    if kind == "int4":
        return _int4_values(pr, vals, _params(vs, math.prod(vals.shape[:-2]))).view(*pr.shape[:-1], 2 * vals.shape[-1])
    if kind == "int8":
        return _int8_values(pr, vals, vs).view(*pr.shape[:-1], vals.shape[-1])
    return torch.matmul(pr, vals.to(pr.dtype))


def _finite(out: torch.Tensor) -> bool:
    """Whether every output is finite: one reduction read on the CPU (free there); elsewhere assumed not, so the
    hidden slots are always zeroed (no device read)."""
    return out.device.type == "cpu" and math.isfinite(out.sum(dtype=torch.float32).item())  # (fp16 would overflow)
