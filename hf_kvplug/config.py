"""Cache geometry: the one dataclass that says what a PlugCache holds and where."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

KV_DTYPES = (None, "int8", "int4")


@dataclass(frozen=True)
class RankLayout:
    """What one process of a distributed model holds: heads split over `tp_size` ranks (transformers' tensor
    parallelism) and the decoder layers `layers` it runs (global indices; pipeline parallelism; None: all)."""

    tp_size: int = 1
    layers: tuple[int, ...] | None = None

    def runs(self, i: int) -> bool:
        return self.layers is None or i in self.layers

    @classmethod
    def from_model(cls, model) -> "RankLayout":
        """From a loaded model: `model._tp_size` (set by transformers when TP is on) and which decoder layers are real
        (transformers replaces the others with `PipelineIdentityLayer`s under PP; its split rule changed in 5.24, so
        it is read, never recomputed)."""
        tp = int(getattr(model, "_tp_size", None) or 1)
        layers = model.get_decoder().layers if hasattr(model, "get_decoder") else model.layers
        real = tuple(i for i, layer in enumerate(layers) if any(True for _ in layer.parameters()))
        if not real:
            raise ValueError("this pipeline stage runs no decoder layer (more pipeline stages than layers?)")
        return cls(tp, real if len(real) < len(layers) else None)


DEFAULT_WINDOW_SLACK = 256  # tokens a sliding-window ring holds past its window, at most (see layer_rings)


@dataclass
class PlugConfig:
    """Shape, dtype and placement of a PlugCache.

    Built by `PlugConfig.from_model` / `PlugConfig.from_hf_config`; users normally pass a model to `PlugCache`.
    `layer_devices[i]` is where layer i's buffers live (so `device_map` splits work), `layer_windows[i]` is the
    sliding window of layer i (None for full attention), `layer_kinds[i]` is "attention" (paged K/V here),
    "linear" (a linear-attention layer of a hybrid model: its state stays in transformers' own cache layer) or
    "remote" (a layer another pipeline stage runs: nothing here). `nheads` / `nheads_k` are this rank's heads
    (`tp_size` splits them: `from_hf_config` is the one place that derives them). With `trim_windows` (the
    default) a sliding-window layer keeps a ring of `layer_rings[i]` blocks per row, its window and
    `window_slack` more slots, instead of `max_cache_len` (see `layer_rings`).
    """

    num_layers: int
    nheads: int
    nheads_k: int
    head_dim: int
    max_batch_size: int
    max_cache_len: int
    dtype: torch.dtype
    layer_devices: list[torch.device]
    layer_windows: list[int | None] = field(default_factory=list)
    kv_dtype: str | None = None
    block_size: int = 64
    model_type: str | None = None
    max_tokens: int | None = None  # the block pool's size in tokens (all rows); None: max_batch_size x max_cache_len
    layer_kinds: list[str] = field(default_factory=list)
    linear_state_bytes: int = 0  # per row, all linear-attention layers together (conv + recurrent state)
    tp_size: int = 1
    trim_windows: bool = True
    window_slack: int | None = None  # ring slots past a window's own; None: min(window, DEFAULT_WINDOW_SLACK)

    def __post_init__(self):
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {self.kv_dtype!r}")
        if self.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"dtype must be float16, bfloat16 or float32, got {self.dtype}")
        for name in ("num_layers", "nheads", "nheads_k", "head_dim", "max_batch_size", "max_cache_len", "block_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.nheads % self.nheads_k:
            raise ValueError(f"nheads ({self.nheads}) must be a multiple of nheads_k ({self.nheads_k})")
        if len(self.layer_devices) != self.num_layers:
            raise ValueError(f"layer_devices has {len(self.layer_devices)} entries for {self.num_layers} layers")
        if self.window_slack is not None and int(self.window_slack) <= 0:
            raise ValueError(f"window_slack must be positive (or None), got {self.window_slack}")
        if self.max_tokens is not None and int(self.max_tokens) <= 0:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}")
        if not self.layer_windows:
            self.layer_windows = [None] * self.num_layers
        if not self.layer_kinds:
            self.layer_kinds = ["attention"] * self.num_layers
        if len(self.layer_kinds) != self.num_layers or set(self.layer_kinds) - {"attention", "linear", "remote"}:
            raise ValueError(f"layer_kinds must hold 'attention', 'linear' or 'remote' per layer, got "
                             f"{self.layer_kinds}")
        if self.kv_dtype == "int4" and self.head_dim % 2:
            raise ValueError(f"kv_dtype='int4' packs two values a byte: head_dim must be even, got {self.head_dim}")
        if "attention" not in self.layer_kinds:
            raise ValueError("no attention layer to cache here (this pipeline stage runs only other kinds?)")
        self.layer_devices = [_indexed(torch.device(d)) for d in self.layer_devices]

    @property
    def max_blocks_per_row(self) -> int:
        return math.ceil(self.max_cache_len / self.block_size)

    @property
    def num_blocks(self) -> int:
        """Blocks in the main pool (each holds `block_size` tokens of one row in every layer that keeps
        `max_cache_len`)."""
        if self.max_tokens is None:
            return self.max_batch_size * self.max_blocks_per_row
        return math.ceil(self.max_tokens / self.block_size)

    @property
    def layer_rings(self) -> list[int | None]:
        """Per layer, the blocks per row a sliding-window layer keeps (a ring), or None where the layer keeps up to
        `max_cache_len` tokens (full attention, `trim_windows=False`, or a window so wide no ring would be smaller).
        A ring holds at least `window - 1 + slack` slots, `slack = window_slack or min(window, 256)`: the window,
        and one forward of up to `slack` new tokens (longer forwards go through it in pieces); a crop may go back
        about `slack` tokens below the most the rows held. The default keeps a ring about the size of a long window
        (4096: 4352 slots) and twice a short one."""
        rings = []
        for window, kind in zip(self.layer_windows, self.layer_kinds):
            slack = min(window, DEFAULT_WINDOW_SLACK) if window and self.window_slack is None else self.window_slack
            ring = math.ceil((window - 1 + slack) / self.block_size) if window and self.trim_windows else None
            rings.append(ring if kind == "attention" and ring is not None and ring < self.max_blocks_per_row
                         else None)
        return rings

    @property
    def groups(self) -> dict[int | None, list[int]]:
        """The attention layers by the block table they use: None (up to max_cache_len; first when present), then
        one group per ring size. Each group has its own pool and table; a block spans every layer of its group."""
        out: dict[int | None, list[int]] = {}
        rings = self.layer_rings
        for ring in [None] + sorted({r for r in rings if r is not None}):
            layers = [i for i in self.attention_layers if rings[i] == ring]
            if layers:
                out[ring] = layers
        return out

    def group_blocks(self, ring: int | None) -> int:
        """Blocks in the pool of group `ring`: `num_blocks` for the main one; for a window, a full ring per row, or
        more when `max_tokens` gives the main pool more than `max_batch_size` rows of `max_cache_len` (the rings
        grow in the same proportion: room for forks and their copies)."""
        if ring is None:
            return self.num_blocks
        return max(self.max_batch_size * ring, math.ceil(self.num_blocks * ring / self.max_blocks_per_row))

    @property
    def storage_dtype(self) -> torch.dtype:
        return {"int8": torch.int8, "int4": torch.uint8}.get(self.kv_dtype, self.dtype)

    def storage_shapes(self, ring: int | None = None) -> tuple[tuple[int, ...], tuple[int, ...], torch.dtype]:
        """(K or V buffer shape, scale buffer shape, scale dtype) of one layer of group `ring`: head_dim values a
        token and head (int8: plus an fp32 scale; int4: head_dim / 2 bytes plus a scale and minimum per half,
        fp16)."""
        base = (self.group_blocks(ring), self.nheads_k, self.block_size)
        if self.kv_dtype == "int4":
            return (*base, self.head_dim // 2), (*base, 4), torch.float16
        if self.kv_dtype == "int8":
            return (*base, self.head_dim), base, torch.float32
        return (*base, self.head_dim), (0,), torch.float32

    @property
    def attention_layers(self) -> list[int]:
        """Indices of the layers with paged K/V (all but a hybrid model's linear-attention layers)."""
        return [i for i, kind in enumerate(self.layer_kinds) if kind == "attention"]

    def bytes_per_token(self, layer_count: int | None = None) -> int:
        """Bytes one more cached token costs over `layer_count` layers (by default the attention layers that keep
        up to max_cache_len: a sliding-window layer's ring is a fixed cost, `ring_bytes_per_row`), K, V and scales
        together."""
        layers = len(self.groups.get(None, [])) if layer_count is None else layer_count
        return layers * self.layer_token_bytes

    @property
    def layer_token_bytes(self) -> int:
        """Bytes of one token in one layer: K, V and scales of every KV head."""
        per_head = {"int8": 2 * (self.head_dim + 4), "int4": 2 * (self.head_dim // 2 + 4 * 2)}.get(
            self.kv_dtype, 2 * self.head_dim * torch.empty((), dtype=self.dtype).element_size())
        return self.nheads_k * per_head

    @property
    def ring_bytes_per_row(self) -> int:
        """Bytes the sliding-window layers' rings hold per row, whatever the row's length."""
        return sum(ring * self.block_size * self.layer_token_bytes for ring in self.layer_rings if ring)

    @classmethod
    def from_hf_config(cls, config, *, max_batch_size, max_cache_len, dtype, device, kv_dtype=None, block_size=64,
                       max_tokens=None, layout: RankLayout | None = None, tp_plan: dict | None = None,
                       trim_windows: bool = True, window_slack: int | None = None):
        """Geometry from a transformers config, for the rank `layout` describes (default: one process); `device` is
        one device or a list with one per layer (None for layers another pipeline stage runs); `tp_plan` is the
        model's (`model.tp_plan`; None: transformers' default plan, q/k/v split by heads)."""
        from . import compat

        layout = layout or RankLayout()
        config = getattr(config, "text_config", None) or config
        nheads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // nheads  # from the global head count
        nheads_k = getattr(config, "num_key_value_heads", None) or nheads
        tp = layout.tp_size
        if tp > 1:
            if nheads % tp or nheads_k % tp:
                raise ValueError(
                    f"tensor parallelism over {tp} ranks needs num_attention_heads ({nheads}) and num_key_value_heads "
                    f"({nheads_k}) divisible by {tp}: transformers splits q/k/v_proj by output features, so a rank "
                    f"would hold part of a head, and its attention fails in the first forward (`view(..., -1, "
                    f"{head_dim})`: shape ... is invalid). Use a tensor-parallel size that divides "
                    f"{math.gcd(nheads, nheads_k)}.")
            local_k = compat.kv_heads_per_rank(tp_plan, nheads_k, tp)
            nheads = nheads // tp if local_k != nheads_k else nheads  # q is split with k, or neither is
            nheads_k = local_k
        num_layers = config.num_hidden_layers
        devices = list(device) if isinstance(device, (list, tuple)) else [device] * num_layers
        kinds = [kind if layout.runs(i) else "remote" for i, kind in enumerate(layer_kinds(config))]
        here = next(d for i, d in enumerate(devices) if kinds[i] != "remote" and d is not None)
        devices = [d if d is not None else here for d in devices]
        return cls(
            num_layers=num_layers,
            nheads=nheads,
            nheads_k=nheads_k,
            head_dim=head_dim,
            max_batch_size=max_batch_size,
            max_cache_len=max_cache_len,
            dtype=dtype,
            layer_devices=devices,
            layer_windows=layer_windows(config),
            kv_dtype=kv_dtype,
            block_size=block_size,
            model_type=getattr(config, "model_type", None),
            max_tokens=max_tokens,
            layer_kinds=kinds,
            linear_state_bytes=kinds.count("linear") * linear_state_bytes(config, dtype),
            tp_size=tp,
            trim_windows=trim_windows,
            window_slack=window_slack,
        )


def _indexed(device: torch.device) -> torch.device:
    """'cuda' -> 'cuda:<current>', so it compares equal to the device tensors report."""
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def layer_kinds(config) -> list[str]:
    """'linear' for a hybrid model's linear-attention layers (`layer_types`), 'attention' for the others."""
    types = getattr(config, "layer_types", None) or [None] * config.num_hidden_layers
    return ["linear" if t == "linear_attention" else "attention" for t in types]


def layer_windows(config) -> list[int | None]:
    """Per-layer sliding window as HF's masks apply it (None = full attention or a linear-attention layer)."""
    from .families import family_of

    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None) or None  # Qwen2-MoE writes 0 for "none"
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return [window if t == "sliding_attention" else None for t in layer_types]
    family = family_of(config)
    if family is not None and family.window_all_layers:
        return [window] * n
    return [None] * n


def linear_state_bytes(config, dtype: torch.dtype) -> int:
    """State one row holds in one gated-DeltaNet layer: the conv state (model dtype) and the recurrent state (fp32,
    as transformers keeps it on its PyTorch path)."""
    if "linear_attention" not in (getattr(config, "layer_types", None) or []):
        return 0
    hk, dk = config.linear_num_key_heads, config.linear_key_head_dim
    hv, dv = config.linear_num_value_heads, config.linear_value_head_dim
    conv = (2 * hk * dk + hv * dv) * config.linear_conv_kernel_dim * torch.empty((), dtype=dtype).element_size()
    return conv + hv * dk * dv * 4
