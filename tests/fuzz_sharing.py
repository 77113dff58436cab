"""Isolation fuzzing of caches that share one block pool and prefix index: random interleavings of generate() calls (new
requests sharing a system prompt, continuations of a cache's own conversation, batches of 1-2 rows), forks, dropped
forks, crops and row reorders on a few caches over one pool, checking after every operation two invariants:
- an operation on one cache never changes what another cache reads (every layer's gathered K and V, tail included);
- an indexed block's data never changes while it is indexed (prefix caching).

What copy-on-write, the shared index and the INT4 waiting codes promise together; a fault in any of them shows as a
changed read (a planted fault, each copy-on-write's source block then written, gives 7 violations in seeds 0-9 fp and 2
in INT4; it does not check a cache against stock: `tests/fuzz.py` does). Run: `python tests/fuzz_sharing.py --kv-dtype
int4 --seeds 0 100` (about 6 s per 10 seeds on one CPU thread); `tests/test_fuzz.py` runs a fixed range. Written from a
review's reproducer (2026-12-07)."""

from __future__ import annotations

import argparse
import gc
import random
import sys

import torch

import hf_kvplug
from hf_kvplug.compat import cache_kwargs as kv
from models import tiny_model


def _ids(n: int, seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(2, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def _reads(cache) -> list[torch.Tensor] | None:
    """What the cache reads: each attention layer's gathered K and V, or None when it holds nothing."""
    if not cache.get_seq_length():
        return None
    return [torch.cat([layer.gather(False), layer.gather(True)], -1).clone() for layer in cache.attn_layers]


def _block(cache, b: int) -> torch.Tensor:
    """Block b's data in every layer (codes and scales alike)."""
    return torch.cat([t[b].reshape(-1).float() for layer in cache.attn_layers for t in layer.kv if t.numel()])


def run(kv_dtype: str | None, seeds: range, steps: int = 12) -> list[str]:
    """The invariants' violations over `seeds` (empty: none)."""
    plugged = hf_kvplug.patch(tiny_model("llama"))
    system = _ids(13, 1)
    bad = []
    for seed in seeds:
        rnd = random.Random(seed)
        # (cache, the sequences of its last generate() call)
        live = [[hf_kvplug.PlugCache(plugged, prefix_caching=True, max_tokens=400, max_batch_size=2,
                                     max_cache_len=96, block_size=4, kv_dtype=kv_dtype), None]]
        seen = {}
        for step in range(steps):
            i = rnd.randrange(len(live))
            cache, last = live[i]
            others = [(o, _reads(o[0])) for j, o in enumerate(live) if j != i]
            r = rnd.random()
            if r < 0.15 and len(live) < 4:
                live.append([cache.fork(), last])
            elif r < 0.25 and len(live) > 1:
                live.pop(i)
                gc.collect()
            elif r < 0.35 and cache.get_seq_length() > 3:
                cache.crop(-rnd.randint(1, 3))
            elif r < 0.42 and cache.get_seq_length():
                cache.reorder_cache(torch.tensor([rnd.randrange(2), rnd.randrange(2)]))
            else:
                length = cache.get_seq_length()
                if last is not None and length + 12 < 90 and rnd.random() < 0.4:  # continue its conversation
                    x = torch.cat([last[:1, :length], _ids(rnd.randint(1, 5), seed * 50 + step)], 1)
                    x = x.expand(cache.batch, -1).contiguous()
                else:  # a new request sharing a part of the system prompt
                    cache.reset()
                    x = torch.cat([system[:, :rnd.randint(4, 13)], _ids(rnd.randint(1, 9), seed * 50 + step)], 1)
                    x = x.expand(rnd.choice([1, 2]), -1).contiguous()
                live[i][1] = plugged.generate(x, **kv(cache), max_new_tokens=rnd.randint(1, 6), do_sample=False)
            for other, before in others:
                if other in live and before is not None:
                    err = max((a - b).abs().max().item() for a, b in zip(before, _reads(other[0])))
                    if err > 0:
                        bad.append(f"seed {seed} step {step}: another cache's K/V changed by {err:.3g}")
            index = live[0][0].pools[None].index
            for serial, b in index.entries.values():
                data = _block(live[0][0], b)
                if serial in seen and not torch.equal(seen[serial], data):
                    bad.append(f"seed {seed} step {step}: indexed block {b} changed")
                seen[serial] = data
    return bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kv-dtype", choices=["fp", "int8", "int4"], default="fp")
    ap.add_argument("--seeds", type=int, nargs=2, default=(0, 100), metavar=("FIRST", "END"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    bad = run(None if args.kv_dtype == "fp" else args.kv_dtype, range(*args.seeds))
    print("\n".join(bad))
    print(f"{args.kv_dtype}: seeds {args.seeds[0]}..{args.seeds[1] - 1}, {len(bad)} violations")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
