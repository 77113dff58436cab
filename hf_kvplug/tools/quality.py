"""`hf-kvplug quality`: what each KV format costs in accuracy, on real text with a trained model.

Every format in `hf_kvplug.config.KV_DTYPES` runs through a PlugCache; the model-dtype one (`kv_dtype=None`) is the
reference, and stock `DynamicCache` is measured against it too (a sanity row: float rounding only). Text: the Python
standard library files held out from pylm's training (`hf_kvplug.tools.pylm`), tokenized by the model's tokenizer.

Teacher-forced, at each context length L: windows of L + 1 held-out tokens, evenly spaced. Every cache gets the
first `--prefill` tokens in one forward, which hf_kvplug runs with the model's own attention over the exact K/V
(so it is exact for every format and is not measured), then the rest `--chunk` tokens per forward (1 = the decode
path that generate() takes); each of those forwards reads all K/V back from the cache. Over the measured positions:
NLL per token of the true next token and its increase over the reference, top-1 agreement with the reference's
argmax, max and mean |logit - reference logit|, max |error| / max |reference logit|, and among the positions whose
argmax differs the largest gap between the reference's two best logits (small: the flips are near-ties).

Greedy: `--gen-prompts` held-out prompts of `--gen-prompt-len` tokens, `--gen-tokens` new tokens each (EOS
ignored), compared with the reference's tokens as prefix agreement (new tokens before the first divergence over all
new tokens, averaged over prompts: the figure the targets judge) and position-wise agreement (equal tokens at equal
positions).

`--split-kv` adds, for each quantized format with a known round trip (INT8, INT4), a stock DynamicCache that stores only
K, or only V, through that round trip (a benchmark-only diagnosis of which one costs accuracy; its prefill also sees
the exact K/V, as hf_kvplug's does). `--half-baselines` adds, for an fp32 model, caches that store K and V rounded to
bf16 and to fp16: how much any 16-bit cache moves the same figures (greedy flips at near-ties included).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from transformers import DynamicCache

from . import models as bm
from . import pylm
from .report import default_out_dir, environment, rel
from ..cache import PlugCache
from ..compat import cache_kwargs as kv
from ..config import KV_DTYPES
from ..patcher import patched
from ..reference import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8
from ..rotation import key_rotation, rotation_gain

ROUND_TRIPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "int8": lambda x: dequantize_int8(*quantize_int8(x), x.dtype),
    "int4": lambda x: dequantize_int4(*quantize_int4(x), x.dtype),
}
# What a 16-bit cache would change in an fp32 model: the yardstick for how often greedy flips at near-ties anyway.
HALF_ROUND_TRIPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "bf16": lambda x: x.to(torch.bfloat16).to(x.dtype),
    "fp16": lambda x: x.to(torch.float16).to(x.dtype),
}


@dataclass(frozen=True)
class Targets:
    """What a KV format must reach on the shipped model (issue 13): at every context length measured."""

    nll_delta: float = 0.01  # nats/token, at most
    top1: float = 0.995  # at least
    greedy: float = 0.99  # prefix agreement over the generated tokens, at least


TARGETS = {"int8": Targets(), "int4": Targets(nll_delta=0.05, top1=0.0, greedy=0.95)}  # issue 16: no top-1 target


@dataclass
class Settings:
    contexts: list[int]
    tokens: int = 1024  # teacher-forced tokens per context length (windows = ceil(tokens / L))
    prefill: int = 16
    chunk: int = 1
    gen_prompts: int = 4
    gen_prompt_len: int = 256
    gen_tokens: int = 256
    split_kv: bool = False
    half_baselines: bool = False


# The defaults for a --model on the CPU (pylm keeps Settings'): a pretrained model decodes ~15x slower than pylm there
# (SmolLM2-135M: about 50 ms a step on 2 cores, so these take about 4 minutes).
CPU_MODEL_DEFAULTS = dict(contexts=[128, 512], tokens=256, gen_prompts=2, gen_tokens=64)


@dataclass
class Format:
    """One way of caching K/V: `fresh()` returns an empty cache of it (None = generate()'s own DynamicCache)."""

    name: str
    kv_dtype: str | None  # the PlugCache format, or for a round-trip emulation the format emulated
    fresh: Callable[[], object]
    is_reference: bool = False


@dataclass
class Stats:
    """Running sums over measured positions of one format against the reference."""

    positions: int = 0
    nll: float = 0.0
    nll_ref: float = 0.0
    top1: int = 0
    max_err: float = 0.0
    abs_err: float = 0.0
    elements: int = 0
    max_ref: float = 0.0
    flipped_margin: float = 0.0  # largest reference top-1 - top-2 logit gap where the argmax differs

    def add(self, logits: torch.Tensor, ref: torch.Tensor, targets: torch.Tensor) -> None:
        """logits, ref [n, vocab] float32; targets [n]."""
        nll = -torch.log_softmax(logits, -1).gather(1, targets[:, None])
        nll_ref = -torch.log_softmax(ref, -1).gather(1, targets[:, None])
        err = (logits - ref).abs()
        self.positions += len(targets)
        self.nll += float(nll.sum())
        self.nll_ref += float(nll_ref.sum())
        agree = logits.argmax(-1) == ref.argmax(-1)
        self.top1 += int(agree.sum())
        if not bool(agree.all()):
            top2 = ref[~agree].topk(2, dim=-1).values
            self.flipped_margin = max(self.flipped_margin, float((top2[:, 0] - top2[:, 1]).max()))
        self.max_err = max(self.max_err, float(err.max()))
        self.abs_err += float(err.sum())
        self.elements += err.numel()
        self.max_ref = max(self.max_ref, float(ref.abs().max()))


@dataclass
class QualityRow:
    model: str
    dtype: str
    device: str
    context: int
    format: str
    windows: int
    positions: int
    nll: float
    nll_ref: float
    nll_delta: float
    top1: float
    max_logit_err: float
    mean_logit_err: float
    rel_max_logit_err: float
    flipped_margin: float  # largest reference top-1 - top-2 logit gap among positions whose argmax differs (0: none)


@dataclass
class GreedyRow:
    model: str
    dtype: str
    device: str
    format: str
    prompts: int
    prompt_len: int
    new_tokens: int
    prefix_agreement: float
    positionwise_agreement: float
    first_divergence: list[int | None] = field(default_factory=list)  # per prompt, new-token index (None: none)
    divergence_margin: list[float | None] = field(default_factory=list)  # reference's top-2 score gap there


class RoundTripCache(DynamicCache):
    """Stock DynamicCache that stores K and/or V through `round_trip` (quantize, dequantize); with `rotate_keys`,
    keys as a quantized PlugCache stores them: `round_trip(k R) R^T / g` (`hf_kvplug.rotation`). As in hf_kvplug,
    the prefill attends over the exact K/V it was given; every later forward reads the stored ones."""

    def __init__(self, config, round_trip: Callable[[torch.Tensor], torch.Tensor], keys: bool, values: bool,
                 rotate_keys: bool = False):
        super().__init__(config=config)
        self.round_trip, self.keys, self.values, self.rotate_keys = round_trip, keys, values, rotate_keys
        self._rotation = None

    def _key_round_trip(self, k: torch.Tensor) -> torch.Tensor:
        if not self.rotate_keys:
            return self.round_trip(k)
        if self._rotation is None:  # built once, at the first key seen (head_dim, device, dtype)
            self._rotation = key_rotation(k.shape[-1]).to(k.device, k.dtype), rotation_gain(k.shape[-1])
        r, g = self._rotation
        return self.round_trip(k @ r) @ r.T / g

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        prefill = self.get_seq_length(layer_idx) == 0
        k = self._key_round_trip(key_states) if self.keys else key_states
        v = self.round_trip(value_states) if self.values else value_states
        k_all, v_all = super().update(k, v, layer_idx, *args, **kwargs)
        return (key_states, value_states) if prefill else (k_all, v_all)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .bench import parse_sizes

    p.add_argument("--model", default=None,
                   help="a local checkpoint directory with a tokenizer; 'smollm2' (SmolLM2-135M-Instruct, fetched by "
                        "scripts/get_smollm2.sh), a .gguf file or a directory holding one (default: pylm, the Llama "
                        "trained on the stdlib that ships with hf_kvplug)")
    p.add_argument("--contexts", type=parse_sizes, default=None,
                   help="context lengths, k = 1024 (default 128,256,512,1024, capped at the model's; a --model on "
                        "the CPU: 128,512)")
    p.add_argument("--tokens", type=int, default=None,
                   help=f"teacher-forced tokens per context length (default {Settings.tokens}; a --model on the "
                        f"CPU: {CPU_MODEL_DEFAULTS['tokens']})")
    p.add_argument("--prefill", type=int, default=Settings.prefill,
                   help=f"tokens of each window given to the (exact) prefill (default {Settings.prefill})")
    p.add_argument("--chunk", type=int, default=Settings.chunk,
                   help="tokens per forward after the prefill (default 1: decode steps; more: multi-token forwards "
                        "through the cache, faster on big models)")
    p.add_argument("--gen-prompts", type=int, default=None,
                   help=f"greedy prompts (default {Settings.gen_prompts}; a --model on the CPU: "
                        f"{CPU_MODEL_DEFAULTS['gen_prompts']}; 0 skips greedy)")
    p.add_argument("--gen-prompt-len", type=int, default=Settings.gen_prompt_len,
                   help=f"greedy prompt tokens (default {Settings.gen_prompt_len})")
    p.add_argument("--gen-tokens", type=int, default=None,
                   help=f"greedy new tokens per prompt (default {Settings.gen_tokens}; a --model on the CPU: "
                        f"{CPU_MODEL_DEFAULTS['gen_tokens']})")
    p.add_argument("--split-kv", action="store_true",
                   help="also measure K-only and V-only round trips of each quantized format (diagnosis)")
    p.add_argument("--half-baselines", action="store_true",
                   help="fp32 models: also measure K/V rounded to bf16 and to fp16 (what a 16-bit cache changes)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="bf16 | fp16 | fp32 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--out", default=None,
                   help="output directory (default benchmarks/results/<date>-<device>-quality-<model>)")


# ------------------------------------------------------------------------------------------------ text

def heldout_stream(tokenizer) -> torch.Tensor:
    """[n] token ids of the held-out stdlib files, each encoded as the tokenizer encodes a text (BOS or not)."""
    ids = tokenizer(pylm.heldout_texts())["input_ids"]
    return torch.tensor([i for doc in ids for i in doc], dtype=torch.long)


def windows(stream: torch.Tensor, count: int, length: int, offset: float = 0.0) -> torch.Tensor:
    """[count, length] evenly spaced windows; `offset` (a fraction of the spacing) shifts them."""
    if len(stream) < length:
        raise SystemExit(f"error: the held-out text has {len(stream)} tokens, fewer than {length}")
    span = len(stream) - length
    starts = [int((i + offset) * span / count) for i in range(count)]
    return torch.stack([stream[s:s + length] for s in starts])


# ------------------------------------------------------------------------------------------------ formats

def formats(model, max_cache_len: int, split_kv: bool, half_baselines: bool = False) -> list[Format]:
    """Stock DynamicCache, a PlugCache per format of KV_DTYPES (the model-dtype one is the reference) and INT4
    without its exact tail (`exact_tail=False`); with `split_kv`, K-only / V-only round trips of each quantized format
    that has one; with `half_baselines` (fp32 models only), K and V rounded to bf16 and to fp16."""
    def plug(kv_dtype, **kw):
        cache = PlugCache(model, max_batch_size=1, max_cache_len=max_cache_len, kv_dtype=kv_dtype, **kw)

        def fresh():
            cache.reset()
            return cache
        return fresh

    dname = bm.dtype_name(model.dtype)
    out = [Format("stock-dynamic", None, lambda: DynamicCache(config=model.config))]
    for kv_dtype in KV_DTYPES:
        out.append(Format(f"plug-{kv_dtype or dname}", kv_dtype, plug(kv_dtype), is_reference=kv_dtype is None))
    # int4 as it was before its exact tail (every token read quantized): what the tail buys, side by side
    out.append(Format("plug-int4-no-tail", "int4", plug("int4", exact_tail=False)))
    if split_kv:
        for kv_dtype in KV_DTYPES:
            if kv_dtype in ROUND_TRIPS:
                rt = ROUND_TRIPS[kv_dtype]
                out.append(Format(f"emul-{kv_dtype}-k-only", kv_dtype,
                                  lambda rt=rt: RoundTripCache(model.config, rt, keys=True, values=False,
                                                               rotate_keys=True)))
                out.append(Format(f"emul-{kv_dtype}-v-only", kv_dtype,
                                  lambda rt=rt: RoundTripCache(model.config, rt, keys=False, values=True)))
    if half_baselines and model.dtype == torch.float32:
        for name, rt in HALF_ROUND_TRIPS.items():
            out.append(Format(f"emul-{name}", None,
                              lambda rt=rt: RoundTripCache(model.config, rt, keys=True, values=True)))
    return out


# ------------------------------------------------------------------------------------------------ measures

@torch.inference_mode()
def teacher_forced(model, ids: torch.Tensor, fmts: list[Format], prefill: int, chunk: int, stats: dict) -> None:
    """Adds one window `ids [1, L + 1]` to `stats[name]`: prefill `prefill` tokens, then `chunk` tokens per forward
    up to token L - 1, every format in lockstep, each step's logits compared with the reference's at once."""
    caches = {f.name: f.fresh() for f in fmts}
    ref_name = next(f.name for f in fmts if f.is_reference)
    length = ids.shape[1] - 1
    for cache in caches.values():
        model(ids[:, :prefill], **kv(cache), use_cache=True)
    for start in range(prefill, length, chunk):
        end = min(length, start + chunk)
        targets = ids[0, start + 1:end + 1]
        logits = {name: model(ids[:, start:end], **kv(cache), use_cache=True).logits[0].float()
                  for name, cache in caches.items()}
        for name, lg in logits.items():
            stats[name].add(lg, logits[ref_name], targets)


@torch.inference_mode()
def greedy(model, prompt: torch.Tensor, fmt: Format, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy ids [new_tokens] after `prompt [1, P]` (EOS ignored), and the gap between the two best scores at each
    step [new_tokens]."""
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, disable_compile=True, return_dict_in_generate=True,
                         output_scores=True, **kv(fmt.fresh()))
    top2 = torch.stack([sc[0].float().topk(2).values for sc in out.scores]).cpu()
    return out.sequences[0, prompt.shape[1]:].cpu(), top2[:, 0] - top2[:, 1]


def agreement(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, int | None]:
    """(prefix agreement, position-wise agreement, first divergence or None) of two [n] id sequences."""
    same = got == ref
    first = None if bool(same.all()) else int((~same).nonzero()[0])
    n = len(ref)
    return (n if first is None else first) / n, float(same.float().mean()), first


def measure(model, stream: torch.Tensor, label: str, s: Settings, log=print) -> tuple[list[QualityRow],
                                                                                     list[GreedyRow]]:
    """Every format at every context length (teacher-forced), then greedy, on the token `stream [n]`; rows in
    format order per context."""
    device = next(model.parameters()).device
    max_len = max(max(s.contexts), s.gen_prompt_len + s.gen_tokens if s.gen_prompts else 0)
    fmts = formats(model, max_len, s.split_kv, s.half_baselines)
    dname = bm.dtype_name(model.dtype)
    common = dict(model=label, dtype=dname, device=str(device))
    rows: list[QualityRow] = []
    for length in s.contexts:
        count = -(-s.tokens // length)
        stats = {f.name: Stats() for f in fmts}
        t0 = time.perf_counter()
        for w in windows(stream, count, length + 1):
            teacher_forced(model, w[None].to(device), fmts, s.prefill, s.chunk, stats)
        for f in fmts:
            st = stats[f.name]
            rows.append(QualityRow(
                **common, context=length, format=f.name, windows=count, positions=st.positions,
                nll=st.nll / st.positions, nll_ref=st.nll_ref / st.positions,
                nll_delta=(st.nll - st.nll_ref) / st.positions, top1=st.top1 / st.positions,
                max_logit_err=st.max_err, mean_logit_err=st.abs_err / st.elements,
                rel_max_logit_err=st.max_err / st.max_ref, flipped_margin=st.flipped_margin))
        log(f"context {length}: {count} windows, {stats[fmts[0].name].positions} positions per format "
            f"({time.perf_counter() - t0:.0f} s)")
        for r in rows[-len(fmts):]:
            log(f"  {r.format:<18} nll {r.nll:.4f} (delta {r.nll_delta:+.5f})  top-1 {r.top1:.2%}  "
                f"max|err| {r.max_logit_err:.4f}  mean|err| {r.mean_logit_err:.5f}  "
                f"flipped margin <= {r.flipped_margin:.4f}")
    greedy_rows: list[GreedyRow] = []
    if s.gen_prompts:
        t0 = time.perf_counter()
        prompts = windows(stream, s.gen_prompts, s.gen_prompt_len, offset=0.5)
        ref_fmt = next(f for f in fmts if f.is_reference)
        refs, margins = zip(*[greedy(model, p[None].to(device), ref_fmt, s.gen_tokens) for p in prompts])
        for f in fmts:
            got = refs if f.is_reference else [greedy(model, p[None].to(device), f, s.gen_tokens)[0] for p in prompts]
            agree = [agreement(g, r) for g, r in zip(got, refs)]
            greedy_rows.append(GreedyRow(
                **common, format=f.name, prompts=len(prompts), prompt_len=s.gen_prompt_len, new_tokens=s.gen_tokens,
                prefix_agreement=sum(a[0] for a in agree) / len(agree),
                positionwise_agreement=sum(a[1] for a in agree) / len(agree),
                first_divergence=[a[2] for a in agree],
                divergence_margin=[None if a[2] is None else float(m[a[2]]) for a, m in zip(agree, margins)]))
        log(f"greedy: {len(prompts)} prompts x {s.gen_tokens} new tokens ({time.perf_counter() - t0:.0f} s)")
        for g in greedy_rows:
            log(f"  {g.format:<18} prefix {g.prefix_agreement:.2%}  position-wise {g.positionwise_agreement:.2%}  "
                f"first divergence {g.first_divergence}, reference margin there "
                f"{[None if m is None else round(m, 4) for m in g.divergence_margin]}")
    return rows, greedy_rows


# ------------------------------------------------------------------------------------------------ verdict

def verdicts(rows: list[QualityRow], greedy_rows: list[GreedyRow]) -> list[str]:
    """One line per target of each format that has targets (TARGETS), measured figures included."""
    lines = []
    for kv_dtype, t in TARGETS.items():
        name = f"plug-{kv_dtype}"
        mine = [r for r in rows if r.format == name]
        if not mine:
            continue
        worst_nll = max(mine, key=lambda r: r.nll_delta)
        worst_top1 = min(mine, key=lambda r: r.top1)
        checks = [(worst_nll.nll_delta <= t.nll_delta,
                   f"NLL increase <= {t.nll_delta} nats/token at every context: worst {worst_nll.nll_delta:+.5f} "
                   f"(context {worst_nll.context})"),
                  (worst_top1.top1 >= t.top1,
                   f"top-1 agreement >= {t.top1:.1%}: worst {worst_top1.top1:.2%} (context {worst_top1.context})")]
        g = next((g for g in greedy_rows if g.format == name), None)
        if g is not None:
            checks.append((g.prefix_agreement >= t.greedy,
                           f"greedy agreement >= {t.greedy:.0%} over {g.new_tokens} tokens (prefix): "
                           f"{g.prefix_agreement:.2%}"))
        lines += [f"{name}: {'met' if ok else 'MISSED'}: {text}" for ok, text in checks]
    return lines


# ------------------------------------------------------------------------------------------------ files

def _table(rows, columns: list[tuple[str, str, str]]) -> str:
    """Markdown table of dataclass rows: (attribute, header, format spec)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(format(getattr(r, a), f) for a, _, f in columns) + " |\n" for r in rows)


def markdown(rows: list[QualityRow], greedy_rows: list[GreedyRow], meta: dict) -> str:
    tf = _table(rows, [("context", "context", "d"), ("format", "format", "s"), ("positions", "positions", "d"),
                       ("nll", "NLL (nats/token)", ".4f"), ("nll_delta", "Δ NLL vs reference", "+.5f"),
                       ("top1", "top-1 agreement", ".2%"), ("max_logit_err", "max abs logit err", ".3g"),
                       ("mean_logit_err", "mean abs logit err", ".3g"),
                       ("rel_max_logit_err", "max err / max abs logit", ".3%"),
                       ("flipped_margin", "largest flipped margin", ".4f")])
    gr = _table(greedy_rows, [("format", "format", "s"), ("prompts", "prompts", "d"),
                              ("prompt_len", "prompt tokens", "d"), ("new_tokens", "new tokens", "d"),
                              ("prefix_agreement", "prefix agreement", ".2%"),
                              ("positionwise_agreement", "position-wise agreement", ".2%")])
    s = meta["settings"]
    lines = [f"# KV format quality: {meta['model']} ({meta['dtype']} on {meta['device_name']})", "",
             f"{meta['date']}, hf_kvplug {meta['git_commit']}, torch {meta['torch']}, transformers "
             f"{meta['transformers']}. Reference: the model-dtype PlugCache (`plug-{meta['dtype']}`). Text: the "
             f"{meta['heldout_tokens']:,} held-out tokens of pylm's stdlib split. Teacher-forced: prefill "
             f"{s['prefill']} tokens (exact, not measured), then {s['chunk']} token(s) per forward through the cache; "
             f"about {s['tokens']} measured tokens per context. Wall time {meta['wall_s']:.0f} s.", "",
             "## Teacher-forced", "", "Largest flipped margin: among the positions whose top-1 differs from the "
             "reference, the largest gap between the reference's two best logits (0 when none differs): the flips "
             "are near-ties when it is small.", "", tf]
    if greedy_rows:
        lines += ["## Greedy", "", "Prefix agreement: new tokens before the first divergence from the reference, over "
                  "all new tokens, averaged over prompts. Position-wise: equal tokens at equal positions.", "", gr]
        lines += ["First divergence per prompt (new-token index, and the gap between the reference's two best "
                  "logits at that step; – = none): " + "; ".join(
                      f"{g.format}: " + ", ".join("–" if d is None else f"{d} ({m:.3f})"
                                                  for d, m in zip(g.first_divergence, g.divergence_margin))
                      for g in greedy_rows if g.format != "plug-" + meta["dtype"]), ""]
    if meta["verdicts"]:
        lines += ["## Targets", ""] + [f"- {v}" for v in meta["verdicts"]] + [""]
    lines += ["Command: `" + meta["command"] + "`", ""]
    return "\n".join(lines)


def write_plot(rows: list[QualityRow], path: Path, title: str) -> bool:
    """NLL increase, top-1 disagreement and max/mean logit error against context, one line per format."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [n for n in dict.fromkeys(r.format for r in rows) if any(r.format == n and r.max_logit_err > 0
                                                                     for r in rows)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = ((axes[0], lambda r: r.nll_delta, "NLL increase (nats/token)"),
              (axes[1], lambda r: 1 - r.top1, "top-1 disagreement"),
              (axes[2], lambda r: r.max_logit_err, "logit error: max (solid), mean (dashed)"))
    for ax, value, ylabel in panels:
        for i, name in enumerate(names):
            pts = [r for r in rows if r.format == name]
            color = f"C{i}"
            ax.plot([r.context for r in pts], [value(r) for r in pts], marker="o", color=color, label=name)
            if ax is axes[2]:
                ax.plot([r.context for r in pts], [r.mean_logit_err for r in pts], marker=".", linestyle="--",
                        color=color)
        ax.set_xscale("log", base=2)
        contexts = sorted({r.context for r in rows})
        ax.set_xticks(contexts, [str(c) for c in contexts])
        ax.minorticks_off()
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_all(rows: list[QualityRow], greedy_rows: list[GreedyRow], meta: dict, out: Path) -> list[Path]:
    """quality.csv, greedy.csv, quality.json, quality.md and quality.png (when matplotlib is there) under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, items, cls in (("quality.csv", rows, QualityRow), ("greedy.csv", greedy_rows, GreedyRow)):
        with open(out / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=[x.name for x in dataclasses.fields(cls)])
            w.writeheader()
            w.writerows(dataclasses.asdict(r) for r in items)
        written.append(out / name)
    with open(out / "quality.json", "w") as f:
        json.dump(dict(meta=meta, rows=[dataclasses.asdict(r) for r in rows],
                       greedy=[dataclasses.asdict(g) for g in greedy_rows]), f, indent=1)
    (out / "quality.md").write_text(markdown(rows, greedy_rows, meta))
    written += [out / "quality.json", out / "quality.md"]
    if write_plot(rows, out / "quality.png", f"{meta['model']} ({meta['dtype']}, {meta['device_name']}): each KV "
                                             f"format against the {meta['dtype']} cache"):
        written.append(out / "quality.png")
    return written


# ------------------------------------------------------------------------------------------------ command

def load(args, device: torch.device):
    """(model, tokenizer, label) of `--model` (default pylm; a checkpoint directory, or a GGUF model: 'smollm2', a
    .gguf file or a directory holding one, its tokenizer read from the file) in `--dtype`."""
    path = args.model or pylm.path()
    dtype = bm.resolve_dtype(args.dtype, device)
    model, label = bm.build_model(path, dtype, device)
    return model, bm.load_tokenizer(path), "pylm" if args.model is None else label


def run(args) -> list[QualityRow]:
    started = time.perf_counter()
    device = bm.resolve_device(args.device)
    model, tokenizer, label = load(args, device)
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None) or 1 << 30
    light = args.model is not None and device.type == "cpu"
    d = CPU_MODEL_DEFAULTS if light else dict(contexts=[128, 256, 512, 1024], tokens=Settings.tokens,
                                              gen_prompts=Settings.gen_prompts, gen_tokens=Settings.gen_tokens)
    args.tokens, args.gen_prompts, args.gen_tokens = (d[k] if getattr(args, k) is None else getattr(args, k)
                                                      for k in ("tokens", "gen_prompts", "gen_tokens"))
    contexts = args.contexts or [c for c in d["contexts"] if c <= limit] or [limit]
    if max(contexts) > limit or args.gen_prompt_len + args.gen_tokens > limit:
        raise SystemExit(f"error: the model's context is {limit} tokens; --contexts and --gen-prompt-len + "
                         "--gen-tokens must fit in it")
    if args.prefill < 1 or args.chunk < 1 or args.tokens < 1 or min(contexts) <= args.prefill:
        raise SystemExit("error: --prefill, --chunk and --tokens must be positive and every context longer than "
                         "--prefill")
    s = Settings(contexts=contexts, tokens=args.tokens, prefill=args.prefill, chunk=args.chunk,
                 gen_prompts=args.gen_prompts, gen_prompt_len=args.gen_prompt_len, gen_tokens=args.gen_tokens,
                 split_kv=args.split_kv, half_baselines=args.half_baselines)
    dname = bm.dtype_name(model.dtype)
    print(f"model {label}: {dname} on {bm.device_name(device)}; reference: the {dname} PlugCache; formats from "
          f"KV_DTYPES {KV_DTYPES}")
    stream = heldout_stream(tokenizer)
    with patched(model):
        rows, greedy_rows = measure(model, stream, label, s)
    meta = dict(model=label, dtype=dname, device_name=bm.device_name(device), settings=dataclasses.asdict(s),
                heldout_tokens=len(stream), wall_s=time.perf_counter() - started,
                command=shlex.join(["hf-kvplug", *getattr(args, "argv", ["quality"])]),
                **environment(bm.device_name(device)))
    meta["verdicts"] = verdicts(rows, greedy_rows)
    out = Path(args.out) if args.out else default_out_dir(bm.device_name(device), f"quality-{label}")
    for v in meta["verdicts"]:
        print(v)
    for path in write_all(rows, greedy_rows, meta, out):
        print(f"wrote {rel(path)}")
    return rows
