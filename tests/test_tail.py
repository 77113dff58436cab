"""An INT4 PlugCache's exact tail (`PlugConfig.exact_tail`, `reference` rule 4): each row's last, partial block is
kept unquantized beside the pool and read instead of its codes, through every path a cache takes (the fused
forward, output_attentions, crops, beams, forks, copies, files), and it is the cache's own memory."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from transformers import DynamicCache

import hf_kvplug
from hf_kvplug import ops, reference
from hf_kvplug.compat import cache_kwargs as kv
from models import tiny_model

BS = 8


def _setup(exact_tail=None, backend="auto", **kw):
    plugged = hf_kvplug.patch(tiny_model("llama"))
    cache = hf_kvplug.PlugCache(plugged, max_batch_size=4, max_cache_len=64, kv_dtype="int4", block_size=BS,
                                exact_tail=exact_tail, backend=backend, **kw)
    return plugged, cache


def _stock_keys(ids):
    stock = tiny_model("llama")
    dyn = DynamicCache()
    stock(ids, **kv(dyn))
    return [(layer.keys, layer.values) for layer in dyn.layers]


def test_the_tail_holds_each_rows_partial_block_exactly():
    """Slots of a row's last, partial block read back as the model wrote them; a block that fills is read quantized
    from then on (the pool holds every token's codes)."""
    ids = torch.randint(2, 128, (2, 19))
    plugged, cache = _setup()
    assert cache.config.exact_tail  # int4's default
    plugged(ids, **kv(cache))
    for layer, (k, v) in zip(cache.layers, _stock_keys(ids)):
        for mine, want in ((layer.keys, k), (layer.values, v)):
            torch.testing.assert_close(mine[:, :, 16:], want[:, :, 16:], atol=2e-6, rtol=1e-5)  # exact (rotation)
            assert (mine[:, :, :16] - want[:, :, :16]).abs().max() > 1e-3  # quantized
    more = torch.randint(2, 128, (2, 5))  # 24 tokens: the block fills, nothing left in the tail
    plugged(more, **kv(cache))
    for layer, (k, _) in zip(cache.layers, _stock_keys(torch.cat([ids, more], 1))):
        assert (layer.keys[:, :, 16:24] - k[:, :, 16:24]).abs().max() > 1e-3


def test_the_tail_changes_what_int4_attends_and_every_path_agrees():
    """With the tail the logits move towards stock's; the fused path, the output_attentions path and the reference
    backend give the same outputs; without it the cache is int4 as it was."""
    ids = torch.randint(2, 128, (2, 21))
    stock = tiny_model("llama")
    want = stock(torch.cat([ids, ids[:, :3]], 1)).logits[:, -3:]
    out = {}
    for name, kw in (("tail", {}), ("plain", {"exact_tail": False}), ("ref", {"backend": "reference"})):
        plugged, cache = _setup(**kw)
        plugged(ids, **kv(cache))
        out[name] = torch.cat([plugged(ids[:, i:i + 1], **kv(cache)).logits for i in range(3)], 1)
        if name == "tail":  # output_attentions: the model's eager attention over the gathered K/V (attend_dense)
            plugged2 = hf_kvplug.patch(tiny_model("llama", attn="eager"))
            cache2 = hf_kvplug.PlugCache(plugged2, max_batch_size=4, max_cache_len=64, kv_dtype="int4", block_size=BS)
            plugged2(ids, **kv(cache2))
            dense = torch.cat([plugged2(ids[:, i:i + 1], output_attentions=True, **kv(cache2)).logits
                               for i in range(3)], 1)
            torch.testing.assert_close(dense, out["tail"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["ref"], out["tail"], atol=1e-5, rtol=1e-5)
    err = {name: (out[name] - want).abs().mean() for name in ("tail", "plain")}
    assert err["tail"] < err["plain"], err


def test_a_crop_into_an_earlier_block_refills_the_tail_from_the_pool():
    """Assisted decoding's crop: within the last block the tail keeps its exact tokens; into an earlier one, whose
    exact values were overwritten, it takes them from the pool, and the cache then reads as one without a tail."""
    ids = torch.randint(2, 128, (1, 26))
    plugged, cache = _setup()
    _, plain = _setup(exact_tail=False)
    for c in (cache, plain):
        plugged(ids, **kv(c))
    cache.crop(-1)  # 25 tokens: the same block (24..25)
    assert torch.equal(cache.layers[0].keys[:, :, 24:], _setup_keys(ids[:, :25])[:, :, 24:])
    cache.crop(-6)  # 19 tokens: into block 16..23, filled (and quantized) before
    plain.crop(-7)
    for mine, theirs in zip(cache.layers, plain.layers):
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
    step = torch.randint(2, 128, (1, 1))
    a, b = plugged(step, **kv(cache)).logits, plugged(step, **kv(plain)).logits
    # the new token is exact in one of them only; the reference backend agrees with the fast path on it
    _, ref = _setup(backend="reference")
    plugged(ids, **kv(ref))
    ref.crop(-7)
    torch.testing.assert_close(plugged(step, **kv(ref)).logits, a, atol=1e-5, rtol=1e-5)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("between", ["nothing", "fork", "select"])
def test_two_crops_the_first_to_a_block_boundary_read_as_one(between):
    """A crop to a block boundary leaves no slot of the block it lands after in the old tail: a second crop into that
    block must refill it, and the cache reads as one cropped once (it read the later block's tokens before)."""
    ids = torch.randint(2, 128, (1, 26))
    plugged, twice = _setup()
    _, once = _setup()
    with torch.no_grad():
        for c in (twice, once):
            plugged(ids, **kv(c))
        twice.crop(-2)  # 24: a block boundary
        if between == "fork":
            twice = twice.fork()
        elif between == "select":
            twice.reorder_cache(torch.tensor([0]))
        twice.crop(-3)  # 21: into block 16..23
        once.crop(-5)
        for mine, theirs in zip(twice.layers, once.layers):
            assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
        step = torch.randint(2, 128, (1, 1))
        assert torch.equal(plugged(step, **kv(twice)).logits, plugged(step, **kv(once)).logits)


def _setup_keys(ids):
    plugged, cache = _setup()
    plugged(ids, **kv(cache))
    return cache.layers[0].keys


def test_beams_forks_copies_and_files_carry_the_tail(tmp_path):
    """The tail is per row and per cache: beam search moves it with its row, a fork or a deep copy gets its own copy
    of it, and a file holds it; each continues exactly as the cache it came from."""
    plugged, cache = _setup()
    ids = torch.randint(2, 128, (3, 13))
    plugged(ids, **kv(cache))
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    _, fresh = _setup()
    plugged(ids[[2, 0, 0]], **kv(fresh))
    step = torch.randint(2, 128, (3, 1))
    for layer, theirs in zip(cache.layers, fresh.layers):
        assert torch.equal(layer.tail.k[:3], theirs.tail.k[:3])
    forked, copied = cache.fork(), copy.deepcopy(cache)
    cache.save(tmp_path / "c.safetensors")
    loaded = hf_kvplug.PlugCache.load(tmp_path / "c.safetensors", plugged)
    assert loaded.config.exact_tail
    want = plugged(step, **kv(cache)).logits
    for other in (forked, copied, loaded):
        assert other.layers[0].tail.k.data_ptr() != cache.layers[0].tail.k.data_ptr()
        assert torch.equal(plugged(step, **kv(other)).logits, want)


def test_int4_files_without_a_tail_load_as_they_were(tmp_path):
    plugged, cache = _setup(exact_tail=False)
    ids = torch.randint(2, 128, (2, 11))
    plugged(ids, **kv(cache))
    cache.save(tmp_path / "old.safetensors")
    loaded = hf_kvplug.PlugCache.load(tmp_path / "old.safetensors", plugged)
    assert not loaded.config.exact_tail and loaded.layers[0].tail is None
    step = torch.randint(2, 128, (2, 1))
    assert torch.equal(plugged(step, **kv(loaded)).logits, plugged(step, **kv(cache)).logits)
    with pytest.raises(ValueError, match="exact_tail"):
        hf_kvplug.PlugCache.load(tmp_path / "old.safetensors", plugged, exact_tail=True)


def test_the_tail_is_int4s_and_its_memory_is_counted():
    plugged, cache = _setup()
    _, plain = _setup(exact_tail=False)
    cfg = cache.config
    per_row = 2 * cfg.nheads_k * BS * cfg.head_dim * 4 * len(cfg.attention_layers)  # fp32 model
    assert cfg.tail_bytes_per_row == per_row and plain.config.tail_bytes_per_row == 0
    assert cache.nbytes - plain.nbytes == cfg.max_batch_size * per_row
    stats, plain_stats = cache.stats(), plain.stats()
    assert stats["tail_bytes"] == cfg.max_batch_size * per_row and "tail_bytes" not in plain_stats
    assert stats["bytes_in_use"] - plain_stats["bytes_in_use"] == stats["tail_bytes"]
    with pytest.raises(ValueError, match="exact_tail"):
        hf_kvplug.PlugCache(plugged, max_batch_size=2, max_cache_len=32, kv_dtype="int8", exact_tail=True)
    assert hf_kvplug.PlugCache(plugged, max_batch_size=2, max_cache_len=32, kv_dtype="int8").layers[0].tail is None


def test_codes_under_the_tail_are_never_read():
    """The codes of a slot read from the tail never enter the arithmetic, as in the reference: an infinite minimum
    there (a value past fp16's range, in an fp32 model) leaves every backend's output finite and the same."""
    ids, step = torch.randint(2, 128, (1, 19)), torch.randint(2, 128, (1, 1))
    out = []
    for backend in ("torch", "reference"):
        plugged, cache = _setup(backend=backend)
        with torch.no_grad():
            plugged(ids, **kv(cache))
            for layer in cache.layers:  # slot 17, in the partial block 16..23
                layer.kv.v_scale[int(layer.block_table[0, 2]), :, 1, 1] = float("inf")
            out.append(plugged(step, **kv(cache)).logits)
    assert out[0].isfinite().all()
    torch.testing.assert_close(out[0], out[1], atol=1e-5, rtol=1e-5)


def test_a_crop_back_into_a_block_that_just_filled_keeps_it_exact():
    """The tail also keeps the block a forward just filled: assisted decoding's rejected drafts that filled it are
    cropped off and the cache reads as one that never held them."""
    ids = torch.randint(2, 128, (1, 24))
    plugged, cache = _setup()
    _, short = _setup()
    with torch.no_grad():
        plugged(ids[:, :16], **kv(cache))
        plugged(ids[:, :16], **kv(short))
        for i in range(16, 24):  # one token a forward, up to 24: block 16..23 fills
            plugged(ids[:, i:i + 1], **kv(cache))
            if i < 22:
                plugged(ids[:, i:i + 1], **kv(short))
        cache.crop(-2)
        step = torch.randint(2, 128, (1, 1))
        assert torch.equal(plugged(step, **kv(cache)).logits, plugged(step, **kv(short)).logits)


def _random_call(rng: random.Random, seed: int, heads_first: bool):
    """One random `ops.attend_with_kvcache` call on an INT4 cache with a tail: ragged rows, leading starts, holes,
    windows, attend-only or any number of new tokens up to the queries, NaN in the tail positions past each row's
    end; buffers stored blocks first or heads first."""
    g = torch.Generator().manual_seed(seed)
    batch, bs, hk, h, d, per_row = rng.randint(1, 3), 8, 2, 4, 16, 8
    q_len = rng.choice([1, 2, 3, 5, 9, 12, 17])
    n_new = rng.randint(0, q_len) if q_len > 1 else rng.randint(0, 1)
    lens = [rng.randint(max(1, q_len - n_new), 40) for _ in range(batch)]
    nblocks = batch * per_row + 2
    codes = [reference.quantize_int4(torch.randn(nblocks, hk, bs, d, generator=g)) for _ in range(2)]
    bufs = [x.transpose(0, 1).contiguous().transpose(0, 1) if heads_first else x.contiguous()
            for x in (codes[0][0], codes[1][0], codes[0][1], codes[1][1])]
    tails = [torch.randn(batch, hk, bs, d, generator=g) * 2 + 1 for _ in range(2)]
    for b, length in enumerate(lens):
        for t in tails:
            t[b, :, (length + n_new) % bs:] = float("nan")  # past the row's end after the call: never read
    holes = rng.random() < 0.3
    return dict(
        q=torch.randn(batch, q_len, h, d, generator=g), k=torch.randn(batch, n_new, hk, d, generator=g),
        v=torch.randn(batch, n_new, hk, d, generator=g), bufs=bufs, k_tail=tails[0], v_tail=tails[1],
        table=torch.randperm(nblocks, generator=g)[:batch * per_row].view(batch, per_row).to(torch.int32),
        seqlens=torch.tensor(lens, dtype=torch.int32), window=rng.choice([0, 0, 3, 5, 9, 20]),
        starts=torch.tensor([rng.randint(0, n - 1) if rng.random() < 0.4 else 0 for n in lens], dtype=torch.int32),
        valid=(torch.rand(batch, per_row * bs, generator=g) > 0.3).to(torch.uint8) if holes else None)


def _run(call: dict, backend: str):
    c = {key: x.clone() if torch.is_tensor(x) else [y.clone() for y in x] if isinstance(x, list) else x
         for key, x in call.items()}
    out = ops.attend_with_kvcache(c["q"], c["k"], c["v"], *c["bufs"], c["table"], c["seqlens"], c["starts"], 0.25,
                                  c["window"], cache_valid=c["valid"], status=torch.zeros(1, dtype=torch.int32),
                                  backend=backend, k_tail=c["k_tail"], v_tail=c["v_tail"])
    return out, c


@pytest.mark.parametrize("backend, calls", [("torch", 60), pytest.param("triton", 12, marks=pytest.mark.interpreter)])
def test_random_calls_agree_with_the_reference(backend, calls):
    """Seeded random calls (`_random_call`) through the fast path and the kernels: the reference's outputs (NaN
    where it has NaN), and its tails and pools byte for byte after the write."""
    rng = random.Random(7)
    for i in range(calls):
        call = _random_call(rng, i, heads_first=backend == "torch" and rng.random() < 0.5)
        want, ref = _run(call, "reference")
        got, mine = _run(call, backend)
        assert torch.equal(got.isnan(), want.isnan()), i
        torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), atol=2e-3, rtol=2e-3, msg=f"call {i}")
        for a, b in zip(mine["bufs"] + [mine["k_tail"], mine["v_tail"]],
                        ref["bufs"] + [ref["k_tail"], ref["v_tail"]]):
            assert torch.equal(a.nan_to_num(), b.nan_to_num()), i


