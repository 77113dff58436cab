"""PlugCache: the `transformers.Cache` a user passes to generate(); K/V live in preallocated paged buffers.

This is the front transformers sees: the Cache API, and the operations that change rows across all the parts
(reset, crop, beam reorder, fork, copy, files). The parts, each in its module:
  * `blocks.Paging`: which blocks each row maps, per group of layers (plain Python, copy-on-write);
  * `device.DeviceState`: per device, what the kernels read besides the K/V (block tables, row starts, slot mask);
  * `layers`: the paged layers (full attention, sliding-window rings), pipeline placeholders, linear-attention
    layers of hybrid models; they hold their buffers and never see this class;
  * `state.ForwardState`: the rows' host-side count and the forward under way, the handshake with the patcher's
    hooks. Host work (mapping blocks, copy-on-write, recording the attention mask, checks) happens in
    `begin_forward`, on eager code before every forward; the decode step itself reads and writes device tensors only.
"""

from __future__ import annotations

import weakref

import torch
from transformers.cache_utils import Cache, DynamicCache

from . import compat, ops, prefix
from .blocks import BlockPool, Paging, PrefixIndex
from .config import PlugConfig
from .device import DeviceState
from .forward import KEEP_MASK, ForwardHost, all_or_broken, inference_mode_explained
from .geometry import Geometry, RankLayout
from .layers import KV, LinearLayers, PlugLayer, RemoteLayer, Slab, Tail, attention_layer
from .rotation import key_rotation, rotation_gain
from .state import ForwardState
from .storage import load_cache, save_cache

__all__ = ["KEEP_MASK", "PlugCache", "PlugLayer", "RemoteLayer"]


