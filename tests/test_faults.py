"""Never silently wrong: faults injected where a user meets them, each against an unpatched twin with a stock cache.

Stale NaN/Inf from an earlier request, a generation config passed by position, a hand-written decode loop,
a forward interrupted part-way, writes past the cache, a cache built in inference mode: each gives stock's result or
a clear error, and the cache is usable again after reset().
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache, GenerationConfig

import hf_kvplug
from hf_kvplug.compat import cache_kwargs as kv
from models import FAMILIES, tiny_model

BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.interpreter)]


def _pair(family, **cache_kw):
    stock = tiny_model(family)
    plugged = hf_kvplug.patch(tiny_model(family))
    cache = hf_kvplug.PlugCache(plugged, **{"max_batch_size": 4, "max_cache_len": 48, "block_size": 8, **cache_kw})
    return stock, plugged, cache


def _poison(model, layer=0, what="v_proj", value=float("nan")):
    module = getattr(model.model.layers[layer].self_attn, what)
    return module.register_forward_hook(lambda mod, args, out: torch.full_like(out, value))


def _left_padded(batch=2, length=9, pads=(0, 3), seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 128, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate(pads):
        ids[row, :n], mask[row, :n] = 0, 0
    return ids, mask


# ------------------------------------------------------------------------------------------------ stale values

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kv_dtype", [None, "int8", "int4"])
@pytest.mark.parametrize("what, value", [("v_proj", float("nan")), ("k_proj", float("inf"))])
def test_nan_from_one_request_does_not_poison_the_next(backend, kv_dtype, what, value):
    stock, plugged, cache = _pair("llama", kv_dtype=kv_dtype, backend=backend)
    ids = torch.randint(2, 128, (1, 7))
    hook = _poison(plugged, what=what, value=value)
    plugged.generate(torch.randint(2, 128, (1, 11)), **kv(cache), max_new_tokens=12, do_sample=False)
    hook.remove()
    cache.reset()
    kw = dict(max_new_tokens=10, do_sample=False)
    assert torch.equal(plugged.generate(ids, **kv(cache), **kw), stock.generate(ids, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kv_dtype", [None, "int8", "int4"])
def test_nan_in_cropped_tokens_does_not_poison_what_follows(backend, kv_dtype):
    """Tokens written by a poisoned forward and then cropped away (as assisted decoding drops rejected drafts)."""
    stock, plugged, cache = _pair("qwen2", kv_dtype=kv_dtype, backend=backend)
    ids = torch.randint(2, 128, (1, 9))
    plugged(ids, **kv(cache))
    hook = _poison(plugged, layer=1)
    plugged(torch.randint(2, 128, (1, 4)), **kv(cache))
    hook.remove()
    cache.crop(-4)
    ref = DynamicCache(config=stock.config)
    stock(ids, **kv(ref))
    for _ in range(3):
        step = torch.randint(2, 128, (1, 2))
        got, want = plugged(step, **kv(cache)).logits, stock(step, **kv(ref)).logits
        assert torch.isfinite(got).all()
        bound = {None: 0, "int8": 0.02, "int4": 0.1}[kv_dtype]  # within the format's quantization error
        atol = 1e-5 + bound * want.abs().max().item()
        torch.testing.assert_close(got, want, atol=atol, rtol=1e-5)


# ------------------------------------------------------------------------------------------- generate() entries

def test_positional_generation_config_is_validated():
    _, plugged, cache = _pair("llama")
    config = GenerationConfig(max_new_tokens=60, do_sample=False, pad_token_id=0)
    with pytest.raises(ValueError, match="max_cache_len=48"):
        plugged.generate(torch.randint(2, 128, (1, 7)), config, **kv(cache))
    assert cache.get_seq_length() == 0 and cache.stats()["blocks_in_use"] == 0


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_both_cache_names_are_validated(name):
    import warnings

    _, plugged, cache = _pair("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old name is deprecated from transformers 5.24
        with pytest.raises(ValueError, match="max_batch_size=4"):
            plugged.generate(torch.randint(2, 128, (1, 5)), max_new_tokens=4, num_beams=5, **{name: cache})
    assert cache.get_seq_length() == 0


def test_inputs_embeds_are_validated():
    stock, plugged, cache = _pair("qwen3")
    embeds = plugged.get_input_embeddings()(torch.randint(2, 128, (1, 40)))
    with pytest.raises(ValueError, match="max_cache_len=48"):
        plugged.generate(inputs_embeds=embeds, **kv(cache), max_new_tokens=20)
    assert cache.get_seq_length() == 0
    with torch.no_grad():
        kw = dict(inputs_embeds=embeds[:, :9], max_new_tokens=6, do_sample=False)
        assert torch.equal(plugged.generate(**kv(cache), **kw), stock.generate(**kw))


# -------------------------------------------------------------------------------------------- hand-written loops

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pads", [(0, 3), (2, 0)])
def test_manual_decode_loop_follows_the_mask(family, pads):
    """model(t, attention_mask=growing_mask, cache=...) without position_ids: stock gives every row the shared
    positions and masks the pads; the plugged model follows the same mask."""
    stock, plugged, cache = _pair(family)
    ref = DynamicCache(config=stock.config)
    ids, mask = _left_padded(pads=pads)
    a = stock(ids, attention_mask=mask, **kv(ref)).logits[:, -1:].argmax(-1)
    b = plugged(ids, attention_mask=mask, **kv(cache)).logits[:, -1:].argmax(-1)
    for _ in range(5):
        assert torch.equal(a, b)
        mask = torch.cat([mask, torch.ones_like(a)], dim=1)
        a = stock(a, attention_mask=mask, **kv(ref)).logits[:, -1:].argmax(-1)
        b = plugged(b, attention_mask=mask, **kv(cache)).logits[:, -1:].argmax(-1)
    assert torch.equal(a, b)


def test_manual_loop_with_a_mask_that_changes_history():
    """Each forward's 2D mask rules over the whole history, as for stock: masking an earlier token later hides it."""
    stock, plugged, cache = _pair("llama")
    ref = DynamicCache(config=stock.config)
    ids = torch.randint(2, 128, (1, 8))
    stock(ids, **kv(ref))
    plugged(ids, **kv(cache))
    mask = torch.ones(1, 9, dtype=torch.long)
    mask[0, 2:4] = 0
    step = torch.randint(2, 128, (1, 1))
    torch.testing.assert_close(plugged(step, attention_mask=mask, **kv(cache)).logits,
                               stock(step, attention_mask=mask, **kv(ref)).logits)


