"""`hf-kvplug demo`: the same greedy generate with HF's DynamicCache and with PlugCache (model dtype and INT8).

Default model: pylm, a 4-layer Llama (GQA) trained on the Python standard library that ships inside hf_kvplug
(`hf_kvplug.tools.pylm`; no download): it completes a Python prompt, and the demo prints the three completions with
the first token that differs from stock marked. `--model PATH` loads a local checkpoint and its tokenizer instead;
`--model smollm2` (or a .gguf file) a GGUF model, SmolLM2-135M-Instruct once `scripts/get_smollm2.sh` has fetched
it. A model whose tokenizer has a chat template gets chat prompts through it (CHAT_PROMPTS, or `--prompt`), one
after the other. `--model random` (or `--family`) builds a tiny random Llama / Qwen2 / Qwen3 in code from a seeded
config (no tokenizer: the prompt becomes byte ids and outputs print as token ids). Timings: each cache's generate()
runs ROUNDS times, the caches taking turns (each round in the order opposite to the last's, so that a drift in the
machine's load favours none); each figure is the median of its runs (decode: of each run's median step).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList

from . import models as bm
from . import pylm, shapes
from .cases import StepTimer, median_p20_p80
from ..cache import PlugCache
from ..patcher import patched
from ..compat import cache_kwargs as kv

DEFAULT_PROMPT = 'def copyfile(src, dst):\n    """Copy data from src to dst."""\n    with open(src, \'rb\') as fsrc:'
RANDOM_PROMPT = "The quick brown fox jumps over the lazy dog."
CHAT_PROMPTS = ("Write a Python function that returns the factorial of n.",
                "What is the capital of France? Answer in one sentence.",
                "Give three tips for writing clear code.")
MARK = ("⟦", "⟧")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="a local checkpoint directory; 'smollm2' (SmolLM2-135M-Instruct, fetched by "
                        "scripts/get_smollm2.sh), a .gguf file or a directory holding one; or 'random' for the "
                        "embedded tiny random model (default: pylm, the Llama trained on the Python stdlib that ships "
                        "with hf_kvplug)")
    p.add_argument("--family", default=None, choices=shapes.DEMO_FAMILIES,
                   help="architecture of the embedded random model (implies --model random; default llama)")
    p.add_argument("--prompt", default=None,
                   help=f"prompt text (default: a Python function header; a chat model: {len(CHAT_PROMPTS)} chat "
                        f"prompts; random model: {RANDOM_PROMPT!r})")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens to generate per prompt (default 48; a chat model: up to 96, ending at EOS)")
    p.add_argument("--kv-dtype", default="int8", choices=("int8", "int4", "none"),
                   help="quantized PlugCache to run besides the model-dtype one ('none' skips it; default int8)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto",
                   help="bf16 | fp16 | fp32 (default: the checkpoint's dtype; embedded and GGUF models: fp32 on CPU, "
                        "bf16 on CUDA)")
    p.add_argument("--seed", type=int, default=0, help="seed of the embedded random model's weights")


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
    if args.model == "random" or (args.model is None and args.family is not None):
        family = args.family or "llama"
        dtype = bm.resolve_dtype(args.dtype, device)
        model = build_demo_model(family, dtype, device, args.seed)
        c = model.config
        desc = (f"embedded tiny random {family} (hidden {c.hidden_size}, {c.num_hidden_layers} layers, "
                f"{c.num_attention_heads}/{c.num_key_value_heads} heads, seed {args.seed})")
        return model, None, desc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = bm.resolve_gguf(args.model) if args.model is not None else None
    if gguf is not None:
        model, label = bm.build_model(gguf, bm.resolve_dtype(args.dtype, device), device)
        c = model.config
        params = sum(p.numel() for p in model.parameters())
        return model, bm.load_tokenizer(gguf), (
            f"{label}, a pretrained {params / 1e6:.0f}M-parameter {c.model_type} ({c.num_hidden_layers} layers, "
            f"{c.num_attention_heads} query / {c.num_key_value_heads} KV heads; GGUF weights dequantized, {gguf})")
    path = args.model or pylm.path()
    # pylm stores fp16 weights and computes in fp32 on the CPU (bf16 on CUDA); a checkpoint keeps its own dtype.
    dtype = bm.resolve_dtype(args.dtype, device) if args.model is None or args.dtype not in (None, "auto") \
        else "auto"
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    model.generation_config.cache_implementation = None  # generate() refuses a user cache alongside one
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id or 0
    if args.model is not None:
        return model, tokenizer, args.model
    c = model.config
    params = sum(p.numel() for p in model.parameters())
    return model, tokenizer, (f"pylm, a {params / 1e6:.1f}M-parameter Llama trained on the Python standard library "
                              f"({c.num_hidden_layers} layers, {c.num_attention_heads} query / "
                              f"{c.num_key_value_heads} KV heads; small enough that its Python is plausible-looking, "
                              f"not correct; {pylm.path()})")


def chat_ids(tokenizer, text: str) -> torch.Tensor:
    """[1, n] ids of `text` as one user turn through the tokenizer's chat template, up to the assistant's turn."""
    chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(chat, return_tensors="pt", add_special_tokens=False).input_ids


def encode(text: str, tokenizer, vocab_size: int, device) -> torch.Tensor:
    if tokenizer is not None:
        return tokenizer(text, return_tensors="pt").input_ids.to(device)
    ids = [1] + [3 + b for b in text.encode("utf-8")]  # BOS, then bytes shifted past pad/bos/eos
    return torch.tensor([[i % vocab_size for i in ids]], device=device)


def generate_once(model, prompt: torch.Tensor, new_tokens: int, cache, name: str, eos: bool = False) -> DemoRun:
    """A short warm-up generate, then a timed one (greedy; caches that preallocate are reset in between). EOS ends
    the timed one only with `eos` (a chat reply)."""
    device = prompt.device
    kw = dict(do_sample=False, attention_mask=torch.ones_like(prompt), disable_compile=True)
    warm = min(new_tokens, 4)
    with torch.inference_mode():
        # min_new_tokens = max_new_tokens: EOS is ignored, so every run decodes the same number of steps.
        model.generate(prompt, max_new_tokens=warm, min_new_tokens=warm, **kv(cache()), **kw)
        timer = StepTimer(device)
        bm.sync(device)
        start = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=None if eos else new_tokens,
                             **kv(cache()), logits_processor=LogitsProcessorList([timer]), **kw)
        bm.sync(device)
        end = time.perf_counter()
    times = timer.times
    steps = [(b - a) * 1e3 for a, b in zip(times, times[1:])]
    return DemoRun(name=name, tokens=out[0, prompt.shape[1]:].cpu(), prefill_ms=(times[0] - start) * 1e3,
                   decode_ms=median_p20_p80(steps)[0] if steps else None, total_ms=(end - start) * 1e3)


ROUNDS = 5  # timed generate() calls per cache, in turns (each round in the other order)


def median_run(runs: list[DemoRun]) -> DemoRun:
    """One cache's runs (the same greedy tokens each time) as one: the median of each timing."""
    decode = [r.decode_ms for r in runs if r.decode_ms is not None]
    # greedy: the same tokens every run, unless something is not deterministic, which the demo then says
    varied = any(not torch.equal(r.tokens, runs[0].tokens) for r in runs[1:])
    name = runs[0].name + (" [tokens varied between runs; the first run's shown]" if varied else "")
    return DemoRun(name, runs[0].tokens, statistics.median(r.prefill_ms for r in runs),
                   statistics.median(decode) if decode else None, statistics.median(r.total_ms for r in runs))


