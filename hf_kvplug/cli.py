"""The `hf-kvplug` command (also `python -m hf_kvplug`): demo, plan, bench and quality subcommands."""

from __future__ import annotations

import argparse
import math
import sys

import torch

from .tools import bench, cases, demo, quality, shapes
from .tools import models as bm
from .config import PlugConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-kvplug",
        description="A paged (optionally INT8) KV cache with fused decode attention for HF generate().")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,plan,bench,quality}")
    demo.add_arguments(sub.add_parser(
        "demo", help="stock vs plugged generate on pylm, a small Llama trained on the Python stdlib (or a local "
                     "checkpoint): completions and timings",
        description=demo.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    add_plan_arguments(sub.add_parser(
        "plan", help="KV bytes per token and in total (fp16 vs INT8), weights, and how many tokens fit",
        description="Memory plan of a PlugCache for a model shape, without loading weights."))
    bench.add_arguments(sub.add_parser(
        "bench", help="sweep providers x batch x context and write CSV / JSON / markdown / PNG",
        description="Sweep providers x batch x context with generate() and write CSV / JSON / markdown / PNG.\n"
                    + (cases.__doc__ or "").split("\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter))
    quality.add_arguments(sub.add_parser(
        "quality", help="accuracy of each KV format against the model-dtype cache on held-out text: NLL, top-1, "
                        "logit error, greedy agreement; CSV / markdown / PNG",
        description=quality.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = list(argv)
    try:
        if args.command == "demo":
            return demo.run(args)
        if args.command == "plan":
            return run_plan(args)
        if args.command == "quality":
            quality.run(args)
            return 0
        bench.run(args)
    except shapes.UnknownModelError as e:
        raise SystemExit(f"error: {e}") from None
    return 0


# ------------------------------------------------------------------------------------------------ plan

def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="llama3-8b",
                   help=f"a known shape ({', '.join(shapes.SHAPES)}) or a local checkpoint dir (config only)")
    p.add_argument("--batch", type=int, default=1, help="rows (default 1)")
    p.add_argument("--context", type=lambda s: bench.parse_sizes(s)[0], default=4096,
                   help="tokens per row, prompt + new (k = 1024; default 4k)")
    p.add_argument("--device", default="auto", help="whose free memory to plan for: auto | cpu | cuda | cuda:N")
    p.add_argument("--weights-dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
                   help="dtype of the weights and of the non-INT8 cache (default bf16)")
    p.add_argument("--block-size", type=int, default=64, help="PlugCache block size (default 64)")


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def plan_numbers(config, batch: int, context: int, dtype: torch.dtype, block_size: int, free: int | None) -> dict:
    """Bytes per token, cache totals, weights and fitting tokens for one config (pure arithmetic)."""
    per = {}
    for kv in (None, "int8"):
        cfg = PlugConfig.from_hf_config(config, max_batch_size=batch, max_cache_len=context, dtype=dtype,
                                        device="cpu", kv_dtype=kv, block_size=block_size)
        per[kv] = cfg
    params, untied_emb = shapes.param_count(config)
    weights = params * shapes.dtype_bytes(dtype)
    rows_len = math.ceil(context / block_size) * block_size
    out = dict(params=params, weights=weights, free=free, alloc_tokens=batch * rows_len)
    for kv, cfg in per.items():
        key = "int8" if kv else "fp"
        bpt = cfg.bytes_per_token()
        out[f"bpt_{key}"] = bpt
        out[f"total_{key}"] = batch * context * bpt
        out[f"alloc_{key}"] = batch * rows_len * bpt
        out[f"fit_{key}"] = None if free is None else max(0, (free - weights) // bpt)
    out["layers"], out["nheads_k"], out["head_dim"], out["nheads"] = (
        per[None].num_layers, per[None].nheads_k, per[None].head_dim, per[None].nheads)
    return out


def run_plan(args) -> int:
    if args.batch <= 0 or args.context <= 0:
        raise SystemExit("error: --batch and --context must be positive")
    config = shapes.load_config(args.model)
    device = bm.resolve_device(args.device)
    dtype = bm.DTYPES[args.weights_dtype]
    free = bm.free_memory_bytes(device)
    n = plan_numbers(config, args.batch, args.context, dtype, args.block_size, free)
    fp = bm.dtype_name(dtype)
    params = f"{n['params'] / 1e9:.2f} B" if n["params"] >= 1e9 else f"{n['params'] / 1e6:.2f} M"
    print(f"model {args.model}: {n['layers']} layers, {n['nheads']} query / {n['nheads_k']} KV heads x head_dim "
          f"{n['head_dim']}, {params} parameters")
    print(f"batch {args.batch} x context {args.context} tokens (a PlugCache allocates rows in {args.block_size}-token "
          f"blocks: {n['alloc_tokens']} slots)\n")
    w = 30
    print(f"{'':<{w}}{fp + ' cache':>22}{'int8 cache':>22}")
    print(f"{'KV bytes / token':<{w}}{n['bpt_fp']:>22,}{n['bpt_int8']:>22,}")
    print(f"{'  (K, V, INT8 scales)':<{w}}{n['bpt_fp'] / 1024:>18.1f} KiB{n['bpt_int8'] / 1024:>18.1f} KiB")
    print(f"{'KV total (batch x context)':<{w}}{_gb(n['total_fp']):>22}{_gb(n['total_int8']):>22}")
    print(f"{'KV allocated by PlugCache':<{w}}{_gb(n['alloc_fp']):>22}{_gb(n['alloc_int8']):>22}")
    print(f"{'weights (' + fp + ')':<{w}}{_gb(n['weights']):>22}")
    where = f"free memory ({device})"
    if free is None:
        print(f"{where:<{w}}{'n/a':>22}")
        print(f"{'tokens that fit':<{w}}{'n/a':>22}{'n/a':>22}")
        return 0
    source = "torch.cuda.mem_get_info" if device.type == "cuda" else "/proc/meminfo MemAvailable"
    print(f"{where:<{w}}{_gb(free):>22}   ({source})")
    print(f"{'tokens that fit after weights':<{w}}{n['fit_fp']:>22,}{n['fit_int8']:>22,}")
    per_row = [f"{n[k] // args.batch:,}" for k in ("fit_fp", "fit_int8")]
    print(f"{'  per row at batch ' + str(args.batch):<{w}}{per_row[0]:>22}{per_row[1]:>22}")
    verdict = ["fits" if n[f"alloc_{k}"] + n["weights"] <= free else "does NOT fit" for k in ("fp", "int8")]
    print(f"{'this batch x context':<{w}}{verdict[0]:>22}{verdict[1]:>22}")
    print("\n(activations, the CUDA context and allocator slack also need memory: keep a margin)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
