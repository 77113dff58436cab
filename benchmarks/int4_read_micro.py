#!/usr/bin/env python
"""The PyTorch path's two ways to read INT4 codes, timed alone (no model): the two products on the codes
(`torchpath._int4_scores`, softmax, `torchpath._int4_values`: what spans past `DEQUANT_SLOTS` take) against
dequantize-then-SDPA (`torchpath._dequantize` for K and V, the exact tail's slots concatenated, PyTorch's SDPA: what
short spans take), for one layer of 2 KV heads x 2 queries each, head_dim 64, at several batch x slots.

A micro-benchmark: it says what each costs with warm, fresh temporaries, not what a decode step costs in a model
(`benchmarks/bench_cpu.py` does). Large fp32 temporaries also cost page faults each time glibc hands their memory
back to the OS; run it once as is and once with `MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000`
to see that part.

Run: OMP_NUM_THREADS=1 python benchmarks/int4_read_micro.py [--sizes 1x512,1x1024,1x2048,4x2048,1x8192]
"""

from __future__ import annotations

import argparse
import time

import torch

from hf_kvplug import torchpath as tp


def bench(f, n: int) -> float:
    for _ in range(max(2, n // 10)):
        f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1x512,1x1024,1x2048,4x2048,1x8192")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--tail", type=int, default=33, help="exact tail slots after the codes (default 33)")
    args = p.parse_args()
    torch.set_num_threads(1)
    hk, group, d, w = 2, 2, 64, args.tail
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, {hk} KV heads x {group} queries, "
          f"head_dim {d}, {w} exact tail slots; us per call")
    for size in args.sizes.split(","):
        b, t = (int(x) for x in size.split("x"))
        n = b * hk
        g = torch.Generator().manual_seed(0)
        codes = torch.randint(0, 256, (2, b, hk, t, d // 2), dtype=torch.uint8, generator=g)
        params = torch.rand(2, b, hk, t, 4, generator=g).half()
        exact = torch.randn(2, b, hk, w, d, generator=g)
        q = torch.randn(b, hk, group, d, generator=g)

        def products():
            kp, vp = tp._params(params[0], n), tp._params(params[1], n)
            s = tp._int4_scores(q.reshape(n, group, d), codes[0], kp)
            s = torch.cat([s, torch.bmm(q.reshape(n, group, d), exact[0].reshape(n, w, d).transpose(1, 2))], -1)
            pr = torch.softmax(s, -1)
            out = tp._int4_values(pr[..., :t], codes[1], vp)
            return out.add_(torch.bmm(pr[..., t:], exact[1].reshape(n, w, d)))

        def dequantized():
            kv = torch.cat((tp._dequantize(codes, params, "int4"), exact), 3)
            k, v = kv.unbind(0)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

        with torch.inference_mode():
            print(f"{b} x {t}: products {bench(products, args.iters):8.1f}   dequantize + SDPA "
                  f"{bench(dequantized, args.iters):8.1f}")


if __name__ == "__main__":
    main()
