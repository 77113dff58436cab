"""A PlugCache's layers, as transformers' cache layers are: they hold their buffers and run their part of a forward,
and never see the cache. What they need of the rows (batch, lengths, leaders, holes) comes as arguments or from the
`ForwardState` they read.

  PlugLayer    paged K/V of a layer that keeps up to max_cache_len tokens per row (full attention, or a window kept
               whole): the fused write + attention through `ops`, the prefill's store, the dense path for
               output_attentions.
  RingLayer    a sliding-window layer that keeps a ring of blocks per row, its window and some slack: every ring
               branch (a prefill longer than the ring, forwards in pieces, what a crop may reach) lives here.
  RemoteLayer  a layer another pipeline stage runs: no buffers.
  LinearLayers a hybrid model's linear-attention layers: transformers' own cache layers, renewed per batch.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import NamedTuple

import torch
from transformers.cache_utils import CacheLayerMixin

from . import compat, ops
from .config import PlugConfig
from .device import DeviceState
from .families import FAMILIES
from .reference import dequantize, gather_kv, overlay_tail, quantize, visible_slots, write_tail_from
from .state import ForwardState


class KV(NamedTuple):
    """One layer's paged buffers: K and V `[num_blocks, nheads_k, block_size, head_dim]` (model dtype or int8;
    uint8 `[..., head_dim / 2]`, two codes a byte, for int4) and their scales (int8: `[num_blocks, nheads_k,
    block_size]` fp32; int4: `[..., 4]` fp16; else empty). Stored blocks first (contiguous, as the kernels read
    them) or heads first (the PyTorch path's: the same indices, the storage `[nheads_k, num_blocks, ...]`)."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor
    v_scale: torch.Tensor

    @classmethod
    def allocate(cls, config: PlugConfig, ring: int | None, device: torch.device, heads_first: bool = False) -> "KV":
        """Zeroed buffers; `heads_first`: each KV head's blocks follow one another in memory, so that a row's
        consecutive blocks are one span per head (`torchpath`)."""
        shape, scale_shape, scale_dtype = config.storage_shapes(ring)

        return cls(*(_zeros(s, d, device, heads_first) for s, d in (
            (shape, config.storage_dtype), (shape, config.storage_dtype), (scale_shape, scale_dtype),
            (scale_shape, scale_dtype))))

    @classmethod
    def allocate_group(cls, config: PlugConfig, ring: int | None, device: torch.device,
                       count: int) -> tuple[torch.Tensor, torch.Tensor | None, list["KV"]]:
        """Zeroed buffers of `count` layers stored heads first, K and V of all of them in one storage (`slab`
        `[2 * count, nheads_k, num_blocks, block_size, width]`: layer i's K is `slab[i]`, its V `slab[count + i]`,
        each as `allocate(heads_first=True)` lays it out), and their scales alike in another (`scales`, None where
        the cache has none), so that one view reaches every layer's span (`torchpath.step_views`,
        `torchpath.code_step_views`). Returns (slab, scales, the layers' KV)."""
        shape, scale_shape, scale_dtype = config.storage_shapes(ring)
        slab = torch.zeros((2 * count, shape[1], shape[0], *shape[2:]), dtype=config.storage_dtype, device=device)
        scales = None
        if len(scale_shape) >= 3:
            scales = torch.zeros((2 * count, scale_shape[1], scale_shape[0], *scale_shape[2:]), dtype=scale_dtype,
                                 device=device)
        return slab, scales, [cls(slab[i].transpose(0, 1), slab[count + i].transpose(0, 1),
                                  *(_zeros(scale_shape, scale_dtype, device, True) if scales is None else
                                    scales[j].transpose(0, 1) for j in (i, count + i))) for i in range(count)]

    def clone(self) -> "KV":
        return KV(*(t.clone() for t in self))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self)

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Block dst[i] takes block src[i]'s data (copy-on-write)."""
        s, d = (torch.tensor(x, device=self.k.device) for x in (src, dst))
        for buf in self:
            if buf.numel():
                buf[d] = buf[s]

    def blocks(self, ids: list[int]) -> dict[str, torch.Tensor]:
        """Blocks `ids` of every non-empty buffer, on the CPU, by name (k, v, k_scale, v_scale)."""
        idx = torch.tensor(ids, dtype=torch.long, device=self.k.device)
        return {name: buf[idx].cpu().contiguous() for name, buf in zip(self._fields, self) if buf.numel()}

    def put_blocks(self, ids: list[int], tensors: dict[str, torch.Tensor]) -> None:
        idx = torch.tensor(ids, dtype=torch.long, device=self.k.device)
        for name, buf in zip(self._fields, self):
            if buf.numel() and ids:
                buf[idx] = tensors[name].to(buf.device)


