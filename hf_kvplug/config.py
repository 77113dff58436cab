"""Cache sizing: the one dataclass that says what a PlugCache holds, for a model `Geometry` (what the model is)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .geometry import Geometry, RankLayout
from .rotation import VERSION as ROTATION

__all__ = ["DEFAULT_WINDOW_SLACK", "KV_DTYPES", "PlugConfig", "RankLayout"]

KV_DTYPES = (None, "int8", "int4")
DEFAULT_WINDOW_SLACK = 256  # tokens a sliding-window ring holds past its window, at most (see layer_rings)


def _read_through(name: str):
    return property(lambda self: getattr(self.geometry, name), doc=f"`geometry.{name}`")


@dataclass
class PlugConfig:
    """What a PlugCache holds for a model `geometry`: `max_batch_size` rows of up to `max_cache_len` tokens in
    blocks of `block_size` (a pool of `max_tokens` slots, all rows together; None: the rectangle), K/V in
    `kv_dtype` (None: the model dtype), keys rotated before quantizing when `rotate_keys` (None: whenever quantized;
    see `hf_kvplug.rotation`), and each row's last, partial block also kept unquantized when `exact_tail` (None: for
    int4; `reference`, rule 4). With `trim_windows` (the default) a sliding-window layer keeps a ring of
    `layer_rings[i]` blocks per row, its window and `window_slack` more slots, instead of `max_cache_len` (see
    `layer_rings`). The geometry's fields read through (`config.nheads_k` is `config.geometry.nheads_k`).
    """

    geometry: Geometry
    max_batch_size: int
    max_cache_len: int
    kv_dtype: str | None = None
    block_size: int = 64
    max_tokens: int | None = None  # the block pool's size in tokens (all rows); None: max_batch_size x max_cache_len
    trim_windows: bool = True
    window_slack: int | None = None  # ring slots past a window's own; None: min(window, DEFAULT_WINDOW_SLACK)
    prefix_caching: bool = False  # keep full blocks of finished requests for later ones (`blocks.PrefixIndex`)
    rotate_keys: bool | None = None  # store k R, attend with q R (`hf_kvplug.rotation`); None: when kv_dtype is set
    exact_tail: bool | None = None  # each row's partial block unquantized too (`layers.Tail`); None: for int4

    num_layers = _read_through("num_layers")
    nheads = _read_through("nheads")
    nheads_k = _read_through("nheads_k")
    head_dim = _read_through("head_dim")
    dtype = _read_through("dtype")
    layer_devices = _read_through("layer_devices")
    layer_windows = _read_through("layer_windows")
    layer_kinds = _read_through("layer_kinds")
    model_type = _read_through("model_type")
    tp_size = _read_through("tp_size")
    linear_state_bytes = _read_through("linear_state_bytes")
    attention_layers = _read_through("attention_layers")

    def __post_init__(self):
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {self.kv_dtype!r}")
        for name in ("max_batch_size", "max_cache_len", "block_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.window_slack is not None and int(self.window_slack) <= 0:
            raise ValueError(f"window_slack must be positive (or None), got {self.window_slack}")
        if self.max_tokens is not None and int(self.max_tokens) <= 0:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}")
        if self.exact_tail is None:
            self.exact_tail = self.kv_dtype == "int4"
        self.exact_tail = bool(self.exact_tail)
        if self.exact_tail and self.kv_dtype != "int4":
            raise ValueError(f"exact_tail=True keeps an int4 cache's partial blocks unquantized; kv_dtype is "
                             f"{self.kv_dtype!r} (the kernels read a tail beside int4 codes only)")
        if self.kv_dtype == "int4" and self.head_dim % 2:
            raise ValueError(f"kv_dtype='int4' packs two values a byte: head_dim must be even, got {self.head_dim}")
        if self.prefix_caching and ("linear" in self.layer_kinds or any(self.layer_rings)):
            raise ValueError(
                "prefix_caching=True needs every layer's state at a block boundary to come from the cached blocks "
                "alone: " + ("this hybrid model's linear-attention layers keep a recurrent state of the whole "
                             "prefix, which the block index does not hold" if "linear" in self.layer_kinds else
                             "its sliding-window layers keep rings that overwrite a prompt's early blocks; pass "
                             "trim_windows=False to keep every token (then they reuse as full attention does)"))

    @property
    def key_rotation(self) -> str | None:
        """The rotation the stored keys carry (`rotation.VERSION`), or None for none."""
        on = self.kv_dtype is not None if self.rotate_keys is None else bool(self.rotate_keys)
        return ROTATION if on else None

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

    def bytes_per_token(self, layer_count: int | None = None) -> int:
        """Bytes one more cached token costs over `layer_count` layers (by default the attention layers that keep
        up to max_cache_len: a sliding-window layer's ring is a fixed cost, `ring_bytes_per_row`), K, V and scales
        together."""
        layers = len(self.groups.get(None, [])) if layer_count is None else layer_count
        return layers * self.layer_token_bytes

    @property
    def layer_token_bytes(self) -> int:
        """Bytes of one token in one layer: K, V and scales of every KV head."""
        return layer_token_bytes(self.geometry, self.kv_dtype)

    @property
    def tail_bytes_per_row(self) -> int:
        """Bytes the exact tails hold per row (K and V of one block in the model dtype, every attention layer)."""
        if not self.exact_tail:
            return 0
        size = torch.empty((), dtype=self.dtype).element_size()
        return len(self.attention_layers) * 2 * self.nheads_k * self.block_size * self.head_dim * size

    @property
    def ring_bytes_per_row(self) -> int:
        """Bytes the sliding-window layers' rings hold per row, whatever the row's length."""
        return sum(ring * self.block_size * self.layer_token_bytes for ring in self.layer_rings if ring)

    @classmethod
    def from_hf_config(cls, config, *, max_batch_size, max_cache_len, dtype, device, kv_dtype=None, block_size=64,
                       max_tokens=None, layout: RankLayout | None = None, tp_plan: dict | None = None,
                       trim_windows: bool = True, window_slack: int | None = None,
                       rotate_keys: bool | None = None, exact_tail: bool | None = None) -> "PlugConfig":
        """Sizes for the geometry of a transformers config (`Geometry.from_hf_config`: `dtype`, `device`, `layout`,
        `tp_plan`)."""
        geometry = Geometry.from_hf_config(config, dtype=dtype, device=device, layout=layout, tp_plan=tp_plan)
        return cls(geometry, max_batch_size=max_batch_size, max_cache_len=max_cache_len, kv_dtype=kv_dtype,
                   block_size=block_size, max_tokens=max_tokens, trim_windows=trim_windows, window_slack=window_slack,
                   rotate_keys=rotate_keys, exact_tail=exact_tail)


def layer_token_bytes(geometry: Geometry, kv_dtype: str | None) -> int:
    """Bytes of one token in one layer of `geometry` stored as `kv_dtype`: K, V and scales of every KV head."""
    d = geometry.head_dim
    per_head = {"int8": 2 * (d + 4), "int4": 2 * (d // 2 + 4 * 2)}.get(
        kv_dtype, 2 * d * torch.empty((), dtype=geometry.dtype).element_size())
    return geometry.nheads_k * per_head
