#!/usr/bin/env python
"""Which INT4 KV-cache scheme should hf_kvplug's kernels implement? Measured on pylm, the small trained Llama.

Every candidate is fake quantization inside the cache: each K and V token the cache stores is quantized and
dequantized in fp32 exactly as a kernel would store it and read it back (INT4 codes, scales and zero points rounded
to fp16 as stored), K after RoPE as the model caches it. "Quantized when written, no calibration": a token's codes
are fixed when it is written (KIVI: when its block of 64 fills) from that token (or block) alone.

Protocol, as hf_kvplug runs a request (and as `hf-kvplug quality` measures INT8):
  * a prefill of the first `--prefill` tokens attends over the exact fresh K/V (hf_kvplug's prefill uses the model's
    own attention), while the cache stores them quantized;
  * then teacher-forced decode, one token per forward, each reading every K/V back from the quantized cache (its
    own token included, as the fused write + attend kernel does).
Windows of L + 1 held-out tokens (stdlib files with crc32(path) % 20 == 0, `hf_kvplug.tools.pylm`), evenly spaced,
the windows of one length batched as rows of one forward; every candidate runs in lockstep with the reference, the
model-dtype (fp32) cache under the same protocol, and each step's logits are compared at once: mean NLL of the true
next token (reference, candidate, increase, with its standard error over windows), top-1 agreement with the
reference's argmax, max and mean |logit error|.

Greedy: `--gen-prompts` held-out prompts of 256 tokens (offset half a spacing from the windows), 256 new tokens
(EOS ignored). Prefix agreement: the new tokens before the first divergence from the reference's greedy sequence,
over 256, averaged over prompts (what the target judges). Position-wise: the candidate teacher-forced on the
reference's greedy sequence, its argmax equal to the reference's token (the first new token comes from the exact
prefill, so it always agrees, in both figures).

After the candidates, K-only and V-only INT4 (the other at fp32) for the best per-token candidate within the bytes
target (by top-1 agreement), for the simplest asymmetric one (one group per token and head) and for the best KIVI
candidate, each distinct row once: which of K or V costs the quality. The fp32 greedy sequences' near-ties (steps
whose two best logits differ by < 0.1) are counted too: they bound what any lossy cache can reach in prefix agreement.

Candidates (group sizes in elements along head_dim; scales / zero points fp16; bytes counted at head_dim 128):
  int8  today's scheme (hf_kvplug.reference.quantize_int8), the reference row
  a     symmetric per token and KV head, one group = head_dim, scale = amax / 7
  b     symmetric per token, groups of 32
  c     asymmetric per token (fp16 scale = (max - min) / 15 and fp16 min), group = head_dim and groups of 32 (and
        of 64 when head_dim > 64; on pylm group = head_dim is 64)
  d     KIVI-style: K asymmetric per channel over each full block of 64 tokens, the partly filled block exact until
        it fills; V asymmetric per token, group = head_dim and groups of 32
  x     K asymmetric per token groups of 32, V asymmetric group = head_dim
  e     K divided by a per-channel pre-scale (amax over the prefill, shared by each RoPE pair, fixed afterwards),
        then asymmetric per token; V asymmetric per token
  r     a fixed Hadamard rotation along head_dim before asymmetric per-token quantization of K and V (a kernel
        rotates q and the output instead)
  t     diagnosis: K asymmetric per token but kept exact while its block of 64 fills (KIVI's tail without KIVI's
        per-channel grouping); V asymmetric per token

Run: `OMP_NUM_THREADS=1 python benchmarks/int4_schemes.py [--model DIR] [--out DIR] [--quick]`; it reads whatever
checkpoint is in the folder at run time (default: pylm's) and prints its training.json step and held-out loss. On
one CPU thread: about 7-10 minutes (16 windows per context, 16 greedy prompts), `--quick` about 3. Deterministic: a
rerun on the same checkpoint gives the same figures. Writes int4_schemes.md, int4_schemes.json and log.txt to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache  # noqa: E402
from transformers.cache_utils import DynamicLayer  # noqa: E402

from hf_kvplug import compat  # noqa: E402
from hf_kvplug.reference import dequantize_int8, quantize_int8  # noqa: E402
from hf_kvplug.tools import pylm  # noqa: E402

CACHE_KW = compat.CACHE_KWARG
KIVI_BLOCK = 64
BYTES_HEAD_DIM = 128  # the bytes column is for this head_dim (pylm's is 64)
FP16_BYTES = 2 * BYTES_HEAD_DIM  # one token's K (or V) of one KV head in fp16
BYTES_TARGET = 0.30
TARGET_NLL = 0.05
TARGET_GREEDY = 0.95


# ------------------------------------------------------------------------------------------------ quantizers
# Each takes x [..., T, D] float32 and returns what the kernel would read back: same shape, float32.

SCALE_DTYPE = [torch.float16]  # how scales and zero points are stored; --fp32-scales switches every scheme


def f16(t: torch.Tensor) -> torch.Tensor:
    """A scale / zero point as stored (fp16 unless --fp32-scales) and read (into fp32 registers)."""
    return t.to(SCALE_DTYPE[0]).float()


def _groups(x: torch.Tensor, group: int) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], x.shape[-1] // group, group)


def sym4(x: torch.Tensor, group: int) -> torch.Tensor:
    """Symmetric INT4 per token, groups of `group` along head_dim: scale = amax / 7, codes in -7..7 (of -8..7)."""
    g = _groups(x, group)
    scale = f16(g.abs().amax(-1, keepdim=True) / 7)
    inv = torch.where(scale > 0, 1.0 / scale.clamp_min(1e-30), torch.zeros_like(scale))
    q = torch.round(g * inv).clamp_(-8, 7)
    return (q * scale).reshape(x.shape)


def asym4(x: torch.Tensor, group: int, dim: int = -1) -> torch.Tensor:
    """Asymmetric INT4 (codes 0..15): per group of `group` along `dim`, lo = min, scale = (max - lo) / 15, both
    stored in fp16; x ~= q * scale + lo. dim=-1: per token along head_dim; dim=-2: per channel over tokens."""
    if dim == -2:
        return asym4(x.transpose(-1, -2), group, -1).transpose(-1, -2)
    g = _groups(x, group)
    lo = f16(g.amin(-1, keepdim=True))
    scale = f16((g.amax(-1, keepdim=True) - lo) / 15)
    inv = torch.where(scale > 0, 1.0 / scale.clamp_min(1e-30), torch.zeros_like(scale))
    q = torch.round((g - lo) * inv).clamp_(0, 15)
    return (q * scale + lo).reshape(x.shape)


def int8_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """hf_kvplug's INT8 today (hf_kvplug.reference): symmetric per token and head, scale = amax / 127, fp32 scale."""
    return dequantize_int8(*quantize_int8(x), torch.float32)


