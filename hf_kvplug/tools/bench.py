"""`hf-kvplug bench`: sweep providers x batch x context with `generate()` and write CSV / JSON / markdown / PNG.

The pieces live in small files: `models` (devices, random-weight models, copy bandwidth), `cases`
(providers, the per-step timer and one measured case; its docstring says how each metric is measured) and
`report` (files, tables, plots, speedups). This file holds the command's arguments and the sweep.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

from . import models as bm
from . import shapes
from .cases import (PROVIDERS, BenchCase, BenchRow, CacheFactory, Settings, empty_row, free_memory,
                          predicted_kv_bytes, random_prompt, run_case_safe, timed_generate)
from ..patcher import patched
from .report import FIELDS, default_out_dir, environment, markdown_table, rel, speedup_lines, write_all

DEFAULT_PROVIDERS = ",".join(PROVIDERS)


def parse_sizes(text: str) -> list[int]:
    """'1,8,32' or '1k,4k,32k' (k = 1024) → sorted unique ints."""
    sizes = set()
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        mult = 1024 if item.endswith("k") else 1
        try:
            value = int(item[:-1] if mult > 1 else item) * mult
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a size: {item!r} (use e.g. 1,8,32 or 1k,4k,32k)") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"sizes must be positive, got {item!r}")
        sizes.add(value)
    if not sizes:
        raise argparse.ArgumentTypeError("empty list of sizes")
    return sorted(sizes)


def parse_providers(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in PROVIDERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown provider(s) {unknown}; choose from {', '.join(PROVIDERS)}")
    return list(dict.fromkeys(names))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="llama3-8b",
                   help=f"a known shape with random weights ({', '.join(shapes.SHAPES)}), a local checkpoint dir or a "
                        "GGUF model ('smollm2', a .gguf file)")
    p.add_argument("--batch", type=parse_sizes, default=parse_sizes("1,8,32"), help="batch sizes (default 1,8,32)")
    p.add_argument("--context", type=parse_sizes, default=parse_sizes("1k,4k,16k,32k"),
                   help="prompt lengths, k = 1024 (default 1k,4k,16k,32k)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per case (default 64, at least 2)")
    p.add_argument("--providers", type=parse_providers, default=parse_providers(DEFAULT_PROVIDERS),
                   help=f"comma-separated (default: all of {DEFAULT_PROVIDERS})")
    p.add_argument("--out", default=None, help="output directory (default benchmarks/results/<date>-<gpu>-<model>)")
    p.add_argument("--dtype", default="auto", help="bf16 | fp16 | fp32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts")
    p.add_argument("--compile-on-cpu", action="store_true",
                   help="run the _compile providers on the CPU too (generate's compile_config with "
                        "_compile_all_devices); otherwise they are skipped there")
    p.add_argument("--plug-backend", default="auto", choices=("auto", "triton", "reference"),
                   help="PlugCache backend (default auto: Triton on CUDA)")
    p.add_argument("--block-size", type=int, default=64, help="PlugCache block size (default 64)")
    p.add_argument("--return-sequences", type=int, default=1,
                   help="sample this many sequences from each prompt (num_return_sequences; default 1: greedy); "
                        "the `kv_in_use_bytes` column then shows what storing each prompt once saves")
    p.add_argument("--full-warmup", action="store_true",
                   help="warm up with the full prompt (default: a 32-token prompt, which compiles the same decode "
                        "graphs at a fraction of the cost)")
    p.add_argument("--check-tokens", type=int, default=16,
                   help="new tokens of the greedy agreement check on the first case; 0 skips it (default 16)")
    p.add_argument("--no-predict-oom", action="store_true",
                   help="run every case even when its KV cache alone exceeds the free device memory")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows already in --out/results.json and run only the missing (or ERROR) cases")


# ------------------------------------------------------------------------------------------------ check

def agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, tuple[int, int] | None]:
    """Fraction of equal tokens and the first (row, step) where they differ (None if identical)."""
    n = min(a.shape[1], b.shape[1])
    a, b = a[:, :n].cpu(), b[:, :n].cpu()
    diff = a != b
    if not diff.any():
        return 1.0, None
    rows, steps = diff.nonzero(as_tuple=True)
    first = int(steps.min())
    row = int(rows[steps == first][0])
    return 1.0 - diff.float().mean().item(), (row, first)


def describe_agreement(name: str, ref: str, a, b, dtype: torch.dtype) -> str:
    frac, first = agreement(a, b)
    if first is None:
        return f"{name} vs {ref}: identical greedy tokens ({a.shape[0]} x {a.shape[1]})"
    text = f"{name} vs {ref}: {100 * frac:.1f}% of tokens agree, first divergence at row {first[0]} step {first[1]}"
    if dtype == torch.float32 and "int8" not in name and "int4" not in name:
        text += " — MISMATCH (fp32 should agree exactly)"
    return text


def greedy_check(model, settings: Settings, batch: int, context: int, new_tokens: int, providers) -> list[str]:
    """Greedy tokens of the plugged caches vs HF's DynamicCache on one small case (eager, short)."""
    vocab = model.config.get_text_config().vocab_size
    prompt = random_prompt(batch, context, vocab, settings.seed, settings.device)
    outputs = {}
    names = ["hf_dynamic", "kvplug"] + [q for q in ("kvplug_int8", "kvplug_int4")
                                        if any(q.split("_")[1] in p for p in providers)]
    for name in names:
        prov = PROVIDERS[name]
        try:
            cache = CacheFactory(prov, BenchCase(name, batch, context, new_tokens), model, settings).new()
            with patched(model) if prov.cache == "plug" else contextlib.nullcontext():
                out, _, _ = timed_generate(model, prov, settings, cache, prompt, new_tokens)
            outputs[name] = out[:, context:]
        except Exception as e:  # noqa: BLE001 - the check reports, the sweep goes on
            outputs[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        cache = None
        free_memory(settings.device)
    head = f"batch {batch}, context {context}, {new_tokens} new tokens, {bm.dtype_name(settings.dtype)}"
    lines = []
    for name in names[1:]:
        ref, got = outputs["hf_dynamic"], outputs[name]
        if isinstance(ref, str) or isinstance(got, str):
            lines.append(f"{name} vs hf_dynamic ({head}): check failed: {got if isinstance(got, str) else ref}")
        else:
            lines.append(describe_agreement(name, "hf_dynamic", got, ref, settings.dtype) + f" ({head})")
    return lines


# ------------------------------------------------------------------------------------------------ sweep

def make_cases(args) -> list[BenchCase]:
    """Case-major order (batch, then context, then provider) so a cut-short run still compares providers."""
    return [BenchCase(p, b, c, args.new_tokens) for b in args.batch for c in args.context for p in args.providers]


def _dominated(case: BenchCase, ooms: dict[str, list[tuple[int, int]]]) -> tuple[int, int] | None:
    for b, c in ooms.get(case.provider, []):
        if case.batch >= b and case.context >= c:
            return b, c
    return None


def _available_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    free = torch.cuda.mem_get_info(device)[0]
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _key(row_or_case) -> tuple[str, int, int]:
    return row_or_case.provider, row_or_case.batch, row_or_case.context


def load_previous(out: Path, meta: dict) -> list[BenchRow]:
    """Rows of an earlier run in `out` (for --resume), checked to be of the same model, dtype, device and length."""
    path = out / "results.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    for key in ("model", "dtype", "device", "new_tokens", "return_sequences"):
        if data.get("meta", {}).get(key, 1 if key == "return_sequences" else None) != meta[key]:
            raise SystemExit(f"error: --resume: {path} was written with {key}={data['meta'].get(key)!r}, "
                             f"this run has {meta[key]!r}; use another --out")
    return [BenchRow(**{k: v for k, v in r.items() if k in FIELDS}) for r in data.get("rows", [])]


def run_sweep(model, cases: list[BenchCase], settings: Settings, args, out: Path, meta: dict,
              previous: list[BenchRow] = ()) -> list[BenchRow]:
    """Every case in turn (tqdm bar); results rewritten after each case so an interrupted run keeps them.
    Cases that already have a row in `previous` (other than ERROR) are not run again."""
    from tqdm.auto import tqdm

    done = {_key(r): r for r in previous if r.status != "ERROR"}
    rows: list[BenchRow] = list(done.values())
    ooms: dict[str, list[tuple[int, int]]] = {}
    for r in rows:
        if r.status == "OOM":
            ooms.setdefault(r.provider, []).append((r.batch, r.context))
    todo = [c for c in cases if _key(c) not in done]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "errors.log", "a") as log, tqdm(todo, desc="bench", unit="case", file=sys.stderr) as bar:
        for case in bar:
            bar.set_postfix_str(f"{case.provider} b={case.batch} ctx={case.context}")
            row = _precheck(case, model, settings, args, ooms)
            if row is None:
                row = run_case_safe(model, case, settings, error_log=log)
            if row.status == "OOM":
                ooms.setdefault(case.provider, []).append((case.batch, case.context))
            rows.append(row)
            write_all(_ordered(rows, cases), meta, out, plots=False)
    rows = _ordered(rows, cases)
    log_path = out / "errors.log"
    if log_path.stat().st_size == 0:
        log_path.unlink()
    return rows


