"""`hf-kvplug plan`: the memory a PlugCache needs for a model shape, without loading weights (pure arithmetic).

Per KV format (the model dtype, INT8, INT4): bytes per cached token over the attention layers (K, V, scales), the
total for batch x context and what a PlugCache allocates by default (rows in whole blocks), the linear-attention
state of hybrid models, and how many tokens fit in the device's free memory beside the weights. Per rank under
tensor / pipeline parallelism (`--tp`, `--pp`: heads split over tp, layers over pp; the largest stage is shown), and
with `--share N --prompt P`, what groups of N rows expanded from one P-token prompt (beams, return sequences) hold
when they store it once; with `--prefix-cache TOKENS`, what a prefix-caching index of that many tokens takes beside
the batch. Last, the bytes per token and layer of each kind of attention at the model's dimensions: multi-head,
grouped-query (the model's own), multi-query, and DeepSeek's multi-head latent attention (MLA), whose cache holds a
`kv_lora_rank` latent and a `qk_rope_head_dim` rotary key per token and layer (the DeepSeek-V2 / V3 shapes are known:
their own figures are that latent; hf_kvplug holds no MLA model, so for them this is arithmetic only).
"""

from __future__ import annotations

import argparse
import math

import torch

from . import models as bm
from . import shapes
from .bench import parse_sizes
from ..config import KV_DTYPES, PlugConfig, RankLayout

FORMATS = [kv or "fp" for kv in KV_DTYPES]  # column keys: "fp", "int8", "int4"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="llama3-8b",
                   help=f"a known shape ({', '.join(shapes.SHAPES)}) or a local checkpoint dir (config only)")
    p.add_argument("--batch", type=int, default=1, help="rows (default 1)")
    p.add_argument("--context", type=lambda s: parse_sizes(s)[0], default=4096,
                   help="tokens per row, prompt + new (k = 1024; default 4k)")
    p.add_argument("--device", default="auto", help="whose free memory to plan for: auto | cpu | cuda | cuda:N")
    p.add_argument("--weights-dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
                   help="dtype of the weights and of the model-dtype cache (default bf16)")
    p.add_argument("--block-size", type=int, default=64, help="PlugCache block size (default 64)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks: heads split over them (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages: layers split over them (default 1)")
    p.add_argument("--share", type=int, default=1,
                   help="rows expanded from each prompt (num_return_sequences or beams; default 1: no sharing)")
    p.add_argument("--prompt", type=lambda s: parse_sizes(s)[0], default=0,
                   help="prompt tokens the --share rows have in common (default 0)")
    p.add_argument("--prefix-cache", type=lambda s: parse_sizes(s)[0], default=0,
                   help="tokens a prefix-caching index keeps beside the batch (PlugCache(prefix_caching=True); "
                        "default 0)")
    p.add_argument("--window-slack", type=int, default=None,
                   help="slots a sliding-window ring holds past its window (PlugCache's window_slack; default "
                        "min(window, 256))")


