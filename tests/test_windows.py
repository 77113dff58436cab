"""Sliding-window layers keep a ring of blocks (the window and a slack) instead of max_cache_len, with stock's tokens.

The tiny models use windows of 6 (Qwen3, its second layer) and 5 (Mixtral, every layer) with blocks of 4 slots, so
the rings hold 12 slots and the prompts and generations here run several times around them.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

import hf_kvplug
from hf_kvplug import storage
from hf_kvplug.compat import cache_kwargs as kv
from models import tiny_model
from test_outputs import ALL_OUTPUTS, assert_same_output

FAMILIES = ["qwen3_sliding", "mixtral_sliding"]
BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.interpreter)]


def _pair(family, **cache_kw):
    stock = tiny_model(family, **cache_kw.pop("model_kw", {}))
    plugged = hf_kvplug.patch(tiny_model(family))
    cache = hf_kvplug.PlugCache(plugged, **{"max_batch_size": 4, "max_cache_len": 64, "block_size": 4, **cache_kw})
    return stock, plugged, cache


def _prompt(batch=2, length=23, pad=3, seed=5):
    ids = torch.randint(2, 128, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    return ids, mask


def _teacher_forced(model, cache, chunks):
    """Logits of consecutive forwards of `chunks` (lists of [B, n] ids) through `cache`."""
    return [model(ids, **kv(cache)).logits for ids in chunks]


def _long_turns_match_stock(stock, plugged, cache):
    """A prefill of 17 tokens, a turn of 20 with a hole in the mask, then 3 decode steps: logits equal stock's."""
    ids = torch.randint(2, 128, (2, 40), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, 16:19] = 0  # a hole inside the second turn
    ref_cache = DynamicCache(config=stock.config)
    for lo, hi in ((0, 17), (17, 37), (37, 38), (38, 39), (39, 40)):
        want = stock(ids[:, lo:hi], attention_mask=mask[:, :hi], **kv(ref_cache)).logits
        got = plugged(ids[:, lo:hi], attention_mask=mask[:, :hi], **kv(cache)).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_rings_hold_the_window_and_its_slack(family):
    _, plugged, cache = _pair(family)
    full = hf_kvplug.PlugCache(plugged, max_batch_size=4, max_cache_len=64, block_size=4, trim_windows=False)
    cfg = cache.config
    for layer in cache.attn_layers:
        if layer.window is None:
            assert layer.ring is None and layer.k_cache.shape[0] == 4 * 16
        else:
            assert layer.ring == 3 and layer.ring_slots == 12 >= 2 * layer.window - 1
            assert layer.k_cache.shape[0] == 4 * 3  # a full ring per row, whatever max_cache_len
    assert all(layer.ring is None for layer in full.attn_layers)
    windowed = sum(w is not None for w in cfg.layer_windows)
    per_layer = full.nbytes // len(full.attn_layers)
    assert cache.nbytes == full.nbytes - windowed * per_layer * (16 - 3) // 16
    assert cache.bytes_per_token() == (len(cfg.attention_layers) - windowed) * cfg.layer_token_bytes
    assert cfg.ring_bytes_per_row == windowed * 12 * cfg.layer_token_bytes
    # a window so wide that a ring would not be smaller keeps max_cache_len
    wide = hf_kvplug.PlugCache(plugged, max_batch_size=4, max_cache_len=8, block_size=4)
    assert all(layer.ring is None for layer in wide.attn_layers)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["greedy", "sample", "beam", "beam_sample"])
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_matches_stock(family, mode, backend):
    if backend == "triton" and mode != "greedy":
        pytest.skip("the interpreter is slow: greedy covers the kernels, the reference every mode")
    stock, plugged, cache = _pair(family, backend=backend, max_batch_size=6)
    ids, mask = _prompt()
    kw = dict(attention_mask=mask, max_new_tokens=30, **{
        "greedy": dict(do_sample=False), "sample": dict(do_sample=True, top_k=20),
        "beam": dict(do_sample=False, num_beams=3, num_return_sequences=3),
        "beam_sample": dict(do_sample=True, num_beams=2)}[mode])
    torch.manual_seed(7)
    ref = stock.generate(ids, **kw)
    torch.manual_seed(7)
    out = plugged.generate(ids, **kv(cache), **kw)
    assert torch.equal(ref, out)
    assert cache.stats()["window_blocks_in_use"] <= cache.stats()["window_blocks_total"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_long_forwards_go_through_the_ring_in_pieces(family, backend):
    """A prefill longer than the ring (only its tail is stored), then a turn of 20 tokens (more than one kernel call
    may take: 12 - window + 1), then decode steps, with holes in the mask: logits equal stock's."""
    stock, plugged, cache = _pair(family, backend=backend)
    _long_turns_match_stock(stock, plugged, cache)
    assert cache.get_seq_length() == 40


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_lookup_crops_within_the_ring(family):
    """Assisted decoding crops rejected drafts; the ring still holds every token the next window needs."""
    stock, plugged, cache = _pair(family, max_batch_size=1)
    ids = torch.tensor([[5, 9, 17, 33, 5, 9, 17, 33, 5, 9, 17, 40, 5, 9, 17, 33, 5, 9]])
    kw = dict(max_new_tokens=30, do_sample=False, prompt_lookup_num_tokens=4, eos_token_id=127)
    assert torch.equal(plugged.generate(ids, **kv(cache), **kw), stock.generate(ids, **kw))


def test_crop_past_the_ring_is_refused_before_anything_changes():
    stock, plugged, cache = _pair("qwen3_sliding")
    ids = torch.randint(2, 128, (1, 30))
    plugged(ids, **kv(cache))
    with pytest.raises(ValueError, match="last 12 tokens written.*trim_windows=False"):
        cache.crop(-8)
    assert cache.get_seq_length() == 30
    cache.crop(-7)  # 12 - 6 + 1: the most a ring can give back
    with pytest.raises(ValueError, match="up to 30"):  # counted from the most the rows held, not from 23
        cache.crop(-1)
    ref = DynamicCache(config=stock.config)
    stock(ids[:, :23], **kv(ref))
    step = torch.randint(2, 128, (1, 3))
    torch.testing.assert_close(plugged(step, **kv(cache)).logits, stock(step, **kv(ref)).logits, rtol=1e-4,
                               atol=1e-5)
    full = hf_kvplug.PlugCache(plugged, max_batch_size=1, max_cache_len=64, block_size=4, trim_windows=False)
    plugged(ids, **kv(full))
    full.crop(-20)  # every token kept: any crop works
    assert full.get_seq_length() == 10


@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_every_output_option_with_windows(mode):
    """Attention weights of a sliding layer cover its last window - 1 cached tokens and the new ones, and the
    returned cache's keys / values are its last window - 1 tokens: what transformers' sliding layers give."""
    stock = tiny_model("qwen3_sliding", attn="eager")
    plugged = hf_kvplug.patch(tiny_model("qwen3_sliding", attn="eager"))
    cache = hf_kvplug.PlugCache(plugged, max_batch_size=4, max_cache_len=48, block_size=4)
    ids, mask = _prompt(length=15)
    mask[0, 5:7] = 0
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, **ALL_OUTPUTS,
              **({"num_beams": 2} if mode == "beam" else {}))
    ref = stock.generate(ids, **kv(DynamicCache(config=stock.config)), **kw)
    out = plugged.generate(ids, **kv(cache), **kw)
    assert_same_output(ref, out)
    assert out.attentions[-1][1].shape[-1] == 6  # window - 1 cached + the new token


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_fork_copy_and_files_keep_the_rings(tmp_path, kv_dtype):
    """A prefix cached once and continued by a fork, a deep copy and a cache loaded from a file: the same logits
    as the original continued the same way, and the original unchanged by the others' writes."""
    _, plugged, cache = _pair("qwen3_sliding", kv_dtype=kv_dtype)
    ids = torch.randint(2, 128, (2, 26))
    plugged(ids, **kv(cache))
    cache.save(tmp_path / "c.safetensors")
    others = [cache.fork(), copy.deepcopy(cache),
              hf_kvplug.PlugCache.load(tmp_path / "c.safetensors", plugged, max_batch_size=4)]
    steps = [torch.randint(2, 128, (2, 1)) for _ in range(14)]
    want = _teacher_forced(plugged, cache, steps)
    for other in others:
        assert other.get_seq_length() == 26
        for a, b in zip(_teacher_forced(plugged, other, steps), want):
            assert torch.equal(a, b)
    assert cache.get_seq_length() == 40