def test_manual_loop_past_max_cache_len_raises_before_writing():
    _, plugged, cache = _pair("llama", max_cache_len=16)
    plugged(torch.randint(2, 128, (1, 15)), **kv(cache))
    plugged(torch.randint(2, 128, (1, 1)), **kv(cache))
    snap = [layer.k_cache.clone() for layer in cache.layers]
    with pytest.raises(ValueError, match="max_cache_len=16"):
        plugged(torch.randint(2, 128, (1, 1)), **kv(cache))
    assert all(torch.equal(a, layer.k_cache) for a, layer in zip(snap, cache.layers))
    assert cache.get_seq_length() == 16


def test_compiled_loop_past_max_cache_len_is_never_silent():
    """A model compiled as a whole cannot check on the host: the write finds no slot, the token's output is NaN and
    the next host read of the cache raises."""
    _, plugged, cache = _pair("llama", max_cache_len=16)
    cache.reserve()
    step = torch.compile(plugged, backend="eager", fullgraph=True)
    with torch.no_grad():
        step(torch.randint(2, 128, (1, 16)), **kv(cache))
        out = step(torch.randint(2, 128, (1, 1)), **kv(cache)).logits
    assert torch.isnan(out).all()
    with pytest.raises(RuntimeError, match="found no slot"):
        cache.get_seq_length()
    cache.reset()
    assert cache.get_seq_length() == 0


# ------------------------------------------------------------------------------------------ interrupted forwards

class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("exc", [_Interrupt, KeyboardInterrupt])
@pytest.mark.parametrize("where", ["prefill", "decode"])
def test_interrupted_forward_is_detected(exc, where):
    """An exception inside layer 1 leaves layer 0 a token ahead: the next use raises (stock raises a size mismatch)
    before producing output; after reset() the cache gives stock's tokens."""
    stock, plugged, cache = _pair("llama")
    ids = torch.randint(2, 128, (1, 7))
    if where == "decode":
        plugged(ids, **kv(cache))

    def boom(*args):
        raise exc("injected")

    hook = plugged.model.layers[1].self_attn.register_forward_pre_hook(boom)
    with pytest.raises(exc):
        plugged(torch.randint(2, 128, (1, 1 if where == "decode" else 7)), **kv(cache))
    hook.remove()
    with pytest.raises(ValueError, match="forward stopped part-way"):
        plugged(torch.randint(2, 128, (1, 1)), **kv(cache))
    with pytest.raises(ValueError, match="forward stopped part-way"):
        plugged.generate(ids, **kv(cache), max_new_tokens=3)
    cache.reset()
    kw = dict(max_new_tokens=8, do_sample=False)
    assert torch.equal(plugged.generate(ids, **kv(cache), **kw), stock.generate(ids, **kw))