# ------------------------------------------------------------------------------------------------ schemes

@dataclass(frozen=True)
class Side:
    """How one of K or V is stored.

    kind: "exact" (model dtype), "token" (fn applied to each token when written), "kivi" (written at full precision;
    when a block of KIVI_BLOCK tokens fills, the block is quantized per channel with fn over its tokens) or
    "prescale" (per channel pre-scale from the prefill's tokens, then fn per token on K / prescale).
    bytes_token: bytes per token per KV head at head_dim 128, scales included; bytes_row: a per-row, per-KV-head
    constant (KIVI's full-precision tail block, the pre-scale vector).
    """

    kind: str
    fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    desc: str = "fp32 (exact)"
    bytes_token: float = 2.0 * BYTES_HEAD_DIM  # counted as fp16 for the ratio
    bytes_row: float = 0.0


EXACT = Side("exact")


def _gdesc(group: int, head_dim: int) -> str:
    return f"group {group}" + (" (= head_dim)" if group == head_dim else "")


def tok_sym(group: int, head_dim: int) -> Side:
    """Bytes are counted at head_dim 128 for groups of the size measured (a group of pylm's whole head_dim, 64,
    counts as 2 groups of 64 at head_dim 128: one group of 128 would be 2 bytes less, and less accurate)."""
    d, g = BYTES_HEAD_DIM, min(group, head_dim)
    return Side("token", lambda x: sym4(x, g), f"sym INT4 per token, {_gdesc(g, head_dim)}", d / 2 + 2 * d / g)


def tok_asym(group: int, head_dim: int) -> Side:
    d, g = BYTES_HEAD_DIM, min(group, head_dim)
    return Side("token", lambda x: asym4(x, g), f"asym INT4 per token, {_gdesc(g, head_dim)}", d / 2 + 4 * d / g)


