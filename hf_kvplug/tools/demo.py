"""`hf-kvplug demo`: the same greedy generate with HF's DynamicCache and with PlugCache (model dtype and INT8).

Default model: a tiny random Llama / Qwen2 / Qwen3 built in code from a seeded config (no download, no tokenizer:
the prompt becomes byte ids and outputs print as token ids). `--model PATH` loads a local checkpoint and its
tokenizer and prints text.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList

from . import models as bm
from . import shapes
from .cases import StepTimer, median_p20_p80
from ..cache import PlugCache
from ..patcher import patched
from ..compat import cache_kwargs as kv

DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="a local checkpoint directory (default: embedded tiny random model)")
    p.add_argument("--family", default="llama", choices=shapes.DEMO_FAMILIES,
                   help="architecture of the embedded model (default llama)")
    p.add_argument("--prompt", default=None, help=f"prompt text (default {DEFAULT_PROMPT!r})")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--kv-dtype", default="int8", choices=("int8", "none"),
                   help="quantized PlugCache to run besides the model-dtype one ('none' skips it; default int8)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto",
                   help="bf16 | fp16 | fp32 (default: the checkpoint's dtype; embedded model: fp32 on CPU, "
                        "bf16 on CUDA)")
    p.add_argument("--seed", type=int, default=0, help="seed of the embedded model's weights")


@dataclass
class DemoRun:
    name: str
    tokens: torch.Tensor  # [new] generated ids of row 0
    prefill_ms: float
    decode_ms: float | None  # median per token
    total_ms: float


def build_demo_model(family: str, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """The embedded model: HF's own init under a fixed seed, without touching the caller's RNG state."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(shapes.demo_config(family), attn_implementation="sdpa")
    model.generation_config.pad_token_id = 0
    return model.to(device=device, dtype=dtype).eval()


def load_model(args, device: torch.device):
    """(model, tokenizer or None, description)."""
    if args.model is None:
        dtype = bm.resolve_dtype(args.dtype, device)
        model = build_demo_model(args.family, dtype, device, args.seed)
        c = model.config
        desc = (f"embedded tiny random {args.family} (hidden {c.hidden_size}, {c.num_hidden_layers} layers, "
                f"{c.num_attention_heads}/{c.num_key_value_heads} heads, seed {args.seed})")
        return model, None, desc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = "auto" if args.dtype in (None, "auto") else bm.resolve_dtype(args.dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    model.generation_config.cache_implementation = None  # generate() refuses a user cache alongside one
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id or 0
    return model, tokenizer, args.model


def encode(text: str, tokenizer, vocab_size: int, device) -> torch.Tensor:
    if tokenizer is not None:
        return tokenizer(text, return_tensors="pt").input_ids.to(device)
    ids = [1] + [3 + b for b in text.encode("utf-8")]  # BOS, then bytes shifted past pad/bos/eos
    return torch.tensor([[i % vocab_size for i in ids]], device=device)


def generate_once(model, prompt: torch.Tensor, new_tokens: int, cache, name: str) -> DemoRun:
    """A short warm-up generate, then a timed one (greedy; caches that preallocate are reset in between)."""
    device = prompt.device
    kw = dict(do_sample=False, attention_mask=torch.ones_like(prompt), disable_compile=True)
    warm = min(new_tokens, 4)
    with torch.inference_mode():
        # min_new_tokens = max_new_tokens: EOS is ignored, so every run decodes the same number of steps.
        model.generate(prompt, max_new_tokens=warm, min_new_tokens=warm, **kv(cache()), **kw)
        timer = StepTimer(device)
        bm.sync(device)
        start = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kv(cache()),
                             logits_processor=LogitsProcessorList([timer]), **kw)
        bm.sync(device)
        end = time.perf_counter()
    times = timer.times
    steps = [(b - a) * 1e3 for a, b in zip(times, times[1:])]
    return DemoRun(name=name, tokens=out[0, prompt.shape[1]:].cpu(), prefill_ms=(times[0] - start) * 1e3,
                   decode_ms=median_p20_p80(steps)[0] if steps else None, total_ms=(end - start) * 1e3)


def _plug_factory(model, max_cache_len: int, kv_dtype):
    cache = PlugCache(model, max_batch_size=1, max_cache_len=max_cache_len, kv_dtype=kv_dtype)

    def fresh():
        cache.reset()
        return cache

    return fresh


def compare(run: DemoRun, ref: DemoRun) -> str:
    n = min(len(run.tokens), len(ref.tokens))
    same = run.tokens[:n] == ref.tokens[:n]
    if bool(same.all()) and len(run.tokens) == len(ref.tokens):
        return f"{run.name} vs {ref.name}: identical tokens ({n}/{n})"
    first = int((~same).nonzero()[0]) if not bool(same.all()) else n
    return (f"{run.name} vs {ref.name}: tokens differ ({int(same.sum())}/{n} equal, first divergence at "
            f"new token {first})")


def show(run: DemoRun, tokenizer) -> str:
    text = tokenizer.decode(run.tokens, skip_special_tokens=True) if tokenizer is not None else run.tokens.tolist()
    decode = "n/a" if run.decode_ms is None else f"{run.decode_ms:.2f} ms/token"
    shown = repr(text) if tokenizer is not None else str(text)
    return (f"{run.name:<22} prefill {run.prefill_ms:7.1f} ms | decode {decode} | total {run.total_ms:7.1f} ms\n"
            f"{'':<22} {shown}")


def run(args) -> int:
    if args.max_new_tokens < 1:
        raise SystemExit("error: --max-new-tokens must be at least 1")
    device = bm.resolve_device(args.device)
    model, tokenizer, desc = load_model(args, device)
    vocab = model.config.get_text_config().vocab_size
    prompt = encode(args.prompt or DEFAULT_PROMPT, tokenizer, vocab, device)
    dname = bm.dtype_name(model.dtype)
    print(f"model:  {desc}, {dname} on {device}")
    print(f"prompt: {args.prompt or DEFAULT_PROMPT!r} → {prompt.shape[1]} tokens"
          + ("" if tokenizer is not None else f" {prompt[0].tolist()}"))
    n = args.max_new_tokens
    max_len = prompt.shape[1] + n
    runs = [generate_once(model, prompt, n, lambda: None, "stock (DynamicCache)")]
    with patched(model):
        runs.append(generate_once(model, prompt, n, _plug_factory(model, max_len, None), f"kvplug ({dname})"))
        if args.kv_dtype == "int8":
            runs.append(generate_once(model, prompt, n, _plug_factory(model, max_len, "int8"), "kvplug (int8)"))
    print()
    for r in runs:
        print(show(r, tokenizer))
    print()
    for r in runs[1:]:
        print(compare(r, runs[0]))
    if device.type != "cuda":
        print(f"\nOn {device.type} the plugged runs use the PyTorch reference (hf_kvplug/reference.py): the correctness "
              "path, which does more work per step than stock. The speed comes from the Triton kernels on a CUDA GPU "
              "(`hf-kvplug bench` there).")
    return 0