def _plug_factory(model, max_cache_len: int, kv_dtype):
    cache = PlugCache(model, max_batch_size=1, max_cache_len=max_cache_len, kv_dtype=kv_dtype)

    def fresh():
        cache.reset()
        return cache

    return fresh


def first_difference(run: DemoRun, ref: DemoRun) -> int | None:
    """Index of the first new token where `run` differs from `ref` (None when the two are identical)."""
    n = min(len(run.tokens), len(ref.tokens))
    diff = (run.tokens[:n] != ref.tokens[:n]).nonzero()
    if len(diff):
        return int(diff[0])
    return None if len(run.tokens) == len(ref.tokens) else n


def compare(run: DemoRun, ref: DemoRun) -> str:
    n = min(len(run.tokens), len(ref.tokens))
    first = first_difference(run, ref)
    if first is None:
        return f"{run.name} vs {ref.name}: identical tokens ({n}/{n})"
    same = int((run.tokens[:n] == ref.tokens[:n]).sum())
    return f"{run.name} vs {ref.name}: tokens differ ({same}/{n} equal, first divergence at new token {first})"


def completion(run: DemoRun, tokenizer, first: int | None) -> str:
    """The new tokens as text (token ids without a tokenizer), the one at index `first` wrapped in ⟦ ⟧."""
    ids = run.tokens.tolist()
    if tokenizer is None:
        parts = [str(i) for i in ids]
        if first is not None and first < len(parts):
            parts[first] = MARK[0] + parts[first] + MARK[1]
        return "[" + ", ".join(parts) + "]"

    def text(x):
        return tokenizer.decode(x, skip_special_tokens=True)
    if first is None or first >= len(ids):
        return text(ids)
    return text(ids[:first]) + MARK[0] + text(ids[first:first + 1]) + MARK[1] + text(ids[first + 1:])


def stock_margin(model, prompt: torch.Tensor, ref: DemoRun, first: int) -> float:
    """Gap between the two best logits of the (unpatched) model before new token `first` of `ref`: one forward
    over the prompt and the `first` tokens before it."""
    ids = torch.cat([prompt, ref.tokens[:first].to(prompt.device)[None]], dim=1)
    with torch.inference_mode():
        top = model(ids, attention_mask=torch.ones_like(ids)).logits[0, -1].float().topk(2).values
    return float(top[0] - top[1])