class PlugCache(ForwardHost, DynamicCache):
    """A drop-in `transformers.Cache` with paged K/V buffers, optionally INT8 or INT4, for patched models.

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
            calibration. Quantized keys are stored rotated (`rotate_keys`).
        dtype, device: required with a config; `device` may be a list with one device per layer.
        block_size: tokens per paged block.
        max_tokens: the pool's size in tokens (all rows together); default `max_batch_size x max_cache_len`. Rows
            take blocks as they grow and rows that `generate()` expands from one prompt share its blocks, so a
            ragged batch or shared prompts fit in less than the rectangle.
        backend: "auto" (Triton kernels on CUDA, the PyTorch fast path `torchpath` on every other device),
            "triton", "torch" or "reference" (the oracle, slow).
        layout: the `RankLayout` of this process under transformers' tensor / pipeline parallelism: read from the
            model when one is given, stated here with a config (default: one process). Each rank's cache holds its
            own heads of the layers it runs.
        trim_windows: sliding-window layers keep a ring of blocks per row, their window and `window_slack` more
            slots, instead of `max_cache_len` (default True). Tokens the window has passed are overwritten, so a
            `crop` may go back at most `ring - window + 1` tokens below the most the rows held (assisted decoding's
            rejected drafts, well within it); False keeps every token, as for full-attention layers.
        window_slack: slots a ring holds past its window (rounded up to blocks): the longest forward that runs in
            one piece and about the longest crop. Default `min(window, 256)`.
        prefix_caching: keep the full blocks of finished requests in an index (keyed by their tokens, mask and
            what else decides their K/V); a generate() call into an empty cache maps the longest indexed prefix of
            its prompts and prefills only the rest. Idle indexed blocks go back to the pool, least recently used
            first, when it needs room. Refused for hybrid models and sliding-window rings (their state at a block
            boundary is not in the blocks).
        rotate_keys: store keys rotated by an orthonormal signed Hadamard matrix and attend with queries rotated
            alike (`hf_kvplug.rotation`): scores are unchanged, and outlier key channels no longer take a quantized
            key's range. None (default): on for kv_dtype "int8" / "int4", off otherwise.
        exact_tail: keep each row's last, partial block unquantized beside the quantized pool, and attend over
            those tokens exactly (KIVI's full-precision residual; the pool still holds every token's codes, so a
            block is read quantized once it fills). Costs `block_size` tokens per row and layer in the model dtype.
            None (default): on for kv_dtype "int4" (docs/int4.md), off otherwise; int4 only.

    Buffers are allocated once here and never re-assigned: `reset()`, `crop()` and `reorder_cache()` work in place,
    so their addresses stay fixed for torch.compile / CUDA graphs.
    """

    def __init__(self, model_or_config, max_batch_size: int = 4, max_cache_len: int = 2048, kv_dtype: str | None = None,
                 *, dtype: torch.dtype | None = None, device=None, block_size: int = 64, max_tokens: int | None = None,
                 backend: str = "auto", layout: RankLayout | None = None, trim_windows: bool = True,
                 window_slack: int | None = None, prefix_caching: bool = False, rotate_keys: bool | None = None,
                 exact_tail: bool | None = None):
        self._model = None  # a weak reference to the model the cache was built for, if it was given one (files)
        if hasattr(model_or_config, "config") and hasattr(model_or_config, "parameters"):
            self._model = weakref.ref(model_or_config)
            hf_config = model_or_config.config
            geometry = Geometry.from_model(model_or_config, layout, dtype=dtype, device=device)
        else:
            hf_config = model_or_config
            if dtype is None or device is None:
                raise ValueError("PlugCache(config, ...) needs dtype= and device= (or pass the model instead)")
            geometry = Geometry.from_hf_config(hf_config, dtype=dtype, device=device, layout=layout)
        length_rope = compat.rope_types(hf_config) & {"dynamic", "longrope"}
        if prefix_caching and length_rope:
            raise ValueError(f"prefix_caching=True reuses one request's K/V in another; this model's RoPE "
                             f"({', '.join(sorted(length_rope))}) changes its frequencies with each forward's length, "
                             "so a reused prefix would carry the frequencies of the request that wrote it: build the "
                             "cache without prefix_caching")
        config = PlugConfig(geometry, max_batch_size=max_batch_size, max_cache_len=max_cache_len, kv_dtype=kv_dtype,
                            block_size=block_size, max_tokens=max_tokens, trim_windows=trim_windows,
                            window_slack=window_slack, prefix_caching=prefix_caching, rotate_keys=rotate_keys,
                            exact_tail=exact_tail)
        ops.resolve_backend(backend, config.layer_devices[0])  # a bad backend fails here, before any allocation
        self._hf_config = getattr(hf_config, "text_config", None) or hf_config
        self._build(config, backend, _pools(config), kvs=None,
                    linear=LinearLayers.build(self._hf_config, config.layer_kinds))

    def _build(self, config: PlugConfig, backend: str, pools: dict, kvs, linear: dict,
               paging: Paging | None = None, slabs: list[Slab] | None = None) -> None:
        self.config, self.backend = config, backend
        self.paging = paging or Paging(pools, config.max_batch_size, config.max_blocks_per_row, config.block_size)
        if config.prefix_caching and pools[None].index is None:  # one index per pool: forks share it
            pools[None].index = PrefixIndex(pools[None])
        # a cache dropped without reset() gives its blocks back (a fork shares its pools with others that go on)
        weakref.finalize(self, self.paging.release)
        for pool in pools.values():
            pool.holders.add(self)
        self.state = ForwardState(sync=self.sync_lengths)
        devices = dict.fromkeys(config.layer_devices[i] for i in config.attention_layers)
        rotation = key_rotation(config.head_dim).to(config.dtype) if config.key_rotation else None
        self.device_states = {d: DeviceState(config.groups, config.max_batch_size, config.max_blocks_per_row,
                                             config.max_cache_len, d, rotation, rotation_gain(config.head_dim))
                              for d in devices}
        if kvs is None:
            slabs, kvs = _slab_kvs(config, backend)
        slabs, tails = _own_tails(config, slabs or ())
        kvs = iter(kvs)
        layers = [linear[i] if kind == "linear" else RemoteLayer(config, i, self.state) if kind == "remote" else
                  attention_layer(config, i, self.device_states[config.layer_devices[i]], self.state,
                                  next(kvs, None), backend, tails.get(i))
                  for i, kind in enumerate(config.layer_kinds)]
        Cache.__init__(self, layers=layers)  # DynamicCache's own __init__ would build growing layers
        self.attn_layers = [layer for layer in layers if isinstance(layer, PlugLayer)]
        # the slabs whose layers hold exactly their buffers (a fork shares its parent's; a copy has none)
        self.slabs = [slab for slab in slabs if all(_in_slab(self.layers[i], slab, j)
                                                    for j, i in enumerate(slab.layers))]
        # the PyTorch path plans each forward once per device and (ring, window), from one layer of each group
        groups: dict = {}
        for layer in self.attn_layers:
            if layer.backend == "torch":
                groups.setdefault((layer.device, layer.ring, layer.window or 0), layer)
        self.plan_layers = list(groups.values())
        self.linear = LinearLayers(self._hf_config, config.layer_kinds, self.layers)
        self.linear_layers = self.linear.indices
        # hints of the generate() call under way: reserve, share, recording, begun (a forward of it was prepared),
        # filled (tokens a row holds once the prompt is in)
        self._generate: dict | None = None
        self._compiled_rows = 0  # leading rows mapped to max_cache_len with private blocks (reserve())
        self._reserved_from = 0  # from which slot on reserve() made them private

    # --- sizes -----------------------------------------------------------------------------------------

    tables = property(lambda self: self.paging.tables, doc="The block table of each group of layers, by ring.")
    pools = property(lambda self: self.paging.pools, doc="The block pool of each group of layers, by ring.")
    table = property(lambda self: next(iter(self.tables.values())), doc="The first group's block table.")
    pool = property(lambda self: self.table.pool, doc="The first group's block pool.")
    max_batch_size = property(lambda self: self.config.max_batch_size)
    max_cache_len = property(lambda self: self.config.max_cache_len)
    kv_dtype = property(lambda self: self.config.kv_dtype)
    batch = property(lambda self: self.state.batch, doc="Rows in use.")
    holes = property(lambda self: self.state.holes, doc="The recorded mask has holes (the kernels read it).")

    @property
    def nbytes(self) -> int:
        """Bytes held by all K/V buffers and scales (the pool, shared with forks) and the exact tails (each cache's
        own)."""
        return sum(layer.kv.nbytes + (layer.tail.nbytes if layer.tail else 0) for layer in self.attn_layers)

    def nbytes_of(self, ring: int | None) -> int:
        """Bytes held by the buffers of group `ring`'s layers."""
        return sum(layer.kv.nbytes for layer in self.attn_layers if layer.ring == ring)

    def bytes_per_token(self) -> int:
        """Bytes one more cached token costs over all layers that keep max_cache_len (K, V and scales); the
        sliding-window layers' rings are a fixed cost (`config.ring_bytes_per_row`)."""
        return self.config.bytes_per_token()

    def stats(self) -> dict:
        """Memory in use, as a plain dict: blocks of the main pool (each spans every layer that keeps max_cache_len)
        in use and shared (by rows or forked caches), bytes all pools hold in use and in total, and the rows /
        tokens of this cache (`Paging.stats`). With sliding-window rings, `window_blocks_*` count the ring pools'
        blocks; with prefix caching, `prefix_cached_blocks` and `prefix_hit_tokens`; with INT4's exact tails,
        `tail_bytes` (counted in use and in total)."""
        per_block = {ring: self.nbytes_of(ring) // pool.num_blocks for ring, pool in self.pools.items()}
        out = self.paging.stats(per_block, bytes_total=self.nbytes, rows=self.batch, tokens=self.seq_length_now())
        tails = sum(layer.tail.nbytes for layer in self.attn_layers if layer.tail is not None)
        if tails:  # INT4's exact tails: a block per row, held whatever the rows hold (in use, as in the total)
            out.update(tail_bytes=tails, bytes_in_use=out["bytes_in_use"] + tails)
        return out

    # --- what transformers asks ------------------------------------------------------------------------

    def get_max_length(self, layer_idx: int | None = None, *args, **kwargs) -> int:
        return self.config.max_cache_len

    def get_query_offset(self, layer_idx: int = 0, *args, **kwargs):
        return 0  # pairs with get_mask_sizes: HF's mask stays q x q and is ignored after the prefill

    def get_seq_length(self, layer_idx: int = 0, *args, **kwargs):
        """Tokens cached per row. An int, from the host's own count (no device read); while torch.compile traces, a
        0-d device tensor (a traced int would be baked into the graph)."""
        if torch.compiler.is_compiling():
            layer = self.layers[layer_idx]
            return (layer if isinstance(layer, PlugLayer) else self.attn_layers[0]).cache_seqlens[0]
        return self.state.seq_length()

    def seq_length_now(self) -> int:
        """The host's count of tokens per row (reads the device only after a forward compiled as a whole)."""
        return self.state.length_now()

    def layer(self, layer_idx: int) -> PlugLayer:
        if layer_idx >= len(self.layers):
            raise ValueError(f"PlugCache has {len(self.layers)} layers but the model called layer {layer_idx}: "
                             "it was built for another model")
        return self.layers[layer_idx]

    # --- rows: reset, crop, beam search ------------------------------------------------------------------

    def reset(self, *args, **kwargs) -> None:
        """Empty every row (buffers keep their addresses); blocks go back to the pool; the next forward prefills."""
        with inference_mode_explained("PlugCache.reset"):
            self._writable_here()
            with all_or_broken(self, "reset()"):
                self.paging.release()
                self._sync_tables()
                self.linear.reset()
                for layer in self.attn_layers:
                    layer.reset()
                for dev in self.device_states.values():
                    dev.reset()
        self.state.reset()  # (the rows are whole again)

    def crop(self, n: int, *args, **kwargs) -> None:
        """Drop `-n` tokens (n < 0), or keep the first `n` tokens where transformers crops that way (its older,
        positive convention). Blocks stay mapped; the next write copies a block first if it is shared."""
        self.state.check_whole()
        self._writable_here()
        self._settle()  # (a forward prepared that never ran is dropped: the layers say what they hold)
        length = self.seq_length_now()
        if n < 0:
            keep = max(0, length + n)
        elif compat.LEGACY_CROP:
            keep = min(length, n)
        elif n > 0:
            raise ValueError(f"crop({n}): this transformers release crops with a negative number of tokens to remove")
        else:
            keep = length
        for layer in self.attn_layers:
            layer.check_crop(keep, self.state.top)
        self.linear.crop(keep - length)  # (it refuses, changing nothing, where transformers' layers keep no past)
        with all_or_broken(self, "crop()"):
            for layer in self.attn_layers:
                layer.crop_to(keep, self.batch, length)
            self.state.cropped(keep)
        if keep < self._reserved_from:  # the next write lands where reserve() made nothing private
            self._compiled_rows = 0

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
        self.state.check_whole()
        self._writable_here()
        self._settle()  # codes written through the rows' tables as they are; a forward that never ran dropped
        with all_or_broken(self, "row reorder"):
            self.paging.select(index)
            self._sync_tables()
            for dev in self.device_states.values():
                dev.select(index, self.holes)
            for layer in self.attn_layers:
                layer.select(index)
            self.linear.select(index)
            self.state.selected(len(index))

    # --- sharing, copies, files ------------------------------------------------------------------------

    def fork(self) -> "PlugCache":
        """A second cache holding the same rows that shares every block with this one, copying no K/V (a prefix
        cached once, then continued several ways). Copy-on-write: a row of either cache that writes into a block
        they share gets its own copy of that block first, so later writes to one never show in the other. Both
        draw from one pool (`stats()` counts it once)."""
        self._settle()
        self._compiled_rows = 0  # its rows share blocks now: a forward compiled as a whole needs reserve() again
        return self._twin(self.pools, [layer.kv for layer in self.attn_layers], self.paging.fork(), self.slabs)

    def __copy__(self) -> "PlugCache":
        """`copy.copy(cache)`: a fork. A copy of the object's fields would share its bookkeeping and blocks without
        their reference counts, and dropping either would give the other's blocks back to the pool."""
        return self.fork()

    def __deepcopy__(self, memo) -> "PlugCache":
        """An independent copy with a pool of its own (HF's prompt-reuse recipe deep-copies a prefilled cache per
        request); `fork()` gives the same without copying any block."""
        self._settle()
        pools = _pools(self.config)
        other = self._twin(pools, [layer.kv.clone() for layer in self.attn_layers], self.paging.copy_onto(pools))
        memo[id(self)] = other
        return other

    def _settle(self) -> None:
        """Before a fork, a copy, a file, a crop or a reorder: the host's count (an open forward's checked: the
        layers say what they hold), and every code the decode steps left to the exact tails written
        (`PlugLayer.settle`)."""
        self.state.check_whole()
        self.seq_length_now()
        if self.state.open:
            self.sync_lengths()
        self.write_waiting_codes()

    def write_waiting_codes(self) -> None:
        """Write every code an INT4 decode step left waiting in a layer's exact tail (`PlugLayer.settle`): before
        anything moves rows, shares or copies the pool, or runs a compiled graph that would otherwise trace it."""
        for layer in self.attn_layers:
            layer.settle()

    def _twin(self, pools: dict, kvs: list[KV], paging: Paging, slabs: list[Slab] | None = None) -> "PlugCache":
        """A cache over `pools` and buffers `kvs` (in `slabs`, where they are) holding what this one holds
        (`paging`: its block tables)."""
        other = object.__new__(PlugCache)
        other._hf_config, other._model = self._hf_config, self._model
        other._build(self.config, self.backend, pools, kvs, linear=self.linear.copies(), paging=paging, slabs=slabs)
        other.linear.batch = self.linear.batch
        other.state.restore(self.state.batch, self.state.length, self.state.holes, self.state.top)
        for layer, theirs in zip(other.attn_layers, self.attn_layers):
            layer.take_rows(theirs)
        for dev, theirs in zip(other.device_states.values(), self.device_states.values()):
            dev.copy_from(theirs)
        other.paging.mark_dirty()
        other._sync_tables()
        return other

    def save(self, path) -> None:
        """Write the cached rows to `path` with safetensors (no pickle): each block they use once (shared blocks
        too), their block tables, lengths, starts and slot mask, and what the cache was built for: the model's
        architecture and, for a cache built from the model (not a config) that is still alive, a digest of its
        weights (`prefix.weights_digest`; a tensor-parallel rank's own shards). `PlugCache.load` reads it back, in
        another process too."""
        self._settle()
        model = self._model() if self._model is not None else None
        save_cache(self, path, weights=prefix.weights_digest(model) if model is not None else None)

    @classmethod
    def load(cls, path, model_or_config, **kwargs) -> "PlugCache":
        """A PlugCache holding what `save` wrote, for `model_or_config` (as the constructor takes it; `kwargs` as
        the constructor's, `max_batch_size` / `max_cache_len` at least what the file holds). Raises a ValueError,
        loading nothing, for a file made for another model, dtype, kv_dtype or block size, for a model with other
        weights (where the file holds their digest and a model is given, not a config), or one truncated or
        altered."""
        model = hasattr(model_or_config, "config") and hasattr(model_or_config, "parameters")
        return load_cache(cls, path, model_or_config, weights=prefix.weights_digest(model_or_config) if model else None,
                          **kwargs)

    # --- generate() ------------------------------------------------------------------------------------

    def check_model(self, model) -> None:
        """Raise a ValueError naming every difference between this cache and `model` (layers, heads, dtype, device,
        the layers and heads this rank holds)."""
        diffs = self.config.geometry.diff(Geometry.from_model(model))
        if diffs:
            raise ValueError("This PlugCache was built for another model (cache vs model: " + "; ".join(diffs)
                             + "). Build one with hf_kvplug.PlugCache(model, ...).")

    def clear_prefix_index(self) -> None:
        """Prefix caching: forget every block kept for later requests (the cache's own rows keep theirs). Needed only
        after a change to the model that `prefix.fingerprint` cannot see (a write through `.data` that misses every
        element it probes); weights changed otherwise, adapters and configs are seen."""
        index = self.pools[None].index if None in self.pools else None
        if index is not None:
            index.clear()

    def reset_stats(self) -> None:
        """Start counting `stats()["prefix_hit_tokens"]` again."""
        if self.pools.get(None) and self.pools[None].index is not None:
            self.pools[None].index.hit_tokens = 0

    def generate_begins(self, reserve: int, share: int, root=None, prompt=None, filled: int = 0) -> None:
        """Hints for the generate() call about to run: map `reserve` tokens per row ahead (so no decode step maps a
        block), and let groups of `share` rows expanded from one prompt store it once; `filled`: the tokens each row
        holds once the prompt is in (the forwards before that, chunks of a prompt included, read their mask). With
        prefix caching, `root` names the model and format (`prefix.fingerprint`: the index keeps only entries made
        under it) and `prompt = (input_ids, attention_mask)` maps what the index holds of the prompts
        (`reuse_prefix`)."""
        self.state.check_whole()
        with inference_mode_explained("PlugCache.generate_begins"):
            self._writable_here()  # (before reuse_prefix changes the tables)
        if self.state.open:
            self.sync_lengths()
        reused = 0
        if root is not None and self.config.prefix_caching:
            self.pools[None].index.set_root(root)
            if prompt is not None:
                reused = self.reuse_prefix(*prompt, share) * prompt[0].shape[0]  # tokens reused, all prompts
        self._generate = {"reserve": reserve, "share": share, "recording": self.linear.recording, "begun": False,
                          "filled": filled, "reused": reused}

    @property
    def in_generate(self) -> bool:
        """Whether a generate() call is under way (between `generate_begins` and `generate_ends`)."""
        return self._generate is not None

    def generate_ends(self, failed: bool, finished=None) -> None:
        """After the generate() call: linear-attention layers stop recording their past if the call switched it on
        (assisted decoding), so later calls keep no state copies and compile again. A call that failed leaves the
        count as the layers hold it: a forward stopped part-way is still open, and the next use checks it (one that
        reused a prefix and stopped before its prompt was in gives it back: the cache is empty again, as it was). With
        prefix caching, the rows `finished` lists (`index_rows`) go into the index."""
        hints, self._generate = self._generate or {}, None
        # A call that reused a prefix into an empty cache and failed before its prompt was in (refused before its
        # first forward, or a forward of the prompt stopped) leaves the cache empty, as it found it: the layers may
        # all still hold just the prefix, which no check would catch and the next prompt would continue.
        prompt_open = self.state.open and (self.state.length or 0) <= hints.get("filled", 0)
        if failed and hints.get("reused") and (not hints.get("begun") or prompt_open):
            try:
                self.reset()
                self.pools[None].index.hit_tokens -= hints["reused"]
            except Exception:  # (the call's own error is the one raised; the next use says to reset)
                self.state.broke("reset() after a failed generate() that reused a prefix stopped part-way")
        elif failed:
            self.state.abandon()  # a forward prepared for a step that never ran: the next one prepares again
        elif finished and self.config.prefix_caching:
            self.index_rows(finished)
        if not hints.get("recording", True):
            self.linear.stop_recording()


compat.answer_max_length_under_both_names(PlugCache)


def _slab_kvs(config: PlugConfig, backend: str) -> tuple[list[Slab], list[KV | None]]:
    """The buffers of a fresh cache's attention layers, in order (None: the layer allocates its own): the layers on
    the PyTorch path get theirs from one slab per device and group (`KV.allocate_group`)."""
    groups: dict = {}
    for i in config.attention_layers:
        device = config.layer_devices[i]
        if ops.resolve_backend(backend, device) == "torch":
            groups.setdefault((device, config.layer_rings[i] or None), []).append(i)
    slabs, kvs = [], {}
    for (device, ring), members in groups.items():
        buf, scales, group = KV.allocate_group(config, ring, device, len(members))
        windows = {config.layer_windows[i] or 0 for i in members}
        key = (ring, windows.pop()) if len(windows) == 1 else None  # layers of one plan only
        if key is not None:
            slabs.append(Slab(buf, scales, None, tuple(members), device, key))
        kvs.update(zip(members, group))
    return slabs, [kvs.get(i) for i, kind in enumerate(config.layer_kinds) if kind not in ("linear", "remote")]


def _own_tails(config: PlugConfig, slabs) -> tuple[list[Slab], dict[int, Tail]]:
    """With exact tails, each slab's layers get this cache's own in one storage (`Tail.allocate_group`), the slab
    naming it (a fork's replace its parent's): (the slabs, the tails by layer). Without, as they are."""
    if not config.exact_tail:
        return list(slabs), {}
    out, tails = [], {}
    for slab in slabs:
        storage, group = Tail.allocate_group(config, slab.device, len(slab.layers))
        out.append(slab._replace(tails=storage))
        tails.update(zip(slab.layers, group))
    return out, tails


def _in_slab(layer, slab: Slab, j: int) -> bool:
    """Whether `layer`'s K and V (their scales, its exact tail) are the j-th of `slab`'s, laid out as
    `KV.allocate_group` (`Tail.allocate_group`) lays them (and the layer takes the PyTorch path, with the slab's
    plan)."""
    if not (isinstance(layer, PlugLayer) and layer.backend == "torch" and layer.plan_key == slab.plan_key):
        return False
    n = len(slab.layers)
    held = [(layer.kv.k, slab.buf[j].transpose(0, 1)), (layer.kv.v, slab.buf[n + j].transpose(0, 1))]
    if slab.scales is not None:
        held += [(layer.kv.k_scale, slab.scales[j].transpose(0, 1)),
                 (layer.kv.v_scale, slab.scales[n + j].transpose(0, 1))]
    if slab.tails is not None:
        k_tail, v_tail = layer.tail or (None, None)
        held += [(k_tail, slab.tails[j]), (v_tail, slab.tails[n + j])]
    return all(mine is not None and mine.data_ptr() == want.data_ptr() and mine.shape == want.shape
               and mine.stride() == want.stride() for mine, want in held)


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