def test_exception_after_the_last_layer_keeps_the_cache_consistent():
    """Raised after every layer ran (in the LM head): the cache holds the tokens, as a stock cache would."""
    stock, plugged, cache = _pair("qwen3")
    ids = torch.randint(2, 128, (1, 7))
    hook = plugged.lm_head.register_forward_pre_hook(lambda *a: (_ for _ in ()).throw(_Interrupt("late")))
    with pytest.raises(_Interrupt):
        plugged(ids, **kv(cache))
    hook.remove()
    ref = DynamicCache(config=stock.config)
    stock(ids, **kv(ref))
    step = torch.randint(2, 128, (1, 1))
    torch.testing.assert_close(plugged(step, **kv(cache)).logits, stock(step, **kv(ref)).logits)


class _RaiseAt:
    """Raises on its `n`-th call: a stopping criterion, a logits processor or a streamer that fails between steps."""

    def __init__(self, n: int, exc, where: str):
        self.n, self.calls, self.exc, self.where = n, 0, exc, where

    def _tick(self):
        self.calls += 1
        if self.calls == self.n:
            raise self.exc("between steps")

    def __call__(self, input_ids, scores):  # a LogitsProcessor (exactly these two parameters) or a StoppingCriteria
        self._tick()
        return scores if self.where == "logits_processor" else torch.zeros(input_ids.shape[0], dtype=torch.bool)

    def put(self, value):  # streamer
        self._tick()

    def end(self):
        pass


@pytest.mark.parametrize("where", ["stopping_criteria", "logits_processor", "streamer"])
@pytest.mark.parametrize("exc", [_Interrupt, KeyboardInterrupt])
def test_generate_that_raises_between_steps_counts_as_stock(where, exc):
    """A generate() stopped between steps by a stopping criterion, logits processor or streamer (or Ctrl-C there):
    the cache reports the tokens stock's DynamicCache holds in the same run, continuing gives stock's logits, and a
    continued generate() equals stock's."""
    from transformers import LogitsProcessorList, StoppingCriteriaList

    stock, plugged, cache = _pair("llama")
    ids = torch.randint(2, 128, (1, 6))
    ref = DynamicCache(config=stock.config)
    for model, c in ((stock, ref), (plugged, cache)):
        hook = _RaiseAt(4, exc, where)
        extra = {"stopping_criteria": StoppingCriteriaList([hook]), "logits_processor": LogitsProcessorList([hook]),
                 "streamer": hook}[where]
        with pytest.raises(exc):
            model.generate(ids, **kv(c), max_new_tokens=8, do_sample=False, **{where: extra})
    assert cache.get_seq_length() == ref.get_seq_length() > ids.shape[1]
    step = torch.randint(2, 128, (1, 1))
    torch.testing.assert_close(plugged(step, **kv(cache)).logits, stock(step, **kv(ref)).logits)