def _zeros(shape, dtype, device, heads_first: bool) -> torch.Tensor:
    """A zeroed buffer `[num_blocks, nheads_k, ...]`; `heads_first`: stored `[nheads_k, num_blocks, ...]` (the same
    indices). A buffer of fewer than 3 dims (an empty scale) is plain."""
    if not heads_first or len(shape) < 3:
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.zeros((shape[1], shape[0], *shape[2:]), dtype=dtype, device=device).transpose(0, 1)


class Slab(NamedTuple):
    """The K and V of a group of layers on the PyTorch path in one storage (`KV.allocate_group`): `buf` `[2 *
    count, ...]`, their scales alike (or None: none), the cache's exact tails of those layers alike
    (`Tail.allocate_group`; None: none, or not in one storage), the layers (by index) whose buffers it holds in that
    order, their device, and the key of the plan they all share (`PlugLayer.plan_key`), by which one view of each
    storage serves every layer's decode step. A fork shares `buf` and `scales` and has tails of its own."""

    buf: torch.Tensor
    scales: torch.Tensor | None
    tails: torch.Tensor | None
    layers: tuple[int, ...]
    device: torch.device
    plan_key: tuple


class Tail(NamedTuple):
    """A quantized layer's exact tail (`PlugConfig.exact_tail`; `reference`, rule 4): K and V of each row's last
    block (partial, or just filled) unquantized, `[max_batch, nheads_k, block_size, head_dim]` in the model dtype
    (keys rotated as the pool stores them). Slot t is at `t % block_size`; reads take the slots of a partial block."""

    k: torch.Tensor
    v: torch.Tensor

    @staticmethod
    def shape(config: PlugConfig) -> tuple[int, ...]:
        return config.max_batch_size, config.nheads_k, config.block_size, config.head_dim

    @classmethod
    def allocate(cls, config: PlugConfig, device: torch.device) -> "Tail":
        return cls(*(torch.zeros(cls.shape(config), dtype=config.dtype, device=device) for _ in range(2)))

    @classmethod
    def allocate_group(cls, config: PlugConfig, device: torch.device, count: int) -> tuple[torch.Tensor, list["Tail"]]:
        """The tails of `count` layers in one storage, `[2 * count, max_batch, nheads_k, block_size, head_dim]`:
        layer i's K tail at i, its V tail at count + i, each as `allocate` lays it out. Returns (the storage, the
        layers' tails)."""
        slab = torch.zeros((2 * count, *cls.shape(config)), dtype=config.dtype, device=device)
        return slab, [cls(slab[i], slab[count + i]) for i in range(count)]

    def clone(self) -> "Tail":
        return Tail(*(t.clone() for t in self))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self)

    def store(self, k, v, before: int) -> None:
        """Rule 4's write for `k, v [B, L, nheads_k, D]` at slots `before + i` of rows < B (host-known, every row
        alike): the tokens in the rows' last block, in place."""
        write_tail_from(k, v, self.k, self.v, before)

    def refill(self, keys, values, first: int) -> None:
        """Rows < B take `keys, values [B, nheads_k, n, D]`, slots `first + i` of one block, as their tail."""
        at = slice(first % self.k.shape[2], first % self.k.shape[2] + keys.shape[2])
        self.k[:keys.shape[0], :, at].copy_(keys)
        self.v[:keys.shape[0], :, at].copy_(values)


class Unwritten(NamedTuple):
    """Slots [first, end) of rows < batch, all in the rows' last block, whose codes the decode step left unwritten:
    the exact tail holds their values, and every read takes them from there until the block fills
    (`PlugLayer.settle` writes them)."""

    batch: int
    first: int
    end: int


