"""Decode-attention kernel benchmark: the fused Triton decode vs PyTorch SDPA, per layer call, on one GPU.

For Llama-3-8B (32 q / 8 kv heads) and Qwen2.5-7B (28 / 4) shapes, head_dim 128, over batch x context, it reports per
provider the median time (triton.testing.do_bench, quantiles 0.5/0.2/0.8, L2 flushed, each call replayed from a CUDA
graph so that Python launch overhead is not timed), the bytes of K, V (and int8 / int4 scales) a decode step must read
(`kv_bytes`, the live tokens only), the achieved GB/s over those bytes and its share of the device-to-device copy
bandwidth measured in the same run. Providers:
  kvplug        hf_kvplug.kernels.attend_with_kvcache (writes the new token and attends; paged cache of 2 x context
                slots per row, or the context rounded up to a block where that does not fit: column `capacity`)
  sdpa_static   HF's static-cache path: repeat_kv + SDPA with a mask over a dense [B, Hk, 2 x context, D] cache
  sdpa_exact    SDPA (enable_gqa) over exactly the valid length: the dense lower bound PyTorch reaches
`max_abs_diff` is the kvplug output against SDPA over the same values (int8 / int4: the dequantized ones).

    python benchmarks/bench_decode_kernel.py                 # full sweep, files in benchmarks/results/
    python benchmarks/bench_decode_kernel.py --quick         # a few cases
    python benchmarks/bench_decode_kernel.py --models llama3-8b --batch 1 --context 32768 --dtypes fp16,int8
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

MODELS = {"llama3-8b": (32, 8, 128), "qwen2.5-7b": (28, 4, 128)}  # nheads, nheads_k, head_dim
BATCHES = (1, 8, 32)
CONTEXTS = (1024, 4096, 16384, 32768)
DTYPES = ("fp16", "int8", "int4")
QUICK = dict(models=["llama3-8b"], batch=[1, 8], context=[4096, 32768])
FIELDS = ["model", "nheads", "nheads_k", "head_dim", "batch", "context", "capacity", "kv_dtype", "provider", "status",
          "median_us", "p20_us", "p80_us", "kv_bytes", "gbps", "pct_copy_bw", "copy_gbps", "max_abs_diff",
          "block_size", "gpu_name", "torch", "triton", "transformers", "git_commit", "date"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--batch", default=",".join(map(str, BATCHES)), help="comma list of batch sizes")
    p.add_argument("--context", default=",".join(map(str, CONTEXTS)), help="comma list of context lengths (tokens)")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma list of kv dtypes: fp16, int8, int4")
    p.add_argument("--block-size", type=int, default=64, help="paged-cache block size (tokens)")
    p.add_argument("--quick", action="store_true", help="llama3-8b, batch 1 and 8, context 4k and 32k")
    p.add_argument("--no-baselines", action="store_true", help="time only the kvplug kernel")
    p.add_argument("--tune", action="store_true",
                   help="instead of the sweep: time every decode config (BLOCK_N, warps, stages, waves of splits) on "
                        "a few representative cases and print the best, to set decode_config / WAVES")
    p.add_argument("--out", default="benchmarks/results", help="output folder (CSV, JSON, markdown)")
    args = p.parse_args(argv)
    args.models = args.models.split(",")
    args.batch = [int(x) for x in args.batch.split(",")]
    args.context = [int(x) for x in args.context.split(",")]
    args.dtypes = args.dtypes.split(",")
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    for m in args.models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; known: {', '.join(MODELS)}")
    for d in args.dtypes:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}; known: {', '.join(DTYPES)}")
    return args


DEVICE = "cuda"  # tests point the tuning helpers at the CPU (Triton's interpreter) to check their plumbing


def free_memory() -> int:
    return torch.cuda.mem_get_info()[0] if DEVICE == "cuda" else 1 << 40


def release() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def environment() -> dict:
    from hf_kvplug.tools.report import environment as env

    return env(torch.cuda.get_device_name())


def timed(fn, rep: int = 200) -> tuple[float, float, float]:
    """(median, p20, p80) in µs of `fn` replayed from a CUDA graph, L2 flushed by do_bench between calls."""
    import triton

    fn()  # compile, autotune-free warm-up
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    ms = triton.testing.do_bench(graph.replay, warmup=25, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return tuple(1e3 * t for t in ms)


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy GB/s (read + write bytes) of a large buffer."""
    import triton

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, quantiles=[0.5])
    ms = ms[0] if isinstance(ms, (list, tuple)) else ms
    return 2 * nbytes / (ms * 1e-3) / 1e9


