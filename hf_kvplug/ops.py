"""Registered torch ops for the cache, and the choice between the Triton kernels and the reference.

Two op families, picked by device (a static property, so the choice costs nothing under torch.compile):
  hf_kvplug::attend_with_kvcache / write_kvcache          triton_op (wrap_triton), CUDA tensors
  hf_kvplug::attend_with_kvcache_ref / write_kvcache_ref  custom_op, the PyTorch reference (any device)
Both mutate the cache buffers in place and are declared so (`mutates_args`), so `torch.compile(fullgraph=True)`
traces them without a graph break.

The backend is "auto" (Triton for CUDA tensors, the reference for every other device; on CUDA a failed import of the
kernels raises instead of falling back), or forced with `PlugCache(..., backend="reference" | "triton")` or the
environment variable HF_KVPLUG_BACKEND. `attend_with_kvcache` is the one public dispatch: the cache layers and
`flash.flash_attn_with_kvcache` both call it.
"""

from __future__ import annotations

import os

import torch

from . import torchpath
from .reference import attend_with_kvcache_ref, write_kvcache_ref

BACKENDS = ("auto", "triton", "torch", "reference")

try:  # Triton is optional: without it (macOS, Windows) every device but CUDA uses the reference.
    from . import kernels as _kernels
except ImportError as e:  # pragma: no cover - depends on the platform
    _kernels = None
    _KERNELS_IMPORT_ERROR = e
else:
    _KERNELS_IMPORT_ERROR = None

_MUTATED = ("k_cache", "v_cache", "k_scale", "v_scale", "status", "k_tail", "v_tail")


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """'triton', 'torch' or 'reference' for buffers on `device`, honouring HF_KVPLUG_BACKEND when `backend` is
    None/auto: auto is Triton for CUDA tensors, the PyTorch fast path (`torchpath`) for every other device."""
    choice = backend if backend not in (None, "auto") else (os.environ.get("HF_KVPLUG_BACKEND") or "auto")
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {choice!r} (argument or HF_KVPLUG_BACKEND)")
    if choice == "auto":
        if device.type != "cuda":
            return "torch"
        if _kernels is None:  # never a silent fallback where the kernels belong
            raise RuntimeError(f"hf_kvplug's Triton kernels failed to import ({_KERNELS_IMPORT_ERROR!r}), so CUDA "
                               "tensors cannot run them; install Triton, or ask for the PyTorch reference with "
                               "backend='reference' (or HF_KVPLUG_BACKEND=reference)")
        return "triton"
    if choice == "triton":
        if _kernels is None:
            raise RuntimeError(f"backend='triton' needs Triton, which failed to import: {_KERNELS_IMPORT_ERROR}")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"backend='triton' needs CUDA tensors (got {device}); set TRITON_INTERPRET=1 to "
                             "run the kernels on the CPU interpreter, or use backend='reference'")
    return choice


# ---------------------------------------------------------------- reference ops (custom_op, opaque to Inductor)

def _check_writable_on_host(block_table, cache_seqlens, batch: int, q_len: int, block_size: int):
    """CPU only (the read is free there): raise, before anything is written, if a new token has no slot. Returns
    each new token's (slot, block) `[batch, q_len]` (`reference.slot_blocks`)."""
    from .reference import slot_blocks

    slots, blocks, ok = slot_blocks(block_table, cache_seqlens, batch, q_len, block_size)
    if not bool(ok.all()):
        row = int((~ok).any(1).nonzero()[0, 0])
        raise ValueError(f"row {row} has no cache slot for {int((~ok[row]).sum())} of its {q_len} new tokens "
                         f"(cache_seqlens={int(cache_seqlens[row])}, {block_table.shape[1]} blocks of {block_size} "
                         "slots, unmapped blocks are -1)")
    return slots, blocks


