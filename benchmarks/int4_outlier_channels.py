"""Can the keys' outlier channels be found from the weights alone? (docs/int4.md, "A window of the newest tokens")

Per layer and KV head: the 3 RoPE pairs (channels j, j + head_dim / 2) whose keys have the largest mean square over a
calibration text (what `int4_schemes.outlier_k` stores as INT8; a pair's norm is the same before and after RoPE),
against the 3 pairs whose rows of k_proj, times the input norm's weight, have the largest squared norm (what the keys'
scale would be for an isotropic normalized hidden state). Prints the per-head choices of the first layers and the
overlap over the model.

Run: `OMP_NUM_THREADS=1 python benchmarks/int4_outlier_channels.py [--model smollm2|DIR|FILE.gguf] [--pairs 3]`
(about a minute on one CPU thread for SmolLM2).
"""

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import int4_schemes as S  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--calib-text", default="stdlib-train")
    args = p.parse_args()
    torch.set_num_threads(1)
    path, gguf = S.resolve_model(args.model)
    kw = {} if gguf is None else dict(gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    calib = S.calibration(model, S.windows(S.heldout_stream(tokenizer, args.calib_text), 4, 512))
    cfg = model.config
    hk, d = cfg.num_key_value_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    total = agree = 0
    for i, layer in enumerate(model.model.layers):
        ms = calib[i]["k"].pow(2).mean(1)  # [Hk, D]
        data = ms[:, :d // 2] + ms[:, d // 2:]
        w = (layer.self_attn.k_proj.weight * layer.input_layernorm.weight[None]).pow(2).sum(-1).view(hk, d)
        weights = w[:, :d // 2] + w[:, d // 2:]
        for h in range(hk):
            a, b = (set(x[h].topk(args.pairs).indices.tolist()) for x in (data, weights))
            total, agree = total + args.pairs, agree + len(a & b)
            if i < 3:
                print(f"layer {i} KV head {h}: from the keys {sorted(a)}, from the weights {sorted(b)}")
    print(f"top-{args.pairs} pairs chosen alike: {agree} of {total} ({agree / total:.0%})")


if __name__ == "__main__":
    main()