def paged_cache(keys, values, block_size: int, capacity: int, kv: str):
    """Paged cache (shuffled blocks) holding `keys/values [B, Hk, L, D]` in slots [0, L) of each row, in format `kv`
    ("fp16" keeps the model dtype, "int8", "int4"); filled a row at a time so that the only large allocations are
    the cache buffers themselves."""
    from hf_kvplug.config import PlugConfig
    from hf_kvplug.geometry import Geometry
    from hf_kvplug.reference import quantize

    batch, nheads_k, length, d = keys.shape
    max_blocks = -(-capacity // block_size)
    used = -(-length // block_size)
    num_blocks = batch * max_blocks
    table = torch.randperm(num_blocks, device=keys.device).view(batch, max_blocks).to(torch.int32)
    geometry = Geometry(num_layers=1, nheads=nheads_k, nheads_k=nheads_k, head_dim=d, dtype=keys.dtype,
                        layer_devices=[keys.device])
    cfg = PlugConfig(geometry, max_batch_size=batch, max_cache_len=max_blocks * block_size,
                     kv_dtype=None if kv == "fp16" else kv, block_size=block_size)
    shape, scale_shape, scale_dtype = cfg.storage_shapes()
    bufs = []
    for x in (keys, values):
        cache = torch.zeros(shape, dtype=cfg.storage_dtype, device=x.device)
        scale = torch.zeros(scale_shape, dtype=scale_dtype, device=x.device)
        for b in range(batch):
            row = F.pad(x[b], (0, 0, 0, used * block_size - length)).view(nheads_k, used, block_size, d).transpose(0, 1)
            idx = table[b, :used].long()
            stored, s = quantize(row, cfg.storage_dtype)
            cache[idx] = stored
            if s is not None:
                scale[idx] = s
        bufs += [cache, scale]
    k_cache, k_scale, v_cache, v_scale = bufs
    return k_cache, v_cache, k_scale, v_scale, table


def kvplug_capacity(batch, nheads_k, context, d, block_size: int, kv: str, free: int) -> int | None:
    """Slots per row of the paged cache: 2 x the context (a half-full cache, as HF's static cache is benchmarked)
    when it fits beside the dense K/V, else the context rounded up to a block; None when neither fits."""
    dense = kv_bytes(batch, nheads_k, context, d, "fp16")
    for cap in (2 * context, context):
        cap = -(-cap // block_size) * block_size
        if dense + kv_bytes(batch, nheads_k, cap, d, kv) < 0.85 * free:
            return cap
    return None


def expected_output(q, keys, values, scale, kv: str):
    """SDPA over the K/V a decode step sees (int8 / int4: the dequantized values), a row at a time to bound memory."""
    from hf_kvplug.reference import dequantize, quantize

    storage = {"int8": torch.int8, "int4": torch.uint8}.get(kv)
    outs = []
    for b in range(keys.shape[0]):
        k, v = keys[b:b + 1], values[b:b + 1]
        if storage is not None:
            k, v = (dequantize(*quantize(x, storage), x.dtype) for x in (k, v))
        outs.append(F.scaled_dot_product_attention(q[b:b + 1].transpose(1, 2), k, v, scale=scale,
                                                   enable_gqa=True).transpose(1, 2))
    return torch.cat(outs)


def kvplug_call(q, keys, values, scale, block_size: int, capacity: int, kv: str):
    """A no-argument call of the fused decode for the last token of `keys/values [B, Hk, L, D]` over a paged copy of
    the others (slots [0, L-1) cached, slot L-1 written by the call)."""
    from hf_kvplug import kernels

    batch, _, context, _ = keys.shape
    k_cache, v_cache, k_scale, v_scale, table = paged_cache(keys, values, block_size, capacity, kv)
    k_new, v_new = keys[:, :, -1:].transpose(1, 2), values[:, :, -1:].transpose(1, 2)  # [B, 1, Hk, D] views
    seqlens = torch.full((batch,), context - 1, dtype=torch.int32, device=keys.device)
    starts = torch.zeros((batch,), dtype=torch.int32, device=keys.device)
    no_holes = torch.empty(0, dtype=torch.uint8, device=keys.device)  # as a PlugCache without masked slots
    status = torch.zeros(1, dtype=torch.int32, device=keys.device)

    def call():
        return kernels.attend_with_kvcache(q, k_new, v_new, k_cache, v_cache, k_scale, v_scale, table, seqlens, starts,
                                           no_holes, status, scale, 0)

    return call


def kv_bytes(batch, nheads_k, length, d, kv: str) -> int:
    """K and V bytes (scales included) of `length` tokens: fp16 2d per head, int8 d + a 4-byte scale, int4 d/2 +
    2 halves x (scale, minimum) in fp16."""
    per_head = {"int8": d + 4, "int4": d // 2 + 8}.get(kv, 2 * d)
    return 2 * batch * length * nheads_k * per_head


def time_kvplug(q, keys, values, scale, block_size, capacity, kv, want) -> dict:
    """The fused decode's error against `want` and its times."""
    call = kvplug_call(q, keys, values, scale, block_size, capacity, kv)
    diff = (call().float() - want.float()).abs().max().item()
    return dict(zip(("median_us", "p20_us", "p80_us"), timed(call)), max_abs_diff=diff)


def time_sdpa_static(q, keys, values, scale) -> dict:
    """transformers' sdpa_attention_forward over a static cache of 2 x the length: repeat_kv, masked SDPA."""
    batch, nheads_k, context, d = keys.shape
    nheads, max_len = q.shape[2], 2 * keys.shape[2]
    group = nheads // nheads_k
    k_static = F.pad(keys, (0, 0, 0, max_len - context))
    v_static = F.pad(values, (0, 0, 0, max_len - context))
    mask = (torch.arange(max_len, device=q.device) < context).view(1, 1, 1, max_len).expand(batch, 1, 1, -1)

    def static():
        k = k_static[:, :, None].expand(-1, -1, group, -1, -1).reshape(batch, nheads, max_len, d)
        v = v_static[:, :, None].expand(-1, -1, group, -1, -1).reshape(batch, nheads, max_len, d)
        return F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, scale=scale)

    return dict(zip(("median_us", "p20_us", "p80_us"), timed(static)))


def run_case(model, batch, context, args, copy_gbps, meta, rows: list[dict]) -> None:
    """Appends this case's rows to `rows` as they are measured (so a failure keeps the ones before it)."""
    nheads, nheads_k, d = MODELS[model]
    dev, dtype, scale = "cuda", torch.float16, d ** -0.5
    base = dict(model=model, nheads=nheads, nheads_k=nheads_k, head_dim=d, batch=batch, context=context,
                block_size=args.block_size, copy_gbps=round(copy_gbps, 1), **meta)
    free = torch.cuda.mem_get_info()[0]
    dense_bytes = kv_bytes(batch, nheads_k, context, d, "fp16")
    smallest = "int4" if "int4" in args.dtypes else "int8" if "int8" in args.dtypes else "fp16"
    if kvplug_capacity(batch, nheads_k, context, d, args.block_size, smallest, free) is None:
        rows += [dict(base, kv_dtype=t, provider="kvplug", status="skipped: memory") for t in args.dtypes]
        return
    gen = torch.Generator(device=dev).manual_seed(0)
    keys = torch.randn((batch, nheads_k, context, d), device=dev, dtype=dtype, generator=gen)
    values = torch.randn((batch, nheads_k, context, d), device=dev, dtype=dtype, generator=gen)
    q = torch.randn((batch, 1, nheads, d), device=dev, dtype=dtype, generator=gen)
    first = len(rows)

    def sdpa_exact(k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k, v, scale=scale, enable_gqa=True).transpose(1, 2)

    for kv in args.dtypes:
        free = torch.cuda.mem_get_info()[0] + dense_bytes  # the dense K/V are already allocated
        capacity = kvplug_capacity(batch, nheads_k, context, d, args.block_size, kv, free)
        row = dict(base, kv_dtype=kv, provider="kvplug", kv_bytes=kv_bytes(batch, nheads_k, context, d, kv),
                   capacity=capacity)
        if capacity is None:
            rows.append(dict(row, status="skipped: memory"))
            continue
        try:
            want = expected_output(q, keys, values, scale, kv)
            row.update(time_kvplug(q, keys, values, scale, args.block_size, capacity, kv, want), status="ok")
        except torch.cuda.OutOfMemoryError:
            row["status"] = "oom"
        torch.cuda.empty_cache()
        rows.append(row)

    if "fp16" in args.dtypes and not args.no_baselines:
        useful = kv_bytes(batch, nheads_k, context, d, "fp16")
        row = dict(base, kv_dtype="fp16", provider="sdpa_exact", kv_bytes=useful, capacity=context)
        try:
            row.update(zip(("median_us", "p20_us", "p80_us"), timed(lambda: sdpa_exact(keys, values))), status="ok")
        except torch.cuda.OutOfMemoryError:
            row["status"] = "oom"
        torch.cuda.empty_cache()
        rows.append(row)

        row = dict(base, kv_dtype="fp16", provider="sdpa_static", kv_bytes=useful, capacity=2 * context)
        if 2 * dense_bytes * (1 + nheads // nheads_k) > 0.9 * torch.cuda.mem_get_info()[0]:  # + repeat_kv copies
            row["status"] = "skipped: memory"
        else:
            try:
                row.update(time_sdpa_static(q, keys, values, scale), status="ok")
            except torch.cuda.OutOfMemoryError:
                row["status"] = "oom"
            torch.cuda.empty_cache()
        rows.append(row)

    for row in rows[first:]:
        if row.get("status") == "ok":
            row["gbps"] = round(row["kv_bytes"] / (row["median_us"] * 1e-6) / 1e9, 1)
            row["pct_copy_bw"] = round(100 * row["gbps"] / copy_gbps, 1)
            for k in ("median_us", "p20_us", "p80_us"):
                row[k] = round(row[k], 2)


def markdown(rows: list[dict], meta: dict, copy_gbps: float) -> str:
    lines = [f"Decode attention per layer call on {meta['gpu_name']} (torch {meta['torch']}, triton {meta['triton']}, "
             f"commit {meta['git_commit'][:12]}, {meta['date']}). Copy bandwidth {copy_gbps:.0f} GB/s. GB/s and % "
             "count the K/V (+scales) bytes of the live tokens only.", "",
             "| model | batch | context | slots/row | kv | provider | median µs | GB/s | % copy BW | max abs diff |",
             "|---|---:|---:|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['model']} | {r['batch']} | {r['context']} | {r.get('capacity') or ''} "
                         f"| {r['kv_dtype']} | {r['provider']} | {r.get('status')} | | | |")
            continue
        diff = f"{r['max_abs_diff']:.2e}" if r.get("max_abs_diff") is not None else ""
        lines.append(f"| {r['model']} | {r['batch']} | {r['context']} | {r.get('capacity') or ''} | {r['kv_dtype']} "
                     f"| {r['provider']} | {r['median_us']:.1f} | {r['gbps']:.0f} | {r['pct_copy_bw']:.1f} | {diff} |")
    return "\n".join(lines) + "\n"


TUNE_CASES = [("llama3-8b", 1, 32768), ("qwen2.5-7b", 1, 32768), ("llama3-8b", 8, 16384), ("llama3-8b", 32, 4096),
              ("llama3-8b", 32, 32768)]


def tune_configs(kv: str):
    """Candidate DecodeConfigs for head_dim 128 (int8: V's scales on the probabilities or on the V tile, too)."""
    from hf_kvplug.kernels.decode_attn import DecodeConfig

    int8 = kv == "int8"
    for block_n in ((64, 128) if kv != "fp16" else (32, 64, 128)):
        for num_warps in (4, 8):
            for num_stages in (2, 3, 4):
                for v_scale_on_p in ((True, False) if int8 else (True,)):
                    yield DecodeConfig(block_n, num_warps, num_stages, v_scale_on_p)


def tune_case(q, keys, values, kv: str, block_size: int, copy_gbps: float) -> list[dict]:
    """Every config x waves of one case: µs, % of copy bandwidth, rank; `default` marks the shipped choice."""
    from hf_kvplug.kernels import decode_attn as DA

    batch, nheads_k, context, d = keys.shape
    capacity = kvplug_capacity(batch, nheads_k, context, d, block_size, kv,
                               free_memory() + kv_bytes(batch, nheads_k, context, d, "fp16"))
    if capacity is None:
        return []
    k_cache, v_cache, k_scale, v_scale, table = paged_cache(keys, values, block_size, capacity, kv)
    k_new, v_new = keys[:, :, -1:].transpose(1, 2), values[:, :, -1:].transpose(1, 2)
    seqlens = torch.full((batch,), context - 1, dtype=torch.int32, device=DEVICE)
    starts = torch.zeros((batch,), dtype=torch.int32, device=DEVICE)
    no_holes = torch.empty(0, dtype=torch.uint8, device=DEVICE)
    status = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    nbytes = kv_bytes(batch, nheads_k, context, d, kv)
    want = expected_output(q, keys, values, d ** -0.5, kv).float()
    tolerance = 1e-2 * want.abs().max().item()

    def launched(config, waves):  # the split count decode_attn really launches for this request
        asked = DA.num_splits_for(batch, nheads_k, capacity, config[0], q.device, waves)
        return DA.split_layout(capacity, asked, config[0])[1]

    shipped = DA.decode_config(d, "fp" if kv == "fp16" else kv)
    default = (shipped, launched(shipped, DA.WAVES))
    rows, seen = [], set()
    for config in tune_configs(kv):
        for waves in (2, 4, 8, 16):
            splits = launched(config, waves)
            if (config, splits) in seen:  # another waves value gives the same launch
                continue
            seen.add((config, splits))

            def call(config=config, splits=splits):
                return DA.decode_attn(q, k_new, v_new, k_cache, v_cache, k_scale, v_scale, table, seqlens, starts,
                                      no_holes, status, d ** -0.5, 0, num_splits=splits, config=config)

            row = dict(batch=batch, context=context, kv_dtype=kv, capacity=capacity, block_n=config[0],
                       num_warps=config[1], num_stages=config[2], v_scale_on_p=config[3], waves=waves,
                       num_splits=splits,
                       default=(config, splits) == default)
            try:
                diff = (call().float() - want).abs().max().item()
                row["max_abs_diff"] = diff
                if not diff <= tolerance:  # a config that computes a wrong answer is never ranked
                    row["status"] = f"wrong: max abs diff {diff:.3g} > {tolerance:.3g}"
                else:
                    us = timed(call, rep=100)[0]
                    row.update(median_us=round(us, 2), status="ok",
                               pct_copy_bw=round(100 * nbytes / (us * 1e-6) / 1e9 / copy_gbps, 1))
            except Exception as e:  # noqa: BLE001 - out of resources for this config, say
                row.update(status=f"error: {type(e).__name__}: {str(e)[:120]}")
            rows.append(row)
    for rank, r in enumerate(sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["median_us"]), 1):
        r["rank"] = rank
    return rows


def tune(args, copy_gbps: float, meta: dict, path: Path) -> list[dict]:
    """tune_case over TUNE_CASES and the dtypes asked for; prints the best config of each beside the default's and
    rewrites `path` (JSON) after every case, so a failure or the device call's time limit keeps what was measured."""
    rows = []
    for model, batch, context in TUNE_CASES:
        nheads, nheads_k, d = MODELS[model]
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        keys, values = (torch.randn((batch, nheads_k, context, d), device=DEVICE, dtype=torch.float16, generator=gen)
                        for _ in range(2))
        q = torch.randn((batch, 1, nheads, d), device=DEVICE, dtype=torch.float16, generator=gen)
        for kv in args.dtypes:
            error = None
            try:
                case = tune_case(q, keys, values, kv, args.block_size, copy_gbps)
            except Exception as e:  # noqa: BLE001 - one case must not lose the others
                error, case = f"error: {type(e).__name__}: {str(e)[:200]}", []
            release()  # outside the except block: its traceback no longer pins the case's tensors
            if error:
                print(f"{model:11s} B={batch:<3d} ctx={context:<6d} {kv:5s} {error}", flush=True)
                case = [dict(batch=batch, context=context, kv_dtype=kv, status=error)]
            done = sorted((r for r in case if "rank" in r), key=lambda r: r["rank"])
            mine = next((r for r in case if r.get("default") and "rank" in r), None)
            if done:
                b = done[0]
                print(f"{model:11s} B={batch:<3d} ctx={context:<6d} {kv:5s} best {b['median_us']:.1f} us "
                      f"({b['pct_copy_bw']}%) BLOCK_N={b['block_n']} warps={b['num_warps']} stages={b['num_stages']} "
                      + (f"v_scale_on_p={b['v_scale_on_p']} " if kv == "int8" else "")
                      + f"waves={b['waves']} splits={b['num_splits']}; default "
                      + (f"{mine['median_us']:.1f} us ({mine['pct_copy_bw']}%) rank {mine['rank']}/{len(done)}"
                         if mine else "failed"), flush=True)
            rows += [dict(r, model=model, **meta) for r in case]
            path.write_text(json.dumps(dict(meta=meta, copy_gbps=copy_gbps, rows=rows), indent=1))
        del keys, values, q
        release()
    return rows


def target_lines(rows: list[dict]) -> list[str]:
    """The issue's H100 targets, judged from the kvplug rows: met or missed, with the numbers."""
    ok = {(r["model"], r["batch"], r["context"], r["kv_dtype"]): r for r in rows
          if r.get("provider") == "kvplug" and r.get("status") == "ok"}
    lines = []
    big = [r for (m, b, c, kv), r in ok.items() if kv == "fp16" and b * c >= 128 * 1024]
    if big:
        worst = min(big, key=lambda r: r["pct_copy_bw"])
        lines.append(f"- fp16 at batch x context >= 128k: {min(r['pct_copy_bw'] for r in big):.1f}%-"
                     f"{max(r['pct_copy_bw'] for r in big):.1f}% of copy bandwidth over {len(big)} cases (target "
                     f">= 90%: {'met' if worst['pct_copy_bw'] >= 90 else 'missed'}; lowest {worst['model']} "
                     f"B={worst['batch']} ctx={worst['context']})")
    for (m, b, c, kv), r in sorted(ok.items()):
        if kv == "fp16" and b == 1 and c == 32768:
            lines.append(f"- single request at 32k, {m}: {r['pct_copy_bw']:.1f}% of copy bandwidth (target >= 75%: "
                         f"{'met' if r['pct_copy_bw'] >= 75 else 'missed'})")
    for fmt, target in (("int8", 1.8), ("int4", 2.5)):
        speedups = [(ok[(m, b, c, "fp16")]["median_us"] / r["median_us"], m, b, c) for (m, b, c, kv), r in ok.items()
                    if kv == fmt and b * c >= 256 * 1024 and (m, b, c, "fp16") in ok]
        if speedups:
            low = min(speedups)
            lines.append(f"- {fmt.upper()} vs fp16 time at batch x context >= 256k: {low[0]:.2f}x-"
                         f"{max(speedups)[0]:.2f}x faster over {len(speedups)} cases (target >= {target}x: "
                         f"{'met' if low[0] >= target else 'missed'}; lowest {low[1]} B={low[2]} ctx={low[3]})")
    return lines


def write_rows(csv_path: Path, json_path: Path, rows: list[dict], meta: dict, copy_gbps: float) -> None:
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    json_path.write_text(json.dumps(dict(meta=meta, copy_gbps=copy_gbps, rows=rows), indent=1))


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_decode_kernel needs a CUDA GPU", file=sys.stderr)
        return 2
    meta = environment()
    copy_gbps = copy_bandwidth()
    print(f"{meta['gpu_name']}: device-to-device copy {copy_gbps:.0f} GB/s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.tune:
        path = out / ("decode_tune-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + ".json")
        tune(args, copy_gbps, meta, path)
        print(f"wrote {path}")
        return 0
    stem = "decode_kernel-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    rows = []
    for model in args.models:
        for batch in args.batch:
            for context in args.context:
                new, error = [], None
                try:
                    run_case(model, batch, context, args, copy_gbps, meta, new)
                except Exception as e:  # noqa: BLE001 - one broken case must not lose the sweep
                    error = f"error: {type(e).__name__}: {str(e)[:200]}"
                torch.cuda.empty_cache()  # outside the except block: its traceback no longer pins the case's tensors
                if error:  # the rows measured before the failure stay; a row says what happened
                    new.append(dict(model=model, batch=batch, context=context, kv_dtype="-", provider="kvplug",
                                    status=error, **meta))
                for r in new:
                    print(f"{model:11s} B={batch:<3d} ctx={context:<6d} {r['kv_dtype']:5s} {r['provider']:12s} "
                          f"{r.get('status')}: {r.get('median_us', '-')} us {r.get('gbps', '-')} GB/s "
                          f"{r.get('pct_copy_bw', '-')}%", flush=True)
                rows += new
                write_rows(out / f"{stem}.csv", out / f"{stem}.json", rows, meta, copy_gbps)  # kept if a case dies
    table = markdown(rows, meta, copy_gbps)
    goals = target_lines(rows)
    if goals:
        table += "\nTargets (H100):\n" + "\n".join(goals) + "\n"
    (out / f"{stem}.md").write_text(table)
    print()
    print(table)
    print(f"wrote {out / stem}.csv/.json/.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