class PlugLayer(CacheLayerMixin):
    """One decoder layer's paged K/V pool, its scales and per-row lengths, on the layer's device.

    `keys` / `values` give what every stock cache layer gives, `[batch, nheads_k, seq_len, head_dim]` in the model
    dtype (dequantized for INT8 / INT4), gathered on access; the paged pool is `k_cache` / `v_cache` (+ `k_scale`,
    `v_scale`). Methods that change rows (reset, crop, reorder) are the cache's: they keep all layers together.
    """

    is_compileable = True
    is_croppable = True
    ring = None  # blocks per row of a sliding-window ring (RingLayer)

    def __init__(self, config: PlugConfig, layer_idx: int, dev: DeviceState, state: ForwardState, kv: KV | None = None,
                 backend: str = "auto", tail: Tail | None = None):
        super().__init__()
        self.config, self.layer_idx, self.dev, self.state = config, layer_idx, dev, state
        self.device = dev.device
        self.window = config.layer_windows[layer_idx]
        self.is_sliding = self.window is not None
        self.plan_key = (self.ring, self.window or 0)  # its plan among the forward's (`DeviceState.plans`)
        # what every forward's `check_states` compares: KV heads x head_dim, dtype, device, rows
        self._fits = ((config.nheads_k, config.head_dim), config.dtype, self.device, config.max_batch_size)
        self.backend = ops.resolve_backend(backend, self.device)
        self.kv = KV.allocate(config, self.ring, self.device, self.backend == "torch") if kv is None else kv
        self.cache_seqlens = torch.zeros(config.max_batch_size, dtype=torch.int32, device=self.device)
        # the rows' own: a fork or a copy shares the pool, never the tail (given: the cache's, in one storage)
        self.tail = (tail or Tail.allocate(config, self.device)) if config.exact_tail else None
        # Host-side: the slots whose codes the decode step left to the exact tail (`Unwritten`), or None. Only a step
        # that reads its token from the tail leaves them (a quantizer less per layer and step); anything else that
        # reads or writes this layer's pool, or moves its rows, calls `settle` first, which writes them.
        self.unwritten: Unwritten | None = None
        compat.mark_static(*self.kv, *(self.tail or ()), self.cache_seqlens)
        self.is_initialized = True
        self.is_last = layer_idx == config.attention_layers[-1]  # its forward ends the cache's forward
        # Host-side: True until the first forward after construction or reset(), so that forward can attend with
        # the model's own attention over the fresh K/V (as stock does) with no device read.
        self.fresh = True

    def __repr__(self):
        return f"{type(self).__name__}(layer={self.layer_idx}, device={self.device}, window={self.window})"

    k_cache = property(lambda self: self.settle() or self.kv.k)
    v_cache = property(lambda self: self.settle() or self.kv.v)
    k_scale = property(lambda self: self.settle() or self.kv.k_scale)
    v_scale = property(lambda self: self.settle() or self.kv.v_scale)

    @property
    def block_table(self) -> torch.Tensor:
        """This layer's group's device table `[max_batch, max_blocks]` by logical block (a ring repeats)."""
        return self.dev.block_tables[self.ring]

    # --- what a stock cache layer offers ------------------------------------------------------------

    @property
    def keys(self) -> torch.Tensor:
        """`[batch, nheads_k, seq_len, head_dim]` in the model dtype: a copy gathered from the paged pool. A
        sliding-window layer gives its last `window - 1` tokens, as transformers' sliding layers keep."""
        return self.dev.unrotate(self.gather(values=False))

    @keys.setter
    def keys(self, value):
        if value is not None:
            raise AttributeError("PlugLayer.keys is read-only (a view gathered from the paged pool, k_cache)")

    @property
    def values(self) -> torch.Tensor:
        """`[batch, nheads_k, seq_len, head_dim]` in the model dtype: a copy gathered from the paged pool."""
        return self.gather(values=True)

    @values.setter
    def values(self, value):
        if value is not None:
            raise AttributeError("PlugLayer.values is read-only (a view gathered from the paged pool, v_cache)")

    def lazy_initialization(self, key_states, value_states=None, *args, **kwargs) -> None:
        """Buffers are allocated at construction; this only checks that the model fits them."""
        self.check_states(key_states.transpose(1, 2))

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError(
            "PlugCache.update() was called by an attention forward that hf_kvplug did not patch. "
            "Call hf_kvplug.patch(model) before generating with a PlugCache (supported: "
            f"{', '.join(sorted(FAMILIES))}).")

    def get_seq_length(self, *args, **kwargs):
        return self.cache_seqlens[0] if torch.compiler.is_compiling() else self.state.seq_length()

    def get_max_length(self, *args, **kwargs) -> int:
        return self.config.max_cache_len

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        # The plugged forward masks by itself (row lengths, starts, the recorded mask): HF need only build a q x q
        # mask, which the prefill's stock attention uses and later forwards ignore.
        return query_length, 0

    def reset(self, *args, **kwargs) -> None:
        self.cache_seqlens.zero_()
        self.fresh = True
        self.unwritten = None  # (the rows hold nothing)

    def activate_past_recording(self, *args, **kwargs) -> None:
        """Nothing to do: every token stays in its slot until `crop` moves the length back (transformers 5.25 passes
        `recurrent_states_to_keep=`, which only linear-attention layers use)."""

    # --- reading ----------------------------------------------------------------------------------------

    def gather(self, values: bool, length: int | None = None, batch: int | None = None) -> torch.Tensor:
        """The keys (values=False) or values of slots [0, length) of rows < batch (a sliding-window layer: its last
        `window - 1` of them); keys as the pool holds them (rotated where the cache rotates them)."""
        batch = self.state.batch if batch is None else batch
        length = self.state.length_now() if length is None else length
        lo = self.first_seen(length)
        buf, scale = (self.kv.v, self.kv.v_scale) if values else (self.kv.k, self.kv.k_scale)
        x = self.gather_slots(buf, scale, lo, length, batch)
        return x if self.tail is None else self._exact(x, values, lo, length)

    def _exact(self, x: torch.Tensor, values: bool, lo: int, length: int) -> torch.Tensor:
        """`x [B, nheads_k, length - lo, D]`, slots [lo, length) of rows holding `length` tokens, with their last,
        partial block's slots taken from the exact tail (rule 4), as the attention reads them."""
        end = torch.full((x.shape[0],), length, device=x.device)
        return overlay_tail(x, self.tail.v if values else self.tail.k, end - length % self.config.block_size, end, lo)

    def first_seen(self, length: int) -> int:
        """The first slot the next token of a row holding `length` may see (its window)."""
        return max(0, length - self.window + 1) if self.window else 0

    def gather_slots(self, buf: torch.Tensor, scale: torch.Tensor, lo: int, hi: int, batch: int) -> torch.Tensor:
        """Slots [lo, hi) of rows < batch, `[batch, nheads_k, hi - lo, head_dim]` in the model dtype."""
        self.settle()
        if hi <= lo or batch == 0:
            return torch.zeros((batch, self.config.nheads_k, 0, self.config.head_dim), dtype=self.config.dtype,
                               device=self.device)
        bs = self.config.block_size
        first, end = lo // bs, math.ceil(hi / bs)
        x = gather_kv(buf, scale, self.block_table[:, first:end], batch, end - first, self.config.dtype)
        return x[:, :, lo - first * bs:hi - first * bs]

    # --- a forward --------------------------------------------------------------------------------------

    def check_states(self, k: torch.Tensor, batch: int | None = None) -> None:
        """Raise (before anything is written) if `k [B, q_len, nheads_k, D]` does not fit this layer's buffers."""
        cfg = self.config
        batch = k.shape[0] if batch is None else batch
        heads, dtype, device, rows = self._fits
        if k.shape[-2:] == heads and k.dtype == dtype and k.device == device and batch <= rows:
            return  # (every forward's check, per layer: the message only when it fails)
        problems = []
        if k.shape[-2] != cfg.nheads_k or k.shape[-1] != cfg.head_dim:
            problems.append(f"kv heads x head_dim {tuple(k.shape[-2:])} != cache {(cfg.nheads_k, cfg.head_dim)}")
        if k.dtype != cfg.dtype:
            problems.append(f"dtype {k.dtype} != cache {cfg.dtype}")
        if k.device != self.device:
            problems.append(f"device {k.device} != cache {self.device}")
        if problems:
            raise ValueError(f"PlugCache layer {self.layer_idx} was built for another model: " + "; ".join(problems)
                             + ". Build the cache with PlugCache(model, ...) from the model you generate with.")
        if batch > cfg.max_batch_size:
            raise ValueError(f"batch of {batch} rows (after beams / return sequences) exceeds the PlugCache's "
                             f"max_batch_size={cfg.max_batch_size}; build it with max_batch_size >= {batch}")

    def write(self, k, v, leaders: list[int] | None) -> None:
        """Store `k, v [B, L, nheads_k, D]` into an empty cache (the first forward); advances the lengths. Rows
        that share a leader's prompt blocks (generate()'s expanded rows) are not written: the leader's K/V serve."""
        self.settle()
        batch, q_len = k.shape[:2]
        k = self.dev.rotate(k)
        table, seqlens = self.block_table, self.cache_seqlens
        if self.tail is not None:  # every row's own (a fresh cache: the rows start at slot 0)
            self.tail.store(k, v, 0)
        if leaders is not None:
            rows = torch.tensor(leaders, device=self.device)
            k, v, table, seqlens = k[rows], v[rows], table[rows], seqlens[rows]
        planned = None if torch.compiler.is_compiling() else self.dev.writes.get(self.plan_key)
        if planned is not None and (planned.batch, planned.q_len) == tuple(k.shape[:2]):
            ops.write_planned(k, v, *self.kv, planned.wflat)  # off CUDA: where the forward's host work planned
        else:
            self._store(k, v, table, seqlens)
        self._advance(batch, q_len)

    def attend(self, q, k, v, softmax_scale: float, holes: bool, rotated: bool = False) -> torch.Tensor:
        """Fused write + attention for `q [B, L, nheads, D]`, `k, v [B, L, nheads_k, D]`; advances the lengths.
        `holes`: the recorded mask has holes, so the kernels read the slot mask. A quantized cache's keys and
        queries go in rotated alike (`DeviceState.rotate`; `rotated`: the caller rotated them)."""
        dev = self.dev
        if dev.rotation is not None:
            if not rotated:
                q, k = dev.rotate(q), dev.rotate(k)
            softmax_scale = dev.softmax_scale(softmax_scale)
        views = None if torch.compiler.is_compiling() else dev.step_views.get(self.layer_idx)
        if (views is not None and q.shape[1] == 1 and q.shape[0] == views.batch and q.dtype == self.config.dtype
                and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                                      or self.kv.k.requires_grad or self.kv.v.requires_grad))):
            # the decode step, when this layer's slab has one; a token it reads from the tail leaves its codes
            end, wait = self.state.length, views.codes_can_wait  # (the forward's host work prepared it: a host count)
            u = self.unwritten
            if u is not None and not (wait and (u.batch, u.end) == (views.batch, end - 1)):
                self.settle()  # (before a step that reads them, or one that does not follow on from them)
            out = ops.attend_step(q, k, v, views, softmax_scale, codes=not wait)
            if wait:
                self.unwritten = Unwritten(views.batch, end - 1 if self.unwritten is None else u.first, end)
        else:
            self.settle()
            out = self._attend_rows(q, k, v, softmax_scale, dev.valid if holes else dev.no_valid)
        self._advance(*q.shape[:2])
        return out

    def _attend_rows(self, q, k, v, softmax_scale, valid):
        return self._attend(q, k, v, softmax_scale, self.cache_seqlens, valid)

    def attend_dense(self, module, q, k, v, attention_fn, total: int, holes: bool, rotated: bool = False):
        """The step of a model with eager attention (and its `output_attentions`): write the new K/V, gather this
        layer's K/V and run the model's own eager attention over it with a mask built from the cache's bounds, as a
        stock cache would (a sliding-window layer over its last `window - 1` cached tokens and the new ones, as
        transformers' sliding layers give it). q `[B, nheads, L, D]`, k `[B, L, nheads_k, D]`, v likewise; `total`:
        tokens each row holds after this forward (`rotated`: q and k carry the key rotation already). Returns `(out
        [B, L, nheads, D], weights)`."""
        self.settle()
        batch, q_len = k.shape[:2]
        if not rotated:  # the weights are unchanged: (q R) . (k R) / g = q . k
            q, k = self.dev.rotate(q), self.dev.rotate(k)
        before = total - q_len
        lo = self.first_seen(before)
        past = [self.gather_slots(buf, scale, lo, before, batch)  # read before the write: a ring reuses places
                for buf, scale in ((self.kv.k, self.kv.k_scale), (self.kv.v, self.kv.v_scale))]
        self._store(k, v, self.block_table, self.cache_seqlens)
        new = self._stored_new(k, v, before, total, batch)
        keys, values = (torch.cat([a, b], 2) for a, b in zip(past, new))
        if self.tail is not None:
            self.tail.store(k, v, before)
            keys, values = self._exact(keys, False, lo, total), self._exact(values, True, lo, total)
        dev = self.dev
        seen = visible_slots(self.cache_seqlens, dev.starts, dev.valid if holes else dev.valid[:0], batch, q_len,
                             self.window or 0, total)[..., lo:]
        mask = torch.zeros(seen.shape, dtype=q.dtype, device=q.device).masked_fill_(~seen, torch.finfo(q.dtype).min)
        out, weights = attention_fn(module, q, keys, values, mask.unsqueeze(1), dropout=0.0,
                                    scaling=dev.softmax_scale(module.scaling))
        self._advance(batch, q_len)
        return out, weights

    def _attend(self, q, k, v, softmax_scale, seqlens, valid):
        if not torch.compiler.is_compiling():  # off CUDA, the forward's host work planned this call
            plan = self.dev.plans.get(self.plan_key)  # ForwardHost._plan
            if plan is not None and plan.batch == q.shape[0] and plan.q_len == q.shape[1]:
                return ops.attend_planned(q, k, v, self.kv, plan, softmax_scale, self.tail)
        k_tail, v_tail = self.tail or (None, None)
        return ops.attend_with_kvcache(q, k, v, *self.kv, self.block_table, seqlens, self.dev.starts, softmax_scale,
                                       self.window, cache_valid=valid, status=self.dev.status, backend=self.backend,
                                       k_tail=k_tail, v_tail=v_tail)

    def _store(self, k, v, table, seqlens) -> None:
        """Write `k, v [B, L, nheads_k, D]` at slots seqlens[b] + i."""
        ops.write_kvcache(k, v, *self.kv, table, seqlens, status=self.dev.status, backend=self.backend)

    def settle(self) -> None:
        """Write the codes the decode step left to the exact tail (`unwritten`), quantized from the values the tail
        holds: the codes a write at once would have stored (the same values, the same quantizer)."""
        u = self.unwritten
        if u is None:
            return
        bs = self.config.block_size
        at = slice(u.first % bs, (u.end - 1) % bs + 1)
        k, v = (t[:u.batch, :, at].transpose(1, 2) for t in self.tail)
        seqlens = torch.full((u.batch,), u.first, dtype=torch.int32, device=self.device)
        # a cache built inside inference_mode holds inference tensors: written inside it, as its steps wrote them
        # (`inference_mode(False)` would switch it off inside a caller's: only ever entered)
        inner = (not torch.compiler.is_compiling() and self.kv.k.is_inference()
                 and not torch.is_inference_mode_enabled())
        with torch.inference_mode() if inner else contextlib.nullcontext():
            self._store(k, v, self.block_table, seqlens)
        self.unwritten = None  # (only once written: a write that raised leaves them waiting)

    def _stored_new(self, k, v, before: int, total: int, batch: int) -> list[torch.Tensor]:
        """The new K and V as the cache holds them, `[batch, nheads_k, L, D]` each."""
        return [self.gather_slots(buf, scale, before, total, batch)
                for buf, scale in ((self.kv.k, self.kv.k_scale), (self.kv.v, self.kv.v_scale))]

    def _advance(self, batch: int, q_len: int) -> None:
        """This layer's part of the forward is done: its rows hold `q_len` more tokens."""
        seqlens = self.cache_seqlens
        (seqlens if batch == seqlens.shape[0] else seqlens[:batch]).add_(self.dev.one if q_len == 1 else q_len)
        self.fresh = False
        self.state.layer_done(self.is_last)

    # --- rows (the cache keeps all layers together) -------------------------------------------------------

    def check_crop(self, keep: int, top: int) -> None:
        """Raise if a crop to `keep` tokens leaves the next forward needing what this layer no longer holds."""

    def crop_to(self, keep: int, batch: int, length: int) -> None:
        """Rows < batch holding `length` tokens keep their first `keep`. The tail holds the block of a row's last
        slot (rule 4): a crop whose last slot falls in an earlier block (a block boundary included, so that a second
        crop finds the block it lands in) refills the tail from the pool, whose codes are all that is left of it."""
        self.settle()
        self.cache_seqlens[:batch].fill_(keep)
        bs = self.config.block_size
        first = (keep - 1) - (keep - 1) % bs  # the block of the last slot kept
        if self.tail is not None and 0 < keep < length and first != (length - 1) - (length - 1) % bs:
            self.tail.refill(*(self.gather_slots(buf, scale, first, keep, batch)
                               for buf, scale in ((self.kv.k, self.kv.k_scale), (self.kv.v, self.kv.v_scale))),
                             first)

    def select(self, index: list[int]) -> None:
        assert self.unwritten is None, "rows move with their codes written (the cache settles first)"
        idx = torch.tensor(index, device=self.device)
        self.cache_seqlens[:len(index)] = self.cache_seqlens[idx]
        for t in self.tail or ():
            t[:len(index)] = t[idx]

    def take_rows(self, theirs: "PlugLayer") -> None:
        """Hold the rows `theirs` holds (a fork or a copy of its cache, whose pool this layer shares or copied, its
        codes written: `settle`)."""
        assert theirs.unwritten is None, "a fork or a copy takes a layer's pool with its codes written (settle)"
        self.cache_seqlens.copy_(theirs.cache_seqlens)
        self.fresh = theirs.fresh
        for mine, other in zip(self.tail or (), theirs.tail or ()):
            mine[:].copy_(other)  # through a new view: a write autograd records leaves a slab's other views stale

    def unpin_from_inference_mode(self) -> bool:
        """Move the buffers built inside torch.inference_mode() into ordinary tensors (new addresses; the K/V only
        where they are such: a fork made inside it of a cache built outside shares ordinary ones). Returns whether
        the K/V or the tail moved."""
        moved = self.kv.k.is_inference() or (self.tail is not None and self.tail.k.is_inference())
        if self.kv.k.is_inference():
            self.kv = self.kv.clone()
        if self.tail is not None and self.tail.k.is_inference():
            self.tail = self.tail.clone()
        if self.cache_seqlens.is_inference():
            self.cache_seqlens = self.cache_seqlens.clone()
        compat.mark_static(*self.kv, *(self.tail or ()), self.cache_seqlens)
        return moved


