"""Pure-PyTorch reference of every cache operation: the CPU path for users and the oracle for the Triton kernels.

Cache layout (per layer), shared by the reference and the kernels:
  k_cache, v_cache  [num_blocks, nheads_k, BLOCK_SIZE, head_dim]   model dtype, or int8
                    [num_blocks, nheads_k, BLOCK_SIZE, head_dim/2]  uint8 for int4 (two values a byte, see below)
  k_scale, v_scale  [num_blocks, nheads_k, BLOCK_SIZE] float32     int8: per token and head (else 0 elements)
                    [num_blocks, nheads_k, BLOCK_SIZE, 4] float16  int4: per token and head, scale and minimum of each
                                                                    half of head_dim
  block_table       [max_batch, max_blocks] int32                   row b's slot s: in block block_table[b, s // BS]
                                                                    (-1: no block mapped there)
  cache_seqlens     [max_batch] int32                               slots filled in row b before this call
  cache_starts      [max_batch] int32                               first slot row b may attend (leading padding)
  cache_valid       [max_batch, max_len] uint8, or 0 elements       0 marks a slot no query attends (padding, holes)
  status            [1] int32, or 0 elements                        set to 1 when a write had no slot
  k_tail, v_tail    [max_batch, nheads_k, BLOCK_SIZE, head_dim]     model dtype, or 0 elements (no tail): row b's
                                                                    last, partial block in full precision

Semantics of `attend_with_kvcache` for rows b < batch, with n_new new tokens (k, v; 0: attend only) and q_len
queries, the queries being the row's last q_len tokens once the new ones are appended (as flash_attn_with_kvcache
aligns them): query i sits at slot s_i = cache_seqlens[b] + n_new - q_len + i (usually n_new = q_len: s_i is new
token i's slot).
  1. K/V of new token j are written to slot cache_seqlens[b] + j (quantized when the cache is int8 or int4). A slot
     past the table or in an unmapped block (-1) is not written: status[0] becomes 1, and the query at that slot and
     every query whose range [lo_i, hi_i] (below) meets the span of the row's lost slots get NaN, so the loss is
     never silent. The slots a row already holds must lie in mapped blocks (an unmapped one reads as block 0).
  2. out[b, i] attends over the slots t with lo_i <= t <= hi_i, lo_i = max(cache_starts[b], s_i - window + 1)
     (window <= 0 means none), hi_i = s_i (causal) or the row's last slot cache_seqlens[b] + n_new - 1 (causal=False;
     at most s_i + right when right >= 0), and cache_valid[b, t] != 0 when cache_valid is given. A query that sees
     no slot gets 0 (as PyTorch's SDPA does for a fully masked row). flash_attn_with_kvcache's softcap and ALiBi
     change the scores, and its log-sum-exp can be returned (`attend_with_kvcache_ref`).
  3. Slots no token of the row sees (past its length, before its start, masked) never enter the arithmetic: their
     K and V are zeroed before the products, so stale NaN/Inf there cannot leak into any output.
  4. The exact tail (k_tail / v_tail given; a quantized PlugCache's, `PlugConfig.exact_tail`): once the call's
     new tokens are in, row b holds L_b = cache_seqlens[b] + n_new tokens and its last, partial block starts at
     tail_lo_b = BLOCK_SIZE * (L_b // BLOCK_SIZE). Every new token whose slot t is writable and lies in the row's
     last block written, t >= BLOCK_SIZE * ((L_b - 1) // BLOCK_SIZE) (the partial block, or the one that just
     filled: a crop back into it finds it exact), is also stored unquantized at k_tail[b, :, t % BLOCK_SIZE], and
     every slot t >= tail_lo_b is read from there instead of the pool. The pool holds every token's codes (here at
     once; a PlugLayer may write a partial block's later, below), so a block that fills is read quantized from then
     on, and a full block never depends on the tail (shared, forked and prefix-cached blocks stay plain). The rule
     applies per call: a call of several tokens that fills a block reads that block's tokens from their codes, where
     one token a call would have read the earlier ones exactly. The caller keeps the tail holding the tokens of each
     row's last block (`PlugLayer`: a crop into an earlier block refills it from the pool). Since no call reads the
     codes of slots t >= tail_lo_b, a PlugLayer's decode step on the PyTorch path leaves them unwritten until its
     block fills or anything else touches the pool, then writes them from the tail (`PlugLayer.settle`): the codes
     this rule writes at once, bit for bit.
cache_seqlens is not advanced: the caller does that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INT8_MAX = 127.0
INT4_MAX = 15.0


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-vector int8: `x [..., D]` -> (`q [..., D]` int8, `scale [...]` float32), x ~= q * scale."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    scale = amax / INT8_MAX
    inv = torch.where(amax > 0, INT8_MAX / amax.clamp_min(1e-30), torch.zeros_like(amax))
    q = torch.round(xf * inv.unsqueeze(-1)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.unsqueeze(-1)).to(dtype)


def quantize_int4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per vector half: `x [..., D]` -> (`packed [..., D/2]` uint8, `params [..., 4]` float16).

    Each half of the vector (dims [0, D/2) and [D/2, D)) gets a scale s = (max - min) / 15 and its minimum m, kept in
    fp16 (the stored values are the ones used to quantize, so the kernels reproduce it); x ~= n * s + m with
    n = round((x - m) / s) in [0, 15]. Byte j holds dim j in its low nibble and dim j + D/2 in its high nibble, so a
    kernel unpacks a tile into two half-width tiles with one scale each. params = (s_lo, m_lo, s_hi, m_hi).
    """
    halves = x.float().unflatten(-1, (2, x.shape[-1] // 2))  # [..., 2, D/2]
    lo, hi = halves.amin(-1), halves.amax(-1)
    scale, minimum = ((hi - lo) / INT4_MAX).half(), lo.half()
    s, m = scale.float(), minimum.float()
    inv = torch.where(s > 0, s.clamp_min(1e-30).reciprocal(), torch.zeros_like(s))
    n = torch.round((halves - m.unsqueeze(-1)) * inv.unsqueeze(-1)).clamp_(0, INT4_MAX).to(torch.uint8)
    packed = n[..., 0, :] | (n[..., 1, :] << 4)
    params = torch.stack([scale[..., 0], minimum[..., 0], scale[..., 1], minimum[..., 1]], dim=-1)
    return packed, params


def dequantize_int4(packed: torch.Tensor, params: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    p = params.float()
    lo = (packed & 15).float() * p[..., 0:1] + p[..., 1:2]
    hi = (packed >> 4).float() * p[..., 2:3] + p[..., 3:4]
    return torch.cat([lo, hi], dim=-1).to(dtype)


def quantize(x: torch.Tensor, storage: torch.dtype):
    """(values as the cache stores them, their scales or None) for a cache of `storage` dtype."""
    if storage == torch.int8:
        return quantize_int8(x)
    if storage == torch.uint8:
        return quantize_int4(x)
    return x.to(storage), None


def dequantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if x.dtype == torch.int8:
        return dequantize_int8(x, scale, dtype)
    if x.dtype == torch.uint8:
        return dequantize_int4(x, scale, dtype)
    return x.to(dtype)


def _slots(cache_seqlens: torch.Tensor, batch: int, q_len: int) -> torch.Tensor:
    return cache_seqlens[:batch].long().unsqueeze(1) + torch.arange(q_len, device=cache_seqlens.device)


def slot_blocks(block_table, cache_seqlens, batch: int, q_len: int, block_size: int):
    """For new token i of row b: its slot, its block id (clamped to >= 0) and whether that slot can be written."""
    slots = _slots(cache_seqlens, batch, q_len).to(block_table.device)
    max_blocks = block_table.shape[1]
    col = slots // block_size
    blocks = block_table[:batch].long().gather(1, col.clamp(max=max_blocks - 1))
    ok = (col < max_blocks) & (blocks >= 0)
    return slots, blocks.clamp(min=0), ok


def has_tail(k_tail: torch.Tensor | None) -> bool:
    return k_tail is not None and k_tail.numel() > 0


def tail_starts(cache_seqlens: torch.Tensor, batch: int, n_new: int, block_size: int) -> torch.Tensor:
    """`[B]` int64: the first slot each row reads from its exact tail once `n_new` new tokens are in (rule 4)."""
    total = cache_seqlens[:batch].long() + n_new
    return total - total % block_size


def write_tail_ref(k, v, k_tail, v_tail, cache_seqlens, ok) -> None:
    """Rule 4's write: new tokens `k, v [B, n_new, nheads_k, D]` that found a slot (`ok [B, n_new]`) and lie in their
    row's last block, stored unquantized in `k_tail, v_tail`, in place. No host read."""
    batch, n_new = k.shape[:2]
    bs = k_tail.shape[2]
    lo = tail_starts(cache_seqlens, batch, n_new - 1, bs).to(k_tail.device)  # the last block's first slot
    rows = torch.arange(batch, device=k_tail.device)
    ok = ok.to(k_tail.device)
    for j in range(max(0, n_new - bs), n_new):  # only the last block_size tokens can lie in the last block
        t = cache_seqlens[:batch].long().to(k_tail.device) + j
        keep = (ok[:, j] & (t >= lo))[:, None, None]  # [B, 1, 1]; j ascending: a written token is the last write
        for new, tail in ((k, k_tail), (v, v_tail)):
            at = tail[rows, :, t % bs]  # [B, Hk, D]
            tail[rows, :, t % bs] = torch.where(keep, new[:, j].to(tail.device, tail.dtype), at)


def write_tail_from(k, v, k_tail, v_tail, before: int) -> None:
    """`write_tail_ref` for rows < B whose new tokens `k, v [B, n_new, nheads_k, D]` all have slots `before + i` (one
    host-known start for every row): the tokens in the rows' last block, in place."""
    n, bs = k.shape[1], k_tail.shape[2]
    end = before + n
    first = max(end - 1 - (end - 1) % bs, before)  # the last block's first slot, or the first new one
    if first < end:
        for new, tail in ((k, k_tail), (v, v_tail)):
            tail[:k.shape[0], :, first % bs:first % bs + end - first].copy_(new[:, first - before:].transpose(1, 2))


def overlay_tail(x: torch.Tensor, tail: torch.Tensor, lo: torch.Tensor, end: torch.Tensor, t0: int = 0):
    """`x [B, Hk, T, D]` (slots t0 + i) with slots in [lo_b, end_b) taken from `tail [>=B, Hk, BS, D]` at t % BS: a
    new tensor in x's dtype."""
    batch, slots, bs = x.shape[0], x.shape[2], tail.shape[2]
    t = torch.arange(t0, t0 + slots, device=x.device)
    use = (t >= lo.to(x.device)[:, None]) & (t < end.to(x.device)[:, None])  # [B, T]
    from_tail = tail[:batch].to(x.device).index_select(2, t % bs).to(x.dtype)
    return torch.where(use[:, None, :, None], from_tail, x)


def write_kvcache_ref(k, v, k_cache, v_cache, k_scale, v_scale, block_table, cache_seqlens, status,
                      k_tail=None, v_tail=None) -> torch.Tensor:
    """Writes `k, v [B, q_len, nheads_k, D]` into slots cache_seqlens[b] + i of rows b < B, in place, and into the
    exact tail (`k_tail, v_tail`, rule 4 of the module doc) when given.

    Returns `ok [B, q_len]` bool: whether each token found a slot. Tokens that did not are not written and set
    `status[0] = 1` (when status has an element). No host read: safe on any device.
    """
    batch, q_len = k.shape[:2]
    bs = k_cache.shape[2]
    slots, blocks, ok = slot_blocks(block_table, cache_seqlens, batch, q_len, bs)
    if ok.numel() == 0:  # no token to write
        return ok
    offs = slots % bs
    # A token without a slot repeats the first writable token's write (same target, same value), so the indexed
    # writes never collide with different values; with no writable token at all, every token rewrites one slot's
    # old value.
    flat_ok = ok.reshape(-1)
    pick = torch.where(flat_ok, torch.arange(flat_ok.numel(), device=ok.device), flat_ok.int().argmax())
    any_ok = flat_ok.any()
    tb, to = blocks.reshape(-1)[pick], offs.reshape(-1)[pick]
    for new, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        new, s = quantize(new.reshape(-1, *new.shape[2:])[pick.to(new.device)], cache.dtype)
        if s is not None:
            scale[tb, :, to] = torch.where(any_ok, s, scale[tb, :, to])
        cache[tb, :, to] = torch.where(any_ok, new, cache[tb, :, to])
    if has_tail(k_tail):
        write_tail_ref(k, v, k_tail, v_tail, cache_seqlens, ok)
    if status.numel():
        status.copy_(torch.maximum(status, (~ok).any().to(status.dtype)))
    return ok


def gather_kv(cache, scale, block_table, batch: int, num_blocks: int, dtype: torch.dtype) -> torch.Tensor:
    """Row-contiguous copy of the first `num_blocks` blocks of rows < batch: [B, nheads_k, num_blocks * BS, D].
    Unmapped blocks (-1) read block 0: callers mask those slots."""
    blocks = block_table[:batch, :num_blocks].long().clamp(min=0)
    x = dequantize(cache[blocks], scale[blocks] if scale.numel() else None, dtype)  # [B, nb, Hk, BS, D]
    b, nb, hk, bs, d = x.shape
    return x.to(dtype).permute(0, 2, 1, 3, 4).reshape(b, hk, nb * bs, d)


def attention_bounds(cache_seqlens, cache_starts, batch: int, q_len: int, window: int, n_new: int | None = None):
    """Per query: its slot `s` and the first slot `lo` it may see, both [B, q_len] int64 (lo > s: none).

    The queries are the last `q_len` tokens once `n_new` new ones (default `q_len`) follow row b's cache_seqlens[b]
    cached ones: `s = cache_seqlens[b] + n_new - q_len + i` (negative when there are fewer tokens than queries)."""
    n_new = q_len if n_new is None else n_new
    s = _slots(cache_seqlens, batch, q_len) + (n_new - q_len)
    lo = cache_starts[:batch].long().to(s.device).unsqueeze(1).expand_as(s)
    if window > 0:
        lo = torch.maximum(lo, s - window + 1)
    return s, lo


def query_ranges(cache_seqlens, cache_starts, batch: int, q_len: int, window: int, n_new: int | None = None,
                 causal: bool = True, right: int = -1):
    """Per query, the slots [lo, hi] it may see (before the slot mask), both [B, q_len] int64 (lo > hi: none).
    Non-causal queries see up to the row's last token, or up to `right` slots past their own when right >= 0."""
    s, lo = attention_bounds(cache_seqlens, cache_starts, batch, q_len, window, n_new)
    if causal:
        return lo, s
    last = s[:, -1:].expand_as(s)
    return lo, last if right < 0 else torch.minimum(s + right, last)


def visible_slots(cache_seqlens, cache_starts, cache_valid, batch: int, q_len: int, window: int, num_slots: int,
                  n_new: int | None = None, causal: bool = True):
    """`seen [B, q_len, num_slots]` bool: which slots each query attends (the semantics in the module doc)."""
    lo, hi = query_ranges(cache_seqlens, cache_starts, batch, q_len, window, n_new, causal)
    return _seen(lo, hi, cache_valid, batch, num_slots)


def _seen(lo, hi, cache_valid, batch: int, num_slots: int):
    t = torch.arange(num_slots, device=lo.device)
    seen = (t >= lo.unsqueeze(-1)) & (t <= hi.unsqueeze(-1))
    if cache_valid.numel():
        valid = cache_valid[:batch, :num_slots].to(seen.device).bool()
        if valid.shape[1] < num_slots:  # slots past the valid map (the tail of the last block) are never seen
            valid = F.pad(valid, (0, num_slots - valid.shape[1]))
        seen = seen & valid.unsqueeze(1)
    return seen


def attend_with_kvcache_ref(
    q, k, v, k_cache, v_cache, k_scale, v_scale, block_table, cache_seqlens, cache_starts, cache_valid, status,
    softmax_scale: float, window: int = 0, num_blocks: int | None = None, causal: bool = True, right: int = -1,
    alibi_slopes: torch.Tensor | None = None, softcap: float = 0.0, return_lse: bool = False,
    k_tail: torch.Tensor | None = None, v_tail: torch.Tensor | None = None,
):
    """Reference of the fused write + attention. `q [B, q_len, nheads, D]` -> out `[B, q_len, nheads, D]`.

    `k, v [B, n_new, nheads_k, D]` may hold any number of new tokens, 0 included (attend only); the queries are the
    row's last q_len tokens after them. `num_blocks` bounds how many blocks per row are read (None: all). Callers
    pass the blocks actually in use when they know it on the host, which keeps the work proportional to the cached
    tokens.

    flash_attn_with_kvcache's options (`hf_kvplug.flash`): `right` >= 0 bounds a non-causal query to the slots up to
    `right` past its own; `softcap` > 0 turns each score x (after softmax_scale) into softcap * tanh(x / softcap);
    `alibi_slopes` `[nheads]` or `[B, nheads]` fp32 then adds -slope * |s_i - t| to the score of query slot s_i and
    key slot t; `return_lse` also returns the natural-log sum of exp(scores) over the seen slots, `[B, nheads,
    q_len]` fp32 (+inf for a query that sees nothing, NaN with a lost token, as its output).

    `k_tail, v_tail`: the exact tail of each row's last, partial block (rule 4 of the module doc), written and read.
    """
    batch, q_len, nheads, _ = q.shape
    n_new = k.shape[1]
    ok = write_kvcache_ref(k, v, k_cache, v_cache, k_scale, v_scale, block_table, cache_seqlens, status,
                           k_tail, v_tail)
    nb = block_table.shape[1] if num_blocks is None else max(1, min(num_blocks, block_table.shape[1]))
    keys = gather_kv(k_cache, k_scale, block_table, batch, nb, q.dtype)
    values = gather_kv(v_cache, v_scale, block_table, batch, nb, q.dtype)
    if has_tail(k_tail):
        lo = tail_starts(cache_seqlens, batch, n_new, k_cache.shape[2])
        end = cache_seqlens[:batch].long() + n_new
        keys, values = overlay_tail(keys, k_tail, lo, end), overlay_tail(values, v_tail, lo, end)
    lo, hi = query_ranges(cache_seqlens, cache_starts, batch, q_len, window, n_new, causal, right)
    seen = _seen(lo, hi, cache_valid, batch, keys.shape[2])
    hidden = ~seen.any(1)[:, None, :, None]  # [B, 1, T, 1]: slots no token of the row sees
    keys = keys.masked_fill(hidden, 0)
    values = values.masked_fill(hidden, 0)
    lse = None
    if alibi_slopes is None and not softcap and not return_lse:
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=seen.unsqueeze(1), scale=softmax_scale,
            enable_gqa=nheads != keys.shape[1],
        ).transpose(1, 2)
    else:
        slots = _slots(cache_seqlens, batch, q_len).to(q.device) + (n_new - q_len)
        out, lse = _attend_scored(q, keys, values, seen, softmax_scale, slots, alibi_slopes, softcap)
    out = out.masked_fill(~seen.any(-1)[..., None, None], 0.0)  # a token that sees nothing: 0, whatever the backend
    if n_new:
        lost = lost_queries(ok, cache_seqlens, lo, hi)
        out = out.masked_fill(lost[..., None, None], float("nan"))
        if lse is not None:
            lse = lse.masked_fill(lost[:, None, :], float("nan"))
    return (out.contiguous(), lse) if return_lse else out.contiguous()


def _attend_scored(q, keys, values, seen, softmax_scale, slots, alibi_slopes, softcap):
    """Attention with explicit scores (fp32, fp64 for fp64 q), for softcap / ALiBi / the log-sum-exp: returns out
    `[B, q_len, nheads, D]` in q's dtype and lse `[B, nheads, q_len]` fp32."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[2] // keys.shape[1]
    qf = q.to(ct).transpose(1, 2)  # [B, H, L, D]
    kf = keys.to(ct).repeat_interleave(group, dim=1)
    vf = values.to(ct).repeat_interleave(group, dim=1)
    scores = qf @ kf.transpose(-1, -2) * softmax_scale  # [B, H, L, T]
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(ct).reshape(-1, q.shape[2])[:, :, None, None]  # [B or 1, H, 1, 1]
        t = torch.arange(scores.shape[-1], device=q.device)
        scores = scores - slopes * (slots[:, None, :, None] - t).abs().to(ct)
    scores = scores.masked_fill(~seen.unsqueeze(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf where nothing is seen
    probs = torch.nan_to_num(torch.exp(scores - lse.unsqueeze(-1)), nan=0.0)
    out = (probs @ vf).transpose(1, 2).to(q.dtype)
    return out, torch.where(lse == float("-inf"), float("inf"), lse).float()


def lost_queries(ok, cache_seqlens, lo, hi):
    """`[B, q_len]` bool: the queries whose output is NaN because a new token was lost (`ok [B, n_new]` False, n_new
    > 0): the query at a lost token's slot, and every query whose range [lo, hi] (`query_ranges`) meets the span of
    the row's lost tokens."""
    (batch, n_new), q_len = ok.shape, lo.shape[1]
    ok = ok.to(lo.device)
    own = F.pad(~ok, (max(0, q_len - n_new), 0))[:, max(0, n_new - q_len):]  # query i <-> new token i + n_new - q_len
    slots = _slots(cache_seqlens, batch, n_new).to(lo.device)
    lost_lo = torch.where(ok, torch.iinfo(torch.int64).max, slots).amin(1, keepdim=True)
    lost_hi = torch.where(ok, -1, slots).amax(1, keepdim=True)
    return own | ((lo <= lost_hi) & (hi >= lost_lo))
