#!/usr/bin/env python
"""The decode step off CUDA: every cache side by side in one run, on the CPU (or another device with --device).

Caches: transformers' DynamicCache, StaticCache and QuantizedCache (each backend that builds here: quanto, hqq, fp8)
on an unpatched model; PlugCache in the model dtype, INT8 and INT4 on a patched twin with the same weights.

Model: a random Llama in fp32. The default is 4 layers, hidden 256, 4 / 2 heads (head_dim 64), MLP 688, vocab 1024.
`--tiny` is host-bound: 8 layers, hidden 64, 4 / 2 heads (head_dim 16), MLP 128, context 64, where per-step Python
work dominates.

For each size (batch x context) and cache: a prefill of `context` random tokens, 2 warm-up decode steps, then
`--steps` decode steps of one token per row (`model(next_token, cache=cache)`, a hand-written loop, so no generate()
overhead on either side), each timed alone, the caches taking turns step by step (a change in the machine's load
falls on all of them alike). The table gives the minimum and the median in ms, and each cache's minimum over
DynamicCache's. StaticCache is sized to the run (context + steps + 4, as the PlugCache), so its masked attention
spans only what the run needs; `static_2x` is a StaticCache of twice that, as one is sized ahead of requests of
unknown length: it attends over all of it, where a PlugCache of any size reads only the tokens its rows hold.

Counted on the patched model (PlugCache in the model dtype, INT8 and INT4) over 8 decode steps (a TorchDispatchMode
counts aten ops, perf_counter times the Python):
  * host, per step: `begin_forward`, the bookkeeping every forward does once (checks, block mapping, the mask);
  * per layer: `enter` and the layer's attend;
  * everything else the forward runs.
The same totals are given for DynamicCache on the stock model.

Run (one thread, as the issue's figures were):
    OMP_NUM_THREADS=1 python benchmarks/bench_cpu.py [--sizes 1x2048,4x2048,1x8192] [--tiny] [--steps 32]
QuantizedCache backends come from `pip install optimum-quanto hqq` (hqq also needs `termcolor`); without them only
the fp8 backend runs. The results (markdown and JSON) go to `--out`, by default benchmarks/results/cpu-<date>/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

RESULTS = Path(__file__).resolve().parent / "results"


def parse_sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        b, c = item.lower().split("x")
        out.append((int(b), int(c[:-1]) * 1024 if c.endswith("k") else int(c)))
    return out


def build_models(tiny: bool, device, seed: int):
    """(stock, plugged): two instances of one random Llama sharing their weights (the same tensors, so that a step of
    either finds them as warm in the CPU's caches as a step of the other left them), the second patched."""
    import hf_kvplug
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096)
    else:
        config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=1024, max_position_embeddings=16384)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    stock = LlamaForCausalLM(config).to(device).eval()
    plugged = LlamaForCausalLM(config).to(device).eval()
    plugged.load_state_dict(stock.state_dict(), assign=True)
    return stock, hf_kvplug.patch(plugged)


def quantized_backends(config) -> tuple[list[str], list[str]]:
    from transformers.cache_utils import QuantizedCache

    ok, missing = [], []
    for backend in ("quanto", "hqq", "fp8"):
        try:
            QuantizedCache(backend, config=config)
            ok.append(backend)
        except Exception as e:  # noqa: BLE001 - a backend that does not build here is reported, not run
            missing.append(f"{backend} ({type(e).__name__}: {str(e).splitlines()[0][:60] if str(e) else ''})")
    return ok, missing


def make_cache(name: str, stock, plugged, batch: int, capacity: int):
    """(model, cache) for provider `name`."""
    import hf_kvplug
    from transformers import DynamicCache, StaticCache
    from transformers.cache_utils import QuantizedCache

    if name == "dynamic":
        return stock, DynamicCache(config=stock.config)
    if name == "static":
        return stock, StaticCache(config=stock.config, max_cache_len=capacity)
    if name == "static_2x":  # sized as a user sizes it ahead of requests of unknown length
        return stock, StaticCache(config=stock.config, max_cache_len=2 * capacity)
    if name.startswith("quantized-"):
        return stock, QuantizedCache(name.split("-", 1)[1], config=stock.config)
    kv = {"plug": None, "plug_int8": "int8", "plug_int4": "int4"}[name]
    return plugged, hf_kvplug.PlugCache(plugged, max_batch_size=batch, max_cache_len=capacity, kv_dtype=kv)