def hadamard(d: int) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix [d, d] (d a power of 2); symmetric, so its own inverse."""
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    if h.shape[0] != d:
        raise ValueError(f"head_dim {d} is not a power of 2")
    return h / math.sqrt(d)


def rotated(inner: Side, head_dim: int) -> Side:
    """`inner` applied to x @ H (a fixed Hadamard rotation along head_dim, no calibration). A kernel stores the
    rotated codes and rotates q once per query (q.k = (qH).(kH)) and the output once (sum p v = (sum p vH) H);
    the fake quantization reads back deq(quant(x H)) H, the same numbers."""
    h = hadamard(head_dim)
    return Side("token", lambda x: inner.fn(x @ h) @ h, f"Hadamard-rotated, {inner.desc}", inner.bytes_token)


def kivi_k() -> Side:
    # per block: 64 x D codes + D (scale, min) pairs in fp16; the tail block at fp16, one per row and KV head.
    d = BYTES_HEAD_DIM
    return Side("kivi", lambda x: asym4(x, KIVI_BLOCK, dim=-2), f"asym INT4 per channel over blocks of {KIVI_BLOCK} "
                "tokens, partial block exact", d / 2 + 4 * d / KIVI_BLOCK, KIVI_BLOCK * 2.0 * d)


def tail_k(inner: Side) -> Side:
    """`inner` (per token) applied when the token's block of KIVI_BLOCK fills; the partial block exact, as KIVI's."""
    return Side("kivi", inner.fn, f"{inner.desc}, applied when its block of {KIVI_BLOCK} fills (partial block exact)",
                inner.bytes_token, KIVI_BLOCK * 2.0 * BYTES_HEAD_DIM)


def prescale_k(inner: Side) -> Side:
    return Side("prescale", inner.fn, f"per-channel pre-scale (RoPE pair amax over the prefill) + {inner.desc}",
                inner.bytes_token, 2.0 * BYTES_HEAD_DIM)


INT8 = Side("token", int8_roundtrip, "INT8 sym per token (today's scheme), fp32 scale", BYTES_HEAD_DIM + 4)


@dataclass(frozen=True)
class Scheme:
    name: str
    k: Side
    v: Side
    group: str  # "per-token", "kivi", "reference", "split"

    def bytes_ratio(self, context: int | None) -> float:
        """(K + V bytes per token per KV head at head_dim 128) / fp16's, per-row constants amortized over
        `context` tokens (None: over an unbounded context)."""
        per_tok = self.k.bytes_token + self.v.bytes_token
        if context:
            per_tok += (self.k.bytes_row + self.v.bytes_row) / context
        return per_tok / (2 * FP16_BYTES)


def candidates(head_dim: int) -> list[Scheme]:
    """The schemes measured; group sizes in elements along head_dim (a group of `head_dim` = one per token and
    head). On pylm (head_dim 64) "groups of 64" and "group = head_dim" are the same scheme: measured once."""
    hd = head_dim
    sym, asym = (lambda g: tok_sym(g, hd)), (lambda g: tok_asym(g, hd))
    out = [Scheme("int8", INT8, INT8, "reference"),
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
            Scheme(f"t K asym g{hd} + exact tail, V asym g{hd}", tail_k(asym(hd)), asym(hd), "tail")]
    return out


# ------------------------------------------------------------------------------------------------ the cache

class FakeQuantLayer(DynamicLayer):
    """One layer's K/V in preallocated [B, H, max_len, D] fp32 buffers holding what a kernel would read back.
    `keys` / `values` are views of the filled part, so everything transformers reads works unchanged."""

    def __init__(self, k: Side, v: Side, max_len: int):
        super().__init__()
        self.sides, self.max_len, self.n = (k, v), max_len, 0

    def lazy_initialization(self, key_states, value_states):
        b, h, _, d = key_states.shape
        self.device = key_states.device
        self.bufs = [torch.zeros(b, h, self.max_len, d, dtype=key_states.dtype, device=self.device) for _ in range(2)]
        self.prescale = [None, None]
        self.is_initialized = True

    def _write(self, i: int, new: torch.Tensor, t0: int, t1: int) -> None:
        side, buf = self.sides[i], self.bufs[i]
        if side.kind == "exact":
            buf[:, :, t0:t1] = new
        elif side.kind == "token":
            buf[:, :, t0:t1] = side.fn(new.float()).to(buf.dtype)
        elif side.kind == "prescale":
            if self.prescale[i] is None:  # from the first write (the prefill), fixed afterwards, stored in fp16
                amax = new.float().abs().amax(-2, keepdim=True)  # [B, H, 1, D]
                half = amax.shape[-1] // 2  # RoPE rotates channel j with j + D/2: one scale per pair
                pair = torch.maximum(amax[..., :half], amax[..., half:])
                s = f16(torch.cat([pair, pair], -1).clamp_min(1e-3))
                self.prescale[i] = s
            s = self.prescale[i]
            buf[:, :, t0:t1] = (side.fn(new.float() / s) * s).to(buf.dtype)
        elif side.kind == "kivi":
            buf[:, :, t0:t1] = new  # full precision until its block fills
            for blk in range(t0 // KIVI_BLOCK, t1 // KIVI_BLOCK):  # blocks completed by this write
                a, b = blk * KIVI_BLOCK, (blk + 1) * KIVI_BLOCK
                buf[:, :, a:b] = side.fn(buf[:, :, a:b].float()).to(buf.dtype)
        else:
            raise ValueError(side.kind)

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
    def __init__(self, config, k: Side, v: Side, max_len: int):
        super().__init__(config=config)
        self.layers = [FakeQuantLayer(k, v, max_len) for _ in range(len(self.layers))]


# ------------------------------------------------------------------------------------------------ text

def heldout_stream(tokenizer) -> torch.Tensor:
    """Token ids of the held-out stdlib files, each encoded as the tokenizer encodes a text, concatenated."""
    ids = tokenizer(pylm.heldout_texts())["input_ids"]
    return torch.tensor([i for doc in ids for i in doc], dtype=torch.long)


def windows(stream: torch.Tensor, count: int, length: int, offset: float = 0.0) -> torch.Tensor:
    span = len(stream) - length
    starts = [int((i + offset) * span / count) for i in range(count)]
    return torch.stack([stream[s:s + length] for s in starts])


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


def new_cache(model, scheme: Scheme | None, max_len: int) -> FakeQuantCache:
    k, v = (EXACT, EXACT) if scheme is None else (scheme.k, scheme.v)
    return FakeQuantCache(model.config, k, v, max_len)


def fwd(model, ids: torch.Tensor, cache) -> torch.Tensor:
    return model(input_ids=ids, use_cache=True, **{CACHE_KW: cache}).logits[:, -1].float()


@torch.inference_mode()
def teacher_forced(model, ids: torch.Tensor, schemes: list[Scheme], prefill: int) -> dict[str, Stats]:
    """ids [W, L + 1]: prefill `prefill` tokens (exact attention), then decode tokens prefill..L-1 one at a time;
    at each step every scheme's logits against the reference's."""
    w, total = ids.shape
    ref_cache = new_cache(model, None, total)
    caches = {s.name: new_cache(model, s, total) for s in schemes}
    stats = {s.name: Stats() for s in schemes}
    fwd(model, ids[:, :prefill], ref_cache)
    for c in caches.values():
        fwd(model, ids[:, :prefill], c)
    for t in range(prefill, total - 1):
        step, target = ids[:, t:t + 1], ids[:, t + 1]
        ref = fwd(model, step, ref_cache)
        for name, c in caches.items():
            stats[name].add(fwd(model, step, c), ref, target)
    return stats


@torch.inference_mode()
def greedy_free(model, prompts: torch.Tensor, scheme: Scheme | None, new_tokens: int,
                margins: list | None = None) -> torch.Tensor:
    """[P, new_tokens] greedy ids (EOS ignored), prompts batched as rows; `margins` (if given) receives each step's
    top-1 - top-2 logit gap [P]."""
    cache = new_cache(model, scheme, prompts.shape[1] + new_tokens)
    logits = fwd(model, prompts, cache)
    out = []
    for i in range(new_tokens):
        if i:
            logits = fwd(model, out[-1], cache)
        if margins is not None:
            top2 = logits.topk(2, -1).values
            margins.append(top2[:, 0] - top2[:, 1])
        out.append(logits.argmax(-1, keepdim=True))
    return torch.cat(out, 1)


@torch.inference_mode()
def greedy_forced(model, prompts: torch.Tensor, ref_gen: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """[P, n] bool: the scheme's argmax, teacher-forced on the reference's greedy tokens, equals them."""
    cache = new_cache(model, scheme, prompts.shape[1] + ref_gen.shape[1])
    same = [fwd(model, prompts, cache).argmax(-1) == ref_gen[:, 0]]
    for j in range(1, ref_gen.shape[1]):
        same.append(fwd(model, ref_gen[:, j - 1:j], cache).argmax(-1) == ref_gen[:, j])
    return torch.stack(same, 1)


def prefix_agreement(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, list[int | None]]:
    firsts = []
    for g, r in zip(got, ref):
        diff = (g != r).nonzero()
        firsts.append(None if len(diff) == 0 else int(diff[0]))
    n = ref.shape[1]
    return sum(n if f is None else f for f in firsts) / (n * len(firsts)), firsts


# ------------------------------------------------------------------------------------------------ run

def checkpoint_info(path: str) -> dict:
    info = dict(path=path)
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


def measure_tf(model, stream, schemes, contexts, nwin, prefill, log) -> list[dict]:
    rows = []
    for length in contexts:
        t0 = time.perf_counter()
        ids = windows(stream, nwin, length + 1)
        stats = teacher_forced(model, ids, schemes, prefill)
        for s in schemes:
            rows.append(dict(scheme=s.name, context=length, windows=nwin, **stats[s.name].row()))
        log(f"  context {length}: {nwin} windows x {length - prefill} decode steps, {len(schemes)} schemes "
            f"({time.perf_counter() - t0:.0f} s)")
        for r in rows[-len(schemes):]:
            log(f"    {r['scheme']:<36} dNLL {r['nll_delta']:+.4f} ±{r['nll_delta_se']:.4f}  top-1 {r['top1']:.2%}"
                f"  max|err| {r['max_logit_err']:.3f}  mean|err| {r['mean_logit_err']:.4f}")
    return rows


def measure_greedy(model, prompts, ref_gen, schemes, log) -> list[dict]:
    rows = []
    t0 = time.perf_counter()
    for s in schemes:
        got = greedy_free(model, prompts, s, ref_gen.shape[1])
        prefix, firsts = prefix_agreement(got, ref_gen)
        pos = float(greedy_forced(model, prompts, ref_gen, s).float().mean())
        rows.append(dict(scheme=s.name, prompts=len(prompts), prompt_len=prompts.shape[1], new_tokens=ref_gen.shape[1],
                         prefix_agreement=prefix, positionwise_agreement=pos, first_divergence=firsts))
        log(f"    {s.name:<36} prefix {prefix:.2%}  position-wise {pos:.2%}  first divergence {firsts}")
    log(f"  greedy: {len(prompts)} prompts x {ref_gen.shape[1]} tokens, {len(schemes)} schemes "
        f"({time.perf_counter() - t0:.0f} s)")
    return rows


def split_schemes(s: Scheme) -> list[Scheme]:
    return [Scheme(f"{s.name} [K only]", s.k, EXACT, "split"), Scheme(f"{s.name} [V only]", EXACT, s.v, "split")]


def targets(r: dict) -> dict:
    """Each target of the issue for one summary row: True / False (None where not measured)."""
    return dict(bytes=r["bytes_ratio_4k"] <= BYTES_TARGET + 1e-9, nll=r["worst_nll_delta"] <= TARGET_NLL,
                greedy_prefix=None if r["greedy_prefix"] is None else r["greedy_prefix"] >= TARGET_GREEDY,
                greedy_positionwise=None if r["greedy_positionwise"] is None
                else r["greedy_positionwise"] >= TARGET_GREEDY)


def summarize(schemes, tf_rows, greedy_rows) -> list[dict]:
    out = []
    for s in schemes:
        mine = [r for r in tf_rows if r["scheme"] == s.name]
        g = next((r for r in greedy_rows if r["scheme"] == s.name), None)
        r = dict(scheme=s.name, group=s.group, k=s.k.desc, v=s.v.desc, bytes_ratio=s.bytes_ratio(None),
                 bytes_ratio_1k=s.bytes_ratio(1024), bytes_ratio_4k=s.bytes_ratio(4096),
                 nll_delta={x["context"]: x["nll_delta"] for x in mine},
                 nll_delta_se={x["context"]: x["nll_delta_se"] for x in mine},
                 top1={x["context"]: x["top1"] for x in mine},
                 mean_top1=sum(x["top1"] for x in mine) / len(mine),
                 max_logit_err=max(x["max_logit_err"] for x in mine),
                 mean_logit_err={x["context"]: x["mean_logit_err"] for x in mine},
                 worst_nll_delta=max(x["nll_delta"] for x in mine),
                 greedy_prefix=None if g is None else g["prefix_agreement"],
                 greedy_positionwise=None if g is None else g["positionwise_agreement"])
        r["targets"] = targets(r)
        out.append(r)
    return out


def fmt_bytes(r) -> str:
    if abs(r["bytes_ratio"] - r["bytes_ratio_1k"]) < 1e-9:
        return f"{r['bytes_ratio']:.3f}"
    return f"{r['bytes_ratio']:.3f} (1k {r['bytes_ratio_1k']:.3f}, 4k {r['bytes_ratio_4k']:.3f})"


def fmt_targets(r) -> str:
    if r["group"] in ("split", "reference"):
        return "–"
    t = r["targets"]
    names = dict(bytes="bytes", nll="ΔNLL", greedy_prefix="prefix", greedy_positionwise="pos-wise")
    return ", ".join(f"{names[k]} {'ok' if v else 'MISSED'}" for k, v in t.items() if v is not None)


def markdown(summary, tf_rows, greedy_rows, meta, contexts) -> str:
    L = []
    ck = meta["checkpoint"]
    L += [f"# INT4 KV-cache schemes on pylm ({meta['date']})", "",
          f"Checkpoint `{ck['path']}`: training step {ck.get('step')}, held-out loss {ck.get('heldout_loss')} "
          f"(weights written {ck.get('weights_mtime')}). hf_kvplug {meta['git_commit']}, torch {meta['torch']}, "
          f"transformers {meta['transformers']}, {meta['threads']} thread(s), wall {meta['wall_s']:.0f} s.", "",
          f"Teacher-forced: {meta['windows']} windows per context, prefill {meta['prefill']} tokens (exact attention, "
          f"not measured), then one token per forward through the quantized cache. Greedy: {meta['gen_prompts']} "
          f"prompts x {meta['gen_prompt_len']} tokens, {meta['gen_tokens']} new tokens. Reference: the fp32 cache "
          f"under the same protocol. Scales and zero points stored as {meta['scale_dtype']}.", "",
          "Bytes: K + V per token per KV head at head_dim 128 relative to fp16 (512 bytes): INT4 codes + fp16 "
          "scales / zero points for the group size measured; KIVI adds its full-precision tail block (64 tokens x "
          "256 bytes of K per row and KV head) amortized over the context (first figure: unbounded context; 1k / "
          "4k: amortized over 1024 / 4096 tokens). K-only / V-only rows count the other at fp16.", "",
          f"Targets: bytes <= {BYTES_TARGET}x (at 4k context), NLL increase <= {TARGET_NLL} nats/token at every "
          f"context, greedy agreement >= {TARGET_GREEDY:.0%} over {meta['gen_tokens']} tokens (prefix: before the "
          "first divergence; pos-wise: teacher-forced on the fp32 greedy sequence).", ""]
    cs = contexts
    head = ("| scheme | bytes vs fp16 | " + " | ".join(f"ΔNLL {c}" for c in cs) + " | "
            + " | ".join(f"top-1 {c}" for c in cs) + " | max abs logit err | mean abs logit err "
            f"{cs[-1]} | greedy prefix | greedy pos-wise | targets |")
    L += ["## Summary", "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in summary:
        g1 = "–" if r["greedy_prefix"] is None else f"{r['greedy_prefix']:.1%}"
        g2 = "–" if r["greedy_positionwise"] is None else f"{r['greedy_positionwise']:.1%}"
        L.append(f"| {r['scheme']} | {fmt_bytes(r)} | "
                 + " | ".join(f"{r['nll_delta'][c]:+.4f} ±{r['nll_delta_se'][c]:.4f}" for c in cs) + " | "
                 + " | ".join(f"{r['top1'][c]:.1%}" for c in cs)
                 + f" | {r['max_logit_err']:.2f} | {r['mean_logit_err'][cs[-1]]:.4f} | {g1} | {g2} | "
                 f"{fmt_targets(r)} |")
    L += ["", "ΔNLL: scheme minus fp32 cache, nats/token, mean over windows ± standard error over windows. top-1: "
          "argmax equal to the fp32 cache's. Max abs logit error over every context.", "",
          "## Schemes", "", "| scheme | K | V |", "|---|---|---|"]
    for r in summary:
        L.append(f"| {r['scheme']} | {r['k']} | {r['v']} |")
    L += ["", "## Teacher-forced, every context", "",
          "Flip margin: among positions whose argmax differs from the fp32 cache's, the gap between the fp32 "
          "cache's two best logits (median and max): small means the flips are near-ties.", "",
          "| context | scheme | positions | NLL fp32 | NLL scheme | ΔNLL | ± se | top-1 | max abs logit err | "
          "mean abs logit err | flip margin median / max |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(tf_rows, key=lambda r: r["context"]):
        L.append(f"| {r['context']} | {r['scheme']} | {r['positions']} | {r['nll_ref']:.4f} | {r['nll']:.4f} | "
                 f"{r['nll_delta']:+.4f} | {r['nll_delta_se']:.4f} | {r['top1']:.2%} | {r['max_logit_err']:.3f} | "
                 f"{r['mean_logit_err']:.4f} | {r['flip_margin_median']:.3f} / {r['flip_margin_max']:.3f} |")
    L += ["", "## Greedy", "", "| scheme | prefix agreement | position-wise | first divergence per prompt |",
          "|---|---|---|---|"]
    for g in greedy_rows:
        L.append(f"| {g['scheme']} | {g['prefix_agreement']:.2%} | {g['positionwise_agreement']:.2%} | "
                 + ", ".join("–" if f is None else str(f) for f in g["first_divergence"]) + " |")
    L += ["", "First divergence: the new-token index where the scheme's free-running greedy sequence first differs "
          "from the fp32 cache's (– none).", ""]
    nt = meta.get("greedy_near_ties")
    if nt:
        L += [f"Near-ties in the fp32 greedy sequences: {nt['0.05']:.1%} / {nt['0.1']:.1%} / {nt['0.25']:.1%} of "
              "the steps have a gap below 0.05 / 0.1 / 0.25 between the two best logits; the first step below 0.1 "
              "per prompt: " + ", ".join("–" if f is None else str(f) for f in nt["first_below_0.1"]) + ".", ""]
    L += ["## K and V statistics (fp32 cache, 4 windows)", "",
          "Crest: per-token max abs / rms, averaged (about 2.4 for a Gaussian vector of 64); rotated: after a "
          "Hadamard rotation along head_dim. Channel rms max / median: per head, then averaged (large: a few outlier "
          "channels).", "", "| layer | K crest | K crest rotated | K channel rms max/median | V crest | "
          "V crest rotated | V channel rms max/median |", "|---|---|---|---|---|---|---|"]
    for r in meta["kv_stats"]:
        L.append(f"| {r['layer']} | {r['k_crest']:.2f} | {r['k_crest_rotated']:.2f} | "
                 f"{r['k_channel_rms_max_over_median']:.2f} | {r['v_crest']:.2f} | {r['v_crest_rotated']:.2f} | "
                 f"{r['v_channel_rms_max_over_median']:.2f} |")
    L += ["",
          f"Sanity: the fp32 cache against stock DynamicCache on two windows (prefill + decode), max abs logit "
          f"difference {meta['sanity_max_abs_diff']:.2e}.", "", f"Command: `{meta['command']}`", ""]
    return "\n".join(L)


@torch.inference_mode()
def kv_stats(model, ids: torch.Tensor) -> list[dict]:
    """Per layer, of the K (after RoPE) and V the fp32 cache holds after a prefill of `ids`: the crest factor
    (per-token max |x| / rms, averaged; about 2.4 for a Gaussian vector of 64) before and after a Hadamard rotation,
    and the per-head max / median of the channels' rms (large: a few outlier channels, what KIVI's per-channel K
    quantization is for)."""
    cache = new_cache(model, None, ids.shape[1])
    fwd(model, ids, cache)
    h = hadamard(cache.layers[0].keys.shape[-1])
    rows = []
    for i, layer in enumerate(cache.layers):
        row = dict(layer=i)
        for name, x in (("k", layer.keys), ("v", layer.values)):
            crest = lambda y: float((y.abs().amax(-1) / y.pow(2).mean(-1).sqrt()).mean())  # noqa: E731
            ch = x.pow(2).mean(dim=(0, 2)).sqrt()  # [H, D]
            row.update({f"{name}_crest": crest(x), f"{name}_crest_rotated": crest(x @ h),
                        f"{name}_channel_rms_max_over_median": float((ch.amax(-1) / ch.median(-1).values).mean())})
        rows.append(row)
    return rows


@torch.inference_mode()
def sanity(model, ids: torch.Tensor, prefill: int) -> float:
    """The exact FakeQuantCache against stock DynamicCache over one short window, decode steps included."""
    a, b = new_cache(model, None, ids.shape[1]), DynamicCache(config=model.config)
    worst = (fwd(model, ids[:, :prefill], a) - fwd(model, ids[:, :prefill], b)).abs().max()
    for t in range(prefill, ids.shape[1]):
        worst = max(worst, (fwd(model, ids[:, t:t + 1], a) - fwd(model, ids[:, t:t + 1], b)).abs().max())
    return float(worst)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=pylm.path(), help="checkpoint directory (default: pylm's)")
    p.add_argument("--out", default="/tmp/int4-schemes", help="output folder (default /tmp/int4-schemes)")
    p.add_argument("--contexts", default=None, help="context lengths (default 256,512,1024; --quick 256,512)")
    p.add_argument("--windows", type=int, default=None, help="windows per context length (default 16; --quick 4)")
    p.add_argument("--prefill", type=int, default=16, help="exact prefill tokens of each window (default 16)")
    p.add_argument("--gen-prompts", type=int, default=None, help="greedy prompts (default 16; --quick 4; 0: none)")
    p.add_argument("--gen-prompt-len", type=int, default=256)
    p.add_argument("--gen-tokens", type=int, default=256)
    p.add_argument("--only", default=None, help="';'-separated scheme names to run (default: all)")
    p.add_argument("--no-split", action="store_true", help="skip the K-only / V-only rows (--quick skips them)")
    p.add_argument("--fp32-scales", action="store_true",
                   help="store scales / zero points in fp32 instead of fp16 (diagnostic; bytes still count fp16)")
    p.add_argument("--quick", action="store_true",
                   help="contexts 256,512, 4 windows, 4 greedy prompts, no K-only / V-only rows (a few minutes)")
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

    ck = checkpoint_info(args.model)
    log(f"checkpoint {args.model}: training step {ck.get('step')} of {ck.get('steps_planned')}, held-out loss "
        f"{ck.get('heldout_loss')}, weights written {ck.get('weights_mtime')}")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if checkpoint_info(args.model).get("weights_mtime") != ck.get("weights_mtime"):
        log("warning: the weights were rewritten while loading (training still running?): rerun for a clean figure")
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    log(f"model: {sum(p.numel() for p in model.parameters()):,} params, {cfg.num_hidden_layers} layers, "
        f"{cfg.num_attention_heads} q / {cfg.num_key_value_heads} KV heads, head_dim {head_dim}; torch "
        f"{torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} thread(s)")
    contexts = [int(c) for c in args.contexts.split(",")]
    limit = cfg.max_position_embeddings
    if max(contexts) > limit or args.gen_prompt_len + args.gen_tokens > limit:
        raise SystemExit(f"error: the model's context is {limit}")
    stream = heldout_stream(tokenizer)
    log(f"held-out text: {len(stream):,} tokens")

    diff = sanity(model, windows(stream, 2, 48), args.prefill)
    log(f"sanity: fp32 FakeQuantCache vs stock DynamicCache, max |logit diff| {diff:.2e}")
    if diff > 1e-3:
        raise SystemExit("error: the exact cache does not reproduce DynamicCache")

    stats = kv_stats(model, windows(stream, 4, min(1024, limit)))
    for r in stats:
        log(f"layer {r['layer']}: K crest {r['k_crest']:.2f} (rotated {r['k_crest_rotated']:.2f}), channel rms "
            f"max/median {r['k_channel_rms_max_over_median']:.2f}; V crest {r['v_crest']:.2f} (rotated "
            f"{r['v_crest_rotated']:.2f}), channel rms max/median {r['v_channel_rms_max_over_median']:.2f}")

    schemes = candidates(head_dim)
    if args.only:
        keep = {s.strip() for s in args.only.split(";")}
        schemes = [s for s in schemes if s.name in keep]
    for s in schemes:
        log(f"  {s.name:<36} bytes {s.bytes_ratio(None):.3f} x fp16 (4k: {s.bytes_ratio(4096):.3f})  K: {s.k.desc};"
            f" V: {s.v.desc}")

    prompts = windows(stream, args.gen_prompts, args.gen_prompt_len, offset=0.5) if args.gen_prompts else None
    ref_margins: list = []
    ref_gen = greedy_free(model, prompts, None, args.gen_tokens, ref_margins) if args.gen_prompts else None
    near_ties = {}
    if args.gen_prompts:
        m = torch.stack(ref_margins, 1)  # [P, n]
        near_ties = {str(t): float((m < t).float().mean()) for t in (0.05, 0.1, 0.25)}
        first = [(int((row < 0.1).nonzero()[0]) if bool((row < 0.1).any()) else None) for row in m]
        near_ties["first_below_0.1"] = first
        log(f"fp32 greedy: fraction of steps whose top-2 logit gap is < 0.05 / 0.1 / 0.25: "
            f"{near_ties['0.05']:.1%} / {near_ties['0.1']:.1%} / {near_ties['0.25']:.1%}; first step < 0.1 per "
            f"prompt {first}")

    log("teacher-forced:")
    tf_rows = measure_tf(model, stream, schemes, contexts, args.windows, args.prefill, log)
    greedy_rows = []
    if args.gen_prompts:
        log("greedy:")
        greedy_rows = measure_greedy(model, prompts, ref_gen, schemes, log)
    summary = summarize(schemes, tf_rows, greedy_rows)

    if not args.no_split:
        def best(group):  # ΔNLL is within noise for every INT4 scheme: rank by top-1 agreement
            pool = [r for r in summary if r["group"] == group and r["targets"]["bytes"]]
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
            tf_rows += measure_tf(model, stream, split, contexts, args.windows, args.prefill, log)
            if args.gen_prompts:
                greedy_rows += measure_greedy(model, prompts, ref_gen, split, log)
            summary += summarize(split, tf_rows, greedy_rows)

    argv = ["OMP_NUM_THREADS=1", shlex.join(["python", "benchmarks/int4_schemes.py", *sys.argv[1:]])]
    meta = dict(date=datetime.date.today().isoformat(), checkpoint=ck, git_commit=git_commit(),
                torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
                threads=torch.get_num_threads(), windows=args.windows, prefill=args.prefill, contexts=contexts,
                gen_prompts=args.gen_prompts, gen_prompt_len=args.gen_prompt_len, gen_tokens=args.gen_tokens,
                heldout_tokens=len(stream), model_head_dim=head_dim, sanity_max_abs_diff=diff,
                scale_dtype=str(SCALE_DTYPE[0]).replace("torch.", ""), greedy_near_ties=near_ties, kv_stats=stats,
                wall_s=time.perf_counter() - started, command=" ".join(argv))
    md = markdown(summary, tf_rows, greedy_rows, meta, contexts)
    (out / "int4_schemes.md").write_text(md)
    with open(out / "int4_schemes.json", "w") as f:
        json.dump(dict(meta=meta, summary=summary, teacher_forced=tf_rows, greedy=greedy_rows), f, indent=1,
                  default=str)
    print()
    print(md)
    log(f"wrote {out / 'int4_schemes.md'} and {out / 'int4_schemes.json'} ({meta['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
