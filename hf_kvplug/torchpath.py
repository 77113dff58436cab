"""The fast PyTorch path of `attend_with_kvcache` for every device but CUDA (the CPU today; MPS and XPU tensors take it
too): the semantics of `reference.attend_with_kvcache_ref`, which stays the oracle (tests hold the two equal), in
far fewer and cheaper tensor ops.

What makes it cheap:
  * a `Plan` says where a call's rows read and write: the blocks to read (only those the queries can see, from the
    first slot of a window to the last token), the slot of each new token, and which of those slots each query
    attends. It is the same for every layer of a group of layers in one forward, so the cache builds it once per
    forward, in its host work (`ForwardHost.begin_forward`), where the rows' lengths and blocks are known;
  * K and V are read where they lie. A row whose blocks are consecutive (what a fresh pool gives each row
    `generate()` maps ahead) is a view of the buffer, and the attention is a batched matmul over its blocks
    (`[blocks x nheads_k]` small products, summed), so the history is never copied; other rows (shared, forked or
    ring blocks) are gathered once, in the same layout. INT8 and INT4 codes become floats there; their scales and
    minima are applied on the scores and on the probabilities, as the kernels apply them;
  * a slot no query sees never reaches an output: its score is -inf, and its V is zeroed whenever the output would
    not be finite otherwise (a NaN or Inf an earlier request left there), as the reference zeroes it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .reference import quantize, query_ranges


# Up to this many slots over all rows, a call gathers K and V into one dense copy and runs PyTorch's SDPA: a few ops,
# where per-op overhead outweighs the copy. Beyond it, rows whose blocks are consecutive are read where they lie.
DENSE_SLOTS = 1024


class Plan(NamedTuple):
    """Where one call on a paged cache reads and writes, for rows < `batch` and `q_len` queries.

    dense: gather the slots into one dense copy and run SDPA (small calls, and rows whose blocks are scattered);
        else read each row's consecutive blocks where they lie.
    nb: blocks read per row (logical blocks [first, first + nb)); the slots read are [t0, t0 + slots): exactly the
        span when dense, whole blocks otherwise.
    runs: per row, the first physical block of its `nb` consecutive blocks, when every row's are consecutive; then
        `adjacent` says whether the rows' runs follow each other (one view holds them all).
    ids: `[batch * nb]` int64, the physical blocks row by row.
    flat: `[batch * nheads_k * slots]` int64 (dense only): the slots as rows of a buffer viewed `[-1, head_dim]`,
        ordered `[batch, nheads_k, slots]`, so one `index_select` gathers them in SDPA's layout.
    wflat: `[batch * n_new * nheads_k]` int64, the rows of that view each new token's K (or V) goes to, ordered as
        the new tokens `[batch, n_new, nheads_k]`; None when nothing is written.
    mask: `[batch, 1, q_len, slots]` bool, which slot each query attends.
    bias: dense: the same as SDPA's additive mask (0 / -inf, fp32), or None where every query sees every slot.
        Otherwise `[batch, nb, 1, 1, q_len, block_size]` bool, the slots each query does NOT see, laid out as the
        scores of the blocks (`[batch, nb, nheads_k, group, q_len, block_size]`).
    blind: `[batch, 1, q_len, 1]` bool, the queries that see no slot (their output is 0), or None: none.
    """

    batch: int
    q_len: int
    dense: bool
    nb: int
    t0: int
    slots: int
    runs: list[int] | None
    adjacent: bool
    ids: torch.Tensor
    flat: torch.Tensor | None
    wflat: torch.Tensor | None
    mask: torch.Tensor
    bias: torch.Tensor | None
    blind: torch.Tensor | None



def plan(block_table, cache_seqlens, cache_starts, cache_valid, batch: int, q_len: int, n_new: int, window: int,
         causal: bool, block_size: int, nheads_k: int, span: tuple[int, int],
         rows: list[list[int]] | None = None, length: int | None = None) -> Plan:
    """The plan of a call whose queries see slots within `span = (first, end)`: host-known bounds, the first slot any
    query may see and one past the row's last token. What the host knows makes it cheaper: `rows`, its copy of the
    table's rows (logical block i of row b is rows[b][i]; a PlugCache's paging), says which rows are consecutive and
    where new tokens go; `length`, the tokens every row holds before the call (a PlugCache's rows hold the same
    count), gives the queries' slots. Without them the CPU reads the tensors (free there). Every new token must have
    a mapped slot (the caller made sure: the cache maps them before the forward; on the CPU `ops` checks first)."""
    device, bs = block_table.device, block_size
    cpu = device.type == "cpu"
    first = max(0, span[0])
    fb = first // bs
    nb = max(1, min(-(-span[1] // bs), block_table.shape[1]) - fb)
    fb = min(fb, block_table.shape[1] - nb)
    if rows is not None and all(len(r) >= fb + nb for r in rows[:batch]):
        ids = torch.tensor([r[fb:fb + nb] for r in rows[:batch]], dtype=torch.long, device=device)
    else:
        ids = block_table[:batch, fb:fb + nb].long().clamp(min=0)  # [B, nb]; an unmapped block reads block 0, unseen
        if cpu:
            rows = [[-1] * fb + r for r in ids.tolist()]  # free to read here
    runs = _runs(rows, batch, fb, nb) if rows is not None else None
    dense = runs is None or batch * nb * bs <= DENSE_SLOTS
    if dense:  # exactly the span
        t0 = max(first, fb * bs)
        t1 = max(t0 + 1, min(span[1], (fb + nb) * bs))
    else:  # whole blocks
        t0, t1 = fb * bs, (fb + nb) * bs
    wflat = _write_rows(block_table, cache_seqlens, batch, n_new, bs, nheads_k, rows, length) if n_new else None
    seen = _seen(cache_seqlens, cache_starts, cache_valid, batch, q_len, n_new, window, causal, t0, t1, length)
    blind = ~seen.any(-1)  # [B, 1, L]
    if cpu and not bool(blind.any()):  # free on the CPU: most calls have no blind query
        blind = None
    flat = bias = None
    if dense:
        # every slot of the row's blocks as a row of the buffer viewed [-1, head_dim]: block * Hk * bs + h * bs + s,
        # ordered [B, Hk, nb * bs]; then the span's
        at = ids.view(batch, 1, nb, 1) * (nheads_k * bs) + torch.arange(nheads_k * bs, device=device).view(
            1, nheads_k, 1, bs)
        flat = at.view(batch, nheads_k, nb * bs)[:, :, t0 - fb * bs:t1 - fb * bs].reshape(-1)
        if not (cpu and bool(seen.all())):
            bias = torch.zeros(seen.shape, device=device).masked_fill_(~seen, float("-inf"))
    else:
        bias = (~seen).reshape(batch, q_len, nb, bs).permute(0, 2, 1, 3).contiguous()[:, :, None, None]
    adjacent = runs is not None and all(r == runs[0] + b * nb for b, r in enumerate(runs))
    return Plan(batch, q_len, dense, nb, t0, t1 - t0, runs, adjacent, ids.reshape(-1), flat, wflat, seen, bias,
                None if blind is None else blind.unsqueeze(-1))


def _write_rows(block_table, cache_seqlens, batch, n_new, bs, nheads_k, rows, length) -> torch.Tensor:
    """`[batch * n_new * nheads_k]`: the row of a `[-1, head_dim]` view each new token's K / V goes to (block *
    nheads_k * bs + head * bs + slot in the block)."""
    device = block_table.device
    if rows is not None and length is not None and batch * n_new <= 64:  # a decode step: on the host
        return torch.tensor([rows[b][s // bs] * (nheads_k * bs) + h * bs + s % bs for b in range(batch)
                             for s in range(length, length + n_new) for h in range(nheads_k)], device=device)
    new = cache_seqlens[:batch].long().unsqueeze(1) + torch.arange(n_new, device=device)  # [B, n_new] slots
    blk = block_table[:batch].long().gather(1, new // bs)
    heads = torch.arange(nheads_k, device=device) * bs
    return ((blk * (nheads_k * bs) + new % bs).unsqueeze(-1) + heads).reshape(-1)


def _seen(cache_seqlens, cache_starts, cache_valid, batch, q_len, n_new, window, causal, t0, t1,
          length) -> torch.Tensor:
    """`[batch, 1, q_len, t1 - t0]` bool: which of slots [t0, t1) each query attends (`reference`'s rules)."""
    device = cache_starts.device
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
    if cache_valid is not None and cache_valid.numel():
        valid = cache_valid[:batch, t0:t1].bool()
        if valid.shape[1] < t1 - t0:  # slots past the valid map are never seen
            valid = torch.nn.functional.pad(valid, (0, t1 - t0 - valid.shape[1]))
        seen = seen & valid.unsqueeze(1)
    return seen.unsqueeze(1)


def _runs(rows, batch: int, first: int, nb: int) -> list[int] | None:
    runs = []
    for row in rows[:batch]:
        part = row[first:first + nb]
        if len(part) < nb or part[0] < 0 or any(part[i] != part[0] + i for i in range(1, nb)):
            return None
        runs.append(part[0])
    return runs


def write(k, v, k_cache, v_cache, k_scale, v_scale, p: Plan) -> None:
    """Write `k, v [B, n_new, nheads_k, D]` at the plan's slots (quantized for int8 / int4 caches), in place."""
    rows = k.shape[0] * k.shape[1] * k.shape[2]
    new = (k.reshape(rows, -1), v.reshape(rows, -1))  # [B * n_new * Hk, D] each
    if k_cache.dtype != k.dtype:  # K and V quantized in one pass
        new, s = quantize(torch.stack(new), k_cache.dtype)
        for scale, part in zip((k_scale, v_scale), s):
            scale.view(-1, *scale.shape[3:]).index_copy_(0, p.wflat, part)
    for cache, part in zip((k_cache, v_cache), new):
        cache.view(-1, cache.shape[-1]).index_copy_(0, p.wflat, part)


def _blocks(buf: torch.Tensor, p: Plan) -> list[torch.Tensor]:
    """The plan's blocks of `buf [num_blocks, ...]`: one `[batch * nb, ...]` tensor, or one `[nb, ...]` per row (a
    view where the blocks are consecutive, else a copy)."""
    if p.runs is None:
        return [buf.index_select(0, p.ids)]
    if p.adjacent:
        return [buf[p.runs[0]:p.runs[0] + p.batch * p.nb]]
    return [buf[r:r + p.nb] for r in p.runs]


def attend(q, k, v, k_cache, v_cache, k_scale, v_scale, p: Plan, softmax_scale: float) -> torch.Tensor:
    """Write the new K/V (if any) and attend `q [B, L, nheads, D]` over the plan's slots: `[B, L, nheads, D]` in q's
    dtype, with `reference.attend_with_kvcache_ref`'s semantics (fp32 arithmetic)."""
    if p.wflat is not None:
        write(k, v, k_cache, v_cache, k_scale, v_scale, p)
    kind = {torch.int8: "int8", torch.uint8: "int4"}.get(k_cache.dtype, "fp")
    if p.dense:
        return _attend_dense(q, k_cache, v_cache, k_scale, v_scale, p, softmax_scale, kind)
    return _attend_blocks(q, k_cache, v_cache, k_scale, v_scale, p, softmax_scale, kind)


def _dense(buf, scale, p: Plan, kind: str, ct) -> torch.Tensor:
    """The plan's slots of one buffer as `[B, Hk, slots, D]` in `ct`: gathered (one `index_select`), dequantized."""
    x = buf.view(-1, buf.shape[-1]).index_select(0, p.flat)  # [B * Hk * T, Dc]
    if kind == "int8":
        x = x.to(ct).mul_(scale.view(-1).index_select(0, p.flat).unsqueeze(-1))
    elif kind == "int4":
        sp = scale.view(-1, 4).index_select(0, p.flat).to(ct)  # [B * Hk * T, 4]: scale, minimum of each half
        x = torch.cat([(x & 15).to(ct).mul_(sp[:, 0:1]).add_(sp[:, 1:2]),
                       (x >> 4).to(ct).mul_(sp[:, 2:3]).add_(sp[:, 3:4])], dim=-1)
    return x.view(p.batch, buf.shape[1], p.slots, x.shape[-1]).to(ct)


def _attend_dense(q, k_cache, v_cache, k_scale, v_scale, p: Plan, softmax_scale: float, kind: str) -> torch.Tensor:
    batch, q_len, nheads, head_dim = q.shape
    ct = torch.float32
    keys, values = _dense(k_cache, k_scale, p, kind, ct), _dense(v_cache, v_scale, p, kind, ct)
    qt = q.transpose(1, 2).to(ct)
    out = torch.nn.functional.scaled_dot_product_attention(qt, keys, values, attn_mask=p.bias, scale=softmax_scale,
                                                           enable_gqa=nheads != keys.shape[1])
    if p.blind is not None:
        out = out.masked_fill(p.blind, 0.0)
    # a slot no query sees may hold NaN / Inf from an earlier request: zero those, as the reference (without a mask,
    # every query sees every slot gathered: nothing to zero)
    if p.bias is not None and not _finite(out):
        hidden = ~p.mask.any(2, keepdim=True).transpose(2, 3)  # [B, 1, T, 1]
        out = torch.nn.functional.scaled_dot_product_attention(
            qt, keys.masked_fill_(hidden, 0), values.masked_fill_(hidden, 0), attn_mask=p.bias, scale=softmax_scale,
            enable_gqa=nheads != keys.shape[1])
        if p.blind is not None:
            out = out.masked_fill(p.blind, 0.0)
    return out.transpose(1, 2).to(q.dtype)


def _attend_blocks(q, k_cache, v_cache, k_scale, v_scale, p: Plan, softmax_scale: float, kind: str) -> torch.Tensor:
    batch, q_len, nheads, head_dim = q.shape
    nheads_k, block_size = k_cache.shape[1], k_cache.shape[2]
    group = nheads // nheads_k
    ct = torch.float32
    # per KV head, its queries, rows ordered (group, query): [B, Hk, R, D], R = group * q_len
    qh = (q.to(ct) * softmax_scale).view(batch, q_len, nheads_k, group, head_dim).permute(0, 2, 3, 1, 4)
    qh = qh.reshape(batch, 1, nheads_k, group * q_len, head_dim)
    rows = _blocks(k_cache, p)
    per = len(rows) == p.batch and p.batch > 1  # one piece per row
    scales = _blocks(k_scale, p) if kind != "fp" else [None] * len(rows)
    parts = []
    for i, (keys, ks) in enumerate(zip(rows, scales)):
        qi = qh[i:i + 1] if per else qh  # [b, 1, Hk, R, D]
        n = keys.shape[0] // qi.shape[0]  # blocks per row in this piece
        qx = qi.expand(-1, n, -1, -1, -1).reshape(-1, group * q_len, head_dim)  # [b * nb * Hk, R, D]
        parts.append(_scores(qx, keys.flatten(0, 1), None if ks is None else ks.flatten(0, 1), kind, head_dim))
    scores = torch.cat(parts) if len(parts) > 1 else parts[0]  # [B * nb * Hk, R, BS]
    scores = scores.view(batch, p.nb, nheads_k, group, q_len, block_size)
    scores.masked_fill_(p.bias, float("-inf"))
    top = scores.amax(dim=(1, 5), keepdim=True)  # the softmax over every slot of a row: its blocks and their slots
    probs = torch.exp_(scores.sub_(top))
    probs.div_(probs.sum(dim=(1, 5), keepdim=True))
    probs = probs.view(-1, group * q_len, block_size)  # [B * nb * Hk, R, BS]
    # [B, 1, R, 1]: the queries that see nothing, in each KV head's rows (group, query)
    blind = None if p.blind is None else p.blind.unsqueeze(2).expand(-1, -1, group, -1, -1).reshape(
        batch, 1, group * q_len, 1)
    out = _attend_values(probs, v_cache, v_scale, p, kind, batch, nheads_k, group * q_len, head_dim)
    if blind is not None:
        out = out.masked_fill(blind, 0.0)
    finite = _finite(out)
    if not finite:  # a slot no query sees may hold NaN / Inf from an earlier request: zero those, as the reference
        hidden = ~p.mask.any(2).reshape(batch * p.nb, 1, block_size)  # [B * nb, 1, BS]
        out = _attend_values(probs, v_cache, v_scale, p, kind, batch, nheads_k, group * q_len, head_dim, hidden)
        if blind is not None:
            out = out.masked_fill(blind, 0.0)
    out = out.view(batch, nheads_k, group, q_len, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(batch, q_len, nheads, head_dim).to(q.dtype)


def _scores(qx, keys, ks, kind: str, head_dim: int) -> torch.Tensor:
    """`qx [N, R, D] . keys [N, BS, Dc]` for N = blocks x KV heads: `[N, R, BS]` fp32, scales applied."""
    if kind == "int4":
        half = head_dim // 2
        kp = ks.float()  # [N, BS, 4]: scale and minimum of each half
        q_lo, q_hi = qx[..., :half], qx[..., half:]
        s = torch.bmm(q_lo, (keys & 15).float().transpose(1, 2)).mul_(kp[:, None, :, 0])
        s.addcmul_(torch.bmm(q_hi, (keys >> 4).float().transpose(1, 2)), kp[:, None, :, 2])
        s.addcmul_(q_lo.sum(-1, keepdim=True), kp[:, None, :, 1])  # the minima's terms
        return s.addcmul_(q_hi.sum(-1, keepdim=True), kp[:, None, :, 3])
    s = torch.bmm(qx, keys.to(qx.dtype).transpose(1, 2))
    return s.mul_(ks.unsqueeze(1)) if kind == "int8" else s


def _attend_values(probs, v_cache, v_scale, p: Plan, kind: str, batch: int, nheads_k: int, rows: int, head_dim: int,
                   hidden=None) -> torch.Tensor:
    """`probs [B * nb * Hk, R, BS] @ V`, summed over each row's blocks: `[B, Hk, R, D]`. `hidden [B * nb, 1, BS]`:
    slots zeroed first."""
    values = _blocks(v_cache, p)
    scales = _blocks(v_scale, p) if kind != "fp" else [None] * len(values)
    per = len(values) == p.batch and p.batch > 1
    parts, start = [], 0
    for i, (vals, vs) in enumerate(zip(values, scales)):
        n = vals.shape[0] * nheads_k
        pr = probs[start:start + n]
        h = None if hidden is None else hidden[i * p.nb:(i + 1) * p.nb] if per else hidden
        if h is not None:  # [n, 1, BS]: over the KV heads, and the head_dim (or the scale / minimum pairs)
            vals = vals.masked_fill(h.unsqueeze(-1), 0)
            vs = None if vs is None else vs.masked_fill(h if vs.dim() == 3 else h.unsqueeze(-1), 0)
        parts.append(_values(pr, vals.flatten(0, 1), None if vs is None else vs.flatten(0, 1), kind))
        start += n
    out = torch.cat(parts) if len(parts) > 1 else parts[0]  # [B * nb * Hk, R, D]
    return out.view(batch, p.nb, nheads_k, rows, head_dim).sum(1)


def _values(pr, vals, vs, kind: str) -> torch.Tensor:
    """`pr [N, R, BS] @ vals [N, BS, Dc]` with V's scales: `[N, R, D]`."""
    if kind == "int4":
        vp = vs.float()  # [N, BS, 4]
        lo = torch.bmm(pr * vp[:, None, :, 0], (vals & 15).float()) + torch.bmm(pr, vp[..., 1:2])
        hi = torch.bmm(pr * vp[:, None, :, 2], (vals >> 4).float()) + torch.bmm(pr, vp[..., 3:4])
        return torch.cat([lo, hi], dim=-1)
    if kind == "int8":
        return torch.bmm(pr * vs.unsqueeze(1), vals.float())
    return torch.bmm(pr, vals.to(pr.dtype))


def _finite(out: torch.Tensor) -> bool:
    """Whether every output is finite: one reduction read on the CPU (free there); elsewhere assumed not, so the
    hidden slots are always zeroed (no device read)."""
    return out.device.type == "cpu" and math.isfinite(out.sum().item())