def decode_times(runs: dict, ids: torch.Tensor, steps: int) -> dict[str, list[float] | str]:
    """Per provider `name -> (model, cache)`: a prefill of `ids`, then `steps` + 2 decode steps (the first two not
    timed), the providers taking turns step by step, so that a change in the machine's load falls on all of them
    alike. A provider that cannot run gets its error (a string) instead of times."""
    from hf_kvplug.compat import cache_kwargs

    live, out = {}, {}
    with torch.no_grad():
        for name, (model, cache) in runs.items():
            try:
                kw = cache_kwargs(cache)
                live[name] = (model, kw, model(ids, **kw).logits[:, -1:].argmax(-1))
                out[name] = []
            except Exception as e:  # noqa: BLE001 - a cache that cannot run a size is reported
                out[name] = f"{type(e).__name__}: {e}"
        for i in range(steps + 2):
            for name, (model, kw, tok) in list(live.items()):
                try:
                    t0 = time.perf_counter()
                    logits = model(tok, **kw).logits
                    dt = time.perf_counter() - t0
                except Exception as e:  # noqa: BLE001
                    out[name] = f"{type(e).__name__}: {e}"
                    del live[name]
                    continue
                live[name] = (model, kw, logits[:, -1:].argmax(-1))
                if i >= 2:
                    out[name].append(dt * 1e3)
    return out


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched (each top-level call once), by the region `where` names."""

    def __init__(self):
        super().__init__()
        self.where = "model"
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[self.where] = self.counts.get(self.where, 0) + 1
        return func(*args, **(kwargs or {}))


def host_profile(stock, plugged, batch: int, context: int, steps: int = 8) -> dict:
    """Ops and Python time per decode step: the plugged model split into host work (once per forward), per-layer
    work and the rest; DynamicCache's total on the stock model; for every cache, the time the decoder spends in
    transformers' mask functions (`create_causal_mask`, and the sliding-window one where the model has it)."""
    from transformers import DynamicCache

    import hf_kvplug
    from hf_kvplug.compat import cache_kwargs
    from hf_kvplug.forward import ForwardHost

    ids = torch.randint(1, stock.config.vocab_size, (batch, context))
    counter = OpCounter()
    seconds = {"host": 0.0, "layer": 0.0, "mask": 0.0}
    originals = {}

    def wrap(owner, name, region):
        fn = getattr(owner, name)
        originals[(owner, name)] = fn

        def counted(*args, **kwargs):
            before, counter.where = counter.where, region
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[region] += time.perf_counter() - t0
                counter.where = before

        setattr(owner, name, counted)

    layer_cls = type(hf_kvplug.PlugCache(plugged, max_batch_size=1, max_cache_len=8).attn_layers[0])
    wrap(ForwardHost, "begin_forward", "host")
    wrap(ForwardHost, "enter", "layer")
    wrap(layer_cls, "attend", "layer")
    modeling = sys.modules[type(stock.model).__module__]
    for name in ("create_causal_mask", "create_sliding_window_causal_mask"):
        if hasattr(modeling, name):
            wrap(modeling, name, "mask")
    try:
        out = {}
        plugs = [(label, plugged, hf_kvplug.PlugCache(plugged, max_batch_size=batch, max_cache_len=context + steps + 4,
                                                      kv_dtype=kv))
                 for label, kv in (("plug", None), ("plug_int8", "int8"), ("plug_int4", "int4"))]
        for label, model, cache in (*plugs, ("dynamic", stock, DynamicCache(config=stock.config))):
            kw = cache_kwargs(cache)
            with torch.no_grad():
                tok = model(ids, **kw).logits[:, -1:].argmax(-1)
                tok = model(tok, **kw).logits[:, -1:].argmax(-1)
                counter.counts.clear()
                seconds.update(host=0.0, layer=0.0, mask=0.0)
                t0 = time.perf_counter()
                with counter:
                    for _ in range(steps):
                        tok = model(tok, **kw).logits[:, -1:].argmax(-1)
                total = time.perf_counter() - t0
            layers = len(model.model.layers)
            c = {k: v / steps for k, v in counter.counts.items()}
            out[label] = {"ops_per_step": sum(c.values()), "ops_host_per_step": c.get("host", 0.0),
                          "ops_per_layer": c.get("layer", 0.0) / layers, "ms_per_step_counted": total / steps * 1e3,
                          "host_us_per_step": seconds["host"] / steps * 1e6,
                          "layer_us_per_layer": seconds["layer"] / steps / layers * 1e6,
                          "ops_mask_per_step": c.get("mask", 0.0), "mask_us_per_step": seconds["mask"] / steps * 1e6}
        return out
    finally:
        for (owner, name), fn in originals.items():
            setattr(owner, name, fn)


def environment() -> dict:
    import transformers

    import hf_kvplug
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.processor() or
            platform.machine(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "hf_kvplug": hf_kvplug.__version__, "commit": os.environ.get("HF_KVPLUG_COMMIT") or commit}


TARGETS = {"plug": "fp: <= DynamicCache at 1x2048, <= StaticCache at 4x2048 and 1x8192",
           "plug_int8": "<= 1.15x DynamicCache, < every QuantizedCache",
           "plug_int4": "<= 1.3x DynamicCache, < every QuantizedCache"}
