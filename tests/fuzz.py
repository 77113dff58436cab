"""Differential fuzzing of generate(): random calls, stock against plugged, the same tokens required.

Each case draws:
- a tiny model (`models.tiny_model`): a family, fp32 / bf16 / fp16, sdpa or eager attention;
- a batch of prompts: random lengths, left padding, token ids or embeddings;
- a generate mode (greedy, sampling with a seed, beam search, beam sampling, prompt lookup, an assistant model), or a
  decode loop of one's own with the prompt in chunks;
- logits processors and stopping: repetition penalty, n-gram blocking, bad words, minimum length, an eos token,
  top-k / top-p / temperature; a chunked prefill (`prefill_chunk_size`);
- what generate() returns: scores, logits, attentions, hidden states; a dict or a tensor;
- a PlugCache: block size, prefix caching, max_batch_size and max_cache_len from exactly what the call needs to more,
  K/V in the model dtype or INT8 / INT4 (those run against a PlugCache on the reference backend, the oracle, instead
  of stock; in fp32, or in half precision in a decode loop of one's own, compared step by step up to a tie);
- a follow-up (`FOLLOW_UPS`): a second call from the first one's output in the same caches, in forks, in a cache
  saved and loaded back, or after a crop; or a reset cache given a new request, the same prompt again, one that
  shares its start, or a new request stopped by an exception raised inside a layer, then run again after a reset.
Stock runs with a DynamicCache (its own, or the one passed along the calls). A case passes when the plugged call
returns stock's sequences and its other outputs within the model dtype's rounding (where stock raises there is
nothing to compare: counted, not failed); it fails on any other difference, and prints its seed and draw so that it
can be rerun alone.

    python tests/fuzz.py --cases 200                 # from seed 0; --seed S to start elsewhere
    python tests/fuzz.py --minutes 20 --seed 1000    # as many cases as fit
    python tests/fuzz.py --case 417 --verbose        # one case again, its draw printed
    python tests/fuzz.py --kv-dtype int4 --dtype bfloat16 --cases 100   # narrowed: INT4 in bf16 (decode loops)

`tests/test_fuzz.py` runs a fixed range of seeds in the suite (and CI).
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import shutil
import sys
import tempfile
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(__file__))

from models import tiny_model  # noqa: E402

import hf_kvplug  # noqa: E402
from hf_kvplug import compat  # noqa: E402
from hf_kvplug.compat import cache_kwargs  # noqa: E402

VOCAB = 128
# the families a case draws from, with their weights: the three base families most, then Mistral, the sliding-window
# ones, an MoE and a hybrid
FAMILIES = {"llama": 3, "qwen2": 2, "qwen3": 2, "qwen3_sliding": 2, "mistral": 1, "mixtral_sliding": 1,
            "qwen2_moe_sliding": 1, "qwen3_moe": 1, "qwen3_next": 1}
# hybrid models (linear-attention layers): where transformers has their cache layers (else llama is run instead);
# prefix caching and files are refused for them, with the reason
HYBRID = {"qwen3_next"}
DTYPES = {"float32": 4, "bfloat16": 1, "float16": 1}
# the plugged cache's K/V: the model dtype (against stock), or INT8 / INT4 against the reference backend's PlugCache
KV_DTYPES = {"": 6, "int8": 1, "int4": 1}
# (and "loop", drawn apart: the model called step by step, the prompt in chunks, as a decode loop of one's own does)
MODES = {"greedy": 3, "sample": 3, "beam": 3, "beam_sample": 1, "prompt_lookup": 1, "assisted": 1}
# what a case does after its first call (with the weights it is drawn with): nothing; go on from its output in the
# same caches, in a fork of each (then in the originals too), in a PlugCache saved and loaded back, or after cropping
# both; a reset cache given a new request, the same prompt again or one sharing its start (prefix caching finds
# them), or a new request stopped by an exception inside a layer, then the cache reset and the request run again
FOLLOW_UPS = {"none": 5, "continue": 3, "fork": 1, "saved": 1, "crop": 2, "reset": 2, "again": 2, "fault": 1,
              "shared": 2}
ON_OUTPUT = ("continue", "fork", "saved", "crop")  # (one row per prompt, the output's tokens in the cache)
# Outputs other than tokens: within this many units of the model dtype's rounding, relative to the largest magnitude
# of the tensor compared (at least 1): the plugged decode step reads the same K/V in another layout (an fp32 sum in
# another order), and differences grow with depth. INT8 / INT4 against the reference: a rounding upstream can move a
# value across a code's boundary, an error of a quantization step in one element (seen: 3e-5 of logits of 0.5 with
# INT8, 2.6e-3 with INT4).
ROUNDING = 64
ROUNDING_CODES = {"int8": 2**12, "int4": 2**16}


def draw(seed: int) -> dict:
    """The case of `seed`: a dict of plain values (printed with a failure)."""
    r = random.Random(seed)
    pick = lambda table: r.choices(list(table), weights=list(table.values()))[0]  # noqa: E731
    mode = pick(MODES)
    single = mode in ("prompt_lookup", "assisted")  # transformers runs these with one row
    batch = 1 if single else r.choice([1, 1, 2, 3, 4])
    length = r.randint(1, 12) if r.random() < 0.7 else r.randint(13, 40)
    pads = [0] + [r.randint(0, length - 1) if r.random() < 0.6 else 0 for _ in range(batch - 1)]
    r.shuffle(pads)
    case = dict(seed=seed, family=pick(FAMILIES), dtype=pick(DTYPES), attn=r.choice(["sdpa", "sdpa", "eager"]),
                mode=mode, batch=batch, length=length, pads=pads,
                max_new_tokens=r.randint(1, 20 if r.random() < 0.8 else 40), embeds=not single and r.random() < 0.15)
    gen = {}
    if mode in ("beam", "beam_sample"):
        gen["num_beams"] = r.randint(2, 3)
        gen["num_return_sequences"] = r.randint(1, gen["num_beams"])
        if r.random() < 0.3:
            gen["length_penalty"] = r.choice([0.0, 0.5, 2.0])
        if r.random() < 0.3:
            gen["early_stopping"] = r.choice([True, False, "never"])
    if mode in ("sample", "beam_sample"):
        gen["do_sample"] = True
        gen["temperature"] = r.choice([0.7, 1.0, 1.3])
        if r.random() < 0.5:
            gen["top_k"] = r.choice([0, 5, 20])
        if r.random() < 0.5:
            gen["top_p"] = r.choice([0.5, 0.9])
        if mode == "sample" and r.random() < 0.4:
            gen["num_return_sequences"] = r.randint(2, 3)
    else:
        gen["do_sample"] = False
    if mode == "prompt_lookup":
        gen["prompt_lookup_num_tokens"] = r.randint(1, 4)
    if mode == "assisted":
        gen["num_assistant_tokens"] = r.randint(1, 5)
    if r.random() < 0.3:
        gen["repetition_penalty"] = r.choice([1.2, 1.5])
    if r.random() < 0.3:
        gen["no_repeat_ngram_size"] = r.choice([2, 3])
    if r.random() < 0.2:
        gen["min_new_tokens"] = r.randint(1, case["max_new_tokens"])
    if r.random() < 0.4 or single:  # transformers 5.4 wants an eos for assisted decoding
        gen["eos_token_id"] = r.randint(2, VOCAB - 1)
    if r.random() < 0.1:
        gen["bad_words_ids"] = [[r.randint(2, VOCAB - 1)], [r.randint(2, VOCAB - 1), r.randint(2, VOCAB - 1)]]
    if r.random() < 0.5:
        gen["return_dict_in_generate"] = True
        gen["output_scores"] = r.random() < 0.7
        gen["output_logits"] = r.random() < 0.5
        gen["output_hidden_states"] = r.random() < 0.2
        gen["output_attentions"] = case["attn"] == "eager" and r.random() < 0.5
    case["gen"] = gen
    rows = batch * max(gen.get("num_beams", 1), gen.get("num_return_sequences", 1))
    need = length + case["max_new_tokens"] + (8 if single else 0)
    case["cache"] = dict(max_batch_size=rows + r.choice([0, 0, 1, 3]), block_size=r.choice([4, 8, 16]),
                         prefix_caching=r.random() < 0.25, slack=r.choice([0, 0, 3, 17]), need=need)
    then = pick(FOLLOW_UPS)
    if case["family"] in HYBRID:
        case["cache"]["prefix_caching"] = False
        then = "continue" if then == "saved" else then
        if not compat.HYBRID_CACHE_LAYERS:
            case["family"] = "llama"
    if then in ON_OUTPUT and (rows != batch or mode not in ("greedy", "sample") or case["embeds"]):
        then = r.choice(["reset", "again", "none"])
    case["then"] = then
    if then in ("again", "shared") and case["family"] not in HYBRID and r.random() < 0.5:
        case["cache"]["prefix_caching"] = True  # (what those follow-ups exercise most)
    case["next"] = dict(extra=r.randint(1, 6), max_new_tokens=r.randint(1, 10), seed=r.randint(0, 10**6),
                        keep=r.random())
    case["kv_dtype"] = pick(KV_DTYPES) or None
    # generate() feeds the prompt in chunks (not into a cache that holds tokens: before 5.21 it feeds them all again)
    chunk = r.randint(1, 8)
    if r.random() < 0.1 and not single and case["then"] not in ON_OUTPUT:
        gen["prefill_chunk_size"] = chunk
    if r.random() < 0.12 and not single:  # a decode loop of the caller's own instead of generate()
        case.update(mode="loop", then="none", embeds=False, gen={},
                    loop=dict(chunk=r.randint(1, length), position_ids=r.random() < 0.5))
        case["cache"]["max_batch_size"] = batch + r.choice([0, 1])
        case["loop"]["grad_layer"] = _grad_layer(r)  # (drawn last: the earlier draws stay those of older seeds)
    if case["kv_dtype"] and case["mode"] != "loop":  # fp32: in half precision the fast path and the reference part
        case["dtype"] = "float32"  # by a rounding, and at ties (a decode loop of one's own is compared up to a tie)
    return case


def narrow(case: dict, kv_dtype: str | None = None, dtype: str | None = None, loop: bool = False) -> dict:
    """`case` with its cache's K/V format, its model dtype or its mode set (`--kv-dtype`, `--dtype`, `--loop`): a
    decode loop of one's own (drawn from the case's seed), where a half-precision INT8 / INT4 case must be one."""
    r = random.Random(case["seed"] * 7 + 1)
    case = dict(case, kv_dtype=kv_dtype or case["kv_dtype"], dtype=dtype or case["dtype"])
    half = case["kv_dtype"] and case["dtype"] != "float32"
    if (loop or half) and case["mode"] != "loop":
        case.update(mode="loop", then="none", embeds=False, gen={},
                    loop=dict(chunk=r.randint(1, case["length"]), position_ids=r.random() < 0.5,
                              grad_layer=_grad_layer(r)))
    return case


def _grad_layer(r: random.Random) -> int | None:
    """A loop's layers on different paths, a third of the time: the attention layer of this index (modulo the
    model's) has a weight that requires grad, and every third step runs with grad enabled, so that in those steps
    that layer and the ones after it (their inputs need grad then) take the general path where the ones before it
    take the decode step's (INT4's codes waiting in their tails since their last step are written first)."""
    return r.randint(0, 7) if r.random() < 0.33 else None


def _prompt(case: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (case["batch"], case["length"]), generator=g)
    if case["mode"] == "prompt_lookup":  # repeat a few n-grams so the lookup proposes (and sometimes misses)
        ids = ids[:, :4].repeat(1, 4)[:, :case["length"]]
    mask = torch.ones_like(ids)
    for row, pads in enumerate(case["pads"]):
        ids[row, :pads] = 0
        mask[row, :pads] = 0
    return ids, mask


def _bound(x: torch.Tensor, dtype: torch.dtype, rounding: int) -> float:
    """How far a plugged output may lie from stock's `x` (fp32): `rounding` units of the model dtype's rounding,
    relative to x's largest magnitude (at least 1)."""
    return rounding * torch.finfo(dtype).eps * max(1.0, x.abs().max().item())


