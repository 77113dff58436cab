"""PlugCache bookkeeping: layout, fixed addresses, reset / crop / reorder in place, what a stock cache exposes."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import hf_kvplug
from hf_kvplug import compat
from hf_kvplug.compat import cache_kwargs as kv
from models import tiny_model


def _addresses(cache):
    dev = [(d.block_table.data_ptr(), d.starts.data_ptr(), d.valid.data_ptr(), d.status.data_ptr())
           for d in cache.device_states.values()]
    return dev + [(l.k_cache.data_ptr(), l.v_cache.data_ptr(), l.k_scale.data_ptr(), l.cache_seqlens.data_ptr())
                  for l in cache.layers]


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
    dev = layer.dev
    assert dev.block_table.shape == (2, 7) and dev.block_table.dtype == torch.int32
    assert (dev.block_table == -1).all()  # rows map blocks as they grow
    assert cache.layers[1].dev is dev  # one table per device
    assert cache.get_max_length() == 100 and cache.get_seq_length() == 0
    assert cache.stats()["blocks_in_use"] == 0


def test_both_max_length_names():
    cache = hf_kvplug.PlugCache(tiny_model("llama"), max_batch_size=1, max_cache_len=40, block_size=16)
    assert all(getattr(cache, name)() == 40 for name in compat.MAX_LENGTH_METHODS)
    assert all(getattr(cache.layers[0], name)() == 40 for name in compat.MAX_LENGTH_METHODS)


def test_pool_budget():
    model = tiny_model("llama")
    cache = hf_kvplug.PlugCache(model, max_batch_size=4, max_cache_len=64, block_size=16, max_tokens=80)
    assert cache.config.num_blocks == 5 and cache.layers[0].k_cache.shape[0] == 5
    assert cache.nbytes == 5 * cache.stats()["bytes_per_block"]


def test_config_path_with_per_layer_devices():
    cfg = tiny_model("llama").config
    cache = hf_kvplug.PlugCache(cfg, max_batch_size=1, max_cache_len=16, dtype=torch.bfloat16,
                                device=["cpu", "meta"])
    assert [l.k_cache.device.type for l in cache.layers] == ["cpu", "meta"]
    assert cache.layers[0].k_cache.dtype == torch.bfloat16
    assert cache.layers[0].dev is not cache.layers[1].dev


def test_int8_bytes_per_token():
    cfg = tiny_model("llama").config
    kw = dict(max_batch_size=1, max_cache_len=16, dtype=torch.float16, device="cpu")
    fp16 = hf_kvplug.PlugCache(cfg, **kw)
    int8 = hf_kvplug.PlugCache(cfg, kv_dtype="int8", **kw)
    # per layer and kv head: K+V of head_dim 16 -> 64 B in fp16; 32 B + 2 fp32 scales = 40 B in int8
    assert fp16.bytes_per_token() == 2 * 2 * 64 and int8.bytes_per_token() == 2 * 2 * 40
    # Llama-3-8B shape: 32 layers x 8 kv heads x d128
    from hf_kvplug.config import PlugConfig
    from hf_kvplug.geometry import Geometry
    big = dict(geometry=Geometry(num_layers=32, nheads=32, nheads_k=8, head_dim=128, dtype=torch.float16,
                                 layer_devices=["cpu"] * 32), max_batch_size=1, max_cache_len=8)
    ratio = PlugConfig(kv_dtype="int8", **big).bytes_per_token() / PlugConfig(**big).bytes_per_token()
    assert ratio == pytest.approx(264 / 512)
    # int4: head_dim / 2 bytes + a scale and a minimum (fp16) per half, for K and V: 0.281 x fp16 (target <= 0.30)
    ratio = PlugConfig(kv_dtype="int4", **big).bytes_per_token() / PlugConfig(**big).bytes_per_token()
    assert ratio == pytest.approx(144 / 512) and ratio <= 0.30


def test_reset_keeps_addresses_and_returns_blocks(filled):
    _, cache = filled
    before = _addresses(cache)
    assert cache.get_seq_length() == 21 and cache.stats()["blocks_in_use"] == 3 * 2
    cache.reset()
    assert cache.get_seq_length() == 0 and _addresses(cache) == before
    assert cache.stats()["blocks_in_use"] == 0 and all(layer.fresh for layer in cache.layers)


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
    assert all(int(layer.cache_seqlens[0]) == 10 for layer in cache.layers)
    cache.crop(-100)
    assert cache.get_seq_length() == 0 and _addresses(cache) == before
    assert not any(layer.fresh for layer in cache.layers)  # only reset() brings back the prefill path


def test_reorder_moves_block_ids_not_data(filled):
    _, cache = filled
    before = _addresses(cache)
    pools = [(l.k_cache.clone(), l.k_scale.clone()) for l in cache.layers]
    rows = [list(r) for r in cache.table.rows[:3]]
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    assert cache.table.rows[:3] == [rows[2], rows[2], rows[0]]
    assert all(torch.equal(l.k_cache, k) and torch.equal(l.k_scale, s) for l, (k, s) in zip(cache.layers, pools))
    assert cache.stats()["blocks_in_use"] == 4 and cache.stats()["blocks_shared"] == 2
    assert _addresses(cache) == before
    assert torch.equal(cache.layers[0].dev.block_table[:3, :2], torch.tensor([rows[2], rows[2], rows[0]],
                                                                             dtype=torch.int32))


@pytest.mark.parametrize("kv_dtype", [None, "int8", "int4"])
def test_reorder_then_decode_matches_reordered_prompts(kv_dtype):
    """After a reorder two rows share blocks; each row's next writes go to its own copy of the partly filled block
    (copy-on-write), and the logits equal a cache filled with the reordered prompts."""
    model = hf_kvplug.patch(tiny_model("qwen2"))
    ids = torch.randint(2, 128, (3, 9))
    cache = hf_kvplug.PlugCache(model, max_batch_size=3, max_cache_len=32, block_size=4, kv_dtype=kv_dtype)
    model(ids, **kv(cache))
    cache.reorder_cache(torch.tensor([1, 0, 0]))
    fresh = hf_kvplug.PlugCache(model, max_batch_size=3, max_cache_len=32, block_size=4, kv_dtype=kv_dtype)
    model(ids[[1, 0, 0]], **kv(fresh))
    for _ in range(5):
        nxt = torch.randint(2, 128, (3, 1))
        torch.testing.assert_close(model(nxt, **kv(cache)).logits, model(nxt, **kv(fresh)).logits)
    assert cache.stats()["blocks_shared"] == 2  # rows 1 and 2 still share the two full blocks of row 0's prompt


@pytest.mark.parametrize("kv_dtype", [None, "int8", "int4"])
def test_keys_and_values_are_per_row_like_a_stock_cache(kv_dtype):
    """`layers[i].keys / .values`: [batch, kv_heads, seq_len, head_dim] in the model dtype (dequantized for INT8 /
    INT4), as DynamicCache gives them; the paged pool keeps its own names."""
    stock = tiny_model("qwen3")
    model = hf_kvplug.patch(tiny_model("qwen3"))
    ids = torch.randint(2, 128, (2, 11))
    ref = DynamicCache(config=stock.config)
    stock(ids, **kv(ref))
    stock(ids[:, :3], **kv(ref))
    cache = hf_kvplug.PlugCache(model, max_batch_size=4, max_cache_len=40, block_size=4, kv_dtype=kv_dtype)
    model(ids, **kv(cache))
    model(ids[:, :3], **kv(cache))
    for mine, theirs in zip(cache.layers, ref.layers):
        assert mine.keys.shape == theirs.keys.shape == (2, 2, 14, 16) and mine.keys.dtype == torch.float32
        if kv_dtype is None:  # layer 0 bit-equal; later layers see hidden states of another attention kernel
            torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(mine.values, theirs.values, rtol=1e-5, atol=1e-6)
        else:
            bound = 0.02 if kv_dtype == "int8" else 0.1  # INT4: range / 30 per half of head_dim at most
            torch.testing.assert_close(mine.values, theirs.values, atol=bound * theirs.values.abs().max().item(),
                                       rtol=0)
    assert cache.layers[0].k_cache.shape[1:] == (2, 4, 8 if kv_dtype == "int4" else 16)  # INT4: two values a byte


def test_contrastive_search_row_methods():
    model = hf_kvplug.patch(tiny_model("llama"))
    cache = hf_kvplug.PlugCache(model, max_batch_size=6, max_cache_len=40, kv_dtype="int8", block_size=16)
    model(torch.randint(2, 128, (3, 21)), **kv(cache))
    rows = [list(r) for r in cache.table.rows[:3]]
    cache.batch_repeat_interleave(2)
    assert cache.batch == 6 and cache.table.rows[:6] == [rows[0], rows[0], rows[1], rows[1], rows[2], rows[2]]
    cache.batch_select_indices(torch.tensor([1, 4]))
    assert cache.batch == 2 and cache.table.rows[:2] == [rows[0], rows[2]]
    assert cache.stats()["blocks_in_use"] == 4 and cache.get_seq_length() == 21


def test_stats_and_no_leaks_after_reset():
    model = hf_kvplug.patch(tiny_model("llama"))
    cache = hf_kvplug.PlugCache(model, max_batch_size=8, max_cache_len=64, block_size=8)
    ids = torch.randint(2, 128, (2, 19))
    model.generate(ids, **kv(cache), max_new_tokens=6, do_sample=True, num_return_sequences=4)
    stats = cache.stats()
    assert set(stats) >= {"blocks_total", "blocks_in_use", "blocks_shared", "bytes_in_use"}
    assert stats["blocks_shared"] == 2 * 2  # each prompt's two full blocks, shared by its four rows
    assert stats["bytes_in_use"] == stats["blocks_in_use"] * stats["bytes_per_block"]
    cache.reset()
    assert cache.stats()["blocks_in_use"] == 0 and all(r == 0 for r in cache.pool.refs)


def test_methods_transformers_calls_take_keywords_they_do_not_use():
    """Every method a stock cache (or cache layer) has that we define takes `**kwargs`, as transformers' own base
    classes do: a keyword a later release adds (5.25's `activate_past_recording(recurrent_states_to_keep=)`) is
    never a TypeError."""
    import inspect

    from transformers.cache_utils import CacheLayerMixin

    from hf_kvplug.cache import PlugLayer, RemoteLayer

    checked = []
    pairs = ((hf_kvplug.PlugCache, DynamicCache), (PlugLayer, CacheLayerMixin), (RemoteLayer, CacheLayerMixin))
    for ours, base in pairs:
        names = {n for n in dir(base) if not n.startswith("_")} | set(compat.MAX_LENGTH_METHODS) | {
            "activate_past_recording", "crop", "reorder_cache", "batch_repeat_interleave", "batch_select_indices"}
        for name, member in vars(ours).items():
            if name in names and callable(member):
                params = inspect.signature(member).parameters.values()
                assert any(p.kind is p.VAR_KEYWORD for p in params), f"{ours.__name__}.{name} takes no **kwargs"
                checked.append(f"{ours.__name__}.{name}")
    assert {"PlugCache.crop", "PlugCache.reset", "PlugCache.get_seq_length", "PlugLayer.activate_past_recording",
            "PlugLayer.get_mask_sizes", "RemoteLayer.get_seq_length"} <= set(checked)


@pytest.mark.skipif(not hasattr(DynamicCache, "activate_past_recording"), reason="transformers 5.4 has no recording")
def test_activate_past_recording_with_its_keywords(filled):
    model, cache = filled
    cache.activate_past_recording(recurrent_states_to_keep=3, a_keyword_from_the_future=True)
    cache.crop(-2)
    assert cache.get_seq_length() == 19


def test_lead_free_is_true_only_when_no_row_starts_late():
    """`DeviceState.lead_free` lets a forward skip reading the row starts: whatever recorded them, it is never True
    while some row starts past slot 0."""
    from hf_kvplug.device import NO_MASK, DeviceState, read_mask
    dev = DeviceState([None], 4, 8, 32, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)

    def padded(batch):
        mask = torch.ones(batch, 12, dtype=torch.long)
        mask[0, :int(torch.randint(0, 3, (1,), generator=gen))] = 0
        return read_mask(mask, batch, 12, 12, False, True, True)

    steps = [lambda: dev.record(3, padded(3)), lambda: dev.record(4, padded(4)), lambda: dev.record(2, NO_MASK),
             lambda: dev.record(4, NO_MASK), lambda: dev.select([2, 0, 1], False), lambda: dev.select([1, 1], False),
             lambda: dev.load_starts(2, torch.tensor([0, 0], dtype=torch.int32)),
             lambda: dev.load_starts(4, torch.tensor([0, 1, 0, 0], dtype=torch.int32)), dev.reset,
             lambda: dev.copy_from(dev.clone())]
    seen = set()
    for i in torch.randint(0, len(steps), (400,), generator=gen).tolist():
        steps[i]()
        seen.add(dev.lead_free)
        assert not dev.lead_free or not dev.starts.any(), f"step {i}: lead_free with starts {dev.starts.tolist()}"
    assert seen == {True, False}
