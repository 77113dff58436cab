"""Bad input gets a clear error, raised before anything is written, with the cache left as it was."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache, GPT2Config

import hf_kvplug
from models import FAMILIES, tiny_model
from hf_kvplug.compat import cache_kwargs as kv

_TF_VERSION = tuple(int(x) for x in transformers.__version__.split(".")[:2])


def _snapshot(cache):
    return [(layer.cache_seqlens.clone(), layer.k_cache.clone(), layer.v_cache.clone()) for layer in cache.layers]


def _unchanged(cache, snap):
    return all(torch.equal(a, layer.cache_seqlens) and torch.equal(k, layer.k_cache) and torch.equal(v, layer.v_cache)
               for layer, (a, k, v) in zip(cache.layers, snap))


@pytest.fixture(params=FAMILIES)
def warm(request):
    """A patched model and a cache already holding one turn (so 'unchanged' means more than 'empty')."""
    model = hf_kvplug.patch(tiny_model(request.param))
    cache = hf_kvplug.PlugCache(model, max_batch_size=2, max_cache_len=32, block_size=16)
    ids = torch.randint(2, 128, (1, 6))
    out = model.generate(ids, **kv(cache), max_new_tokens=4, do_sample=False)
    return model, cache, out


def test_over_max_cache_len(warm):
    model, cache, out = warm
    snap = _snapshot(cache)
    with pytest.raises(ValueError, match="max_cache_len=32"):
        model.generate(out, **kv(cache), max_new_tokens=40)
    assert _unchanged(cache, snap)


def test_over_max_cache_len_when_continuing_with_only_the_new_turn(warm):
    model, cache, out = warm  # 9 tokens cached
    snap = _snapshot(cache)
    new_turn = torch.randint(2, 128, (1, 5))
    mask = torch.ones(1, out.shape[1] + 5, dtype=torch.long)  # the whole conversation's mask, new tokens only
    with pytest.raises(ValueError, match="max_cache_len=32"):
        model.generate(new_turn, attention_mask=mask, **kv(cache), max_new_tokens=20)
    assert _unchanged(cache, snap)


@pytest.mark.parametrize("mode", [dict(), dict(num_beams=2), dict(prompt_lookup_num_tokens=3, eos_token_id=0)])
def test_a_cache_sized_exactly_for_the_call_runs_it(mode):
    """A call writes its prompt and every new token but the last: a cache of exactly that many slots runs it as stock
    (greedy, beams, prompt lookup), and one slot fewer is refused before writing. (5.4's prompt lookup needs an
    eos_token_id, stock's too.)"""
    stock = tiny_model("llama")
    model = hf_kvplug.patch(tiny_model("llama"))
    ids = torch.randint(2, 128, (1, 6))
    kw = dict(max_new_tokens=9, do_sample=False, **mode)
    rows = mode.get("num_beams", 1)
    cache = hf_kvplug.PlugCache(model, max_batch_size=rows, max_cache_len=14, block_size=4)
    assert torch.equal(model.generate(ids, **kv(cache), **kw), stock.generate(ids, **kw))
    small = hf_kvplug.PlugCache(model, max_batch_size=rows, max_cache_len=13, block_size=4)
    with pytest.raises(ValueError, match="need 14 cache slots"):
        model.generate(ids, **kv(small), **kw)
    assert small.get_seq_length() == 0


def test_max_length_counts_from_the_ids_given(warm):
    """generate() makes max_length less the ids it is given: passed only the new turn with the whole conversation's
    mask, it makes more tokens than max_length less the conversation, and the check counts those (it let such a
    call run, then fail part-way after writing)."""
    model, cache, out = warm  # 9 tokens cached, max_cache_len 32
    snap = _snapshot(cache)
    new_turn = torch.randint(2, 128, (1, 5))
    mask = torch.ones(1, out.shape[1] + 5, dtype=torch.long)
    with pytest.raises(ValueError, match="max_cache_len=32"):  # 25 - 5 = 20 new tokens after 14 held: 33 slots
        model.generate(new_turn, attention_mask=mask, **kv(cache), max_length=25, do_sample=False)
    assert _unchanged(cache, snap)
    # what fits runs, as stock's: 12 - 5 new tokens, the last one not written
    held = cache.get_seq_length()
    got = model.generate(new_turn, attention_mask=mask, **kv(cache), max_length=12, do_sample=False)
    assert got.shape[1] == 12 and cache.get_seq_length() == held + 5 + 7 - 1


@pytest.mark.parametrize("how", ["default", "embeds"])
def test_max_length_left_at_its_default_counts_twenty_new_tokens(how):
    """With no max_length or max_new_tokens anywhere, generate() makes 20 tokens after the input ids (or after no ids
    at all for inputs_embeds, and then max_length counts from the embeddings): the check counts what it makes, and a
    cache too short for it refuses before writing (it let the call run and fail part-way)."""
    model = hf_kvplug.patch(tiny_model("llama"))
    cache = hf_kvplug.PlugCache(model, max_batch_size=1, max_cache_len=24, block_size=4)
    ids = torch.randint(2, 128, (1, 8))
    kw = {"input_ids": ids} if how == "default" else {"inputs_embeds": model.get_input_embeddings()(ids).detach()}
    with pytest.raises(ValueError, match="max_cache_len=24"):
        model.generate(**kw, **kv(cache), do_sample=False)
    assert cache.get_seq_length() == 0 and cache.stats()["blocks_in_use"] == 0
    out = model.generate(**kw, **kv(cache), do_sample=False, max_new_tokens=12)  # what fits runs
    assert out.shape[1] == (8 if how == "default" else 0) + 12


@pytest.mark.parametrize("eos", [5, [5, 6], "tensor", "numpy"])
def test_eos_token_id_in_any_form_generate_takes(eos):
    """generate() takes eos_token_id as an int, a list, a tensor or a numpy int; so does the call's check (it read a
    tensor's as a list and raised)."""
    import numpy as np

    stock = tiny_model("llama")
    model = hf_kvplug.patch(tiny_model("llama"))
    eos = {"tensor": torch.tensor(5), "numpy": np.int64(5)}.get(eos, eos) if isinstance(eos, str) else eos
    ids = torch.randint(2, 128, (1, 8))
    for prefix_caching in (False, True):
        cache = hf_kvplug.PlugCache(model, max_batch_size=1, max_cache_len=32, block_size=4,
                                    prefix_caching=prefix_caching)
        kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=eos)
        assert torch.equal(model.generate(ids, **kv(cache), **kw), stock.generate(ids, **kw))