def _error(e: Exception) -> str:
    """An exception as a case reports it: its type and the first line of its message."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _nested(x) -> list:
    """A generate() output field (a tensor, or tuples of them per step and layer) as a flat list of tensors."""
    if x is None:
        return []
    if isinstance(x, torch.Tensor):
        return [x]
    return [t for item in x for t in _nested(item)]


def _compare(ref, out, what: str, dtype: torch.dtype, rounding: int = ROUNDING) -> str | None:
    """None if `out` (a plugged generate()'s return) matches `ref` (stock's), else what differs."""
    seq_ref, seq_out = (ref.sequences, out.sequences) if hasattr(ref, "sequences") else (ref, out)
    if seq_ref.shape != seq_out.shape or not torch.equal(seq_ref, seq_out):
        return f"{what}: sequences differ\nstock   {seq_ref.tolist()}\nplugged {seq_out.tolist()}"
    for field in ("scores", "logits", "attentions", "hidden_states"):
        a, b = _nested(getattr(ref, field, None)), _nested(getattr(out, field, None))
        if len(a) != len(b):
            return f"{what}: {field}: {len(a)} tensors from stock, {len(b)} plugged"
        for i, (x, y) in enumerate(zip(a, b)):
            if x.shape != y.shape:
                return f"{what}: {field}[{i}] shapes {tuple(x.shape)} and {tuple(y.shape)}"
            finite = torch.isfinite(x)
            if field == "scores":  # processed: a top-k / top-p boundary may fall either side of a rounding
                finite &= torch.isfinite(y)
            elif not torch.equal(finite, torch.isfinite(y)) or not torch.equal(x[~finite], y[~finite]):
                return f"{what}: {field}[{i}] differ in their infinities"
            if not finite.any():
                continue
            x, y = x[finite].float(), y[finite].float()
            bound = _bound(x, dtype, rounding)
            if ((x - y).abs() > bound).any():
                return f"{what}: {field}[{i}] differ by {(x - y).abs().max().item():.3g}"
    return None


def _generate(model, ids, mask, cache, gen: dict, max_new: int, seed: int, assistant, embeds: bool = False):
    """(output, None) or (None, the exception's type and message). `embeds`: the prompt goes in as embeddings."""
    kw = dict(gen, max_new_tokens=max_new, attention_mask=mask)
    if embeds:
        with torch.no_grad():
            kw["inputs_embeds"], ids = model.get_input_embeddings()(ids), None
    if assistant is not None:
        kw["assistant_model"] = assistant
    if cache is not None:
        kw.update(cache_kwargs(cache))
    torch.manual_seed(seed)
    try:
        with torch.no_grad():
            return model.generate(ids, **kw), None
    except Exception as e:  # noqa: BLE001 - compared with what stock raised
        return None, _error(e)


def _loop(model, cache, ids, mask, chunk: int, steps: int, position_ids: bool, grad: bool = False):
    """A decode loop of one's own: the prompt in chunks of `chunk` tokens, then `steps` greedy steps of one token,
    each call given the 2D mask so far (and `position_ids` from it if asked; `grad`: every third step with grad
    enabled, so that a layer whose weight requires grad switches paths). Returns the last logits of each call after
    the prompt, `[batch, vocab]` each, or the exception's type and message."""
    out, length = [], ids.shape[1]
    call = cache_kwargs(cache)
    try:
        with torch.no_grad():
            for start in range(0, length, chunk):
                end = min(length, start + chunk)
                kw = dict(attention_mask=mask[:, :end], **call)
                if position_ids:
                    kw["position_ids"] = (mask[:, :end].cumsum(-1) - 1).clamp(min=0)[:, start:end]
                logits = model(ids[:, start:end], **kw).logits[:, -1].detach()
            out.append(logits)
            for i in range(steps):
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                kw = dict(attention_mask=mask, **call)
                if position_ids:
                    kw["position_ids"] = mask.cumsum(-1)[:, -1:] - 1
                with torch.set_grad_enabled(grad and i % 3 == 2):
                    logits = model(logits.argmax(-1, keepdim=True), **kw).logits[:, -1].detach()
                out.append(logits)
    except Exception as e:  # noqa: BLE001 - compared with what stock raised
        return _error(e)
    return out


def _compare_loop(ref, out, dtype: torch.dtype, rounding: int = ROUNDING) -> str | None:
    """None if the plugged loop's logits `out` are stock's `ref` within the rounding bound, step by step, and it picks
    stock's tokens up to the end or to a tie: a step where stock's logit of the plugged pick is within the bound of
    its best (the two loops then go on from different tokens, and nothing after is compared)."""
    for i, (x, y) in enumerate(zip(ref, out)):
        x, y = x.float(), y.float()
        bound = _bound(x, dtype, rounding)
        if ((x - y).abs() > bound).any():
            return f"loop: step {i}: logits differ by {(x - y).abs().max().item():.3g}"
        picked, best = y.argmax(-1), x.argmax(-1)
        if not torch.equal(picked, best):
            gap = x.gather(-1, best[:, None]) - x.gather(-1, picked[:, None])
            if (gap > bound).any():
                return f"loop: step {i} picks {picked.tolist()} where stock picks {best.tolist()}"
            return None  # a tie, within rounding
    return None


REFUSED = {"count": 0}  # calls stock refused (raised) in this process: nothing to compare with


def _faulty(model, nxt: dict, call) -> bool:
    """`call()` with an exception raised in one layer's attention (or linear-attention) module at one of its calls,
    both drawn (if the call makes fewer, it runs whole). Returns whether the exception was raised."""
    layers = model.model.layers
    layer = layers[nxt["seed"] % len(layers)]
    module = getattr(layer, "self_attn", None) or getattr(layer, "linear_attn", None) or layer
    at, calls = int(nxt["keep"] * (nxt["max_new_tokens"] + 1)), [0]

    def boom(mod, args, kwargs):
        calls[0] += 1
        if calls[0] - 1 == at:
            raise RuntimeError("fuzz: a fault injected in a layer")

    handle = module.register_forward_pre_hook(boom, with_kwargs=True)
    try:
        call()
    finally:
        handle.remove()
    return calls[0] > at


def _refused(ref_err: str | None, out_err: str | None, what: str) -> str | None:
    """A call where stock or plugged raised: a failure if plugged raised where stock ran. Where stock raised there is
    no result to compare with (the plugged call may raise, or run where stock cannot: crop a sliding-window layer in
    transformers 5.4's assisted decoding, say); counted in `REFUSED`."""
    if ref_err:
        REFUSED["count"] += 1
        return None
    return f"{what}: stock ran, plugged raised {out_err}"


def run(case: dict) -> str | None:
    """Run one case; None if plugged matched stock (or, for an INT8 / INT4 cache, the reference backend), else the
    difference."""
    from transformers import DynamicCache

    family, attn, dtype, kv_dtype = case["family"], case["attn"], getattr(torch, case["dtype"]), case["kv_dtype"]
    stock = tiny_model(family, dtype, attn=attn)
    plugged = hf_kvplug.patch(tiny_model(family, dtype, attn=attn))
    assistant = tiny_model(family, dtype, seed=1, attn=attn) if case["mode"] == "assisted" else None
    c = case["cache"]
    max_len = max(c["need"], c["need"] + case["next"]["extra"] + case["next"]["max_new_tokens"]) + c["slack"]
    windowed = any(getattr(stock.config, name, None) for name in ("sliding_window", "use_sliding_window"))
    # prefix caching with sliding-window layers keeps every token (a ring would overwrite the blocks it indexes)
    extra = dict(trim_windows=False) if c["prefix_caching"] and windowed else {}
    if case["then"] == "fork":  # a fork shares its pool: room for both caches' rows (PlugCache's max_tokens)
        extra["max_tokens"] = 2 * c["max_batch_size"] * -(-max_len // c["block_size"]) * c["block_size"]
    cache = hf_kvplug.PlugCache(plugged, max_batch_size=c["max_batch_size"], max_cache_len=max_len,
                                block_size=c["block_size"], prefix_caching=c["prefix_caching"], kv_dtype=kv_dtype,
                                **extra)
    if kv_dtype is None:
        def new_stock_cache():
            return DynamicCache(config=stock.config)
    else:  # what the quantized cache must give: the reference backend's (plain PyTorch, the oracle)
        stock = hf_kvplug.patch(stock)

        def new_stock_cache():  # (with the same prefix caching: a reused prefix is read from its codes)
            return hf_kvplug.PlugCache(stock, max_batch_size=c["max_batch_size"], max_cache_len=max_len,
                                       block_size=c["block_size"], prefix_caching=c["prefix_caching"],
                                       kv_dtype=kv_dtype, backend="reference", **extra)
    stock_cache = new_stock_cache()
    # a code flipped by a rounding upstream is far from fp32's rounding, and within a half dtype's (seen: 4 units)
    rounding = ROUNDING if kv_dtype is None or dtype != torch.float32 else ROUNDING_CODES[kv_dtype]
    ids, mask = _prompt(case, case["seed"])
    if case["mode"] == "loop":
        grad_layer = case["loop"].get("grad_layer")
        if grad_layer is not None:  # one attention layer's weight requires grad, in both models
            for model in (stock, plugged):
                model.requires_grad_(False)
                attn = [layer.self_attn for layer in model.model.layers if hasattr(layer, "self_attn")]
                next(attn[grad_layer % len(attn)].parameters()).requires_grad_(True)
        loop = (ids, mask, case["loop"]["chunk"], case["max_new_tokens"], case["loop"]["position_ids"],
                grad_layer is not None)
        ref, out = _loop(stock, stock_cache, *loop), _loop(plugged, cache, *loop)
        if isinstance(ref, str) or isinstance(out, str):
            return _refused(ref if isinstance(ref, str) else None, out if isinstance(out, str) else None, "loop")
        return _compare_loop(ref, out, dtype, rounding)
    first = (case["gen"], case["max_new_tokens"], case["seed"], assistant, case["embeds"])
    ref, ref_err = _generate(stock, ids, mask, stock_cache, *first)
    out, out_err = _generate(plugged, ids, mask, cache, *first)
    if ref_err or out_err:
        return _refused(ref_err, out_err, "first call")
    diff = _compare(ref, out, "first call", dtype, rounding)
    if diff or case["then"] == "none":
        return diff
    nxt, then = case["next"], case["then"]
    g = torch.Generator().manual_seed(nxt["seed"])
    if then in ON_OUTPUT:  # the conversation goes on from the first call's output
        seq = ref.sequences if hasattr(ref, "sequences") else ref
        if then == "crop":  # both caches drop their last tokens, keeping at least one (a negative crop)
            held = stock_cache.get_seq_length()
            keep = 1 + int(nxt["keep"] * (held - 1))
            try:
                stock_cache.crop(keep - held)
            except (RuntimeError, ValueError) as e:  # stock's sliding-window layers cannot go back past the window
                return _refused(f"{type(e).__name__}: {e}", None, "crop")
            cache.crop(keep - held)
            seq = seq[:, :keep]
        more = torch.randint(2, VOCAB, (seq.shape[0], nxt["extra"]), generator=g)
        ids2 = torch.cat([seq, more], 1)
        seen = torch.ones_like(ids2)  # the prompt's mask, then every generated and new token
        seen[:, :min(mask.shape[1], seq.shape[1])] = mask[:, :seq.shape[1]]
        mask2 = seen
        if then == "fork":
            original, cache = cache, cache.fork()
            stock_cache = copy.deepcopy(stock_cache)
        elif then == "saved":
            path = os.path.join(tempfile.mkdtemp(prefix="kvplug-fuzz-"), "cache")
            try:
                cache.save(path)
                cache = hf_kvplug.PlugCache.load(path, plugged)
            finally:
                shutil.rmtree(os.path.dirname(path), ignore_errors=True)
    else:  # a reset cache (stock: a fresh DynamicCache) given a new request (or a faulty one), or the same prompt
        cache.reset()
        if kv_dtype is None:
            stock_cache = new_stock_cache()
        else:
            stock_cache.reset()  # (keeping its prefix index, as the plugged cache keeps its own)
        ids2, mask2 = (ids, mask) if then == "again" else (
            torch.randint(2, VOCAB, (ids.shape[0], nxt["extra"] + 2), generator=g), None)
        mask2 = torch.ones_like(ids2) if mask2 is None else mask2
        if then == "shared":  # the prompt's first tokens (a system prompt, say), then others
            keep = 1 + int(nxt["keep"] * (ids.shape[1] - 1))
            ids2, mask2 = torch.cat([ids[:, :keep], ids2], 1), torch.cat([mask[:, :keep], mask2], 1)
    second = (case["gen"], nxt["max_new_tokens"], nxt["seed"], assistant, case["embeds"] and then not in ON_OUTPUT)
    if then == "fault":  # the request stopped by an exception inside one attention layer; reset, then run again
        if not _faulty(plugged, nxt, lambda: _generate(plugged, ids2, mask2, cache, *second)) and kv_dtype:
            _generate(stock, ids2, mask2, stock_cache, *second)  # it ran whole: so does the reference (prefix index)
            stock_cache.reset()
        cache.reset()
    ref2, ref_err = _generate(stock, ids2, mask2, stock_cache, *second)
    out2, out_err = _generate(plugged, ids2, mask2, cache, *second)
    if ref_err or out_err:
        return _refused(ref_err, out_err, "second call")
    diff = _compare(ref2, out2, f"second call ({then})", dtype, rounding)
    if diff or then != "fork":
        return diff
    out3, out_err = _generate(plugged, ids2, mask2, original, *second)  # the original, after its fork went on
    if out_err:
        return f"the original after a fork: {out_err}"
    return _compare(ref2, out3, "the original after a fork", dtype, rounding)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="first case's seed (default 0)")
    p.add_argument("--cases", type=int, default=100, help="cases to run (default 100)")
    p.add_argument("--minutes", type=float, default=None, help="run cases until this much time has passed")
    p.add_argument("--case", type=int, default=None, help="run only the case of this seed")
    p.add_argument("--verbose", action="store_true", help="print every case's draw")
    p.add_argument("--kv-dtype", choices=["int8", "int4"], help="every case's PlugCache in this format")
    p.add_argument("--dtype", choices=list(DTYPES), help="every case's model in this dtype (INT8 / INT4 in half "
                   "precision: decode loops)")
    p.add_argument("--loop", action="store_true", help="every case a decode loop of one's own")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from transformers.utils import logging
    logging.disable_progress_bar()
    seeds = [args.case] if args.case is not None else range(args.seed, args.seed + (10**9 if args.minutes else
                                                                                     args.cases))
    start, failed, ran = time.time(), [], 0
    for seed in seeds:
        if args.minutes and time.time() - start > args.minutes * 60:
            break
        case = narrow(draw(seed), args.kv_dtype, args.dtype, args.loop)
        if args.verbose:
            print(case, flush=True)
        try:
            diff = run(case)
        except Exception:  # noqa: BLE001 - the harness itself failed: report it with the case
            diff = "harness error:\n" + traceback.format_exc()
        ran += 1
        if diff:
            failed.append(seed)
            print(f"FAIL seed {seed}: {case}\n  {diff}\n", flush=True)
    print(f"{ran} cases from seed {args.seed if args.case is None else args.case}, {len(failed)} failed, "
          f"{REFUSED['count']} calls stock refused"
          + (f": seeds {failed}" if failed else "") + f" ({time.time() - start:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
