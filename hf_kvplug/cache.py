"""PlugCache: a transformers `Cache` whose K/V live in preallocated paged GPU (or CPU) buffers, fp or INT8.

Three kinds of state, kept apart:
  * the buffers: per layer a pool of blocks `[num_blocks, nheads_k, block_size, head_dim]` for K and V (INT8 and
    INT4 add scales), allocated once, never re-assigned, shared with forks. Layers that keep up to max_cache_len
    share one pool of block ids; sliding-window layers keep a ring of blocks a little past their window, in a pool
    (and table) per ring size (`PlugConfig.groups`);
  * per device, what the kernels read besides them: the block table of each group, each row's first visible slot
    (`starts`), the slot mask for masks with holes (`valid`) and an overflow flag (`status`); per layer, the row
    lengths;
  * on the host: which blocks each row maps (`blocks.BlockTable`), how many tokens the rows hold, and whether a
    forward is under way. Host work (mapping blocks, copy-on-write, recording the attention mask, checks) happens
    in `begin_forward`, called on eager code before every forward: generate()'s mask preparation, or the patched
    model's forward pre-hooks. The decode step itself reads and writes device tensors only.
"""

from __future__ import annotations

import copy
import math

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

from . import compat, ops
from .blocks import BlockPool, BlockTable
from .config import PlugConfig, RankLayout
from .reference import dequantize, gather_kv, quantize, visible_slots

KEEP_MASK = object()  # begin_forward: leave the recorded mask as it is (a layer called without the model around it)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _mark_static(*tensors: torch.Tensor) -> None:
    # guard=False (the default only in newer torch; older releases default to True): the buffers are lifted as graph
    # inputs instead of being baked in behind an ID_MATCH guard, so a second PlugCache of the same geometry reuses the
    # compiled graph instead of recompiling (CUDA graphs re-record for the new addresses instead).
    if not _compiling():
        for t in tensors:
            torch._dynamo.mark_static_address(t, guard=False)


def _inference_mode_error(e: RuntimeError, what: str) -> RuntimeError:
    if "Inplace update to inference tensor outside InferenceMode" not in str(e):
        return e
    return RuntimeError(f"{what}: this PlugCache was built inside torch.inference_mode() and is used outside it "
                        "(inference tensors cannot be written there). Build the cache outside inference_mode (it "
                        "works inside torch.no_grad() and inference_mode alike), or keep every use inside it.")


class DeviceState:
    """What the kernels read on one device besides the K/V buffers, shared by the layers there (static addresses)."""

    def __init__(self, config: PlugConfig, device: torch.device):
        rows, width = config.max_batch_size, config.max_blocks_per_row
        self.device = device
        # per group (None: layers keeping max_cache_len; a ring size: sliding-window layers), by logical block
        self.block_tables = {ring: torch.full((rows, width), -1, dtype=torch.int32, device=device)
                             for ring in config.groups}
        self.starts = torch.zeros(rows, dtype=torch.int32, device=device)
        self.valid = torch.ones((rows, config.max_cache_len), dtype=torch.uint8, device=device)
        self.status = torch.zeros(1, dtype=torch.int32, device=device)
        _mark_static(*self.block_tables.values(), self.starts, self.valid, self.status)

    @property
    def block_table(self) -> torch.Tensor:
        """The first group's table (the main one when the model has layers that keep max_cache_len)."""
        return next(iter(self.block_tables.values()))

    def clone(self) -> "DeviceState":
        other = copy.copy(self)
        other.block_tables = {ring: t.clone() for ring, t in self.block_tables.items()}
        for name in ("starts", "valid", "status"):
            setattr(other, name, getattr(self, name).clone())
        _mark_static(*other.block_tables.values(), other.starts, other.valid, other.status)
        return other