def _attend_ref_bounded(q, k, v, k_cache, v_cache, k_scale, v_scale, block_table, cache_seqlens, cache_starts,
                        cache_valid, status, softmax_scale, window, causal, k_tail, v_tail, **flash):
    num_blocks = None
    if cache_seqlens.device.type == "cpu" and q.shape[0]:  # bound the work by the real length: free to read here
        longest = int(cache_seqlens[: q.shape[0]].max()) + k.shape[1]
        num_blocks = -(-longest // k_cache.shape[2])
    return attend_with_kvcache_ref(q, k, v, k_cache, v_cache, k_scale, v_scale, block_table, cache_seqlens,
                                   cache_starts, cache_valid, status, softmax_scale, window, num_blocks=num_blocks,
                                   causal=causal, k_tail=k_tail, v_tail=v_tail, **flash)


def _cpu_plan(q, k, v, k_cache, v_cache, k_scale, v_scale, block_table, cache_seqlens, cache_starts, cache_valid,
              window: int, causal: bool) -> torchpath.Plan:
    """The fast path's plan of a call on CPU tensors, its span read from the lengths (free to read there)."""
    batch, q_len, n_new = q.shape[0], q.shape[1], k.shape[1]
    lengths = cache_seqlens[:batch]
    end = int(lengths.max()) + n_new if batch else 0
    first = max(0, int(lengths.min()) + n_new - q_len - window + 1) if window and batch else 0
    return torchpath.plan(block_table, cache_seqlens, cache_starts, cache_valid, batch, q_len, n_new, window, causal,
                          k_cache.shape[2], k_cache.shape[1], (first, end), strides=torchpath.slot_strides(k_cache))


@torch.library.custom_op("hf_kvplug::attend_with_kvcache_ref", mutates_args=_MUTATED)
def _attend_ref_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    k_scale: torch.Tensor, v_scale: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
    cache_starts: torch.Tensor, cache_valid: torch.Tensor, status: torch.Tensor, softmax_scale: float, window: int,
    causal: bool, k_tail: torch.Tensor, v_tail: torch.Tensor,
) -> torch.Tensor:
    return _attend_ref_bounded(q, k, v, k_cache, v_cache, k_scale, v_scale, block_table, cache_seqlens, cache_starts,
                               cache_valid, status, softmax_scale, window, causal, k_tail, v_tail)


@_attend_ref_op.register_fake
def _(q, k, v, k_cache, v_cache, k_scale, v_scale, block_table, cache_seqlens, cache_starts, cache_valid, status,
      softmax_scale, window, causal, k_tail, v_tail):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


@torch.library.custom_op("hf_kvplug::write_kvcache_ref", mutates_args=_MUTATED)
def _write_ref_op(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor,
    v_scale: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor, status: torch.Tensor,
    k_tail: torch.Tensor, v_tail: torch.Tensor,
) -> None:
    write_kvcache_ref(k, v, k_cache, v_cache, k_scale, v_scale, block_table, cache_seqlens, status, k_tail, v_tail)


@_write_ref_op.register_fake
def _(k, v, k_cache, v_cache, k_scale, v_scale, block_table, cache_seqlens, status, k_tail, v_tail):
    return None


# ---------------------------------------------------------------- Triton ops (triton_op: Inductor sees the kernels)

if _kernels is not None:

    @torch.library.triton_op("hf_kvplug::attend_with_kvcache", mutates_args=_MUTATED)
    def _attend_triton_op(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
        k_scale: torch.Tensor, v_scale: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
        cache_starts: torch.Tensor, cache_valid: torch.Tensor, status: torch.Tensor, softmax_scale: float,
        window: int, causal: bool, k_tail: torch.Tensor, v_tail: torch.Tensor,
    ) -> torch.Tensor:
        return _kernels.attend_with_kvcache(q, k, v, k_cache, v_cache, k_scale, v_scale, block_table,
                                            cache_seqlens, cache_starts, cache_valid, status, softmax_scale, window,
                                            causal, k_tail=k_tail, v_tail=v_tail)

    @torch.library.triton_op("hf_kvplug::write_kvcache", mutates_args=_MUTATED)
    def _write_triton_op(
        k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor,
        v_scale: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor, status: torch.Tensor,
        k_tail: torch.Tensor, v_tail: torch.Tensor,
    ) -> None:
        _kernels.write_kvcache(k, v, k_cache, v_cache, k_scale, v_scale, block_table, cache_seqlens, status,
                               k_tail=k_tail, v_tail=v_tail)


# ---------------------------------------------------------------- public functions