def _rank_layout(config, tp: int, pp: int) -> RankLayout:
    n = (getattr(config, "text_config", None) or config).num_hidden_layers
    if pp > n:
        raise SystemExit(f"error: --pp {pp} exceeds the model's {n} layers")
    first = -(-n // pp)  # the largest stage
    return RankLayout(tp, tuple(range(first)) if pp > 1 else None)


def token_bytes(values: int, fmt: str, dtype: torch.dtype) -> int:
    """Bytes of one cached vector of `values` numbers in format `fmt`: the model dtype; INT8 with an fp32 scale;
    INT4 with an fp16 scale and minimum per half (hf_kvplug's formats)."""
    return {"int8": values + 4, "int4": values // 2 + 8}.get(fmt, values * shapes.dtype_bytes(dtype))


def attention_kinds(config, dtype: torch.dtype) -> dict[str, tuple[str, int]]:
    """Per token and layer, in the model dtype: (what is cached, bytes) for multi-head, grouped-query, multi-query and
    multi-head latent attention at `config`'s dimensions (MLA: the model's own latent, else DeepSeek-V3's 512 + 64)."""
    text = getattr(config, "text_config", None) or config
    b = shapes.dtype_bytes(dtype)
    heads = text.num_attention_heads
    rank, rope = getattr(text, "kv_lora_rank", None), getattr(text, "qk_rope_head_dim", None)
    if rank:  # an MLA model: its heads' K (nope + rope) and V, expanded, are what MHA would cache
        k, v = text.qk_nope_head_dim + rope, text.v_head_dim
        return {"MHA": (f"{heads} heads x (K {k} + V {v})", heads * (k + v) * b),
                "MLA": (f"latent {rank} + rope {rope} (this model)", (rank + rope) * b)}
    d = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    return {"MHA": (f"{heads} heads x K, V {d}", 2 * heads * d * b),
            "GQA": (f"{kv} KV heads x K, V {d} (this model)" if kv not in (1, heads) else "-",
                    2 * kv * d * b if kv not in (1, heads) else 0),
            "MQA": (f"1 KV head x K, V {d}", 2 * d * b),
            "MLA": ("latent 512 + rope 64 (DeepSeek-V3's)", (512 + 64) * b)}


def _mla_numbers(config, batch, context, dtype, block_size, layout, tp, pp) -> tuple[dict, int]:
    """An MLA model's cache as vLLM and SGLang hold it (the latent and the rotary key per token and layer, shared by
    every head, so not split over tensor-parallel ranks), in each format: {fmt: bytes per token}, layers."""
    text = getattr(config, "text_config", None) or config
    layers = len(layout.layers) if layout.layers else text.num_hidden_layers
    values = text.kv_lora_rank + text.qk_rope_head_dim
    return {fmt: layers * token_bytes(values, fmt, dtype) for fmt in FORMATS}, layers


def plan_numbers(config, batch: int, context: int, dtype: torch.dtype, block_size: int, free: int | None, *,
                 tp: int = 1, pp: int = 1, share: int = 1, prompt: int = 0, window_slack: int | None = None,
                 prefix_cache: int = 0) -> dict:
    """Bytes per token, totals, weights and fitting tokens for one config, per rank (keys `<what>_<format>`)."""
    layout = _rank_layout(config, tp, pp)
    params, _ = shapes.param_count(config)
    weights = params * shapes.dtype_bytes(dtype) // (tp * pp)  # an even share: embeddings and heads are close enough
    blocks_row = math.ceil(context / block_size)
    text = getattr(config, "text_config", None) or config
    if getattr(text, "kv_lora_rank", None):  # MLA: arithmetic only
        mla, layers = _mla_numbers(config, batch, context, dtype, block_size, layout, tp, pp)
        per = {fmt: _Flat(bpt, layers, text) for fmt, bpt in mla.items()}
    else:
        per = {fmt: PlugConfig.from_hf_config(config, max_batch_size=batch, max_cache_len=context, dtype=dtype,
                                              device="cpu", kv_dtype=None if fmt == "fp" else fmt,
                                              block_size=block_size, layout=layout, window_slack=window_slack)
               for fmt in FORMATS}
    out = dict(params=params, weights=weights, free=free, alloc_tokens=batch * blocks_row * block_size,
               linear_state=batch * per["fp"].linear_state_bytes, tp=tp, pp=pp,
               mla=getattr(text, "kv_lora_rank", None) is not None, kinds=attention_kinds(config, dtype),
               prefix_tokens=math.ceil(prefix_cache / block_size) * block_size)
    if share > 1:  # shared prompts: its full blocks once per group, the rest (and a copy of a partial block) per row
        groups, full = math.ceil(batch / share), prompt // block_size
        out["shared_tokens"] = (groups * full + batch * (blocks_row - full)) * block_size
    for fmt, cfg in per.items():
        bpt = cfg.bytes_per_token()  # the layers that keep every token; sliding-window rings are a fixed cost
        ring = batch * cfg.ring_bytes_per_row
        tail = batch * cfg.tail_bytes_per_row  # int4's exact tails: a block per row and layer, model dtype
        fixed = out["linear_state"] + ring + tail
        out[f"bpt_{fmt}"] = bpt
        out[f"ring_{fmt}"] = ring
        out[f"tail_{fmt}"] = tail
        out[f"total_{fmt}"] = batch * context * bpt + ring + tail
        out[f"alloc_{fmt}"] = out["alloc_tokens"] * bpt + fixed
        out[f"prefix_{fmt}"] = out["prefix_tokens"] * bpt
        if share > 1:
            out[f"shared_{fmt}"] = out["shared_tokens"] * bpt + fixed
        room = None if free is None else max(0, free - weights - fixed - out[f"prefix_{fmt}"])
        # tokens that fit: unbounded (None) where every layer keeps only its window
        out[f"fit_{fmt}"] = None if room is None or bpt == 0 else room // bpt
        out[f"fits_any_{fmt}"] = room is not None and bpt == 0 and free - weights - fixed >= 0
    cfg = per["fp"]
    windowed = [w for w, r in zip(cfg.layer_windows, cfg.layer_rings) if r]
    out.update(layers=len(cfg.attention_layers), all_layers=cfg.num_layers, nheads_k=cfg.nheads_k,
               head_dim=cfg.head_dim, nheads=cfg.nheads, window_layers=len(windowed),
               ring_slots=max((r for r in cfg.layer_rings if r), default=0) * block_size,
               windows=sorted(set(windowed)))
    return out


class _Flat:
    """What `plan_numbers` reads of a PlugConfig, for an MLA model's latent cache (every layer keeps every token)."""

    def __init__(self, bpt: int, layers: int, text):
        self._bpt, self.num_layers = bpt, text.num_hidden_layers
        self.attention_layers = list(range(layers))
        self.nheads, self.nheads_k = text.num_attention_heads, 1
        self.head_dim = text.kv_lora_rank + text.qk_rope_head_dim
        self.linear_state_bytes, self.ring_bytes_per_row, self.tail_bytes_per_row = 0, 0, 0
        self.layer_windows, self.layer_rings = [None] * layers, [None] * layers

    def bytes_per_token(self) -> int:
        return self._bpt


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def run(args) -> int:
    if args.window_slack is not None and args.window_slack <= 0:
        raise SystemExit(f"error: --window-slack must be positive, got {args.window_slack}")
    if min(args.batch, args.context, args.tp, args.pp, args.share) <= 0 or args.prompt < 0:
        raise SystemExit("error: --batch, --context, --tp, --pp and --share must be positive")
    config = shapes.load_config(args.model)
    device = bm.resolve_device(args.device)
    dtype = bm.DTYPES[args.weights_dtype]
    free = bm.free_memory_bytes(device)
    try:
        n = plan_numbers(config, args.batch, args.context, dtype, args.block_size, free, tp=args.tp, pp=args.pp,
                         share=args.share, prompt=min(args.prompt, args.context), window_slack=args.window_slack,
                         prefix_cache=args.prefix_cache)
    except ValueError as e:  # heads that do not split over --tp
        raise SystemExit(f"error: {e}") from None
    fp = bm.dtype_name(dtype)
    params = f"{n['params'] / 1e9:.2f} B" if n["params"] >= 1e9 else f"{n['params'] / 1e6:.2f} M"
    rank = f" (per rank: tp {n['tp']}, pp {n['pp']}, the largest stage)" if n["tp"] * n["pp"] > 1 else ""
    layers = (f"{n['layers']} attention layers of {n['all_layers']}" if n["layers"] != n["all_layers"]
              else f"{n['layers']} layers")
    if n["mla"]:
        print(f"model {args.model}: {layers}, {n['nheads']} heads, multi-head latent attention: a latent of "
              f"{n['head_dim']} values (kv_lora_rank + rope) per token and layer{rank}, {params} parameters\n"
              "(hf_kvplug holds no MLA model: the figures are arithmetic, the latent as vLLM and SGLang cache it, in "
              "the model dtype or quantized as hf_kvplug quantizes K)")
    else:
        print(f"model {args.model}: {layers}, {n['nheads']} query / {n['nheads_k']} KV heads x head_dim "
              f"{n['head_dim']}{rank}, {params} parameters")
    print(f"batch {args.batch} x context {args.context} tokens (a PlugCache allocates rows in {args.block_size}-token "
          f"blocks: {n['alloc_tokens']} slots)\n")
    w, c = 34, 18
    names = [fp + " cache"] + [f"{f} cache" for f in FORMATS[1:]]

    def row(label, values):
        print(f"{label:<{w}}" + "".join(f"{v:>{c}}" for v in values))

    if n["window_layers"]:
        print(f"{n['window_layers']} sliding-window layers (window {', '.join(map(str, n['windows']))}) keep a ring of "
              f"{n['ring_slots']} slots per row, whatever the context; the bytes per token count the other layers\n")
    row("", names)
    row("KV bytes / token", [f"{n['bpt_' + f]:,}" for f in FORMATS])
    row("  (K, V, scales)", [f"{n['bpt_' + f] / 1024:.1f} KiB" for f in FORMATS])
    if n["window_layers"]:
        row("sliding-window rings (batch)", [_gb(n["ring_" + f]) for f in FORMATS])
    if any(n["tail_" + f] for f in FORMATS):
        row("exact tails (a block per row)", [_gb(n["tail_" + f]) for f in FORMATS])
    row("KV total (batch x context)", [_gb(n["total_" + f]) for f in FORMATS])
    if n["linear_state"]:
        row("linear-attention state (batch)", [_gb(n["linear_state"])] * len(FORMATS))
    row("allocated by PlugCache", [_gb(n["alloc_" + f]) for f in FORMATS])
    if "shared_tokens" in n:
        row(f"  rows sharing {args.share} x {args.prompt}-token prompts", [_gb(n["shared_" + f]) for f in FORMATS])
    if n["prefix_tokens"]:
        row(f"prefix index ({n['prefix_tokens']} tokens)", [_gb(n["prefix_" + f]) for f in FORMATS])
    row(f"weights ({fp})", [_gb(n["weights"])])
    where = f"free memory ({device})"
    if free is None:
        row(where, ["n/a"])
        row("tokens that fit", ["n/a"] * len(FORMATS))
        _print_kinds(n, fp)
        return 0
    source = "torch.cuda.mem_get_info" if device.type == "cuda" else "/proc/meminfo MemAvailable"
    print(f"{where:<{w}}{_gb(free):>{c}}   ({source})")
    def fit(f, per_row=1):
        if n["fit_" + f] is None:
            return "any (windows)" if n["fits_any_" + f] else "0"
        return f"{n['fit_' + f] // per_row:,}"

    row("tokens that fit after weights", [fit(f) for f in FORMATS])
    row(f"  per row at batch {args.batch}", [fit(f, args.batch) for f in FORMATS])
    need = "shared" if "shared_tokens" in n else "alloc"
    beside = " + the prefix index" if n["prefix_tokens"] else ""
    row(f"this batch x context{beside}", ["fits" if n[f"{need}_{f}"] + n[f"prefix_{f}"] + n["weights"] <= free
                                          else "does NOT fit" for f in FORMATS])
    print("\n(activations, the CUDA context and allocator slack also need memory: keep a margin)")
    _print_kinds(n, fp)
    return 0


def _print_kinds(n: dict, fp: str) -> None:
    print(f"\nKV bytes per token and layer by kind of attention at this model's dimensions ({fp}):")
    for kind, (what, size) in n["kinds"].items():
        if size:
            print(f"  {kind:<5}{what:<44}{size:>10,}")
