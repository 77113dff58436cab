"""PlugCache bookkeeping: layout, fixed addresses, reset / crop / reorder in place, bytes per token."""

from __future__ import annotations

import pytest
import torch

import hf_kvplug
from hf_kvplug import cache as cache_mod
from hf_kvplug import compat
from models import tiny_model
from hf_kvplug.compat import cache_kwargs as kv


def _addresses(cache):
    return [(l.k_cache.data_ptr(), l.v_cache.data_ptr(), l.k_scale.data_ptr(), l.cache_seqlens.data_ptr(),
             l.block_table.data_ptr()) for l in cache.layers]


@pytest.fixture
def filled():
    model = hf_kvplug.patch(tiny_model("llama"))
    cache = hf_kvplug.PlugCache(model, max_batch_size=3, max_cache_len=40, kv_dtype="int8", block_size=16)
    model(torch.randint(2, 128, (3, 21)), **kv(cache))
    return model, cache


def test_layout_and_placement():
    model = tiny_model("qwen3")
    cache = hf_kvplug.PlugCache(model, max_batch_size=2, max_cache_len=100, block_size=16)
    cfg = cache.config
    assert len(cache.layers) == model.config.num_hidden_layers and cache.is_compileable
    assert cfg.max_blocks_per_row == 7 and cfg.num_blocks == 14
    layer = cache.layers[0]
    assert layer.k_cache.shape == (14, 2, 16, 16) and layer.k_cache.dtype == torch.float32
    assert layer.k_scale.numel() == 0
    assert layer.block_table.shape == (2, 7) and layer.block_table.dtype == torch.int32
    assert layer.block_table is cache.layers[1].block_table  # one table per device
    assert cache.get_max_length() == 100 and cache.get_seq_length() == 0


def test_config_path_with_per_layer_devices():
    cfg = tiny_model("llama").config
    cache = hf_kvplug.PlugCache(cfg, max_batch_size=1, max_cache_len=16, dtype=torch.bfloat16,
                                device=["cpu", "meta"])
    assert [l.k_cache.device.type for l in cache.layers] == ["cpu", "meta"]
    assert cache.layers[0].k_cache.dtype == torch.bfloat16
    assert cache.layers[0].block_table is not cache.layers[1].block_table


def test_int8_bytes_per_token():
    cfg = tiny_model("llama").config
    kw = dict(max_batch_size=1, max_cache_len=16, dtype=torch.float16, device="cpu")
    fp16 = hf_kvplug.PlugCache(cfg, **kw)
    int8 = hf_kvplug.PlugCache(cfg, kv_dtype="int8", **kw)
    # per layer and kv head: K+V of head_dim 16 -> 64 B in fp16; 32 B + 2 fp32 scales = 40 B in int8
    assert fp16.bytes_per_token() == 2 * 2 * 64 and int8.bytes_per_token() == 2 * 2 * 40
    # Llama-3-8B shape: 32 layers x 8 kv heads x d128
    from hf_kvplug.config import PlugConfig
    big = dict(num_layers=32, nheads=32, nheads_k=8, head_dim=128, max_batch_size=1, max_cache_len=8,
               dtype=torch.float16, layer_devices=["cpu"] * 32)
    ratio = PlugConfig(kv_dtype="int8", **big).bytes_per_token() / PlugConfig(**big).bytes_per_token()
    assert ratio == pytest.approx(264 / 512)


def test_reset_keeps_addresses(filled):
    _, cache = filled
    before = _addresses(cache)
    assert cache.get_seq_length() == 21
    cache.reset()
    assert cache.get_seq_length() == 0 and _addresses(cache) == before


def test_crop_negative_and_legacy(filled, monkeypatch):
    _, cache = filled
    before = _addresses(cache)
    cache.crop(-5)
    assert cache.get_seq_length() == 16
    if not compat.LEGACY_CROP:  # crop(0) drops nothing (before the negative convention it means "keep 0 tokens")
        cache.crop(0)
        assert cache.get_seq_length() == 16
    with pytest.raises(ValueError, match="negative"):
        monkeypatch.setattr(compat, "LEGACY_CROP", False)
        cache.crop(3)
    monkeypatch.setattr(compat, "LEGACY_CROP", True)  # older releases: positive = target length
    cache.crop(10)
    assert cache.get_seq_length() == 10
    cache.crop(-100)
    assert cache.get_seq_length() == 0 and _addresses(cache) == before
    assert not any(layer.fresh for layer in cache.layers)  # only reset() brings back the prefill path