class PlugLayer(CacheLayerMixin):
    """One decoder layer's paged K/V pool, its scales (INT8) and per-row lengths, all on the layer's device.

    `keys` / `values` give what every stock cache layer gives, `[batch, nheads_k, seq_len, head_dim]` in the model
    dtype (dequantized for INT8), gathered on access; the paged pool is `k_cache` / `v_cache` (+ `k_scale`,
    `v_scale`). Methods that change rows (reset, crop, reorder) are the cache's: they keep all layers together.
    """

    is_compileable = True
    is_croppable = True

    def __init__(self, cache: "PlugCache", layer_idx: int, buffers=None):
        super().__init__()
        config = cache.config
        dev = config.layer_devices[layer_idx]
        self.cache = cache
        self.config = config
        self.layer_idx = layer_idx
        self.device = dev
        self.window = config.layer_windows[layer_idx]
        self.is_sliding = self.window is not None
        # A ring of blocks (sliding window): it holds the last `ring_slots` slots of a row; a forward writes at most
        # `chunk` tokens per kernel call so that no write lands on a slot one of its queries still sees.
        self.ring = config.layer_rings[layer_idx]
        self.ring_slots = self.ring * config.block_size if self.ring else None
        self.chunk = self.ring_slots - self.window + 1 if self.ring else None
        self.backend = ops.resolve_backend(cache.backend, dev)
        if buffers is None:
            shape, scale_shape, scale_dtype = config.storage_shapes(self.ring)
            buffers = (torch.zeros(shape, dtype=config.storage_dtype, device=dev),
                       torch.zeros(shape, dtype=config.storage_dtype, device=dev),
                       torch.zeros(scale_shape, dtype=scale_dtype, device=dev),
                       torch.zeros(scale_shape, dtype=scale_dtype, device=dev))
        self.k_cache, self.v_cache, self.k_scale, self.v_scale = buffers
        self.cache_seqlens = torch.zeros(config.max_batch_size, dtype=torch.int32, device=dev)
        _mark_static(self.k_cache, self.v_cache, self.k_scale, self.v_scale, self.cache_seqlens)
        self.is_initialized = True
        self.is_last = layer_idx == config.attention_layers[-1]  # its forward ends the cache's forward
        # Host-side: True until the first forward after construction or reset(), so that forward can attend with
        # the model's own attention over the fresh K/V (as stock does) with no device read.
        self.fresh = True

    def __repr__(self):
        ring = f", ring={self.ring_slots}" if self.ring else ""
        return f"PlugLayer(layer={self.layer_idx}, device={self.device}, window={self.window}{ring})"

    @property
    def dev(self) -> DeviceState:
        return self.cache.device_states[self.device]

    @property
    def block_table(self) -> torch.Tensor:
        """This layer's group's device table `[max_batch, max_blocks]` by logical block (a ring repeats)."""
        return self.dev.block_tables[self.ring]

    # --- what a stock cache layer offers ------------------------------------------------------------

    @property
    def keys(self) -> torch.Tensor:
        """`[batch, nheads_k, seq_len, head_dim]` in the model dtype: a copy gathered from the paged pool. A
        sliding-window layer gives its last `window - 1` tokens, as transformers' sliding layers keep."""
        return self.gather(self.k_cache, self.k_scale)

    @keys.setter
    def keys(self, value):
        if value is not None:
            raise AttributeError("PlugLayer.keys is read-only (a view gathered from the paged pool, k_cache)")

    @property
    def values(self) -> torch.Tensor:
        """`[batch, nheads_k, seq_len, head_dim]` in the model dtype: a copy gathered from the paged pool."""
        return self.gather(self.v_cache, self.v_scale)

    @values.setter
    def values(self, value):
        if value is not None:
            raise AttributeError("PlugLayer.values is read-only (a view gathered from the paged pool, v_cache)")

    def gather(self, buf: torch.Tensor, scale: torch.Tensor, length: int | None = None,
               batch: int | None = None) -> torch.Tensor:
        """Slots [0, length) of rows < batch (a sliding-window layer: its last `window - 1` of them)."""
        batch = self.cache.batch if batch is None else batch
        length = self.cache.seq_length_now() if length is None else length
        lo = max(0, length - self.window + 1) if self.window else 0
        return self.gather_slots(buf, scale, lo, length, batch)

    def gather_slots(self, buf: torch.Tensor, scale: torch.Tensor, lo: int, hi: int, batch: int) -> torch.Tensor:
        """Slots [lo, hi) of rows < batch, `[batch, nheads_k, hi - lo, head_dim]` in the model dtype."""
        if hi <= lo or batch == 0:
            return torch.zeros((batch, self.config.nheads_k, 0, self.config.head_dim), dtype=self.config.dtype,
                               device=self.device)
        bs = self.config.block_size
        first, end = lo // bs, math.ceil(hi / bs)
        x = gather_kv(buf, scale, self.block_table[:, first:end], batch, end - first, self.config.dtype)
        return x[:, :, lo - first * bs:hi - first * bs]

    def lazy_initialization(self, key_states, value_states=None, *args, **kwargs) -> None:
        """Buffers are allocated at construction; this only checks that the model fits them."""
        self.check_states(key_states.transpose(1, 2))

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError(
            "PlugCache.update() was called by an attention forward that hf_kvplug did not patch. "
            "Call hf_kvplug.patch(model) before generating with a PlugCache (supported: "
            f"{', '.join(sorted(_supported_names()))}).")

    def get_seq_length(self, *args, **kwargs):
        return self.cache.get_seq_length(self.layer_idx)

    def get_max_length(self, *args, **kwargs) -> int:
        return self.config.max_cache_len

    def get_max_cache_shape(self, *args, **kwargs) -> int:
        return self.config.max_cache_len

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        # The plugged forward masks by itself (row lengths, starts, the recorded mask): HF need only build a q x q
        # mask, which the prefill's stock attention uses and later forwards ignore.
        return query_length, 0

    def reset(self, *args, **kwargs) -> None:
        self.cache_seqlens.zero_()
        self.fresh = True

    def activate_past_recording(self, *args, **kwargs) -> None:
        """Nothing to do: every token stays in its slot until `crop` moves the length back (transformers 5.25 passes
        `recurrent_states_to_keep=`, which only linear-attention layers use)."""

    # --- the plugged attention --------------------------------------------------------------------

    def check_states(self, k: torch.Tensor, batch: int | None = None) -> None:
        """Raise (before anything is written) if `k [B, q_len, nheads_k, D]` does not fit this layer's buffers."""
        cfg = self.config
        batch = k.shape[0] if batch is None else batch
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

    def _enter(self, k: torch.Tensor) -> None:
        """Checks before this layer writes; begins the forward when nothing did (a layer called directly)."""
        self.check_states(k)
        if not _compiling() and not self.cache._open:
            self.cache.begin_forward(k.shape[0], k.shape[1], KEEP_MASK)
            self.cache._prepared = False

    def _leave(self, batch: int, q_len: int) -> None:
        self.cache_seqlens[:batch].add_(q_len)
        self.fresh = False
        if self.is_last:
            self.cache._open = False  # a constant store: replayed after a compiled graph, so this works there too

    def write(self, k, v) -> None:
        """Store `k, v [B, L, nheads_k, D]` into an empty cache (the first forward); advances the lengths. Rows
        that share a leader's prompt blocks (generate()'s expanded rows) are not written: the leader's K/V serve."""
        self._enter(k)
        batch, q_len = k.shape[:2]
        leaders = self.cache._leaders
        table, seqlens = self.block_table, self.cache_seqlens
        if leaders is not None:
            rows = torch.tensor(leaders, device=self.device)
            k, v, table, seqlens = k[rows], v[rows], table[rows], seqlens[rows]
        self._store(k, v, table, seqlens)
        self._leave(batch, q_len)

    def _store(self, k, v, table, seqlens) -> None:
        """Write `k, v [B, L, nheads_k, D]` at slots seqlens[b] + i. A ring keeps the last `ring_slots` of them
        only (an earlier token would share its place with a later one of the same write)."""
        q_len = k.shape[1]
        if self.ring and q_len > self.ring_slots:
            drop = q_len - self.ring_slots
            k, v, seqlens = k[:, drop:], v[:, drop:], seqlens + drop
        ops.write_kvcache(k, v, self.k_cache, self.v_cache, self.k_scale, self.v_scale, table, seqlens,
                          status=self.dev.status, backend=self.backend)

    def attend(self, q, k, v, softmax_scale: float) -> torch.Tensor:
        """Fused write + attention for `q [B, L, nheads, D]`, `k, v [B, L, nheads_k, D]`; advances the lengths."""
        self._enter(k)
        batch, q_len = q.shape[:2]
        dev = self.dev
        valid = dev.valid if self.cache.holes else None
        # A ring takes at most `chunk` new tokens per call: their queries' windows stay clear of their own writes.
        step = self.chunk if self.ring else q_len
        outs = [ops.attend_with_kvcache(q[:, i:i + step], k[:, i:i + step], v[:, i:i + step], self.k_cache,
                                        self.v_cache, self.k_scale, self.v_scale, self.block_table,
                                        self.cache_seqlens + i if i else self.cache_seqlens, dev.starts,
                                        softmax_scale, self.window, cache_valid=valid, status=dev.status,
                                        backend=self.backend)
                for i in range(0, q_len, step)]
        self._leave(batch, q_len)
        return outs[0] if len(outs) == 1 else torch.cat(outs, 1)

    def attend_dense(self, module, q, k, v, attention_fn):
        """The slow path for `output_attentions=True`: write the new K/V, gather this layer's K/V and run the
        model's own (eager) attention over it with a mask built from the cache's bounds, as a stock cache would
        (a sliding-window layer over its last `window - 1` cached tokens and the new ones, as transformers' sliding
        layers give it). q `[B, nheads, L, D]`, k `[B, L, nheads_k, D]`, v likewise. Returns
        `(out [B, L, nheads, D], weights)`."""
        self._enter(k)
        batch, q_len = k.shape[:2]
        dev = self.dev
        total = self.cache.length  # known on the host: begin_forward ran (eagerly) for this forward
        before = total - q_len
        lo = max(0, before - self.window + 1) if self.window else 0
        past = [self.gather_slots(buf, scale, lo, before, batch)  # read before the write: a ring reuses places
                for buf, scale in ((self.k_cache, self.k_scale), (self.v_cache, self.v_scale))]
        self._store(k, v, self.block_table, self.cache_seqlens)
        if self.ring and q_len > self.ring_slots:  # not all kept: the new K/V as the cache stores them
            new = [dequantize(*quantize(x.transpose(1, 2), self.k_cache.dtype), self.config.dtype) for x in (k, v)]
        else:
            new = [self.gather_slots(buf, scale, before, total, batch)
                   for buf, scale in ((self.k_cache, self.k_scale), (self.v_cache, self.v_scale))]
        keys, values = (torch.cat([a, b], 2) for a, b in zip(past, new))
        seen = visible_slots(self.cache_seqlens, dev.starts, dev.valid if self.cache.holes else dev.valid[:0],
                             batch, q_len, self.window or 0, total)[..., lo:]
        mask = torch.zeros(seen.shape, dtype=q.dtype, device=q.device).masked_fill_(~seen, torch.finfo(q.dtype).min)
        out, weights = attention_fn(module, q, keys, values, mask.unsqueeze(1), dropout=0.0, scaling=module.scaling)
        self._leave(batch, q_len)
        return out, weights