compat.answer_max_length_under_both_names(PlugLayer)


class RingLayer(PlugLayer):
    """A sliding-window layer keeping a ring of `ring` blocks per row: the last `ring_slots` slots written, at least
    its window and some slack. The device table repeats the ring along the row, so the kernels index it by slot as
    any table; slot t and t + ring_slots share a place, so a forward writes at most `chunk` tokens per kernel call
    (their queries' windows stay clear of their own writes) and a prefill longer than the ring stores its tail."""

    def __init__(self, config: PlugConfig, layer_idx: int, dev: DeviceState, state: ForwardState, kv: KV | None = None,
                 backend: str = "auto", tail: Tail | None = None):
        self.ring = config.layer_rings[layer_idx]
        self.ring_slots = self.ring * config.block_size
        super().__init__(config, layer_idx, dev, state, kv, backend, tail)
        self.chunk = self.ring_slots - self.window + 1

    def __repr__(self):
        return f"{super().__repr__()[:-1]}, ring={self.ring_slots})"

    def _attend_rows(self, q, k, v, softmax_scale, valid):
        q_len, step = q.shape[1], self.chunk
        outs = [self._attend(q[:, i:i + step], k[:, i:i + step], v[:, i:i + step], softmax_scale,
                             self.cache_seqlens + i if i else self.cache_seqlens, valid)
                for i in range(0, q_len, step)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, 1)

    def _store(self, k, v, table, seqlens) -> None:
        """Only the last `ring_slots` of the new tokens (an earlier one would share its place with a later one)."""
        drop = k.shape[1] - self.ring_slots
        if drop > 0:
            k, v, seqlens = k[:, drop:], v[:, drop:], seqlens + drop
        super()._store(k, v, table, seqlens)

    def _stored_new(self, k, v, before: int, total: int, batch: int) -> list[torch.Tensor]:
        if k.shape[1] <= self.ring_slots:
            return super()._stored_new(k, v, before, total, batch)
        # not all kept: the new K/V as the cache would store them
        return [dequantize(*quantize(x.transpose(1, 2), self.kv.k.dtype), self.config.dtype) for x in (k, v)]

    def check_crop(self, keep: int, top: int) -> None:
        # the ring holds the slots of the last ring_slots tokens written (up to `top`, even past a crop): the next
        # window must be among them
        need = max(0, keep - self.window + 1)
        if need < top - self.ring_slots:
            raise ValueError(
                f"crop to {keep} tokens: sliding-window layer {self.layer_idx} (window {self.window}) keeps "
                f"the slots of its last {self.ring_slots} tokens written (up to {top}), and the next "
                f"forward would need tokens from {need}. A crop may reach back at most "
                f"{self.ring_slots - self.window + 1} tokens below the most the rows held; build the cache with "
                "a larger window_slack=, or trim_windows=False to keep every token.")


