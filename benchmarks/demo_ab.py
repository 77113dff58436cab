#!/usr/bin/env python
"""`hf-kvplug demo`'s fp32 decode against stock's, in many interleaved pairs: how the demo's per-token figures
compare when the machine's load drifts (the demo itself runs each cache three times).

Each pair is one timed generate() of stock (DynamicCache) and one of the fp32 PlugCache on the demo's model and
prompt (`hf_kvplug.tools.demo.generate_once`: a warm-up, then `--tokens` greedy tokens, the median of the per-token
steps), back to back, the order alternating. It prints the median and quartiles of plug / stock over the pairs and
each side's median and minimum ms per token.

Run (one thread, as the demo's figures in the README):
    OMP_NUM_THREADS=1 python benchmarks/demo_ab.py [--pairs 60] [--tokens 48]
"""

from __future__ import annotations

import argparse
import statistics

import torch


def main() -> None:
    from hf_kvplug.patcher import patched
    from hf_kvplug.tools import demo

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=60)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dp = argparse.ArgumentParser()
    demo.add_arguments(dp)
    model, tok = demo.load_model(dp.parse_args([]), torch.device("cpu"))[:2]
    prompt = demo.encode(demo.DEFAULT_PROMPT, tok, model.config.vocab_size, torch.device("cpu"))
    fresh = demo._plug_factory(model, prompt.shape[1] + args.tokens, None)
    ratios, stock, plug = [], [], []
    for i in range(args.pairs):
        ms = {}
        for who in (("stock", "plug") if i % 2 == 0 else ("plug", "stock")):
            if who == "stock":
                ms[who] = demo.generate_once(model, prompt, args.tokens, lambda: None, who).decode_ms
            else:
                with patched(model):
                    ms[who] = demo.generate_once(model, prompt, args.tokens, fresh, who).decode_ms
        ratios.append(ms["plug"] / ms["stock"])
        stock.append(ms["stock"])
        plug.append(ms["plug"])
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    print(f"{args.pairs} pairs, {args.tokens} tokens, {args.threads} thread(s), torch {torch.__version__}")
    print(f"plug / stock: median {statistics.median(ratios):.4f} (quartiles {q1:.4f} - {q3:.4f}); "
          f"plug faster in {sum(r < 1 for r in ratios)} of {len(ratios)}")
    print(f"ms per token, median (min): stock {statistics.median(stock):.3f} ({min(stock):.3f}), "
          f"plug {statistics.median(plug):.3f} ({min(plug):.3f})")


if __name__ == "__main__":
    main()
