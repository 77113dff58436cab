#!/usr/bin/env python
"""Prefix caching in a chat: a long system prompt sent with every request, one request at a time.

A 1,024-token system prompt, then `--requests` requests (default 8), each the system prompt and a different 32-token
user turn, 16 greedy new tokens, batch 1, `cache.reset()` between requests (as a server reuses one cache). Side by
side in one run: a PlugCache with `prefix_caching=True` and one without. Per request: the tokens its first forward is
fed, its time to first token (TTFT: from the call to the streamer receiving the first new token) and its whole
generate() time; the tokens must equal the cache without prefix caching. The targets: requests 2-8 feed at most one
block plus their turn, with a TTFT at most 1/5 of request 1's.

    OMP_NUM_THREADS=1 python benchmarks/bench_prefix.py                  # the CPU, the default random model
    python benchmarks/bench_prefix.py --device cuda --dtype bf16 --model llama3-8b-4l   # a GPU (4-layer 8B slice)

Models are random (no download): `default` is bench_cpu.py's (4 layers, hidden 256), `llama3-8b-4l` the Llama-3-8B
shape cut to 4 layers. Results go to `--out` (markdown and JSON), by default benchmarks/results/prefix-<date>/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import RESULTS, build_models, environment  # noqa: E402


class FirstToken:
    """A streamer that notes when the first new token arrives (generate() puts the prompt first)."""

    def __init__(self):
        self.calls, self.at = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.at is None:
            self.at = time.perf_counter()

    def end(self):
        pass


def run(model, cache, prompts, new_tokens: int, device) -> list[dict]:
    import hf_kvplug

    fed = []
    hook = model.register_forward_pre_hook(
        lambda mod, args, kwargs: fed.append((kwargs.get("input_ids") if kwargs.get("input_ids") is not None
                                              else args[0]).shape[1]), with_kwargs=True)
    rows = []
    try:
        for ids in prompts:
            cache.reset()
            fed.clear()
            streamer = FirstToken()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(ids, **{hf_kvplug.CACHE_KWARG: cache}, max_new_tokens=new_tokens,
                                     do_sample=False, streamer=streamer)
            if device.type == "cuda":
                torch.cuda.synchronize()
            total = time.perf_counter() - t0
            rows.append({"prompt": ids.shape[1], "first_forward_tokens": fed[0], "ttft_ms": (streamer.at - t0) * 1e3,
                         "generate_ms": total * 1e3, "tokens": out[0, ids.shape[1]:].tolist(),
                         "hit_tokens": cache.stats().get("prefix_hit_tokens", 0)})
    finally:
        hook.remove()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", choices=("default", "llama3-8b-4l"))
    p.add_argument("--system", type=int, default=1024, help="system prompt tokens (default 1024)")
    p.add_argument("--turn", type=int, default=32, help="user turn tokens (default 32)")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    import hf_kvplug

    if args.model == "default":
        _, model = build_models(False, device, 0)
    else:
        from transformers import LlamaForCausalLM

        from hf_kvplug.tools import shapes

        config = shapes.llama3_8b()
        config.num_hidden_layers = 4
        torch.manual_seed(0)
        model = hf_kvplug.patch(LlamaForCausalLM(config).to(device))
    model = model.to(dtype).eval()
    model.generation_config.pad_token_id = 0
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    system = torch.randint(1, vocab, (1, args.system), generator=g)
    prompts = [torch.cat([system, torch.randint(1, vocab, (1, args.turn), generator=g)], 1).to(device)
               for _ in range(args.requests)]
    size = dict(max_batch_size=1, max_cache_len=args.system + args.turn + args.new_tokens + args.block_size,
                block_size=args.block_size)
    with_index = hf_kvplug.PlugCache(model, prefix_caching=True, **size)
    without = hf_kvplug.PlugCache(model, **size)
    run(model, without, prompts[:1], 2, device)  # warm-up: allocations, first-call overheads
    base = run(model, without, prompts, args.new_tokens, device)
    cached = run(model, with_index, prompts, args.new_tokens, device)
    env = environment()
    first = cached[0]["ttft_ms"]
    lines = ["| request | fed, first forward | TTFT (no prefix caching) | TTFT (prefix caching) | TTFT / request 1's "
             "| generate() (no / with) | same tokens |", "|---|---|---|---|---|---|---|"]
    ok = True
    for i, (a, b) in enumerate(zip(base, cached)):
        same = a["tokens"] == b["tokens"]
        ok &= same
        if i:
            ok &= b["first_forward_tokens"] <= args.block_size + args.turn and b["ttft_ms"] <= first / 5
        lines.append(f"| {i + 1} | {b['first_forward_tokens']} of {b['prompt']} | {a['ttft_ms']:.1f} ms | "
                     f"{b['ttft_ms']:.1f} ms | {b['ttft_ms'] / first:.2f} | {a['generate_ms']:.0f} / "
                     f"{b['generate_ms']:.0f} ms | {'yes' if same else 'NO'} |")
    later = [b["ttft_ms"] for b in cached[1:]]
    summary = (f"requests 2-{len(cached)}: TTFT {min(later):.1f}-{max(later):.1f} ms against request 1's "
               f"{first:.1f} ms ({max(later) / first:.2f}x at most; target <= 0.20x), first forward fed at most "
               f"{max(b['first_forward_tokens'] for b in cached[1:])} tokens "
               f"(target <= {args.block_size + args.turn}); "
               f"prefix_hit_tokens {cached[-1]['hit_tokens']}; targets {'met' if ok else 'MISSED'}")
    text = "\n".join(lines) + "\n\n" + summary
    print(f"# prefix caching, chat ({args.model}, {args.dtype}, {device}): " + ", ".join(
        f"{k} {v}" for k, v in env.items()))
    print(text)
    out = Path(args.out) if args.out else RESULTS / f"prefix-{datetime.date.today().isoformat()}-{device.type}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_prefix.md").write_text(f"# Prefix caching, chat ({args.model}, {args.dtype}, {device})\n\n"
                                         + ", ".join(f"{k} {v}" for k, v in env.items()) + "\n\n" + text + "\n")
    (out / "bench_prefix.json").write_text(json.dumps({"env": env, "args": vars(args), "without": base,
                                                       "with": cached}, indent=1))
    print(f"\n(written to {out})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