def attention_layer(config: PlugConfig, layer_idx: int, dev: DeviceState, state: ForwardState, kv: KV | None = None,
                    backend: str = "auto", tail: Tail | None = None) -> PlugLayer:
    """The layer class config says layer `layer_idx` needs: a ring for a trimmed sliding window, else paged."""
    cls = RingLayer if config.layer_rings[layer_idx] else PlugLayer
    return cls(config, layer_idx, dev, state, kv, backend, tail)


class RemoteLayer(CacheLayerMixin):
    """Stands in for a decoder layer another pipeline stage runs: no buffers; length queries answer from the rows'
    count (every layer on every rank holds the same number of tokens), everything else does nothing."""

    is_compileable = True
    is_croppable = True
    is_sliding = False

    def __init__(self, config: PlugConfig, layer_idx: int, state: ForwardState):
        super().__init__()
        self.config, self.layer_idx, self.state, self.is_initialized = config, layer_idx, state, True

    def __repr__(self):
        return f"RemoteLayer({self.layer_idx})"

    def lazy_initialization(self, *args, **kwargs) -> None:
        pass

    def update(self, *args, **kwargs):
        raise RuntimeError(f"layer {self.layer_idx} runs on another pipeline stage: this rank's PlugCache holds none "
                           "of its K/V")

    def get_seq_length(self, *args, **kwargs):
        return self.state.seq_length()

    def get_max_length(self, *args, **kwargs) -> int:
        return self.config.max_cache_len

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        return query_length, 0

    def reset(self, *args, **kwargs) -> None:
        pass

    def activate_past_recording(self, *args, **kwargs) -> None:
        pass