def test_file_with_rings_refused_by_a_cache_without():
    _, plugged, cache = _pair("qwen3_sliding")
    plugged(torch.randint(2, 128, (1, 9)), **kv(cache))
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        cache.save(f"{d}/c.safetensors")
        with pytest.raises(ValueError, match="layer_rings"):
            hf_kvplug.PlugCache.load(f"{d}/c.safetensors", plugged, trim_windows=False)


def test_compiled_decode_runs_around_the_ring():
    """A model compiled as a whole (no eager code before its forward) maps nothing per step: reserve() maps every
    ring block once and decode steps wrap around it; same logits as eager, one graph."""
    _, plugged, eager = _pair("qwen3_sliding", max_batch_size=2)
    compiled = hf_kvplug.PlugCache(plugged, max_batch_size=2, max_cache_len=64, block_size=4)
    compiled.reserve()
    step = torch.compile(plugged, fullgraph=True, backend="aot_eager")
    ids = torch.randint(2, 128, (2, 7))
    with torch.no_grad():
        token = plugged(ids, **kv(eager)).logits[:, -1:].argmax(-1)
        plugged(ids, **kv(compiled))
        for _ in range(30):  # two and a half times around the 12-slot ring
            want = plugged(token, **kv(eager)).logits
            torch.testing.assert_close(step(token, **kv(compiled)).logits, want, rtol=1e-5, atol=1e-5)
            token = want.argmax(-1)