def test_training_mode_with_attention_dropout_is_refused_before_writing():
    """A PlugCache attends without dropout: a model in training mode with attention_dropout > 0 (stock drops
    attention weights there) is refused before anything is written, and the cache then follows stock in eval mode;
    with no dropout, training mode runs as stock."""
    stock = tiny_model("llama", attention_dropout=0.5)
    model = hf_kvplug.patch(tiny_model("llama", attention_dropout=0.5))
    cache = hf_kvplug.PlugCache(model, max_batch_size=1, max_cache_len=32, block_size=8)
    snap = _snapshot(cache)
    ids = torch.randint(2, 128, (1, 7))
    model.train()
    with torch.no_grad(), pytest.raises(ValueError, match="attention_dropout=0.5.*model.eval"):
        model(ids, **kv(cache))
    assert _unchanged(cache, snap) and all(layer.fresh for layer in cache.layers)
    model.eval()
    kw = dict(max_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(ids, **kv(cache), **kw), stock.generate(ids, **kw))
    plain, plain_stock = hf_kvplug.patch(tiny_model("llama")).train(), tiny_model("llama").train()
    cache = hf_kvplug.PlugCache(plain, max_batch_size=1, max_cache_len=32, block_size=8)
    assert torch.equal(plain.generate(ids, **kv(cache), **kw), plain_stock.generate(ids, **kw))


def test_over_max_cache_len_in_a_direct_forward(warm):
    model, cache, _ = warm
    snap = _snapshot(cache)
    with pytest.raises(ValueError, match="exceed the PlugCache's max_cache_len"):
        model(torch.randint(2, 128, (1, 30)), **kv(cache))
    assert _unchanged(cache, snap)


def test_prefill_over_max_cache_len_into_an_empty_cache():
    model = hf_kvplug.patch(tiny_model("llama"))
    cache = hf_kvplug.PlugCache(model, max_batch_size=2, max_cache_len=32, block_size=16)
    snap = _snapshot(cache)
    with pytest.raises(ValueError, match="exceed the PlugCache's max_cache_len=32"):
        model(torch.randint(2, 128, (1, 33)), **kv(cache))
    assert _unchanged(cache, snap) and all(layer.fresh for layer in cache.layers)


def test_failed_prefill_leaves_the_cache_empty(monkeypatch):
    """An error inside the prefill's attention (say, out of memory) stores nothing: a retry equals stock."""
    from transformers import DynamicCache
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    stock = tiny_model("llama")
    model = hf_kvplug.patch(tiny_model("llama"))
    cache = hf_kvplug.PlugCache(model, max_batch_size=2, max_cache_len=32, block_size=16)
    ids = torch.randint(2, 128, (1, 20))

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("simulated")

    with monkeypatch.context() as m:
        m.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", out_of_memory)
        with pytest.raises(torch.OutOfMemoryError):
            model(ids, **kv(cache))
    assert all(layer.fresh for layer in cache.layers) and cache.get_seq_length() == 0
    got = model(ids[:, :8], **kv(cache)).logits
    assert torch.equal(got, stock(ids[:, :8], **kv(DynamicCache(config=stock.config))).logits)


@pytest.mark.parametrize("zeros", [[(1, 3, 5)], [(0, 2, 3)]], ids=["right-padding", "gap"])
def test_mask_that_is_not_left_padding_follows_stock(warm, zeros):
    """Right padding and gaps are followed as stock follows them (once refused: now the cache records the mask)."""
    model, cache, _ = warm
    stock = tiny_model(model.config.model_type)
    cache.reset()
    ids = torch.randint(2, 128, (2, 5))
    mask = torch.ones_like(ids)
    for row, start, end in zeros:
        mask[row, start:end] = 0
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(ids, **kv(cache), **kw), stock.generate(ids, **kw))
    assert cache.holes


