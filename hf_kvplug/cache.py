"""PlugCache: a transformers `Cache` whose K/V live in preallocated paged GPU (or CPU) buffers, fp or INT8."""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import compat, ops
from .config import PlugConfig


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _mark_static(*tensors: torch.Tensor) -> None:
    # guard=False (the default only in newer torch; older releases default to True): the buffers are lifted as graph
    # inputs instead of being baked in behind an ID_MATCH guard, so a second PlugCache of the same geometry reuses the
    # compiled graph instead of recompiling (CUDA graphs re-record for the new addresses instead).
    if not _compiling():
        for t in tensors:
            torch._dynamo.mark_static_address(t, guard=False)


def _version(t: torch.Tensor):
    return None if t.is_inference() else t._version  # inference tensors keep no version counter


class StartsMemo:
    """Eager only: the per-row first valid slots of one forward on one device, computed by the first layer there and
    reused by the later ones (each layer holds the same lengths when it runs), saving a few tiny ops per layer.
    The first layer refreshes it every forward, or clears it when it runs compiled or takes the prefill path, so a
    later layer never sees another forward's value; the key also holds the ids' version (in-place updates)."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.position_ids = self.starts = self.version = None
        self.q_len = 0

    def get(self, position_ids, q_len: int, batch: int):
        if (self.position_ids is position_ids and self.q_len == q_len and self.starts.shape[0] == batch
                and self.version == _version(position_ids)):
            return self.starts
        return None

    def put(self, position_ids, q_len: int, starts: torch.Tensor) -> torch.Tensor:
        self.position_ids, self.q_len, self.starts = position_ids, q_len, starts
        self.version = _version(position_ids)
        return starts


class PlugLayer(CacheLayerMixin):
    """One decoder layer's paged K/V pool, its scales (INT8) and per-row lengths, all on the layer's device."""

    is_compileable = True
    is_croppable = True

    def __init__(self, config: PlugConfig, layer_idx: int, block_table: torch.Tensor, backend: str,
                 starts_memo: StartsMemo | None = None, leads: bool = True):
        super().__init__()
        dev = config.layer_devices[layer_idx]
        shape = (config.num_blocks, config.nheads_k, config.block_size, config.head_dim)
        self.config = config
        self.layer_idx = layer_idx
        self.device = dev
        self.window = config.layer_windows[layer_idx]
        self.is_sliding = self.window is not None
        self.backend = ops.resolve_backend(backend, dev)
        self.k_cache = torch.zeros(shape, dtype=config.storage_dtype, device=dev)
        self.v_cache = torch.zeros(shape, dtype=config.storage_dtype, device=dev)
        scale_shape = shape[:3] if config.kv_dtype == "int8" else (0,)
        self.k_scale = torch.zeros(scale_shape, dtype=torch.float32, device=dev)
        self.v_scale = torch.zeros(scale_shape, dtype=torch.float32, device=dev)
        self.block_table = block_table
        self.starts_memo = starts_memo or StartsMemo()
        self.leads = leads  # first layer on its device: refreshes the memo every forward
        self.cache_seqlens = torch.zeros(config.max_batch_size, dtype=torch.int32, device=dev)
        _mark_static(self.k_cache, self.v_cache, self.k_scale, self.v_scale, self.cache_seqlens)
        self.keys, self.values = self.k_cache, self.v_cache
        self.is_initialized = True
        # Host-side: True until the first forward after construction or reset(), so that forward can attend with
        # the model's own attention over the fresh K/V (as stock does) with no device read. Never True wrongly:
        # crop() leaves it False, and the cached path is right for any state.
        self.fresh = True

    def __repr__(self):
        return f"PlugLayer(layer={self.layer_idx}, device={self.device}, window={self.window})"

    # --- transformers Cache layer API -------------------------------------------------------------

    def lazy_initialization(self, key_states, value_states=None) -> None:
        """Buffers are allocated at construction; this only checks that the model fits them."""
        self.check_states(key_states)

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError(
            "PlugCache.update() was called by an attention forward that hf_kvplug did not patch. "
            "Call hf_kvplug.patch(model) before generating with a PlugCache (supported: "
            "LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, MistralForCausalLM)."
        )

    def get_seq_length(self):
        """Tokens cached in row 0: an int on the CPU; on an accelerator (and while torch.compile traces) a 0-d
        device tensor, as HF's StaticCache returns, because some transformers releases read it every step."""
        n = self.cache_seqlens[0]
        if _compiling():
            return n
        return int(n) if self.device.type == "cpu" else n.clone()

    def get_max_length(self) -> int:
        return self.config.max_cache_len

    def get_max_cache_shape(self) -> int:
        return self.config.max_cache_len

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        # The plugged forward masks by itself from lengths and positions: HF need only build a q x q mask.
        return query_length, 0

    def reset(self) -> None:
        self.cache_seqlens.zero_()
        self.fresh = True

    def crop(self, n: int) -> None:
        """Drop `-n` tokens (n < 0), or keep the first `n` tokens on transformers < 5.18 (its positive convention)."""
        if n < 0:
            self.cache_seqlens.sub_(-n).clamp_(min=0)
        elif compat.LEGACY_CROP:
            self.cache_seqlens.clamp_(max=n)
        elif n > 0:
            raise ValueError(f"crop({n}): transformers >= 5.18 crops with a negative number of tokens to remove")

    def used_blocks(self, batch: int) -> int:
        """Blocks holding tokens in rows < batch: a host read of the lengths, or every block where none is allowed."""
        nb = self.block_table.shape[1]
        if _compiling() or (self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            return nb
        return min(nb, math.ceil(int(self.cache_seqlens[:batch].max()) / self.config.block_size))

    def reorder_cache(self, beam_idx: torch.LongTensor, used_blocks: int | None = None) -> None:
        """Row b becomes a copy of row beam_idx[b] (beam search), in place; copies only the blocks in use."""
        idx = beam_idx.to(self.device, torch.long)
        batch = idx.numel()
        nb = self.used_blocks(batch) if used_blocks is None else used_blocks
        src = self.block_table[idx, :nb].reshape(-1).long()
        dst = self.block_table[:batch, :nb].reshape(-1).long()
        for buf in (self.k_cache, self.v_cache, self.k_scale, self.v_scale):
            if buf.numel():
                buf[dst] = buf[src]
        self.cache_seqlens[:batch] = self.cache_seqlens[idx]

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("PlugCache does not support contrastive search (batch_repeat_interleave)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("PlugCache does not support contrastive search (batch_select_indices)")

    def activate_past_recording(self) -> None:
        """Nothing to do: every token stays in its slot until `crop` moves the length back."""

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

    def check_write(self, k) -> None:
        """Raise unless `k [B, L, nheads_k, D]` fits this empty layer (no device read: the cache is empty)."""
        self.check_states(k)
        if k.shape[1] > self.config.max_cache_len:
            raise ValueError(f"{k.shape[1]} tokens would exceed the PlugCache's max_cache_len="
                             f"{self.config.max_cache_len}; build it larger")

    def write(self, k, v) -> None:
        """Store `k, v [B, L, nheads_k, D]` into an empty cache (the first forward); advances the lengths."""
        batch, q_len = k.shape[:2]
        self.check_write(k)
        if self.leads:
            self.starts_memo.clear()
        ops.write_kvcache(k, v, self.k_cache, self.v_cache, self.k_scale, self.v_scale, self.block_table,
                          self.cache_seqlens, backend=self.backend)
        self.cache_seqlens[:batch].add_(q_len)
        self.fresh = False

    def row_starts(self, position_ids, seqlens: torch.Tensor, q_len: int) -> torch.Tensor:
        """First valid slot of each row (left padding): the last position is (slots after the write - 1 - pads)."""
        if position_ids is None:
            return torch.zeros(seqlens.shape[0], dtype=torch.int32, device=self.device)
        eager = not _compiling()
        if eager and not self.leads:
            starts = self.starts_memo.get(position_ids, q_len, seqlens.shape[0])
            if starts is not None:
                return starts
        last = position_ids[:, -1].to(self.device)
        starts = (seqlens + (q_len - 1) - last).clamp_(min=0).to(torch.int32)
        if eager:
            return self.starts_memo.put(position_ids, q_len, starts)
        if self.leads:  # compiled: replayed after the graph, so eager layers after this one recompute
            self.starts_memo.clear()
        return starts

    def attend(self, q, k, v, position_ids, softmax_scale: float) -> torch.Tensor:
        """Fused write + attention for `q [B, L, nheads, D]`, `k, v [B, L, nheads_k, D]`; advances the lengths."""
        batch, q_len = q.shape[:2]
        self.check_states(k, batch)
        if self.fresh:  # read-only on the decode path: nothing for torch.compile to replay after each step
            self.fresh = False
        seqlens = self.cache_seqlens[:batch]
        if not _compiling() and (self.device.type == "cpu" or q_len > 1):
            longest = int(seqlens.max()) + q_len  # a host read, but never on the CUDA decode path
            if longest > self.config.max_cache_len:
                raise ValueError(f"{longest} tokens would exceed the PlugCache's max_cache_len="
                                 f"{self.config.max_cache_len}; build it larger or call cache.reset()")
        starts = self.row_starts(position_ids, seqlens, q_len)
        out = ops.attend_with_kvcache(q, k, v, self.k_cache, self.v_cache, self.k_scale, self.v_scale,
                                      self.block_table, self.cache_seqlens, starts, softmax_scale, self.window,
                                      backend=self.backend)
        seqlens.add_(q_len)
        return out


class PlugCache(Cache):
    """A drop-in `transformers.Cache` with preallocated paged K/V buffers, optionally INT8, for patched models.

    Args:
        model_or_config: the model to generate with (buffers follow each layer's device and the model's dtype), or
            its `PretrainedConfig` (then `dtype=` and `device=` are required).
        max_batch_size: rows the cache holds; with beam search or `num_return_sequences` count the expanded batch.
        max_cache_len: tokens per row (prompt + generated); rounded up to a whole number of blocks internally.
        kv_dtype: None (store K/V in the model dtype) or "int8" (per token and head scales, no calibration).
        dtype, device: required with a config; `device` may be a list with one device per layer.
        block_size: tokens per paged block.
        backend: "auto" (Triton kernels on CUDA, the PyTorch reference elsewhere), "triton" or "reference".

    Buffers are allocated once here and never re-assigned: `reset()`, `crop()` and `reorder_cache()` work in place,
    so their addresses stay fixed for torch.compile / CUDA graphs.
    """

    def __init__(self, model_or_config, max_batch_size: int = 4, max_cache_len: int = 2048, kv_dtype: str | None = None,
                 *, dtype: torch.dtype | None = None, device=None, block_size: int = 64, backend: str = "auto"):
        if hasattr(model_or_config, "config") and hasattr(model_or_config, "parameters"):
            model = model_or_config
            dtype = dtype or model.dtype
            device = device if device is not None else _layer_devices(model)
            hf_config = model.config
        else:
            hf_config = model_or_config
            if dtype is None or device is None:
                raise ValueError("PlugCache(config, ...) needs dtype= and device= (or pass the model instead)")
        self.config = PlugConfig.from_hf_config(hf_config, max_batch_size=max_batch_size, max_cache_len=max_cache_len,
                                                dtype=dtype, device=device, kv_dtype=kv_dtype, block_size=block_size)
        cfg = self.config
        # One block table per device; this release gives row b the fixed run of blocks b*max_blocks ... (b+1)*max_blocks-1.
        tables = {}
        for dev in cfg.layer_devices:
            if dev not in tables:
                table = torch.arange(cfg.num_blocks, dtype=torch.int32, device=dev).view(cfg.max_batch_size, -1)
                _mark_static(table)
                tables[dev] = table
        memos = {dev: StartsMemo() for dev in tables}
        layers = [PlugLayer(cfg, i, tables[dev], backend, memos[dev], leads=cfg.layer_devices.index(dev) == i)
                  for i, dev in enumerate(cfg.layer_devices)]
        super().__init__(layers=layers)

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
        """Bytes held by all K/V buffers and scales."""
        return sum(t.numel() * t.element_size() for layer in self.layers
                   for t in (layer.k_cache, layer.v_cache, layer.k_scale, layer.v_scale))

    def bytes_per_token(self) -> int:
        """Bytes one cached token costs over all layers (K, V and INT8 scales)."""
        return self.config.bytes_per_token()

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.config.max_cache_len

    def get_max_cache_shape(self, layer_idx: int | None = None) -> int:
        return self.config.max_cache_len

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row b becomes a copy of row beam_idx[b] in every layer, copying only the blocks in use (one
        host read of the lengths per call, not per layer: all layers hold the same number of tokens)."""
        used = self.layers[0].used_blocks(beam_idx.numel()) if self.layers else 0
        for layer in self.layers:
            layer.reorder_cache(beam_idx, used)

    def get_query_offset(self, layer_idx: int = 0):
        return 0  # pairs with get_mask_sizes: HF's mask stays q x q and is ignored by the plugged forward

    def get_seq_length(self, layer_idx: int = 0):
        return self.layers[layer_idx].get_seq_length()

    def layer(self, layer_idx: int) -> PlugLayer:
        if layer_idx >= len(self.layers):
            raise ValueError(f"PlugCache has {len(self.layers)} layers but the model called layer {layer_idx}: "
                             "it was built for another model")
        return self.layers[layer_idx]

    def attend(self, layer_idx: int, q, k, v, position_ids, softmax_scale: float) -> torch.Tensor:
        """Write this step's K/V of layer `layer_idx` and attend; q `[B, L, nheads, D]`, k/v `[B, L, nheads_k, D]`."""
        return self.layer(layer_idx).attend(q, k, v, position_ids, softmax_scale)

    def check_model(self, model) -> None:
        """Raise a ValueError naming every difference between this cache and `model` (layers, heads, dtype, device)."""
        expected = PlugConfig.from_hf_config(model.config, max_batch_size=self.max_batch_size,
                                             max_cache_len=self.max_cache_len, dtype=model.dtype,
                                             device=_layer_devices(model), kv_dtype=self.kv_dtype,
                                             block_size=self.config.block_size)
        diffs = [f"{name}: cache {getattr(self.config, name)} vs model {getattr(expected, name)}"
                 for name in ("num_layers", "nheads", "nheads_k", "head_dim", "dtype", "layer_devices", "layer_windows")
                 if getattr(self.config, name) != getattr(expected, name)]
        if diffs:
            raise ValueError("This PlugCache was built for another model (" + "; ".join(diffs)
                             + "). Build one with hf_kvplug.PlugCache(model, ...).")


def _layer_devices(model) -> list[torch.device]:
    """Device of each decoder layer's attention weights (follows `device_map`)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")
    devices = []
    for layer in layers:
        weight = layer.self_attn.k_proj.weight
        if weight.device.type == "meta":
            raise ValueError("layer weights are on the meta device (offloaded?); PlugCache needs them on a real device")
        devices.append(weight.device)
    return devices