def test_crops_count_from_the_most_the_rows_held():
    """After a crop and one more token, a second crop is measured against the 30 tokens once written: the slots of
    tokens 17-19 were overwritten by tokens 29-31's places, whatever the length is now."""
    _, plugged, cache = _pair("qwen3_sliding")
    plugged(torch.randint(2, 128, (1, 30)), **kv(cache))
    cache.crop(-7)
    plugged(torch.randint(2, 128, (1, 1)), **kv(cache))
    with pytest.raises(ValueError, match="up to 30"):
        cache.crop(-3)
    assert cache.get_seq_length() == 24


def test_a_full_ring_pool_refuses_a_fork_before_writing_and_max_tokens_makes_room():
    """Every row of a full batch holds a whole ring, so a fork's first copy-on-write finds the ring pool empty: a
    clear error naming the ring pool, raised before any table changes (host and device tables still agree). A
    max_tokens above the rectangle grows the rings in proportion, and the fork then follows its original."""
    _, plugged, cache = _pair("qwen3_sliding", max_batch_size=2)
    ids = torch.randint(2, 128, (2, 26))
    plugged(ids, **kv(cache))
    fork = cache.fork()
    before = {ring: [list(r) for r in t.rows] for ring, t in fork.tables.items()}
    step = torch.randint(2, 128, (2, 1))
    with pytest.raises(ValueError, match="sliding-window ring pool .*max_tokens="):
        plugged(step, **kv(fork))
    assert {ring: [list(r) for r in t.rows] for ring, t in fork.tables.items()} == before
    for ring, t in fork.tables.items():
        assert torch.equal(fork.layers[0].dev.block_tables[ring], torch.tensor(t.to_dense(), dtype=torch.int32))
    roomy = hf_kvplug.PlugCache(plugged, max_batch_size=2, max_cache_len=64, block_size=4, max_tokens=2 * 2 * 64)
    assert roomy.pools[3].num_blocks == 2 * cache.pools[3].num_blocks
    plugged(ids, **kv(roomy))
    other = roomy.fork()
    steps = [torch.randint(2, 128, (2, 1)) for _ in range(14)]
    for a, b in zip(_teacher_forced(plugged, other, steps), _teacher_forced(plugged, roomy, steps)):
        assert torch.equal(a, b)