TINY_TARGETS = {"plug": "<= 1.2x DynamicCache (host-bound)"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=None, help="batch x context list (default 1x2048,4x2048,1x8192; --tiny 1x64)")
    p.add_argument("--tiny", action="store_true", help="the host-bound model: 8 layers, hidden 64, context 64")
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per case (default 32)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--providers", default=None, help="comma list (default: all that build here)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dequant-slots", default=None, metavar="INT8,INT4",
                   help="for tuning: torchpath.DEQUANT_SLOTS for this run (default: the shipped values)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/cpu-<date>[-tiny])")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = parse_sizes(args.sizes or ("1x64" if args.tiny else "1x2048,4x2048,1x8192"))
    stock, plugged = build_models(args.tiny, device, args.seed)
    backends, missing = quantized_backends(stock.config)
    providers = (args.providers.split(",") if args.providers else
                 ["dynamic", "static", "static_2x", *(f"quantized-{b}" for b in backends), "plug", "plug_int8",
                  "plug_int4"])
    from hf_kvplug import torchpath

    if args.dequant_slots:
        torchpath.DEQUANT_SLOTS.update(zip(("int8", "int4"), map(int, args.dequant_slots.split(","))))
    env = environment()
    env["dequant_slots"] = dict(torchpath.DEQUANT_SLOTS)
    print(f"# {'tiny (host-bound)' if args.tiny else 'default'} model on {device}: " + ", ".join(
        f"{k} {v}" for k, v in env.items()))
    if missing:
        print("QuantizedCache backends that do not build here: " + "; ".join(missing))
    rows = []
    for batch, context in sizes:
        ids = torch.randint(1, stock.config.vocab_size, (batch, context), generator=torch.Generator().manual_seed(1))
        runs = {name: make_cache(name, stock, plugged, batch, context + args.steps + 4) for name in providers}
        for name, times in decode_times(runs, ids.to(device), args.steps).items():
            if isinstance(times, str):
                rows.append({"batch": batch, "context": context, "cache": name, "error": times})
                print(f"{batch}x{context} {name}: {times[:100]}", flush=True)
                continue
            rows.append({"batch": batch, "context": context, "cache": name, "min_ms": min(times),
                         "median_ms": statistics.median(times)})
            print(f"{batch}x{context} {name:>18}: min {min(times):8.3f} ms  median {statistics.median(times):8.3f} ms",
                  flush=True)
        del runs
    profile = host_profile(stock, plugged, *sizes[0])
    lines = table(rows, providers, sizes, TINY_TARGETS if args.tiny else TARGETS)
    lines += ["", f"Per decode step at {sizes[0][0]}x{sizes[0][1]} (aten ops counted by dispatch, Python time by "
                  "perf_counter, 8 steps):", "",
              "| cache | aten ops per step | host work per step (once per forward) | per layer (enter + attend) "
              "| transformers' mask functions per step |",
              "|---|---|---|---|---|"]
    for label, r in profile.items():
        plug = label.startswith("plug")
        host = f"{r['ops_host_per_step']:.0f} ops, {r['host_us_per_step']:.0f} us" if plug else "-"
        layer = f"{r['ops_per_layer']:.0f} ops, {r['layer_us_per_layer']:.0f} us" if plug else "-"
        mask = f"{r['ops_mask_per_step']:.0f} ops, {r['mask_us_per_step']:.0f} us"
        lines.append(f"| {label} | {r['ops_per_step']:.0f} | {host} | {layer} | {mask} |")
    text = "\n".join(lines)
    print("\n" + text)
    stem = f"cpu-{datetime.date.today().isoformat()}{'-tiny' if args.tiny else ''}"
    out = Path(args.out) if args.out else RESULTS / stem
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_cpu.md").write_text(f"# CPU decode step ({'tiny' if args.tiny else 'default'} model)\n\n"
                                      + ", ".join(f"{k} {v}" for k, v in env.items()) + "\n\n" + text + "\n")
    (out / "bench_cpu.json").write_text(json.dumps({"env": env, "tiny": args.tiny, "rows": rows,
                                                    "profile": profile, "missing_backends": missing}, indent=1))
    print(f"\n(written to {out})")
    return 0


def table(rows, providers, sizes, targets) -> list[str]:
    """Minimum ms per decode step and each cache's minimum over DynamicCache's, one column per size."""
    cell = {(r["batch"], r["context"], r["cache"]): r for r in rows}
    head = "| cache | " + " | ".join(f"{b} x {c}" for b, c in sizes) + " | target |"
    lines = [head, "|---|" + "---|" * len(sizes) + "---|"]
    for name in providers:
        parts = []
        for b, c in sizes:
            r, base = cell.get((b, c, name)), cell.get((b, c, "dynamic"))
            if r is None or "error" in r:
                parts.append("error" if r else "-")
            elif base and "min_ms" in base and name != "dynamic":
                parts.append(f"{r['min_ms']:.2f} ms ({r['min_ms'] / base['min_ms']:.2f}x)")
            else:
                parts.append(f"{r['min_ms']:.2f} ms (1.00x)")
        lines.append(f"| {name} | " + " | ".join(parts) + f" | {targets.get(name, '')} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