def _empty(device, dtype) -> torch.Tensor:
    """A 0-element tensor standing for "no cache_valid" / "no scale" / "no status" (made anew: a memo of them would be
    a dict torch.compile guards on)."""
    return torch.empty(0, dtype=dtype, device=device)


def attend_with_kvcache(
    q, k, v, k_cache, v_cache, k_scale, v_scale, block_table, cache_seqlens, cache_starts,
    softmax_scale: float, window: int | None = None, cache_valid=None, status=None, backend: str = "auto",
    causal: bool = True, *, right: int = -1, alibi_slopes: torch.Tensor | None = None, softcap: float = 0.0,
    return_lse: bool = False, num_splits: int | None = None, plan: torchpath.Plan | None = None,
    k_tail: torch.Tensor | None = None, v_tail: torch.Tensor | None = None,
):
    """Write the new K/V into the paged cache and attend over each row's visible slots, in one call.

    The queries are each row's last q_len tokens once the new ones are appended, as in flash_attn_with_kvcache
    (exact semantics in `hf_kvplug.reference`); the model's forwards pass as many new tokens as queries.

    Args:
        q: `[batch, q_len, nheads, head_dim]` queries (post-RoPE); any strides with a contiguous last dim.
        k, v: `[batch, n_new, nheads_k, head_dim]` new keys (post-RoPE) and values, in the model dtype, written at
            slots `cache_seqlens[b] + j`; any n_new, usually q_len. None: attend only, nothing written.
        k_cache, v_cache: `[num_blocks, nheads_k, block_size, head_dim]` in the model dtype or int8, or
            `[num_blocks, nheads_k, block_size, head_dim / 2]` uint8 for int4 (two codes a byte, see `reference`).
            **Written in place.**
        k_scale, v_scale: `[num_blocks, nheads_k, block_size]` float32 for int8 caches, `[..., 4]` float16 for int4
            (scale and minimum of each half of head_dim), else empty or None. **Written.**
        block_table: `[max_batch, max_blocks]` int32 block ids, -1 where no block is mapped.
        cache_seqlens: `[max_batch]` int32, slots filled before this call (not advanced here).
        cache_starts: `[batch]` int32, first slot each row may attend (leading padding).
        softmax_scale: usually `head_dim ** -0.5`.
        window: sliding window in tokens (HF semantics: the query and the `window - 1` slots before it), or None.
        causal: False lets every query see up to the row's last token (its window still bounds it on the left).
        cache_valid: optional `[max_batch, max_len]` uint8, 0 where a slot is masked out (padding, holes).
        status: optional `[1]` int32, set to 1 (**written**) on the device if a new token had no slot.
        backend: "auto", "triton" or "reference" (see module docstring).
        right, alibi_slopes, softcap, return_lse, num_splits: flash_attn_with_kvcache's options (`hf_kvplug.flash`;
            semantics in `reference.attend_with_kvcache_ref`): a non-causal query sees at most `right` slots past its
            own (-1: all); ALiBi slopes `[nheads]` or `[batch, nheads]` fp32; a softcap on the scores; also return
            the natural log-sum-exp `[batch, nheads, q_len]` fp32; the split-KV count for one query (None: the
            launcher's choice). A call with any of them runs the kernels or the reference directly, not through the
            registered ops (torch.compile does not trace it).
        plan: for the PyTorch fast path (backend "torch"), where this call reads and writes, built by the caller
            from what it knows on the host (`torchpath.plan`: a PlugCache builds one per forward and group of
            layers); the caller vouches that every new token has a mapped slot. Without one, the CPU builds it
            from the tensors (reading them is free there) and other devices run the reference.
        k_tail, v_tail: `[max_batch, nheads_k, block_size, head_dim]` in the model dtype (int4 caches), or None:
            each row's last, partial block unquantized, read instead of its codes (rule 4 of `reference`).
            **Written**: the new tokens that land in that block.

    Returns:
        `[batch, q_len, nheads, head_dim]` attention output in the dtype of `q`; 0 for a query that sees no slot
        (and `(out, lse)` with `return_lse`). No backward. A new token with no slot (past the table or an unmapped
        block) is not written, sets `status`, and the queries that would see it (and the one at its slot) get NaN;
        on CPU tensors that raises a ValueError instead, before anything is written.
    """
    if plan is not None and not torch.compiler.is_compiling():  # the cache's own call: everything checked on the host
        return torchpath.attend(q, k, v, k_cache, v_cache, k_scale, v_scale, plan, softmax_scale, k_tail, v_tail)
    window = int(window or 0)
    if (k is None) != (v is None):
        raise ValueError("k and v: both tensors, or both None (attend only)")
    if k is None:
        k = v = q.new_empty((q.shape[0], 0, k_cache.shape[1], q.shape[-1]))
    if k.shape[0] != q.shape[0] or v.shape != k.shape:
        raise ValueError(f"k and v must be [batch, n_new, nheads_k, head_dim] alike, with q's batch: "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    no_scale = _empty(q.device, torch.float32)
    args = (q, k, v, k_cache, v_cache, no_scale if k_scale is None else k_scale,
            no_scale if v_scale is None else v_scale, block_table, cache_seqlens, cache_starts,
            _empty(q.device, torch.uint8) if cache_valid is None else cache_valid,
            _empty(q.device, torch.int32) if status is None else status, softmax_scale, window, bool(causal),
            *_tails(k_tail, v_tail, q, k_cache))
    compiling = torch.compiler.is_compiling()
    if q.device.type == "cpu" and not compiling:
        _check_writable_on_host(block_table, cache_seqlens, q.shape[0], k.shape[1], k_cache.shape[2])
    flash = dict(right=right, alibi_slopes=alibi_slopes, softcap=softcap)
    if right >= 0 or alibi_slopes is not None or softcap or return_lse or num_splits is not None:
        if resolve_backend(backend, q.device) == "triton":
            lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32) if return_lse else None
            out = _kernels.attend_with_kvcache(*args[:-2], k_tail=args[-2], v_tail=args[-1], **flash, lse=lse,
                                               num_splits=num_splits)
            return (out, lse) if return_lse else out
        return _attend_ref_bounded(*args, **flash, return_lse=return_lse)
    choice = resolve_backend(backend, q.device)
    if choice == "triton":
        if q.device.type != "cuda":  # the CPU interpreter: launch directly, there is nothing to trace
            return _kernels.attend_with_kvcache(*args[:-2], k_tail=args[-2], v_tail=args[-1])
        return torch.ops.hf_kvplug.attend_with_kvcache(*args)
    if q.device.type == "cpu":
        if compiling:
            return torch.ops.hf_kvplug.attend_with_kvcache_ref(*args)
        if choice == "torch" and k.shape[1] in (0, q.shape[1]) and all(map(torchpath.paged_layout, (k_cache, v_cache))):
            cpu_plan = _cpu_plan(*args[:11], window, causal)
            if cpu_plan.mode != "blocks" or k_tail is None:  # (blocks read where they lie: no tail there)
                return torchpath.attend(*args[:7], cpu_plan, softmax_scale, *args[-2:])
        return _attend_ref_bounded(*args)  # eager: skip the op dispatcher's overhead, same function
    # Reference forced on an accelerator: plain torch ops over the whole row with a mask (no host sync).
    return attend_with_kvcache_ref(*args[:-3], causal=args[-3], k_tail=args[-2], v_tail=args[-1])