class RemoteLayer(CacheLayerMixin):
    """Stands in for a decoder layer another pipeline stage runs: no buffers; length queries answer from the cache
    (every layer on every rank holds the same number of tokens), everything else does nothing."""

    is_compileable = True
    is_croppable = True
    is_sliding = False

    def __init__(self, cache: "PlugCache", layer_idx: int):
        super().__init__()
        self.cache, self.layer_idx, self.is_initialized = cache, layer_idx, True

    def __repr__(self):
        return f"RemoteLayer({self.layer_idx})"

    def lazy_initialization(self, *args, **kwargs) -> None:
        pass

    def update(self, *args, **kwargs):
        raise RuntimeError(f"layer {self.layer_idx} runs on another pipeline stage: this rank's PlugCache holds none "
                           "of its K/V")

    def get_seq_length(self, *args, **kwargs):
        return self.cache.get_seq_length()

    def get_max_length(self, *args, **kwargs) -> int:
        return self.cache.max_cache_len

    get_max_cache_shape = get_max_length  # the name transformers 5.4-5.12 asks (compat.MAX_LENGTH_METHODS)

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        return query_length, 0

    def reset(self, *args, **kwargs) -> None:
        pass

    def activate_past_recording(self, *args, **kwargs) -> None:
        pass


class PlugCache(DynamicCache):
    """A drop-in `transformers.Cache` with paged K/V buffers, optionally INT8, for patched models.

    It is a `DynamicCache` (what generate() builds by default, code checking for one keeps working) whose layers
    hold preallocated paged buffers instead of growing tensors; generate() still compiles with it, as it compiles
    every compileable cache that is not exactly a `DynamicCache`.

    Args:
        model_or_config: the model to generate with (buffers follow each layer's device and the model's dtype), or
            its `PretrainedConfig` (then `dtype=` and `device=` are required).
        max_batch_size: rows the cache holds; with beam search or `num_return_sequences` count the expanded batch.
        max_cache_len: tokens per row (prompt + generated); rounded up to a whole number of blocks internally.
        kv_dtype: None (store K/V in the model dtype), "int8" (symmetric, a scale per token and head) or "int4"
            (asymmetric, a scale and minimum per token, head and half of head_dim); quantized when written, no
            calibration.
        dtype, device: required with a config; `device` may be a list with one device per layer.
        block_size: tokens per paged block.
        max_tokens: the pool's size in tokens (all rows together); default `max_batch_size x max_cache_len`. Rows
            take blocks as they grow and rows that `generate()` expands from one prompt share its blocks, so a
            ragged batch or shared prompts fit in less than the rectangle.
        backend: "auto" (Triton kernels on CUDA, the PyTorch reference elsewhere), "triton" or "reference".
        layout: the `RankLayout` of this process under transformers' tensor / pipeline parallelism: read from the
            model when one is given, stated here with a config (default: one process). Each rank's cache holds its
            own heads of the layers it runs.
        trim_windows: sliding-window layers keep a ring of blocks per row, their window and `window_slack` more
            slots, instead of `max_cache_len` (default True). Tokens the window has passed are overwritten, so a
            `crop` may go back at most `ring - window + 1` tokens below the most the rows held (assisted decoding's
            rejected drafts, well within it); False keeps every token, as for full-attention layers.
        window_slack: slots a ring holds past its window (rounded up to blocks): the longest forward that runs in
            one piece and about the longest crop. Default `min(window, 256)`.

    Buffers are allocated once here and never re-assigned: `reset()`, `crop()` and `reorder_cache()` work in place,
    so their addresses stay fixed for torch.compile / CUDA graphs.
    """

    def __init__(self, model_or_config, max_batch_size: int = 4, max_cache_len: int = 2048, kv_dtype: str | None = None,
                 *, dtype: torch.dtype | None = None, device=None, block_size: int = 64, max_tokens: int | None = None,
                 backend: str = "auto", layout: RankLayout | None = None, trim_windows: bool = True,
                 window_slack: int | None = None):
        model, tp_plan = None, None
        if hasattr(model_or_config, "config") and hasattr(model_or_config, "parameters"):
            model = model_or_config
            layout = layout or RankLayout.from_model(model)
            dtype = dtype or model.dtype
            device = device if device is not None else _layer_devices(model, layout)
            hf_config, tp_plan = model.config, getattr(model, "tp_plan", None)
        else:
            hf_config = model_or_config
            if dtype is None or device is None:
                raise ValueError("PlugCache(config, ...) needs dtype= and device= (or pass the model instead)")
        config = PlugConfig.from_hf_config(hf_config, max_batch_size=max_batch_size, max_cache_len=max_cache_len,
                                           dtype=dtype, device=device, kv_dtype=kv_dtype, block_size=block_size,
                                           max_tokens=max_tokens, layout=layout, tp_plan=tp_plan,
                                           trim_windows=trim_windows, window_slack=window_slack)
        if model is not None:
            _check_local_heads(model, config)
        ops.resolve_backend(backend, config.layer_devices[0])  # a bad backend fails here, before any allocation
        self._hf_config = getattr(hf_config, "text_config", None) or hf_config
        self._build(config, backend, _pools(config), buffers=None,
                    linear=compat.linear_attention_layers(self._hf_config, config.layer_kinds))

    def _build(self, config: PlugConfig, backend: str, pools: dict, buffers, linear: dict) -> None:
        self.config = config
        self.backend = backend
        # One pool and table per group of layers (PlugConfig.groups): None for the layers keeping max_cache_len,
        # a ring size for sliding-window layers. Every row operation goes through all of them.
        self.pools = pools
        self.tables = {ring: BlockTable(pools[ring], config.max_batch_size, config.max_blocks_per_row, ring)
                       for ring in config.groups}
        self.device_states = {config.layer_devices[i]: None for i in config.attention_layers}
        self.device_states = {dev: DeviceState(config, dev) for dev in self.device_states}
        self.length: int | None = 0  # tokens every active row holds (host); None: only the device knows
        self.batch = 0  # active rows
        self.holes = False  # the recorded mask has a 0 after a 1 somewhere: the kernels read `valid`
        self._open = False  # a forward began and its last layer has not run yet
        self._pending = 0  # tokens the open forward adds
        self._prepared = False  # begin_forward ran for the coming forward (the model's hooks skip it then)
        self._prepared_for = (0, 0)  # (batch, q_len) it ran for
        self._leaders: list[int] | None = None  # prefill rows whose K/V are stored for their whole group
        self._full_rows = 0  # leading rows mapped to max_cache_len with private blocks (a compiled forward's need)
        self._generate: dict | None = None  # hints of the generate() call under way: reserve, share
        self._linear_batch: int | None = None  # rows the linear-attention layers' states were built for
        self._top = 0  # the most tokens the rows held since reset(): a ring holds slots [_top - ring_slots, length)
        attn = iter(config.attention_layers if buffers is None else buffers)
        layers = [linear[i] if kind == "linear" else RemoteLayer(self, i) if kind == "remote"
                  else PlugLayer(self, i, None if buffers is None else next(attn))
                  for i, kind in enumerate(config.layer_kinds)]
        Cache.__init__(self, layers=layers)  # DynamicCache's own __init__ would build growing layers
        self.attn_layers = [layer for layer in layers if isinstance(layer, PlugLayer)]
        self.linear_layers = [i for i, kind in enumerate(config.layer_kinds) if kind == "linear"]

    # --- sizes ----------------------------------------------------------------------------------

    @property
    def table(self) -> BlockTable:
        """The first group's block table (the main one when the model has layers that keep max_cache_len)."""
        return next(iter(self.tables.values()))

    @property
    def pool(self) -> BlockPool:
        return self.table.pool

    @property
    def max_batch_size(self) -> int:
        return self.config.max_batch_size

    @property
    def max_cache_len(self) -> int:
        return self.config.max_cache_len

    @property
    def kv_dtype(self) -> str | None:
        return self.config.kv_dtype

    @property
    def nbytes(self) -> int:
        """Bytes held by all K/V buffers and scales (the pool, shared with forks)."""
        return sum(t.numel() * t.element_size() for layer in self.attn_layers
                   for t in (layer.k_cache, layer.v_cache, layer.k_scale, layer.v_scale))

    def bytes_per_token(self) -> int:
        """Bytes one more cached token costs over all layers that keep max_cache_len (K, V and scales); the
        sliding-window layers' rings are a fixed cost (`config.ring_bytes_per_row`)."""
        return self.config.bytes_per_token()

    def stats(self) -> dict:
        """Memory in use, as a plain dict: blocks of the main pool (each spans every layer that keeps max_cache_len)
        in use and shared (by rows or forked caches), bytes all pools hold in use and in total, and the rows /
        tokens of this cache. With sliding-window rings, `window_blocks_*` count the ring pools' blocks."""
        groups = {ring: (self.pools[ring], self.nbytes_of(ring) // self.pools[ring].num_blocks)
                  for ring in self.tables}
        main = groups.get(None, (BlockPool(0), 0))
        out = {"blocks_total": main[0].num_blocks, "blocks_in_use": main[0].in_use, "blocks_shared": main[0].shared,
               "block_size": self.config.block_size, "bytes_per_block": main[1],
               "bytes_in_use": sum(pool.in_use * per for pool, per in groups.values()),
               "bytes_total": self.nbytes, "rows": self.batch, "tokens": self.seq_length_now()}
        rings = [g for ring, g in groups.items() if ring is not None]
        if rings:
            out.update(window_blocks_total=sum(p.num_blocks for p, _ in rings),
                       window_blocks_in_use=sum(p.in_use for p, _ in rings),
                       window_blocks_shared=sum(p.shared for p, _ in rings))
        return out

    def nbytes_of(self, ring: int | None) -> int:
        """Bytes held by the buffers of group `ring`'s layers."""
        return sum(t.numel() * t.element_size() for layer in self.attn_layers if layer.ring == ring
                   for t in (layer.k_cache, layer.v_cache, layer.k_scale, layer.v_scale))

    def get_max_length(self, layer_idx: int | None = None, *args, **kwargs) -> int:
        return self.config.max_cache_len

    def get_max_cache_shape(self, layer_idx: int | None = None, *args, **kwargs) -> int:
        return self.config.max_cache_len

    def get_query_offset(self, layer_idx: int = 0, *args, **kwargs):
        return 0  # pairs with get_mask_sizes: HF's mask stays q x q and is ignored after the prefill

    def get_seq_length(self, layer_idx: int = 0, *args, **kwargs):
        """Tokens cached per row. An int, from the host's own count (no device read); while torch.compile traces, a
        0-d device tensor (a traced int would be baked into the graph)."""
        if _compiling():
            return self._attn_layer(layer_idx).cache_seqlens[0]
        n = self.seq_length_now()
        return n - self._pending if self._open else n

    def seq_length_now(self) -> int:
        """The host's count of tokens per row, reading the device only where the host lost count (after a forward
        compiled as a whole with no eager code before it)."""
        if self.length is None:
            self.sync_lengths()
        return self.length

    def _attn_layer(self, layer_idx: int) -> PlugLayer:
        layer = self.layers[layer_idx]
        return layer if isinstance(layer, PlugLayer) else self.attn_layers[0]  # a linear layer: the first attention one

    def layer(self, layer_idx: int) -> PlugLayer:
        if layer_idx >= len(self.layers):
            raise ValueError(f"PlugCache has {len(self.layers)} layers but the model called layer {layer_idx}: "
                             "it was built for another model")
        return self.layers[layer_idx]

    # --- the host side of a forward ---------------------------------------------------------------

    def begin_forward(self, batch: int, q_len: int, attention_mask=None, *, from_generate: bool = False,
                      first_step: bool = True) -> None:
        """Host work before a forward of `batch` rows x `q_len` new tokens, on eager code: checks (the previous
        forward completed, sizes), records `attention_mask` (2D, None, or `KEEP_MASK`), maps blocks and makes
        shared blocks private where this forward writes. `from_generate` / `first_step`: called by generate()'s
        mask preparation, for its first forward or a later one. Raises before anything is written."""
        try:
            self._begin(batch, q_len, attention_mask, from_generate, first_step)
        except RuntimeError as e:
            raise _inference_mode_error(e, "PlugCache.begin_forward") from e

    def _begin(self, batch, q_len, attention_mask, from_generate, first_step) -> None:
        self._writable_here()
        if self._open:
            self.sync_lengths()  # the last forward stopped part-way: go on only if every layer agrees
        length = self.seq_length_now()
        if batch > self.max_batch_size:
            raise ValueError(f"batch of {batch} rows (after beams / return sequences) exceeds the PlugCache's "
                             f"max_batch_size={self.max_batch_size}; build it with max_batch_size >= {batch}")
        if length and batch != self.batch:
            raise ValueError(f"the PlugCache holds {self.batch} rows of {length} tokens and this forward has "
                             f"{batch} rows; call cache.reset() to start a new batch")
        if length + q_len > self.max_cache_len:
            raise ValueError(f"{length + q_len} tokens would exceed the PlugCache's max_cache_len="
                             f"{self.max_cache_len}; build it larger or call cache.reset()")
        fresh = self.attn_layers[0].fresh
        hints = self._generate or {}
        reserve = max(length + q_len, hints.get("reserve", 0))
        share = hints.get("share", 1)
        shared_prompt = fresh and share > 1 and batch % share == 0 and q_len > 0
        bs = self.config.block_size
        if not shared_prompt:  # all or nothing: every group's pool has room before anything changes
            for table in self.tables.values():
                need = table.blocks_needed(list(range(batch)), length, length + q_len, reserve, bs)
                if need > len(table.pool.free):
                    table.pool.allocate(need)  # raises PoolExhausted, naming the pool
        if fresh and self.linear_layers and batch != self._linear_batch:
            if self._linear_batch is not None:  # their states keep the batch they were built for: start new ones,
                new = compat.linear_attention_layers(self._hf_config, self.config.layer_kinds)  # recording the past
                for i, layer in new.items():  # if generate() switched that on (assisted decoding) before this forward
                    compat.record_like(layer, self.layers[i])
                    self.layers[i] = layer
            self._linear_batch = batch
        if attention_mask is not KEEP_MASK:
            self._record_mask(attention_mask, batch, length, q_len, from_generate, first_step, fresh)
        self._leaders = None
        try:
            for ring, table in self.tables.items():
                if shared_prompt:  # a fresh cache: a pool that runs short leaves only unwritten rows mapped
                    leaders = list(range(0, batch, share))
                    followers = [list(range(b + 1, b + share)) for b in leaders]
                    copies = table.prepare_write(leaders, 0, q_len, reserve, bs)
                    table.share_from(leaders, followers, math.ceil(q_len / bs))
                    rest = [r for group in followers for r in group]
                    copies += table.prepare_write(rest, q_len, q_len, reserve, bs)
                    self._leaders = leaders
                else:
                    copies = table.prepare_write(list(range(batch)), length, length + q_len, reserve, bs)
                self._copy_blocks(ring, copies)
        finally:
            self._sync_tables()  # the device tables always match the host's
        self._top = max(self._top, length + q_len)
        self.batch = batch
        self.length = length + q_len
        self._pending = q_len
        self._open = True
        self._prepared = True
        self._prepared_for = (batch, q_len)

    def _writable_here(self) -> None:
        """A cache built inside torch.inference_mode() holds inference tensors, which cannot be written outside it.
        Used outside, it moves its state into ordinary tensors once (new addresses: a compiled graph re-records),
        as a stock DynamicCache, which makes new tensors every step, simply works there."""
        if torch.is_inference_mode_enabled() or not self.attn_layers[0].cache_seqlens.is_inference():
            return
        for layer in self.attn_layers:
            for name in ("k_cache", "v_cache", "k_scale", "v_scale", "cache_seqlens"):
                setattr(layer, name, getattr(layer, name).clone())
                _mark_static(getattr(layer, name))
        for key, dev in self.device_states.items():
            self.device_states[key] = dev.clone()

    def _record_mask(self, mask, batch: int, length: int, q_len: int, from_generate: bool, first_step: bool,
                     fresh: bool) -> None:
        """The slots each row may attend, from this forward's 2D attention mask over all `length + q_len` tokens (as
        a stock cache reads it: columns past the mask count as 0, extra columns are ignored). Work is O(tokens
        cached), except on a multi-token forward (a prefill, a new turn), which also marks every later slot visible
        for the decode steps of generate(), whose new mask columns are always 1 and are not read again."""
        total = length + q_len
        generate_step = from_generate and not first_step  # a later step of generate(): its new columns are ones
        if mask is None:
            self.holes = False
            for dev in self.device_states.values():
                dev.starts[:batch].zero_()
            return
        if isinstance(mask, dict) or not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            if from_generate or fresh:
                return  # generate() recorded its 2D mask when it built this one; a prefill uses it as is
            raise ValueError("a PlugCache follows 2D attention masks ([batch, tokens], 1 = attend); after the "
                             "first forward it cannot follow a 4D mask or a BlockMask: pass the 2D mask")
        if generate_step and q_len == 1 and mask.shape[-1] == total:
            return  # a decode step of generate(): the new column is 1, already visible
        if mask.shape[0] != batch:
            raise ValueError(f"attention_mask has {mask.shape[0]} rows for a batch of {batch}")
        m = mask[:, :total].bool()
        if m.shape[1] < total:
            m = torch.nn.functional.pad(m, (0, total - m.shape[1]))
        lead = (m.int().cumsum(-1) == 0).sum(-1).to(torch.int32)  # leading zeros: the first visible slot
        holes_here = ~m & (m.int().cumsum(-1) > 0)  # a 0 after a 1: right padding or a gap
        if m.device.type == "cpu" or q_len > 1:
            holes = bool(holes_here.any())  # free on the CPU; one read per prefill / multi-token step otherwise
        else:
            holes = True  # a single-token step on an accelerator: no read on the decode path, take the masked kernel
        for dev in self.device_states.values():
            dev.starts[:batch].copy_(lead)
            if holes:
                dev.valid[:batch, :total].copy_(m)
                if q_len > 1 or from_generate:  # generate()'s later decode steps returned above
                    dev.valid[:batch, total:].fill_(1)
        self.holes = holes

    def traced_forward(self, batch: int, q_len: int, attention_mask) -> None:
        """What a forward compiled as a whole, with no eager code before it (`torch.compile(model)` in a loop of
        your own), can do: device-side mask recording. Blocks must already be mapped (`reserve()`)."""
        if self._full_rows < batch:
            raise ValueError("a forward compiled as a whole cannot map cache blocks; call cache.reserve() once "
                             "before the loop (or compile model.forward and call the model, whose pre-hook maps "
                             "blocks eagerly)")
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            m = attention_mask.bool()
            lead = (m.int().cumsum(-1) == 0).sum(-1).to(torch.int32)
            for dev in self.device_states.values():
                dev.starts[:batch].copy_(lead)
                width = min(m.shape[1], self.max_cache_len)
                dev.valid[:batch, :width].copy_(m[:, :width])
                dev.valid[:batch, width:].fill_(1)
            self.holes = True
        elif attention_mask is None:
            for dev in self.device_states.values():
                dev.starts[:batch].zero_()
            self.holes = False
        self.batch = batch
        self.length = None  # only the device knows now: the next eager use reads it
        self._open = True

    def sync_lengths(self) -> None:
        """Read every layer's row lengths (one device read) and take them as the host's count. Raises if the layers
        disagree (a forward stopped part-way: the cache must be reset) or if a write found no slot."""
        per_layer = torch.stack([layer.cache_seqlens[:max(self.batch, 1)].to("cpu", non_blocking=False)
                                 for layer in self.attn_layers])
        status = [int(dev.status[0]) for dev in self.device_states.values()]
        fresh = {layer.fresh for layer in self.attn_layers}
        if any(status):
            raise RuntimeError("a PlugCache write found no slot (past max_cache_len, or a block a forward compiled "
                               "as a whole could not map): the outputs of that step are NaN. Call cache.reset(); "
                               "build the cache larger or call cache.reserve() before compiled loops.")
        if (per_layer != per_layer[0, 0]).any() or len(fresh) > 1:
            raise ValueError("the PlugCache's layers hold different numbers of tokens: a forward stopped part-way "
                             "(an exception or KeyboardInterrupt inside the model). Call cache.reset() and run the "
                             "request again.")
        self.length = int(per_layer[0, 0])
        self._top = max(self._top, self.length)
        self._open = False
        self._pending = 0
        self._prepared = False

    def check_status(self) -> None:
        """Raise if a write on the device found no slot since the last reset (one device read)."""
        if any(int(dev.status[0]) for dev in self.device_states.values()):
            self.sync_lengths()  # raises with the explanation

    def _copy_blocks(self, ring: int | None, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: block src's data into block dst, in every layer of group `ring`."""
        if not copies:
            return
        for layer in self.attn_layers:
            if layer.ring != ring:
                continue
            src = torch.tensor([c[0] for c in copies], device=layer.device)
            dst = torch.tensor([c[1] for c in copies], device=layer.device)
            for buf in (layer.k_cache, layer.v_cache, layer.k_scale, layer.v_scale):
                if buf.numel():
                    buf[dst] = buf[src]

    def _sync_tables(self) -> None:
        for ring, table in self.tables.items():
            if not table.dirty:
                continue
            dense = torch.tensor(table.to_dense(), dtype=torch.int32)
            for dev in self.device_states.values():
                dev.block_tables[ring].copy_(dense.to(dev.device))
            self._full_rows = 0  # reserve() says again which rows a compiled forward may use
            table.dirty = False

    def reserve(self, tokens: int | None = None, rows: int | None = None) -> None:
        """Map private blocks for `tokens` slots (default max_cache_len) of the first `rows` rows (default all), so
        that forwards compiled as a whole (which cannot map blocks) can run. Raises if the pool is too small."""
        rows = self.max_batch_size if rows is None else rows
        tokens = self.max_cache_len if tokens is None else tokens
        start = self.seq_length_now()
        for ring, table in self.tables.items():  # a ring maps all its blocks: it serves any length
            copies = table.prepare_write(list(range(rows)), start, max(tokens, start), tokens, self.config.block_size)
            self._copy_blocks(ring, copies)
        self._sync_tables()
        full = 0  # leading rows whose every block is mapped and private from the current length on
        for b in range(rows):
            bs = self.config.block_size
            if any(len(t.rows[b]) < t.width or any(t.pool.refs[t.rows[b][i]] > 1
                                                   for i in t.positions_written(start, self.max_cache_len, bs))
                   for t in self.tables.values()):
                break
            full += 1
        self._full_rows = full

    # --- rows: reset, crop, beam search ---------------------------------------------------------

    def reset(self, *args, **kwargs) -> None:
        """Empty every row (buffers keep their addresses); blocks go back to the pool; the next forward prefills."""
        self._writable_here()
        for table in self.tables.values():
            table.release(range(self.max_batch_size))
        self._sync_tables()
        try:
            for i in self.linear_layers:  # a reset cache records no past (assisted decoding switches it on again)
                compat.stop_recording(self.layers[i])
            for layer in self.layers:
                layer.reset()  # linear-attention layers too: transformers zeroes their states
            for dev in self.device_states.values():
                dev.starts.zero_()
                dev.valid.fill_(1)
                dev.status.zero_()
        except RuntimeError as e:
            raise _inference_mode_error(e, "PlugCache.reset") from e
        self.length, self.batch, self.holes, self._top = 0, 0, False, 0
        self._open = self._prepared = False
        self._pending = 0
        self._leaders = None

    def crop(self, n: int, *args, **kwargs) -> None:
        """Drop `-n` tokens (n < 0), or keep the first `n` tokens where transformers crops that way (its older,
        positive convention). Blocks stay mapped; the next write copies a block first if it is shared."""
        self._writable_here()
        length = self.seq_length_now()
        if n < 0:
            keep = max(0, length + n)
        elif compat.LEGACY_CROP:
            keep = min(length, n)
        elif n > 0:
            raise ValueError(f"crop({n}): this transformers release crops with a negative number of tokens to remove")
        else:
            keep = length
        for layer in self.attn_layers:  # a ring holds the slots of the last ring_slots tokens written (up to _top,
            need = max(0, keep - layer.window + 1) if layer.ring else length  # even past a crop): the next window
            if layer.ring and need < self._top - layer.ring_slots:  # must be among them
                raise ValueError(
                    f"crop to {keep} tokens: sliding-window layer {layer.layer_idx} (window {layer.window}) keeps "
                    f"the slots of its last {layer.ring_slots} tokens written (up to {self._top}), and the next "
                    f"forward would need tokens from {need}. A crop may reach back at most "
                    f"{layer.ring_slots - layer.window + 1} tokens below the most the rows held; build the cache with "
                    "a larger window_slack=, or trim_windows=False to keep every token.")
        for i in self.linear_layers:  # transformers' rule: only a layer recording its past can go back
            self.layers[i].crop(keep - length)
        for layer in self.attn_layers:
            layer.cache_seqlens[:self.batch].fill_(keep)
        self.length = keep

    def reorder_cache(self, beam_idx: torch.LongTensor, *args, **kwargs) -> None:
        """Beam search: row b becomes row beam_idx[b]. Moves block ids and reference counts, copies no K/V (a row
        that then writes into a block it shares gets a copy of that one block first). One host read of beam_idx."""
        self._select(beam_idx.tolist())

    def batch_repeat_interleave(self, repeats: int, *args, **kwargs) -> None:
        """Row b becomes rows b*repeats ... b*repeats + repeats-1, sharing its blocks (contrastive search)."""
        self._select([b for b in range(self.batch) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor, *args, **kwargs) -> None:
        """Keep rows `indices` (in that order), sharing blocks where an index repeats (contrastive search)."""
        self._select(torch.as_tensor(indices).tolist())

    def _select(self, index: list[int]) -> None:
        if len(index) > self.max_batch_size:
            raise ValueError(f"{len(index)} rows exceed the PlugCache's max_batch_size={self.max_batch_size}")
        if any(i < 0 or i >= self.max_batch_size for i in index):
            raise ValueError(f"row index out of range in {index}")
        self._writable_here()
        self.seq_length_now()
        for table in self.tables.values():
            table.select(index)
        self._sync_tables()
        batch = len(index)
        for dev in self.device_states.values():
            idx = torch.tensor(index, device=dev.device)
            dev.starts[:batch] = dev.starts[idx]
            if self.holes:
                dev.valid[:batch] = dev.valid[idx]
        for layer in self.attn_layers:
            idx = torch.tensor(index, device=layer.device)
            layer.cache_seqlens[:batch] = layer.cache_seqlens[idx]
        for i in self.linear_layers:  # their states are per row: index_select, as transformers reorders beams
            self.layers[i].reorder_cache(torch.tensor(index))
        self.batch = batch

    # --- sharing, copies, files ----------------------------------------------------------------------

    def fork(self) -> "PlugCache":
        """A second cache holding the same rows that shares every block with this one, copying no K/V (a prefix
        cached once, then continued several ways). Copy-on-write: a row of either cache that writes into a block
        they share gets its own copy of that block first, so later writes to one never show in the other. Both
        draw from one pool (`stats()` counts it once)."""
        self.seq_length_now()
        if self._open:
            self.sync_lengths()
        self._full_rows = 0  # its rows share blocks now: a forward compiled as a whole needs reserve() again
        other = object.__new__(PlugCache)
        other._build(self.config, self.backend, self.pools,
                     buffers=[(l.k_cache, l.v_cache, l.k_scale, l.v_scale) for l in self.attn_layers],
                     linear={i: copy.deepcopy(self.layers[i]) for i in self.linear_layers})
        other.tables = {ring: table.fork() for ring, table in self.tables.items()}
        other._copy_state_from(self)
        return other

    def __deepcopy__(self, memo) -> "PlugCache":
        """An independent copy with a pool of its own (HF's prompt-reuse recipe deep-copies a prefilled cache per
        request); `fork()` gives the same without copying any block."""
        self.seq_length_now()
        if self._open:
            self.sync_lengths()
        other = object.__new__(PlugCache)
        other._build(self.config, self.backend, _pools(self.config),
                     buffers=[tuple(t.clone() for t in (l.k_cache, l.v_cache, l.k_scale, l.v_scale))
                              for l in self.attn_layers],
                     linear={i: copy.deepcopy(self.layers[i]) for i in self.linear_layers})
        for ring, table in other.tables.items():
            table.rows = [list(row) for row in self.tables[ring].rows]
            for row in table.rows:  # the same block ids in the copied buffers: the new pool lends exactly those
                for i in row:
                    if table.pool.refs[i] == 0:
                        table.pool.free.remove(i)
                    table.pool.refs[i] += 1
        other._copy_state_from(self)
        memo[id(self)] = other
        return other

    def _copy_state_from(self, src: "PlugCache") -> None:
        for name in ("length", "batch", "holes", "_hf_config", "_linear_batch", "_top"):
            setattr(self, name, getattr(src, name))
        for layer, theirs in zip(self.attn_layers, src.attn_layers):
            layer.cache_seqlens.copy_(theirs.cache_seqlens)
            layer.fresh = theirs.fresh
        for dev, theirs in zip(self.device_states.values(), src.device_states.values()):
            dev.starts.copy_(theirs.starts)
            dev.valid.copy_(theirs.valid)
        for table in self.tables.values():
            table.dirty = True
        self._sync_tables()

    def save(self, path) -> None:
        """Write the cached rows to `path` with safetensors (no pickle): each block they use once (shared blocks
        too), their block tables, lengths, starts and slot mask, and what the cache was built for. `PlugCache.load`
        reads it back, in another process too."""
        from .storage import save_cache

        self.seq_length_now()
        if self._open:
            self.sync_lengths()
        save_cache(self, path)

    @classmethod
    def load(cls, path, model_or_config, **kwargs) -> "PlugCache":
        """A PlugCache holding what `save` wrote, for `model_or_config` (as the constructor takes it; `kwargs` as
        the constructor's, `max_batch_size` / `max_cache_len` at least what the file holds). Raises a ValueError,
        loading nothing, for a file made for another model, dtype, kv_dtype or block size, or one truncated or
        altered."""
        from .storage import load_cache

        return load_cache(cls, path, model_or_config, **kwargs)

    # --- generate() -------------------------------------------------------------------------------

    def check_model(self, model) -> None:
        """Raise a ValueError naming every difference between this cache and `model` (layers, heads, dtype, device,
        the layers and heads this rank holds)."""
        layout = RankLayout.from_model(model)
        expected = PlugConfig.from_hf_config(model.config, max_batch_size=self.max_batch_size,
                                             max_cache_len=self.max_cache_len, dtype=model.dtype,
                                             device=_layer_devices(model, layout), kv_dtype=self.kv_dtype,
                                             block_size=self.config.block_size, layout=layout,
                                             tp_plan=getattr(model, "tp_plan", None))
        diffs = [f"{name}: cache {getattr(self.config, name)} vs model {getattr(expected, name)}"
                 for name in ("num_layers", "nheads", "nheads_k", "head_dim", "dtype", "layer_devices", "layer_windows",
                              "layer_kinds")
                 if getattr(self.config, name) != getattr(expected, name)]
        if diffs:
            raise ValueError("This PlugCache was built for another model (" + "; ".join(diffs)
                             + "). Build one with hf_kvplug.PlugCache(model, ...).")

    def generate_begins(self, reserve: int, share: int) -> None:
        """Hints for the generate() call about to run: map `reserve` tokens per row ahead (so no decode step maps a
        block), and let groups of `share` rows expanded from one prompt store it once."""
        if self._open:
            self.sync_lengths()
        recording = any(compat.recording(self.layers[i]) is not None for i in self.linear_layers)
        self._generate = {"reserve": reserve, "share": share, "recording": recording}

    def generate_ends(self, failed: bool) -> None:
        """After the generate() call: linear-attention layers stop recording their past if the call switched it on
        (assisted decoding), so later calls keep no state copies and compile again. A call that failed leaves the
        count as the layers hold it: a forward stopped part-way is still open, and the next use checks it."""
        hints, self._generate, self._leaders = self._generate or {}, None, None
        if failed:
            self._prepared = False  # a forward begun for a step that never ran: the next one begins again
        if not hints.get("recording", True):
            for i in self.linear_layers:
                compat.stop_recording(self.layers[i])


def _pools(config: PlugConfig) -> dict[int | None, BlockPool]:
    """A block pool per group of layers (`PlugConfig.groups`), each named for its exhaustion message."""
    pools = {}
    for ring in config.groups:
        if ring is None:
            pools[ring] = BlockPool(config.group_blocks(ring), hint=": build the cache with a larger max_tokens= (or "
                                    "max_batch_size / max_cache_len), or reset() it")
        else:
            pools[ring] = BlockPool(
                config.group_blocks(ring), name=f"the sliding-window ring pool ({ring} blocks a row)",
                hint=": every row holds a full ring, so forks and copies of full rows need room. Pass max_tokens= "
                     "above max_batch_size x max_cache_len (the rings grow with it), or trim_windows=False")
    return pools


def _supported_names():
    from .patcher import SUPPORTED

    return SUPPORTED


def _check_local_heads(model, config: PlugConfig) -> None:
    """The module weights are the truth: the first attention layer this rank runs must hold the K/V heads the
    config says (tensor parallelism splits k_proj; on 5.23+ its weight is a DTensor of the global shape)."""
    i = config.attention_layers[0]
    weight = model.get_decoder().layers[i].self_attn.k_proj.weight
    rows = (weight.to_local() if hasattr(weight, "to_local") else weight).shape[0]
    if rows != config.nheads_k * config.head_dim:
        raise ValueError(f"layer {i}'s k_proj holds {rows} output rows on this process; the cache expected "
                         f"{config.nheads_k} KV heads x head_dim {config.head_dim} (tensor-parallel size "
                         f"{config.tp_size}): pass the model as loaded, or layout= with its tp_size")


def _layer_devices(model, layout: RankLayout | None = None) -> list[torch.device | None]:
    """Device of each decoder layer's attention weights (follows `device_map`); None for the layers another
    pipeline stage runs."""
    layout = layout or RankLayout()
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")
    devices = []
    for i, layer in enumerate(layers):
        if not layout.runs(i):
            devices.append(None)
            continue
        # a hybrid model's linear-attention layers have no self_attn: any weight of theirs
        attn = getattr(layer, "self_attn", None)
        weight = attn.k_proj.weight if attn is not None else next(layer.parameters())
        if weight.device.type == "meta":
            raise ValueError("layer weights are on the meta device (offloaded?); PlugCache needs them on a real device")
        devices.append(weight.device)
    return devices