def _ordered(rows: list[BenchRow], cases: list[BenchCase]) -> list[BenchRow]:
    """Rows in sweep order (rows of cases outside this sweep, from --resume, last)."""
    order = {_key(c): i for i, c in enumerate(cases)}
    return sorted(rows, key=lambda r: order.get(_key(r), len(order)))


def _precheck(case, model, settings, args, ooms) -> BenchRow | None:
    """An OOM row without running when a smaller case of the provider OOMed or the KV cache cannot fit."""
    smaller = _dominated(case, ooms)
    if smaller:
        return empty_row(case, settings, status="OOM", note=f"not run: OOM at batch {smaller[0]} x context "
                                                            f"{smaller[1]} already")
    if args.no_predict_oom:
        return None
    need, avail = predicted_kv_bytes(PROVIDERS[case.provider], case, model, args.block_size,
                                     args.return_sequences), \
        _available_bytes(settings.device)
    if need is not None and avail is not None and need > avail:
        return empty_row(case, settings, status="OOM", note=f"not run (predicted): KV cache {need / 1e9:.1f} GB > "
                                                            f"{avail / 1e9:.1f} GB free")
    return None


# ------------------------------------------------------------------------------------------------ command

def run(args) -> list[BenchRow]:
    """The `bench` command: build the model, check, sweep, write and print. Returns the rows."""
    if args.new_tokens < 2:
        raise SystemExit("error: --new-tokens must be at least 2 (one prefill token + decode steps)")
    if args.return_sequences < 1:
        raise SystemExit("error: --return-sequences must be at least 1")
    if args.resume and not args.out:
        raise SystemExit("error: --resume needs the --out directory of the run to continue")
    device = bm.resolve_device(args.device)
    dtype = bm.resolve_dtype(args.dtype, device)
    print(f"building {args.model} ({bm.dtype_name(dtype)}) on {device} ...", flush=True)
    model, label = bm.build_model(args.model, dtype, device, seed=args.seed)
    total_w, read_w = bm.weight_bytes(model)
    copy_bw = bm.copy_bandwidth(device)
    env = environment(bm.device_name(device))
    settings = Settings(model_label=label, device=device, dtype=dtype, weights_read_bytes=read_w, copy_bw=copy_bw,
                        env=env, seed=args.seed, compile_on_cpu=args.compile_on_cpu, plug_backend=args.plug_backend,
                        block_size=args.block_size, full_warmup=args.full_warmup,
                        return_sequences=args.return_sequences)
    out = Path(args.out) if args.out else default_out_dir(env["gpu_name"], label)
    meta = dict(env, model=label, device=str(device), dtype=bm.dtype_name(dtype), new_tokens=args.new_tokens,
                weights_gb=total_w / 1e9, weights_read_gb=read_w / 1e9, copy_bw_gbps=copy_bw / 1e9,
                weights_note="random weights, known shape" if shapes.is_known(args.model) else "checkpoint",
                warmup="full prompt" if args.full_warmup else f"{settings.warmup_prompt}-token prompt",
                batch=args.batch, context=args.context, providers=args.providers,
                return_sequences=args.return_sequences,
                providers_described={p: PROVIDERS[p].description for p in args.providers}, check=[])
    print(f"weights {total_w / 1e9:.2f} GB ({read_w / 1e9:.2f} GB read per decode step); "
          f"copy bandwidth {copy_bw / 1e9:.0f} GB/s; output → {rel(out)}", flush=True)
    previous = load_previous(out, meta) if args.resume else []
    if previous:
        print(f"resuming: {len(previous)} rows already in {rel(out / 'results.json')}", flush=True)
    if args.check_tokens > 0:
        meta["check"] = greedy_check(model, settings, args.batch[0], args.context[0], args.check_tokens,
                                     args.providers)
        for line in meta["check"]:
            print("check:", line, flush=True)
    rows = run_sweep(model, make_cases(args), settings, args, out, meta, previous)
    written = write_all(rows, meta, out, plots=not args.no_plots)
    print()
    print(markdown_table(rows))
    ratios = speedup_lines(rows)
    if ratios:
        print("\nspeedups:")
        for line in ratios:
            print("  " + line)
    print("\nwrote " + ", ".join(rel(p) for p in written))
    return rows