def test_batch_over_max_batch_size(warm):
    model, cache, _ = warm
    snap = _snapshot(cache)
    ids = torch.randint(2, 128, (2, 5))
    with pytest.raises(ValueError, match="max_batch_size=2"):
        model.generate(ids, **kv(cache), max_new_tokens=3, num_beams=2)
    with pytest.raises(ValueError, match="max_batch_size=2"):
        model(torch.randint(2, 128, (3, 5)), **kv(cache))
    assert _unchanged(cache, snap)


def test_use_cache_false(warm):
    """generate(use_cache=False) with a PlugCache runs without a cache and leaves it untouched (stock would re-feed
    the whole sequence into the cache every step); a direct forward uses the cache it is given, as stock does."""
    model, cache, out = warm
    stock = tiny_model(model.config.model_type)
    snap = _snapshot(cache)
    kw = dict(max_new_tokens=3, use_cache=False, do_sample=False)
    assert torch.equal(model.generate(out, **kv(cache), **kw), stock.generate(out, **kw))
    assert _unchanged(cache, snap)
    ref = DynamicCache(config=stock.config)
    stock(out[:, :-1], **kv(ref))  # the cache holds those 9 tokens: the last one was never fed back
    got = model(out[:, -1:], **kv(cache), use_cache=False).logits
    torch.testing.assert_close(got, stock(out[:, -1:], **kv(ref), use_cache=False).logits)


def test_unsupported_model_type():
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    forwards = [m.forward for m in model.modules()]
    with pytest.raises(ValueError, match="supported: llama, mistral, mixtral, qwen2, qwen2_moe, qwen3"):
        hf_kvplug.patch(model)
    assert [m.forward for m in model.modules()] == forwards
    assert not hf_kvplug.is_patched(model)


@pytest.mark.parametrize("change, message", [
    (dict(num_hidden_layers=3), "num_layers"),
    (dict(num_key_value_heads=4), "nheads_k"),
    (dict(head_dim=8), "head_dim"),
])
def test_cache_for_another_model(change, message):
    model = hf_kvplug.patch(tiny_model("llama"))
    other = tiny_model("llama", **change)
    cache = hf_kvplug.PlugCache(other, max_batch_size=1, max_cache_len=32, block_size=16)
    snap = _snapshot(cache)
    with pytest.raises(ValueError, match=message):
        model.generate(torch.randint(2, 128, (1, 5)), **kv(cache), max_new_tokens=3)
    with pytest.raises(ValueError, match="another model"):
        model(torch.randint(2, 128, (1, 5)), **kv(cache))
    assert _unchanged(cache, snap)


def test_cache_of_another_dtype_or_device():
    model = hf_kvplug.patch(tiny_model("qwen3"))
    ids = torch.randint(2, 128, (1, 5))
    half = hf_kvplug.PlugCache(model.config, max_batch_size=1, max_cache_len=32, dtype=torch.float16, device="cpu")
    with pytest.raises(ValueError, match="dtype"):
        model.generate(ids, **kv(half), max_new_tokens=3)
    with pytest.raises(ValueError, match="dtype"):
        model(ids, **kv(half))
    assert half.get_seq_length() == 0
    meta = hf_kvplug.PlugCache(model.config, max_batch_size=1, max_cache_len=32, dtype=torch.float32, device="meta")
    with pytest.raises(ValueError, match="layer_devices"):
        model.generate(ids, **kv(meta), max_new_tokens=3)
    if _TF_VERSION >= (5, 17):  # older masks read the (meta) cache length before any layer runs
        with pytest.raises(ValueError, match="device"):  # (a meta cache cannot tell its length: pass positions)
            model(ids, **kv(meta), position_ids=torch.arange(5)[None])


def test_unpatched_model_with_plug_cache():
    model = tiny_model("llama")
    cache = hf_kvplug.PlugCache(model, max_batch_size=1, max_cache_len=32)
    with pytest.raises(RuntimeError, match=r"hf_kvplug.patch\(model\)"):
        model.generate(torch.randint(2, 128, (1, 5)), **kv(cache), max_new_tokens=3)
    assert cache.get_seq_length() == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(kv_dtype="fp8"), "kv_dtype"),
    (dict(max_cache_len=0), "max_cache_len"),
    (dict(backend="cuda"), "backend"),
])
def test_bad_cache_arguments(kwargs, message):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=message):
        hf_kvplug.PlugCache(model, **{"max_batch_size": 1, "max_cache_len": 32, **kwargs})


def test_config_needs_dtype_and_device():
    with pytest.raises(ValueError, match="dtype= and device="):
        hf_kvplug.PlugCache(tiny_model("llama").config, max_batch_size=1, max_cache_len=16)
