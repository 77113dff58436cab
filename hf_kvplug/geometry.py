"""What a model is, as a PlugCache sees it on this process: heads, head_dim, dtype, and per layer its kind, window and
device. Built once from a model or a transformers config; sizes (rows, tokens, formats) are `config.PlugConfig`'s."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import compat
from .families import family_of

LAYER_KINDS = ("attention", "linear", "remote")


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
        real = tuple(i for i, layer in enumerate(_decoder_layers(model)) if any(True for _ in layer.parameters()))
        if not real:
            raise ValueError("this pipeline stage runs no decoder layer (more pipeline stages than layers?)")
        return cls(tp, real if len(real) < len(_decoder_layers(model)) else None)


@dataclass(frozen=True)
class Geometry:
    """A model's attention as this process runs it.

    `nheads` / `nheads_k` are this rank's heads (`tp_size` splits them; `from_hf_config` is the one place that
    derives them). Per layer: `layer_devices[i]` is where its weights (so its cache buffers) live, `layer_windows[i]`
    its sliding window as transformers' masks apply it (None: full attention), `layer_kinds[i]` is "attention"
    (paged K/V), "linear" (a hybrid model's linear-attention layer: its state stays in transformers' own cache layer)
    or "remote" (a layer another pipeline stage runs). `linear_state_bytes`: per row, the linear-attention layers'
    state together.
    """

    num_layers: int
    nheads: int
    nheads_k: int
    head_dim: int
    dtype: torch.dtype
    layer_devices: list[torch.device]
    layer_windows: list[int | None] = field(default_factory=list)
    layer_kinds: list[str] = field(default_factory=list)
    model_type: str | None = None
    tp_size: int = 1
    linear_state_bytes: int = 0

    def __post_init__(self):
        if self.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"dtype must be float16, bfloat16 or float32, got {self.dtype}")
        for name in ("num_layers", "nheads", "nheads_k", "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.nheads % self.nheads_k:
            raise ValueError(f"nheads ({self.nheads}) must be a multiple of nheads_k ({self.nheads_k})")
        if len(self.layer_devices) != self.num_layers:
            raise ValueError(f"layer_devices has {len(self.layer_devices)} entries for {self.num_layers} layers")
        kinds = list(self.layer_kinds) or ["attention"] * self.num_layers
        if len(kinds) != self.num_layers or set(kinds) - set(LAYER_KINDS):
            raise ValueError(f"layer_kinds must hold one of {LAYER_KINDS} per layer, got {kinds}")
        if "attention" not in kinds:
            raise ValueError("no attention layer to cache here (this pipeline stage runs only other kinds?)")
        object.__setattr__(self, "layer_kinds", kinds)
        object.__setattr__(self, "layer_windows", list(self.layer_windows) or [None] * self.num_layers)
        object.__setattr__(self, "layer_devices", [_indexed(torch.device(d)) for d in self.layer_devices])

    @property
    def attention_layers(self) -> list[int]:
        """Indices of the layers with paged K/V (all but linear-attention and remote layers)."""
        return [i for i, kind in enumerate(self.layer_kinds) if kind == "attention"]

    def diff(self, other: "Geometry") -> list[str]:
        """`name: self vs other` for every field in which `other` differs."""
        return [f"{name}: {getattr(self, name)} vs {getattr(other, name)}" for name in self.__dataclass_fields__
                if getattr(self, name) != getattr(other, name)]

    @classmethod
    def from_model(cls, model, layout: RankLayout | None = None, *, dtype: torch.dtype | None = None,
                   device=None) -> "Geometry":
        """From a loaded model: its config, dtype, each layer's device (`device_map` splits work) and the layout this
        rank runs (read from the model unless given), checked against the first attention layer's k_proj. `dtype`,
        `device` (one, or one per layer) override the model's."""
        layout = layout or RankLayout.from_model(model)
        device = device if device is not None else _layer_devices(model, layout)
        geometry = cls.from_hf_config(model.config, dtype=dtype or model.dtype, device=device, layout=layout,
                                      tp_plan=getattr(model, "tp_plan", None))
        geometry._check_local_heads(model)
        return geometry

    @classmethod
    def from_hf_config(cls, config, *, dtype: torch.dtype, device, layout: RankLayout | None = None,
                       tp_plan: dict | None = None) -> "Geometry":
        """From a transformers config, for the rank `layout` describes (default: one process); `device` is one device
        or a list with one per layer (None for layers another pipeline stage runs); `tp_plan` is the model's
        (`model.tp_plan`; None: transformers' default plan, q/k/v split by heads)."""
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
        return cls(num_layers=num_layers, nheads=nheads, nheads_k=nheads_k, head_dim=head_dim, dtype=dtype,
                   layer_devices=[d if d is not None else here for d in devices], layer_windows=layer_windows(config),
                   layer_kinds=kinds, model_type=getattr(config, "model_type", None), tp_size=tp,
                   linear_state_bytes=kinds.count("linear") * linear_state_bytes(config, dtype))

    def _check_local_heads(self, model) -> None:
        """The module weights are the truth: the first attention layer this rank runs must hold the K/V heads the
        geometry says (tensor parallelism splits k_proj)."""
        i = self.attention_layers[0]
        weight = _decoder_layers(model)[i].self_attn.k_proj.weight
        rows = compat.local_shape(weight)[0]
        if rows != self.nheads_k * self.head_dim:
            raise ValueError(f"layer {i}'s k_proj holds {rows} output rows on this process; the cache expected "
                             f"{self.nheads_k} KV heads x head_dim {self.head_dim} (tensor-parallel size "
                             f"{self.tp_size}): pass the model as loaded, or layout= with its tp_size")


def layer_kinds(config) -> list[str]:
    """'linear' for a hybrid model's linear-attention layers (`layer_types`), 'attention' for the others."""
    types = getattr(config, "layer_types", None) or [None] * config.num_hidden_layers
    return ["linear" if t == "linear_attention" else "attention" for t in types]


def layer_windows(config) -> list[int | None]:
    """Per-layer sliding window as HF's masks apply it (None = full attention or a linear-attention layer)."""
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


def _indexed(device: torch.device) -> torch.device:
    """'cuda' -> 'cuda:<current>', so it compares equal to the device tensors report."""
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _decoder_layers(model):
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")
    return layers


def _layer_devices(model, layout: RankLayout) -> list[torch.device | None]:
    """Device of each decoder layer's attention weights (follows `device_map`); None for the layers another
    pipeline stage runs."""
    devices = []
    for i, layer in enumerate(_decoder_layers(model)):
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