def test_interrupted_generate_then_reset():
    stock, plugged, cache = _pair("llama")
    ids = torch.randint(2, 128, (2, 6))
    calls = []

    def third_call(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    hook = plugged.model.layers[1].register_forward_pre_hook(third_call)
    with pytest.raises(KeyboardInterrupt):
        plugged.generate(ids, **kv(cache), max_new_tokens=8, do_sample=False)
    hook.remove()
    cache.reset()
    kw = dict(max_new_tokens=8, do_sample=False)
    assert torch.equal(plugged.generate(ids, **kv(cache), **kw), stock.generate(ids, **kw))


# ------------------------------------------------------------------------------------------ changes stopped part-way

def _raising_at(monkeypatch, owner, name, at, exc):
    """`owner.name` raises `exc` at its `at`-th call (1-based), then runs as before."""
    real, calls = getattr(owner, name), []

    def fake(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            raise exc("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, fake)


@pytest.mark.parametrize("exc", [torch.OutOfMemoryError, KeyboardInterrupt])
@pytest.mark.parametrize("where", ["copy on write", "crop", "reorder", "reset"])
def test_changes_stopped_part_way_refuse_every_use_until_reset(monkeypatch, where, exc):
    """Out of memory or Ctrl-C inside changes that must all happen (a fork's copy on write, whose table already maps
    the copy; a crop or a reorder of an INT4 cache, layer by layer with its tails; a reset) left rows that read a
    block never filled, or layers that disagree unseen: every use now raises until reset(), and the parent of a fork
    is untouched. Then the cache gives stock's tokens again."""
    from hf_kvplug import layers as layers_mod
    from hf_kvplug.layers import KV

    stock, plugged, parent = _pair("llama", kv_dtype="int4" if where in ("crop", "reorder") else None, block_size=4)
    ids, step = torch.randint(2, 128, (2, 10)), torch.randint(2, 128, (2, 1))
    kw = dict(max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        plugged(ids, **kv(parent))
        want = plugged(step, **kv(parent.fork())).logits
        cache = parent.fork()
        if where == "copy on write":  # the fork's first write goes into the block it shares with its parent
            _raising_at(monkeypatch, KV, "copy_blocks", 1, exc)
            do = lambda: plugged(step, **kv(cache))  # noqa: E731
        elif where == "crop":
            _raising_at(monkeypatch, layers_mod.PlugLayer, "crop_to", 2, exc)
            do = lambda: cache.crop(-3)  # noqa: E731
        elif where == "reorder":
            _raising_at(monkeypatch, layers_mod.PlugLayer, "select", 2, exc)
            do = lambda: cache.reorder_cache(torch.tensor([1, 0]))  # noqa: E731
        else:
            _raising_at(monkeypatch, layers_mod.PlugLayer, "reset", 2, exc)
            do = cache.reset
        with pytest.raises(exc):
            do()
        monkeypatch.undo()
        for use in (lambda: plugged(step, **kv(cache)), lambda: cache.crop(-1), cache.fork,
                    lambda: plugged.generate(ids, **kv(cache), **kw)):
            with pytest.raises(RuntimeError, match="stopped part-way.*call cache.reset"):
                use()
        torch.testing.assert_close(plugged(step, **kv(parent)).logits, want)
        cache.reset()
    assert torch.equal(plugged.generate(ids, **kv(cache), **kw), stock.generate(ids, **kw))


def test_a_device_table_load_that_fails_is_tried_again(monkeypatch):
    """A fork's copy on write maps a new block; loading the table that names it fails (out of memory): the next
    forward loads it again, rather than writing through the old table into the block the parent holds."""
    from hf_kvplug.device import DeviceState

    stock, plugged, parent = _pair("llama", block_size=4, backend="reference")
    ids, steps = torch.randint(2, 128, (1, 10)), torch.randint(2, 128, (1, 3))
    ref = DynamicCache(config=stock.config)
    with torch.no_grad():
        plugged(ids, **kv(parent))
        stock(ids, **kv(ref))
        fork, ref_fork = parent.fork(), copy.deepcopy(ref)
        _raising_at(monkeypatch, DeviceState, "load_table", 1, torch.OutOfMemoryError)
        with pytest.raises(torch.OutOfMemoryError):
            plugged(steps[:, :1], **kv(fork))
        monkeypatch.undo()
        for i in range(steps.shape[1]):
            torch.testing.assert_close(plugged(steps[:, i:i + 1], **kv(fork)).logits,
                                       stock(steps[:, i:i + 1], **kv(ref_fork)).logits)
            torch.testing.assert_close(plugged(steps[:, i:i + 1], **kv(parent)).logits,
                                       stock(steps[:, i:i + 1], **kv(ref)).logits)


@pytest.mark.parametrize("then", ["crop", "reorder"])
def test_a_forward_that_never_ran_then_a_crop_or_reorder(then):
    """A hand-written loop whose forward is stopped by the user's own pre-hook (the cache prepared it, no layer ran),
    then crop() or reorder_cache(): the cache drops the prepared forward, as a stock cache never saw it."""
    stock, plugged, cache = _pair("llama", block_size=4, max_batch_size=2, max_cache_len=32)
    ids, steps = torch.randint(2, 128, (2, 9)), torch.randint(2, 128, (2, 4))
    ref = DynamicCache(config=stock.config)
    with torch.no_grad():
        plugged(ids, **kv(cache))
        stock(ids, **kv(ref))

        def stop(*args):
            raise RuntimeError("the user's hook")

        hook = plugged.register_forward_pre_hook(stop)
        with pytest.raises(RuntimeError, match="the user's hook"):
            plugged(steps[:, :1], **kv(cache))
        hook.remove()
        if then == "crop":
            cache.crop(-2)
            ref.crop(-2)
        else:
            cache.reorder_cache(torch.tensor([1, 0]))
            ref.reorder_cache(torch.tensor([1, 0]))
        for i in range(1, steps.shape[1]):
            torch.testing.assert_close(plugged(steps[:, i:i + 1], **kv(cache)).logits,
                                       stock(steps[:, i:i + 1], **kv(ref)).logits)
        assert cache.get_seq_length() == ref.get_seq_length()


# ------------------------------------------------------------------------------------------------ inference mode

def test_cache_built_in_inference_mode_works_outside():
    stock, plugged, _ = _pair("llama")
    with torch.inference_mode():
        cache = hf_kvplug.PlugCache(plugged, max_batch_size=1, max_cache_len=32, block_size=8)
    ids = torch.randint(2, 128, (1, 6))
    kw = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(plugged.generate(ids, **kv(cache), **kw), stock.generate(ids, **kw))
    cache.reset()
    with torch.inference_mode():  # and inside again
        assert torch.equal(plugged.generate(ids, **kv(cache), **kw), stock.generate(ids, **kw))


def test_forks_of_a_cache_built_in_inference_mode_refuse_to_part_outside_it():
    """A cache built inside torch.inference_mode() moves its state into ordinary tensors when used outside it; one
    that shares its blocks with another (a fork, or the cache it was forked from) refuses instead, before anything
    is written, and stays usable inside inference mode: a copy of its own would no longer see the blocks the other
    writes and the shared prefix index hands it (the tokens were silently wrong). A deep copy has a pool of its own
    and works outside; once the fork is gone, the parent works outside too."""
    stock, plugged, _ = _pair("llama")
    system = torch.randint(2, 128, (1, 41), generator=torch.Generator().manual_seed(0))
    turn = [torch.randint(2, 128, (1, 5 + i), generator=torch.Generator().manual_seed(1 + i)) for i in range(3)]
    kw = dict(max_new_tokens=6, do_sample=False)
    with torch.inference_mode():
        parent = hf_kvplug.PlugCache(plugged, max_batch_size=2, max_cache_len=128, block_size=8, prefix_caching=True)
        fork = parent.fork()
    for cache in (fork, parent):
        with torch.no_grad(), pytest.raises(RuntimeError, match="shares its blocks with another cache"):
            plugged.generate(torch.cat([system, turn[0]], 1), **kv(cache), **kw)
        with pytest.raises(RuntimeError, match="shares its blocks with another cache"):
            cache.reset()
        with pytest.raises(RuntimeError, match="shares its blocks with another cache"):
            cache.reserve(rows=1)  # (before its tables change: it used to map blocks whose copy then failed)
    with torch.inference_mode():  # both still work inside it, the fork mapping the parent's indexed blocks
        for cache, ids in ((parent, torch.cat([system, turn[0]], 1)), (fork, torch.cat([system, turn[1]], 1))):
            cache.reset()
            assert torch.equal(plugged.generate(ids, **kv(cache), **kw), stock.generate(ids, **kw))
        assert fork.stats()["prefix_hit_tokens"] == 40
    own = copy.deepcopy(fork)
    ids = torch.cat([system, turn[2]], 1)
    with torch.no_grad():
        own.reset()
        assert torch.equal(plugged.generate(ids, **kv(own), **kw), stock.generate(ids, **kw))
        del fork, own, cache  # (the loop above left `cache` naming the fork)
        parent.reset()
        assert torch.equal(plugged.generate(ids, **kv(parent), **kw), stock.generate(ids, **kw))

    # a fork made inside inference mode of a cache built outside it shares ordinary K/V: it moves only its own state
    # and works outside, each cache mapping the blocks the other indexed
    normal = hf_kvplug.PlugCache(plugged, max_batch_size=2, max_cache_len=128, block_size=8, prefix_caching=True)
    with torch.inference_mode():
        twin = normal.fork()
    with torch.no_grad():
        for i, cache in enumerate((twin, normal, twin)):
            ids = torch.cat([system, turn[i]], 1)
            cache.reset()
            assert torch.equal(plugged.generate(ids, **kv(cache), **kw), stock.generate(ids, **kw))
            assert cache.stats()["prefix_hit_tokens"] == 40 * i