def _waiting_loop(cache, plugged, steps: int, between=None, first: int = 11):
    """A prompt of `first` tokens, then `steps` greedy decode steps, `between(step, cache)` after each (it may
    return another cache to go on with); the logits of each step."""
    ids = torch.randint(2, 128, (2, first), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = plugged(ids, **kv(cache))
        logits = [out.logits[:, -1]]
        for i in range(steps):
            out = plugged(out.logits[:cache.batch, -1:].argmax(-1), **kv(cache))
            logits.append(out.logits[:, -1])
            if between is not None:
                cache = between(i, cache) or cache
    return torch.cat(logits), cache


def test_codes_a_decode_step_leaves_to_the_tail_are_the_codes_written_at_once(monkeypatch):
    """A decode step that reads its token from the exact tail (its block not full) leaves that token's codes
    unwritten (`PlugLayer.unwritten`); the step that fills the block, or anything else that touches the pool, writes
    them first (`settle`). Across three blocks that fill, the logits and, once settled, every buffer are bit for bit
    those of a cache that writes each token's codes at once."""
    from hf_kvplug import torchpath
    plugged, cache = _setup()
    left = []
    got, cache = _waiting_loop(cache, plugged, 22, lambda i, c: left.append(c.attn_layers[0].unwritten))
    assert all(u is not None for u in left[:4])  # tokens 12-15: their block (8-15) fills at token 16
    assert left[4] is None and left[5] == (2, 16, 17)  # the step that filled it wrote them; the next one waits
    monkeypatch.setattr(torchpath.CodeViews, "codes_can_wait", property(lambda self: False))
    _, at_once = _setup()
    want, at_once = _waiting_loop(at_once, plugged, 22)
    assert all(layer.unwritten is None for layer in at_once.attn_layers)
    assert torch.equal(got, want)
    cache._settle()
    for mine, theirs in zip(cache.attn_layers, at_once.attn_layers):
        assert mine.unwritten is None
        for a, b in zip((*mine.kv, *mine.tail), (*theirs.kv, *theirs.tail)):
            assert torch.equal(a, b)


def _save_load(tmp_path):
    def op(cache, plugged):
        cache.save(tmp_path / "c.safetensors")
        return hf_kvplug.PlugCache.load(tmp_path / "c.safetensors", plugged)
    return op


def _grad_step(cache, plugged):
    """One step with the last layer's weights requiring grad, grad enabled: that layer takes the general path."""
    w = plugged.model.layers[-1].self_attn.q_proj.weight
    w.requires_grad_(True)
    try:
        with torch.enable_grad():
            plugged(torch.full((2, 1), 7), **kv(cache))
    finally:
        w.requires_grad_(False)


OPERATIONS = {
    "crop in the block": lambda c, m: c.crop(-2),
    "crop into the block before": lambda c, m: c.crop(-6),
    "reorder": lambda c, m: c.reorder_cache(torch.tensor([1, 1])),
    "select one row": lambda c, m: c.batch_select_indices(torch.tensor([0])),
    "fork": lambda c, m: c.fork(),
    "deep copy": lambda c, m: copy.deepcopy(c),
    "keys": lambda c, m: [layer.keys for layer in c.layers] and None,
    "three tokens": lambda c, m: m(torch.full((c.batch, 3), 9), **kv(c)) and None,
    "grad on one layer": _grad_step,
}


@pytest.mark.parametrize("name", [*OPERATIONS, "save and load"])
def test_codes_left_to_the_tail_are_written_before_anything_else_reads_them(name, tmp_path):
    """Whatever comes between decode steps while codes wait in the tail (a crop within the block or into the one
    before, beams, selecting rows, a fork, a copy, a file, reading keys, a forward of several tokens, a step one
    layer takes on the general path) gives the logits the reference backend gives, step after step, as the blocks
    fill."""
    plugged, cache = _setup()
    _, ref = _setup(backend="reference")
    op = _save_load(tmp_path) if name == "save and load" else OPERATIONS[name]

    def between(i, c):
        if i != 2:  # 14 tokens: 12 and 13 wait in the tail
            return None
        if c.backend != "reference":
            assert all(layer.unwritten == (2, 11, 14) for layer in c.attn_layers)
        return op(c, plugged)

    got, cache = _waiting_loop(cache, plugged, 14, between)
    want, ref = _waiting_loop(ref, plugged, 14, between)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert (got - want).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["save", "fork", "deep copy", "keys", "k_cache"])