def timing(run: DemoRun) -> str:
    decode = "n/a" if run.decode_ms is None else f"{run.decode_ms:6.2f} ms/token"
    return f"{run.name:<22} prefill {run.prefill_ms:7.1f} ms | decode {decode} | total {run.total_ms:7.1f} ms"


def block(text: str) -> str:
    return "\n".join("  │ " + line for line in text.rstrip("\n").split("\n"))


def run_prompt(model, tokenizer, prompt: torch.Tensor, n: int, kv_dtype: str, eos: bool = False) -> None:
    """Stock, model-dtype PlugCache and (unless 'none') `kv_dtype` PlugCache on `prompt [1, P]`: `n` greedy tokens
    each (fewer where `eos` and the reply ends), printed side by side with timings and where each departs from
    stock."""
    dname = bm.dtype_name(model.dtype)
    max_len = prompt.shape[1] + n
    plugged = [(f"kvplug ({dname})", _plug_factory(model, max_len, None))]
    if kv_dtype != "none":
        plugged.append((f"kvplug ({kv_dtype})", _plug_factory(model, max_len, kv_dtype)))
    caches = [("stock (DynamicCache)", None)] + plugged
    rounds = []  # the caches take turns, ROUNDS times, so a change in the machine's load falls on all of them alike
    for i in range(ROUNDS):
        turn = [None] * len(caches)
        for j in (range(len(caches)) if i % 2 == 0 else reversed(range(len(caches)))):  # each round the other way
            name, factory = caches[j]
            with patched(model) if factory else contextlib.nullcontext():
                turn[j] = generate_once(model, prompt, n, factory or (lambda: None), name, eos)
        rounds.append(turn)
    runs = [median_run([r[i] for r in rounds]) for i in range(len(rounds[0]))]
    until = "up to {n} greedy new tokens from each (the reply ends at EOS)" if eos else \
        "{n} greedy new tokens from each (EOS ignored)"
    print(f"\n{until.format(n=n)}; the first token that differs from stock is marked {MARK[0]}like this{MARK[1]}:")
    for r in runs:
        first = None if r is runs[0] else first_difference(r, runs[0])
        print(f"\n{r.name}" + ("" if r is runs[0] else f": {compare(r, runs[0]).split(': ', 1)[1]}"))
        print(block(completion(r, tokenizer, first)))
    print(f"\ntimings, the median of {ROUNDS} runs each, the caches taking turns in alternating order:")
    for r in runs:
        print(timing(r))
    print()
    for r in runs[1:]:
        print(compare(r, runs[0]))
    for r in runs[1:]:
        first = first_difference(r, runs[0])
        if first is not None and first < len(runs[0].tokens):
            margin = stock_margin(model, prompt, runs[0], first)
            print(f"  {r.name}: before new token {first}, stock's two best candidates were {margin:.3f} apart (in "
                  "logits), so a small change in the logits picks the other one, and the texts part from there "
                  "(`hf-kvplug quality` measures how often that happens over many positions)")


def run(args) -> int:
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise SystemExit("error: --max-new-tokens must be at least 1")
    device = bm.resolve_device(args.device)
    model, tokenizer, desc = load_model(args, device)
    vocab = model.config.get_text_config().vocab_size
    chat = tokenizer is not None and getattr(tokenizer, "chat_template", None) is not None
    if chat:
        texts = [args.prompt] if args.prompt else list(CHAT_PROMPTS)
        prompts = [chat_ids(tokenizer, t).to(device) for t in texts]
    else:
        texts = [args.prompt or (DEFAULT_PROMPT if tokenizer is not None else RANDOM_PROMPT)]
        prompts = [encode(texts[0], tokenizer, vocab, device)]
    n = args.max_new_tokens or (96 if chat else 48)
    print(f"model:  {desc}, {bm.dtype_name(model.dtype)} on {device}")
    for i, (text, prompt) in enumerate(zip(texts, prompts)):
        if chat:
            print(f"\n=== chat {i + 1}/{len(texts)}: the user's turn through the chat template ({prompt.shape[1]} "
                  f"tokens with the template):\n{block(text)}")
        elif tokenizer is not None:
            print(f"prompt ({prompt.shape[1]} tokens):\n{block(text)}")
        else:
            print(f"prompt: {text!r} → {prompt.shape[1]} tokens {prompt[0].tolist()}")
        run_prompt(model, tokenizer, prompt, n, args.kv_dtype, eos=chat)
    if device.type != "cuda":
        print(f"\nOn {device.type} the plugged runs take hf_kvplug's PyTorch path (hf_kvplug/torchpath.py): each row's "
              "blocks read where they lie, a plan per forward shared by every layer; `benchmarks/bench_cpu.py` puts it "
              "beside every transformers cache. On a CUDA GPU the Triton kernels run instead (`hf-kvplug bench`).")
    return 0