def attend_planned(q, k, v, kv, plan: torchpath.Plan, softmax_scale: float, tail=None) -> torch.Tensor:
    """`attend_with_kvcache(..., plan=plan)` for the call a PlugCache layer makes on eager code off CUDA, with the
    plan its forward's host work built (and vouches for): `kv` is `(k_cache, v_cache, k_scale, v_scale)`, `tail`
    `(k_tail, v_tail)` or None. The same buffers are written in place; none of the arguments the plan replaces
    (tables, lengths, bounds) is built for it."""
    return torchpath.attend(q, k, v, *kv, plan, softmax_scale, *(tail or (None, None)))


def attend_step(q, k, v, views, softmax_scale: float, codes: bool = True) -> torch.Tensor:
    """The decode step of a PlugCache layer whose buffers are part of a slab, through the views its forward's host
    work took of them: `torchpath.StepViews` (K/V in the model dtype, `torchpath.step_views`) or
    `torchpath.CodeViews` (INT8 / INT4, `torchpath.code_step_views`); the new token's K and V are written through
    them, in place. The same ops, on the same views, as `attend_planned` runs for that step. `codes=False`: the new
    token's codes are not written (`CodeViews.codes_can_wait`; its caller writes them later, `PlugLayer.settle`)."""
    if isinstance(views, torchpath.CodeViews):
        return torchpath.attend_step_codes(q, k, v, views, softmax_scale, codes)
    return torchpath.attend_step(q, k, v, *views, softmax_scale)