def test_a_file_without_rings_loads_as_it_was_saved(tmp_path):
    _, plugged, _ = _pair("qwen3_sliding")
    full = hf_kvplug.PlugCache(plugged, max_batch_size=2, max_cache_len=64, block_size=4, trim_windows=False)
    plugged(torch.randint(2, 128, (1, 26)), **kv(full))
    full.save(tmp_path / "c.safetensors")
    loaded = hf_kvplug.PlugCache.load(tmp_path / "c.safetensors", plugged, max_cache_len=64)
    assert loaded.get_seq_length() == 26 and not any(loaded.config.layer_rings)
    step = torch.randint(2, 128, (1, 1))
    assert torch.equal(plugged(step, **kv(loaded)).logits, plugged(step, **kv(full)).logits)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_small_window_slack_keeps_stock_logits_in_smaller_rings(family, backend):
    """window_slack=1: rings of the window and one slot, rounded up to blocks (8 slots for windows of 6 and 5), so a
    forward runs in pieces of 3 or 4 tokens; prefill, a long turn with a hole, decode and generate() (greedy and
    beam) still equal stock, and a crop past the slack is refused before anything changes."""
    stock, plugged, cache = _pair(family, backend=backend, window_slack=1, max_batch_size=6)
    assert {layer.ring_slots for layer in cache.attn_layers if layer.ring} == {8}
    wide = hf_kvplug.PlugCache(plugged, max_batch_size=6, max_cache_len=64, block_size=4)
    assert cache.nbytes < wide.nbytes
    _long_turns_match_stock(stock, plugged, cache)
    window = min(layer.window for layer in cache.attn_layers if layer.ring)
    with pytest.raises(ValueError, match="window_slack="):
        cache.crop(-(8 - window + 2))
    assert cache.get_seq_length() == 40
    if backend == "reference":
        p, m = _prompt()
        for kw in (dict(do_sample=False), dict(do_sample=False, num_beams=3, num_return_sequences=2)):
            cache.reset()
            assert torch.equal(plugged.generate(p, attention_mask=m, max_new_tokens=20, **kv(cache), **kw),
                               stock.generate(p, attention_mask=m, max_new_tokens=20, **kw))


def test_a_file_from_before_window_slack_loads_with_its_wide_rings(tmp_path):
    """Files written before window_slack existed kept rings of 2 x window - 1 slots; they load with those rings
    (inferred from the window), where a new cache of a window of 300 keeps 299 + 256 slots."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, MistralConfig

    from models import _COMMON

    torch.manual_seed(0)
    model = hf_kvplug.patch(AutoModelForCausalLM.from_config(MistralConfig(**{**_COMMON, "sliding_window": 300})))
    model.eval()
    kw = dict(max_batch_size=1, max_cache_len=1024, block_size=64)
    old = hf_kvplug.PlugCache(model, window_slack=300, **kw)
    assert {layer.ring for layer in old.attn_layers} == {10}  # ceil(599 / 64)
    assert {layer.ring for layer in hf_kvplug.PlugCache(model, **kw).attn_layers} == {9}  # ceil(555 / 64)
    ids = torch.randint(2, 128, (1, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids[:, :20], **kv(old))
    path = tmp_path / "old.safetensors"
    old.save(path)
    with safe_open(str(path), framework="pt") as f:  # as an older hf_kvplug wrote it: no window_slack
        meta = json.loads(f.metadata()["hf_kvplug"])
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    for key in ("window_slack", "weights", "sha256_covers"):  # (nor a weights digest, nor a checksum over the meta)
        del meta[key]
    meta["sha256"] = storage._digest(tensors)
    save_file(tensors, str(path), metadata={"hf_kvplug": json.dumps(meta)})
    back = hf_kvplug.PlugCache.load(path, model)
    assert {layer.ring for layer in back.attn_layers} == {10}
    with torch.no_grad():
        torch.testing.assert_close(model(ids[:, 20:], **kv(back)).logits, model(ids[:, 20:], **kv(old)).logits,
                                   rtol=0, atol=0)