def test_codes_waiting_in_a_cache_built_in_inference_mode_are_written_outside_it(name, tmp_path):
    """A cache built and decoded inside torch.inference_mode() holds inference tensors, with codes waiting in the
    tail; outside it, a file, a fork, a copy, its keys and its pool attributes still work and continue as the
    reference (the codes are written as its steps wrote them, inside inference mode; a fork, which shares those
    tensors, goes on inside it)."""
    plugged, _ = _setup()
    ids = torch.randint(2, 128, (2, 11), generator=torch.Generator().manual_seed(3))

    def build(backend):
        with torch.inference_mode():
            cache = _setup(backend=backend)[1]
            out = plugged(ids, **kv(cache))
            for _ in range(2):  # tokens 11 and 12 wait in the tail
                out = plugged(out.logits[:, -1:].argmax(-1), **kv(cache))
        return cache, out.logits[:, -1:].argmax(-1)

    def then(cache):
        if name == "save":
            cache.save(tmp_path / "c.safetensors")
            return hf_kvplug.PlugCache.load(tmp_path / "c.safetensors", plugged)
        if name == "fork":
            return cache.fork()
        if name == "deep copy":
            return copy.deepcopy(cache)
        if name == "keys":
            [layer.keys for layer in cache.layers]
        else:
            [layer.k_cache for layer in cache.attn_layers]
        return cache

    logits = []
    for backend in ("auto", "reference"):
        cache, tok = build(backend)
        if backend == "auto":
            assert all(layer.unwritten is not None for layer in cache.attn_layers)
        cache = then(cache)
        assert all(layer.unwritten is None for layer in cache.attn_layers)
        with torch.inference_mode() if name == "fork" else torch.no_grad():
            steps = []
            for _ in range(6):  # the block fills at 16
                out = plugged(tok, **kv(cache))
                tok = out.logits[:, -1:].argmax(-1)
                steps.append(out.logits[:, -1])
        logits.append(torch.stack(steps))
    assert (logits[0] - logits[1]).abs().max() < 1e-4


def test_the_pool_attributes_give_codes_written():
    """`k_cache`, `v_cache`, `k_scale`, `v_scale` (the paged pool, documented) write the codes waiting in the tail
    first: they hold what a cache writing each token's codes at once holds."""
    plugged, cache = _setup()
    _, ref = _setup(backend="reference")
    _waiting_loop(cache, plugged, 3)
    _waiting_loop(ref, plugged, 3)
    assert all(layer.unwritten is not None for layer in cache.attn_layers)
    for mine, theirs in zip(cache.attn_layers, ref.attn_layers):
        for attr in ("k_cache", "v_cache", "k_scale", "v_scale"):
            a, b = getattr(mine, attr), getattr(theirs, attr)
            assert torch.equal(a.transpose(0, 1).contiguous().transpose(0, 1) if a.shape != b.shape else a, b), attr
