"""patch / unpatch / patched: exact round trips, idempotence, and stock behaviour with stock caches."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, StaticCache

import hf_kvplug
from models import FAMILIES, tiny_model
from hf_kvplug.compat import CACHE_KWARG, cache_kwargs as kv


def _attn_modules(model):
    return [layer.self_attn for layer in model.model.layers]


@pytest.mark.parametrize("family", FAMILIES + ("mistral",))
def test_round_trip_restores_exact_forwards(family):
    model = tiny_model(family)
    before = [(m.forward.__func__, dict(m.__dict__)) for m in _attn_modules(model)]
    generate = model.generate.__func__
    hf_kvplug.patch(model)
    assert hf_kvplug.is_patched(model)
    assert all(m.forward.__func__ is hf_kvplug.attention.plug_attention_forward for m in _attn_modules(model))
    hf_kvplug.patch(model)  # idempotent: still one level of wrapping
    assert all(m._kvplug_original_forward.__func__ is not hf_kvplug.attention.plug_attention_forward
               for m in _attn_modules(model))
    hf_kvplug.unpatch(model)
    assert not hf_kvplug.is_patched(model)
    after = [(m.forward.__func__, dict(m.__dict__)) for m in _attn_modules(model)]
    assert [f for f, _ in after] == [f for f, _ in before]
    assert [d.keys() for _, d in after] == [d.keys() for _, d in before]
    assert "forward" not in _attn_modules(model)[0].__dict__
    assert model.generate.__func__ is generate and "generate" not in model.__dict__


def test_patched_context_manager():
    model = tiny_model("qwen2")
    with hf_kvplug.patched(model) as m:
        assert m is model and hf_kvplug.is_patched(model)
    assert not hf_kvplug.is_patched(model)
    hf_kvplug.patch(model)
    with hf_kvplug.patched(model):
        pass
    assert hf_kvplug.is_patched(model)  # it was patched before the block: stays patched


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cache_kind", ["none", "dynamic", "static"])
def test_patched_model_with_stock_cache_is_unchanged(family, cache_kind):
    stock = tiny_model(family)
    plugged = hf_kvplug.patch(tiny_model(family))
    ids = torch.randint(2, 128, (2, 6))

    def run(model):
        kw = {}
        if cache_kind == "dynamic":
            kw[CACHE_KWARG] = DynamicCache(config=model.config)
        elif cache_kind == "static":
            kw[CACHE_KWARG] = StaticCache(config=model.config, max_cache_len=32)
        return model.generate(ids, max_new_tokens=8, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, **kw)

    ref, out = run(stock), run(plugged)
    assert torch.equal(ref.sequences, out.sequences)
    assert all(torch.equal(a, b) for a, b in zip(ref.logits, out.logits))  # bit-identical: same code ran


def test_patch_beneath_accelerate_hooks():
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module

    stock = tiny_model("llama")
    model = tiny_model("llama")
    for m in _attn_modules(model):
        add_hook_to_module(m, AlignDevicesHook(execution_device="cpu"))
    hooked = [m.forward for m in _attn_modules(model)]
    hf_kvplug.patch(model)
    assert [m.forward for m in _attn_modules(model)] == hooked  # the hook still wraps our forward
    cache = hf_kvplug.PlugCache(model, max_batch_size=1, max_cache_len=32, block_size=16)
    ids = torch.randint(2, 128, (1, 6))
    ref = stock.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(ref, model.generate(ids, **kv(cache), max_new_tokens=8, do_sample=False))
    hf_kvplug.unpatch(model)
    for m in _attn_modules(model):
        remove_hook_from_module(m)
        assert m.forward.__func__ is type(m).forward


def test_patch_keeps_an_instance_level_generate_override():
    model = tiny_model("llama")
    calls = []
    original = model.generate

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    model.generate = spy
    hf_kvplug.patch(model)
    cache = hf_kvplug.PlugCache(model, max_batch_size=1, max_cache_len=32)
    model.generate(torch.randint(2, 128, (1, 5)), **kv(cache), max_new_tokens=2)
    assert calls == [1]
    hf_kvplug.unpatch(model)
    assert model.generate is spy
