"""GPU only: plugged generate() with the Triton kernels equals stock on real attention shapes (random weights)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, Qwen2Config, Qwen3Config

import hf_kvplug
from hf_kvplug.compat import cache_kwargs as kv

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# Real attention shapes (heads, kv heads, head_dim, hidden); 2 layers and a small vocab keep the test quick.
SHAPES = {
    "llama3-8b": (LlamaConfig, dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                                     intermediate_size=14336, rope_theta=500000.0)),
    "qwen2.5-7b": (Qwen2Config, dict(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
                                      intermediate_size=18944, rope_theta=1000000.0)),
    "qwen3-8b": (Qwen3Config, dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                    intermediate_size=12288, rope_theta=1000000.0)),
}


def _model(name, dtype, layers=2):
    cls, kw = SHAPES[name]
    torch.manual_seed(0)
    config = cls(num_hidden_layers=layers, vocab_size=4096, max_position_embeddings=8192, **kw)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").cuda().eval()
    model.generation_config.pad_token_id = 0
    return model


def _prompts(batch, length, pads=()):
    ids = torch.randint(2, 4096, (batch, length), device="cuda")
    mask = torch.ones_like(ids)
    for row, p in enumerate(pads):
        ids[row, :p] = 0
        mask[row, :p] = 0
    return ids, mask


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_fp32_greedy_identical(name, kv_dtype):
    model = _model(name, torch.float32)
    ids, mask = _prompts(3, 300, pads=(0, 37, 130))
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False)
    hf_kvplug.patch(model)
    cache = hf_kvplug.PlugCache(model, max_batch_size=3, max_cache_len=512, kv_dtype=kv_dtype)
    assert cache.layers[0].backend == "triton"
    out = model.generate(ids, attention_mask=mask, **kv(cache), max_new_tokens=32, do_sample=False)
    agree = (out[:, 300:] == ref[:, 300:]).float().mean().item()
    print(f"{name} fp32 kv={kv_dtype}: token agreement {agree:.3f}")
    if kv_dtype is None:
        assert torch.equal(out, ref)
    else:
        assert agree >= 0.9


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_bf16_agreement_and_logits(name, kv_dtype):
    model = _model(name, torch.bfloat16)
    ids, _ = _prompts(2, 1000)
    stock = model.generate(ids, max_new_tokens=64, do_sample=False)
    # teacher-forced logits along the stock tokens: stock DynamicCache vs plugged
    steps = 64
    prompt = stock.shape[1] - steps

    def logits(cache):
        out = [model(stock[:, :prompt], **kv(cache)).logits[:, -1].float()]
        for t in range(prompt, stock.shape[1]):
            out.append(model(stock[:, t:t + 1], **kv(cache)).logits[:, -1].float())
        return torch.stack(out)

    ref = logits(DynamicCache(config=model.config))
    hf_kvplug.patch(model)
    got = logits(hf_kvplug.PlugCache(model, max_batch_size=2, max_cache_len=2048, kv_dtype=kv_dtype))
    plugged = model.generate(ids, **kv(hf_kvplug.PlugCache(model, 2, 2048, kv_dtype=kv_dtype)),
                             max_new_tokens=64, do_sample=False)
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    argmax = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    agree = (plugged[:, prompt:] == stock[:, prompt:]).float().mean().item()
    print(f"{name} bf16 kv={kv_dtype}: rel logits err {rel:.4f}, teacher-forced argmax agreement {argmax:.3f}, "
          f"free-running token agreement {agree:.3f}")
    assert rel < (0.05 if kv_dtype else 0.03)
    assert argmax >= 0.9


def test_long_context_and_reuse():
    model = hf_kvplug.patch(_model("llama3-8b", torch.float32, layers=1))
    cache = hf_kvplug.PlugCache(model, max_batch_size=1, max_cache_len=8192 + 64)
    ids, _ = _prompts(1, 8000)
    hf_kvplug.unpatch(model)
    ref = model.generate(ids, max_new_tokens=16, do_sample=False)
    hf_kvplug.patch(model)
    for _ in range(2):
        out = model.generate(ids, **kv(cache), max_new_tokens=16, do_sample=False)
        assert torch.equal(out, ref)
        cache.reset()