def write_planned(k, v, k_cache, v_cache, k_scale, v_scale, wflat: torch.Tensor) -> None:
    """A PlugCache prefill's write on the PyTorch path, at the rows of the storage its forward's host work found
    (`torchpath.WritePlan`: every slot mapped, buffers in a paged layout): `k, v [B, L, nheads_k, D]` stored (INT8 /
    INT4 quantized) in place, the same bytes `write_kvcache` stores, without its per-call check and slot lookup."""
    torchpath.write(k, v, k_cache, v_cache, k_scale, v_scale, wflat)


def _tails(k_tail, v_tail, q, k_cache) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact tail's buffers, checked against the cache, or two 0-element tensors standing for none (registered
    ops take tensors)."""
    if (k_tail is None) != (v_tail is None):
        raise ValueError("k_tail and v_tail: both tensors, or both None")
    if k_tail is None:
        return _empty(q.device, q.dtype), _empty(q.device, q.dtype)
    want = (k_cache.shape[1], k_cache.shape[2], q.shape[-1])
    if k_cache.dtype != torch.uint8:
        raise ValueError(f"an exact tail goes with an int4 cache (uint8 codes), not {k_cache.dtype}")
    for t in (k_tail, v_tail):
        if tuple(t.shape[1:]) != want or t.shape[0] < q.shape[0] or t.dtype != q.dtype or not t.is_contiguous():
            raise ValueError(f"k_tail, v_tail: contiguous [>= {q.shape[0]}, {want[0]}, {want[1]}, {want[2]}] in "
                             f"{q.dtype} (rows, KV heads, block_size, head_dim), got {tuple(t.shape)} {t.dtype}")
    return k_tail, v_tail


def write_kvcache(k, v, k_cache, v_cache, k_scale, v_scale, block_table, cache_seqlens, status=None,
                  backend: str = "auto", *, k_tail=None, v_tail=None) -> None:
    """Write `k, v [batch, q_len, nheads_k, head_dim]` into slots `cache_seqlens[b] + i`, quantizing for int8/int4.

    Buffers as in `attend_with_kvcache`; `k_cache, v_cache, k_scale, v_scale` (and `status`, and the exact tail
    `k_tail, v_tail` when given) are written in place, nothing is returned and `cache_seqlens` is not advanced. A
    token with no slot is not written and sets status[0]; on CPU tensors that raises a ValueError instead, before
    anything is written.
    """
    status = _empty(k.device, torch.int32) if status is None else status
    args = (k, v, k_cache, v_cache, k_scale, v_scale, block_table, cache_seqlens, status,
            *_tails(k_tail, v_tail, k, k_cache))
    where = None
    if k.device.type == "cpu" and not torch.compiler.is_compiling():
        where = _check_writable_on_host(block_table, cache_seqlens, k.shape[0], k.shape[1], k_cache.shape[2])
    choice = resolve_backend(backend, k.device)
    if choice == "triton":
        if k.device.type != "cuda":
            return _kernels.write_kvcache(*args[:-2], k_tail=args[-2], v_tail=args[-1])
        return torch.ops.hf_kvplug.write_kvcache(*args)
    if k.device.type == "cpu":
        codes = k_cache.dtype in (torch.int8, torch.uint8)
        bufs = (k_cache, v_cache, *args[4:6]) if codes else (k_cache, v_cache)
        if (where is not None and choice == "torch" and (codes or k_cache.dtype == k.dtype)
                and all(map(torchpath.paged_layout, bufs))):  # every token has a slot (checked above)
            return torchpath.write_new(*args[:6], *where, *args[-2:])
        return torch.ops.hf_kvplug.write_kvcache_ref(*args)
    write_kvcache_ref(*args)