def test_reorder_copies_rows_in_place(filled):
    _, cache = filled
    before = _addresses(cache)
    layer = cache.layers[1]
    view = lambda buf: buf.view(3, -1, *buf.shape[1:])  # noqa: E731 - rows own fixed runs of blocks
    rows_k, rows_s = view(layer.k_cache).clone(), view(layer.k_scale).clone()
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    used = 2  # 21 tokens in blocks of 16
    assert torch.equal(view(layer.k_cache)[0, :used], rows_k[2, :used])
    assert torch.equal(view(layer.k_cache)[1, :used], rows_k[2, :used])
    assert torch.equal(view(layer.k_cache)[2, :used], rows_k[0, :used])
    assert torch.equal(view(layer.k_scale)[2, :used], rows_s[0, :used])
    assert _addresses(cache) == before


def test_reorder_then_decode_matches_reordered_prompts():
    model = hf_kvplug.patch(tiny_model("qwen2"))
    ids = torch.randint(2, 128, (3, 9))
    cache = hf_kvplug.PlugCache(model, max_batch_size=3, max_cache_len=32, block_size=4)
    model(ids, **kv(cache))
    cache.reorder_cache(torch.tensor([1, 0, 0]))
    nxt = torch.randint(2, 128, (3, 1))
    got = model(nxt, **kv(cache)).logits
    fresh = hf_kvplug.PlugCache(model, max_batch_size=3, max_cache_len=32, block_size=4)
    model(ids[[1, 0, 0]], **kv(fresh))
    want = model(nxt, **kv(fresh)).logits
    torch.testing.assert_close(got, want)


def test_row_starts_computed_once_per_forward(monkeypatch):
    """Eager: the first layer on a device computes the left-padding starts, the others reuse them; every forward
    (and a repeated call with the same position_ids object) recomputes."""
    model = hf_kvplug.patch(tiny_model("llama", num_hidden_layers=3))
    cache = hf_kvplug.PlugCache(model, max_batch_size=2, max_cache_len=32, block_size=4)
    assert [layer.leads for layer in cache.layers] == [True, False, False]
    ids = torch.randint(2, 128, (2, 6))
    model(ids, **kv(cache))
    puts = []
    put = cache_mod.StartsMemo.put
    monkeypatch.setattr(cache_mod.StartsMemo, "put", lambda self, *a: puts.append(a[1]) or put(self, *a))
    position_ids = torch.tensor([[6], [6]])
    for step in range(2):
        model(torch.randint(2, 128, (2, 1)), **kv(cache), position_ids=position_ids)
        assert len(puts) == step + 1
    assert cache.get_seq_length() == 8


@pytest.mark.parametrize("compile_first_layer", [False, True])
def test_row_starts_never_stale(compile_first_layer):
    """Two requests with different left padding, decoding with one position_ids buffer updated in place, give the
    same logits whether the first layer runs eagerly or compiled (then it cannot refresh the memo, it clears it)."""

    def decode_logits(compiled):
        model = hf_kvplug.patch(tiny_model("llama"))
        if compiled:
            model.model.layers[0].compile(backend="eager")
        cache = hf_kvplug.PlugCache(model, max_batch_size=2, max_cache_len=64, block_size=4)
        position_ids = torch.zeros(2, 1, dtype=torch.long)
        outs = []
        for seed, pads in enumerate(([3, 0], [0, 2])):
            cache.reset()
            ids = torch.randint(2, 128, (2, 8), generator=torch.Generator().manual_seed(seed))
            mask = torch.ones_like(ids)
            for row, n in enumerate(pads):
                ids[row, :n], mask[row, :n] = 0, 0
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            model(ids, attention_mask=mask, position_ids=pos, **kv(cache))
            position_ids.copy_(pos[:, -1:] + 1)
            outs.append(model(torch.tensor([[5], [9]]), position_ids=position_ids, **kv(cache)).logits)
        return outs

    torch._dynamo.reset()
    for got, want in zip(decode_logits(compile_first_layer), decode_logits(False)):
        assert torch.equal(got, want)


def test_unsupported_contrastive_search_methods(filled):
    _, cache = filled
    with pytest.raises(NotImplementedError, match="contrastive"):
        cache.batch_repeat_interleave(2)