compat.answer_max_length_under_both_names(RemoteLayer)


class LinearLayers:
    """A hybrid model's linear-attention layers: the cache layers transformers' own DynamicCache builds for them
    (`compat.linear_attention_layers`), at their indices in `layers` (the cache's list), so that their state stays
    in the classes transformers maintains. Their states keep the batch they were built for: a fresh forward with
    another batch size gets new ones."""

    def __init__(self, hf_config, kinds: list[str], layers: list):
        self.hf_config, self.kinds, self.layers = hf_config, kinds, layers
        self.indices = [i for i, kind in enumerate(kinds) if kind == "linear"]
        self.batch: int | None = None  # rows their states were built for

    @staticmethod
    def build(hf_config, kinds: list[str]) -> dict:
        return compat.linear_attention_layers(hf_config, kinds)

    def begin(self, batch: int) -> None:
        """Before a fresh forward of `batch` rows: new states for another batch size, recording their past if
        generate() switched that on (assisted decoding) before this forward."""
        if not self.indices or batch == self.batch:
            return
        if self.batch is not None:
            for i, layer in self.build(self.hf_config, self.kinds).items():
                compat.record_like(layer, self.layers[i])
                self.layers[i] = layer
        self.batch = batch

    @property
    def recording(self) -> bool:
        return any(compat.recording(self.layers[i]) is not None for i in self.indices)

    def stop_recording(self) -> None:
        for i in self.indices:
            compat.stop_recording(self.layers[i])

    def reset(self) -> None:
        """A reset cache records no past (assisted decoding switches it on again); transformers zeroes the states."""
        self.stop_recording()
        for i in self.indices:
            self.layers[i].reset()

    def crop(self, tokens: int) -> None:
        for i in self.indices:  # transformers' rule: only a layer recording its past can go back
            self.layers[i].crop(tokens)

    def select(self, index: list[int]) -> None:
        for i in self.indices:  # their states are per row: index_select, as transformers reorders beams
            self.layers[i].reorder_cache(torch.tensor(index))

    def copies(self) -> dict:
        return {i: copy.deepcopy(self.layers[i]) for i in self.indices}
