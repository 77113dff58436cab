"""Prefix caching across generate() calls (`PlugCache(..., prefix_caching=True)`): later requests map the indexed
blocks of earlier ones and prefill only the rest, with stock's tokens in every generate mode; idle indexed blocks give
way when the pool needs room; models whose state at a block boundary is not in the blocks are refused."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import hf_kvplug
from hf_kvplug import compat
from hf_kvplug.compat import cache_kwargs as kv
from models import tiny_model

BS = 8


def _pair(family="llama", **cache_kw):
    stock = tiny_model(family)
    plugged = hf_kvplug.patch(tiny_model(family))
    cache = hf_kvplug.PlugCache(plugged, **{"max_batch_size": 4, "max_cache_len": 128, "block_size": BS,
                                            "prefix_caching": True, **cache_kw})
    return stock, plugged, cache


def _fed(model):
    """Record the number of tokens each forward of `model` is fed."""
    fed = []
    model.register_forward_pre_hook(
        lambda mod, args, kwargs: fed.append((kwargs.get("input_ids") if kwargs.get("input_ids") is not None
                                              else args[0]).shape[1]), with_kwargs=True)
    return fed


def _ids(n, seed, batch=1):
    return torch.randint(2, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_chat_requests_prefill_only_their_turn():
    """A 41-token system prompt, then requests each adding another turn, reset() between them: each later request's
    first forward feeds at most one block plus its turn, and the tokens are stock's."""
    stock, plugged, cache = _pair()
    fed = _fed(plugged)
    system = _ids(41, 0)
    kw = dict(max_new_tokens=6, do_sample=False)
    hits = []
    for request in range(5):
        ids = torch.cat([system, _ids(5 + request, 100 + request)], 1)
        cache.reset()
        fed.clear()
        out = plugged.generate(ids, **kv(cache), **kw)
        assert torch.equal(out, stock.generate(ids, **kw))
        hits.append(cache.stats()["prefix_hit_tokens"])
        if request:
            assert fed[0] <= BS + ids.shape[1] - 41  # at most a block and the turn
            assert ids.shape[1] - fed[0] == 40  # the system prompt's 5 full blocks came from the index
    assert hits == [0, 40, 80, 120, 160]
    assert cache.stats()["prefix_cached_blocks"] >= 5
    cache.reset_stats()
    assert cache.stats()["prefix_hit_tokens"] == 0


def test_a_whole_conversation_continues_from_its_own_blocks():
    """Turn 2 resends the conversation so far: it finds turn 1's prompt and answer in the index."""
    stock, plugged, cache = _pair()
    fed = _fed(plugged)
    kw = dict(max_new_tokens=12, do_sample=False)
    first = plugged.generate(_ids(20, 1), **kv(cache), **kw)
    turn2 = torch.cat([first, _ids(4, 2)], 1)
    cache.reset()
    fed.clear()
    assert torch.equal(plugged.generate(turn2, **kv(cache), **kw), stock.generate(turn2, **kw))
    assert fed[0] == turn2.shape[1] - 24  # first's 31 cached tokens hold 3 full blocks


@pytest.mark.parametrize("mode", ["sample", "beams", "return_sequences", "assisted"])
def test_every_mode_gives_stock_tokens(mode):
    """Sampling, beams, return sequences: later requests reuse the index. Assisted decoding feeds its whole first
    candidate sequence whatever a cache holds, so it reuses nothing, but what it leaves is indexed for others."""
    stock, plugged, cache = _pair(max_batch_size=6)
    kw = {"sample": dict(do_sample=True, top_k=20), "beams": dict(num_beams=3, num_return_sequences=2),
          "return_sequences": dict(do_sample=True, num_return_sequences=3),
          "assisted": dict(prompt_lookup_num_tokens=3, do_sample=False, eos_token_id=127)}[mode]
    base = _ids(26, 3)
    for request in range(3):
        ids = torch.cat([base, _ids(3, 50 + request)], 1)
        if mode == "assisted":
            ids = torch.cat([ids, ids[:, 5:15]], 1)  # something to look up
        cache.reset()
        torch.manual_seed(request)
        want = stock.generate(ids, max_new_tokens=8, **kw)
        torch.manual_seed(request)
        assert torch.equal(plugged.generate(ids, **kv(cache), max_new_tokens=8, **kw), want)
    assert (cache.stats()["prefix_hit_tokens"] > 0) == (mode != "assisted")
    cache.reset()
    ids = torch.cat([base, _ids(3, 99)], 1)
    assert torch.equal(plugged.generate(ids, **kv(cache), max_new_tokens=8, do_sample=False),
                       stock.generate(ids, max_new_tokens=8, do_sample=False))
    assert cache.stats()["prefix_hit_tokens"] > 0


@pytest.mark.parametrize("asked", ["output_attentions", "output_hidden_states"])
def test_a_call_returning_the_prompts_states_runs_the_prompt_whole(asked):
    """A call that returns the prefill's attentions or hidden states gets them for every prompt token, as stock's
    (found by `tests/fuzz.py`: with blocks reused, the prefill covered only the rest); its blocks are indexed all the
    same, and the next call without them reuses the prefix."""
    stock = tiny_model("llama", attn="eager")
    plugged = hf_kvplug.patch(tiny_model("llama", attn="eager"))
    cache = hf_kvplug.PlugCache(plugged, max_batch_size=2, max_cache_len=64, block_size=BS, prefix_caching=True)
    ids = _ids(21, 4)
    kw = {"max_new_tokens": 5, "do_sample": False, "return_dict_in_generate": True, asked: True}
    plugged.generate(ids, **kv(cache), **kw)
    cache.reset()
    out, ref = plugged.generate(ids, **kv(cache), **kw), stock.generate(ids, **kw)
    assert cache.stats()["prefix_hit_tokens"] == 0 and torch.equal(out.sequences, ref.sequences)
    field = asked.removeprefix("output_")
    for a, b in zip(getattr(ref, field), getattr(out, field)):  # per step, per layer
        for x, y in zip(a, b):
            assert x.shape == y.shape and torch.allclose(x, y, atol=1e-5)
    cache.reset()
    assert torch.equal(plugged.generate(ids, **kv(cache), max_new_tokens=5, do_sample=False), ref.sequences)
    assert cache.stats()["prefix_hit_tokens"] == 16


def test_a_crop_back_into_indexed_blocks_fits_a_cache_sized_for_the_request():
    """A cache sized exactly for its rows, filled, its blocks indexed; then crop back into the first block and go on
    (found by `tests/fuzz.py`: the copies of the indexed blocks found no room). The rows write in place, the index
    giving those entries up, and the tokens are stock's."""
    stock = tiny_model("llama")
    plugged = hf_kvplug.patch(tiny_model("llama"))
    cache = hf_kvplug.PlugCache(plugged, max_batch_size=2, max_cache_len=24, block_size=16, prefix_caching=True)
    stock_cache = DynamicCache(config=stock.config)
    ids = _ids(8, 5, batch=2)
    kw = dict(max_new_tokens=9, do_sample=False)
    out = plugged.generate(ids, **kv(cache), **kw)
    assert torch.equal(out, stock.generate(ids, **kv(stock_cache), **kw))
    assert cache.stats()["prefix_cached_blocks"] == 2 and cache.stats()["blocks_in_use"] == 2  # 16 slots a row
    cache.crop(-13)
    stock_cache.crop(-13)
    more = torch.cat([out[:, :3], _ids(1, 6, batch=2)], 1)
    kw = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(plugged.generate(more, **kv(cache), **kw), stock.generate(more, **kv(stock_cache), **kw))


def test_a_chunked_prefill_gives_stock_tokens():
    """generate(prefill_chunk_size=...) after a request with the same prompt: stock's tokens. Transformers before 5.21
    chunks the prompt from its first token whatever the cache holds, so a reused prefix would be fed twice (found by
    `tests/fuzz.py` on 5.4: silently other tokens); nothing is reused there."""
    stock, plugged, cache = _pair()
    ids = _ids(21, 8)
    kw = dict(max_new_tokens=8, do_sample=False, prefill_chunk_size=4)
    want = stock.generate(ids, **kw)
    for _ in range(2):
        cache.reset()
        assert torch.equal(plugged.generate(ids, **kv(cache), **kw), want)
    assert cache.stats()["prefix_hit_tokens"] == (16 if compat.CHUNKED_PREFILL_SKIPS_CACHED else 0)


def test_left_padded_batches_reuse_what_every_row_shares():
    """Rows with the same padding and tokens match; generate skips the same count for every row, so a batch reuses
    the blocks all its rows find."""
    stock, plugged, cache = _pair()
    ids = torch.cat([_ids(30, 4, batch=2), _ids(3, 5, batch=2)], 1)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0  # row 1 left-padded
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    want = stock.generate(ids, **kw)
    assert torch.equal(plugged.generate(ids, **kv(cache), **kw), want)
    for turn in range(2):
        again = ids.clone()
        again[:, -3:] = _ids(3, 60 + turn, batch=2)  # new turns, same padded history
        cache.reset()
        before = cache.stats()["prefix_hit_tokens"]
        assert torch.equal(plugged.generate(again, **kv(cache), **kw), stock.generate(again, **kw))
        assert cache.stats()["prefix_hit_tokens"] - before == 2 * 24  # 3 full blocks per row
    other = ids.clone()
    other[1, :4] = 7  # row 1 no longer padded: its first block differs, so the batch reuses nothing
    cache.reset()
    before = cache.stats()["prefix_hit_tokens"]
    kw_other = dict(kw, attention_mask=torch.ones_like(ids))
    assert torch.equal(plugged.generate(other, **kv(cache), **kw_other), stock.generate(other, **kw_other))
    assert cache.stats()["prefix_hit_tokens"] == before


@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
def test_quantized_caches_give_the_tokens_they_give_without_it(kv_dtype):
    stock, plugged, cache = _pair(kv_dtype=kv_dtype)
    plain = hf_kvplug.PlugCache(plugged, max_batch_size=4, max_cache_len=128, block_size=BS, kv_dtype=kv_dtype)
    system = _ids(33, 6)
    kw = dict(max_new_tokens=8, do_sample=False)
    for request in range(3):
        ids = torch.cat([system, _ids(4, 70 + request)], 1)
        cache.reset()
        plain.reset()
        assert torch.equal(plugged.generate(ids, **kv(cache), **kw), plugged.generate(ids, **kv(plain), **kw))
    assert cache.stats()["prefix_hit_tokens"] == 2 * 32


def test_idle_blocks_give_way_when_the_pool_needs_room():
    """A pool of 12 blocks and prompts of 5 blocks each: the index fills, then gives up its least recently used
    idle blocks; no request fails while idle ones exist, and the freshest prompt is still found."""
    stock, plugged, cache = _pair(max_batch_size=1, max_cache_len=64, max_tokens=12 * BS)
    kw = dict(max_new_tokens=4, do_sample=False)
    prompts = [_ids(41, 200 + i) for i in range(6)]
    for ids in prompts:
        cache.reset()
        assert torch.equal(plugged.generate(ids, **kv(cache), **kw), stock.generate(ids, **kw))
    stats = cache.stats()
    assert stats["blocks_in_use"] <= stats["blocks_total"] == 12 and stats["prefix_cached_blocks"] >= 5
    cache.reset()
    before = cache.stats()["prefix_hit_tokens"]
    ids = torch.cat([prompts[-1], _ids(2, 9)], 1)
    assert torch.equal(plugged.generate(ids, **kv(cache), **kw), stock.generate(ids, **kw))
    assert cache.stats()["prefix_hit_tokens"] - before == 40


def test_changed_weights_are_never_matched():
    """The index's root names the model object and its weights' in-place versions: after load_state_dict of other
    weights, nothing indexed before matches, and the tokens follow the new weights."""
    stock, plugged, cache = _pair()
    ids = _ids(30, 8)
    kw = dict(max_new_tokens=6, do_sample=False)
    plugged.generate(ids, **kv(cache), **kw)
    other = tiny_model("llama", seed=1)
    plugged.load_state_dict(other.state_dict())
    cache.reset()
    before = cache.stats()["prefix_hit_tokens"]
    assert torch.equal(plugged.generate(ids, **kv(cache), **kw), other.generate(ids, **kw))
    assert cache.stats()["prefix_hit_tokens"] == before


@pytest.mark.parametrize("how", ["data", "parameter", "cleared"])
def test_weights_written_through_data_or_replaced_are_never_matched(how):
    """Writes through `.data` leave a weight's in-place version as it was, and a replaced Parameter starts again at
    version 0: the index's root probes each weight's elements and address too, so nothing indexed before matches
    (the tokens were silently the old weights' K/V); unchanged weights still match; `clear_prefix_index()` forgets
    what an edit missing every probed element would leave."""
    stock, plugged, cache = _pair()
    ids = _ids(30, 8)
    kw = dict(max_new_tokens=6, do_sample=False)
    plugged.generate(ids, **kv(cache), **kw)
    cache.reset()
    plugged.generate(ids, **kv(cache), **kw)
    assert cache.stats()["prefix_hit_tokens"] == 24  # unchanged: matched
    new = torch.randn_like(plugged.model.layers[0].self_attn.k_proj.weight) * 0.1
    for model in (plugged, stock):
        proj = model.model.layers[0].self_attn.k_proj
        if how == "parameter":
            proj.weight = torch.nn.Parameter(new.clone())
        elif how == "data":
            proj.weight.data.copy_(new)
    cache.reset()
    if how == "cleared":
        cache.clear_prefix_index()
    assert torch.equal(plugged.generate(ids, **kv(cache), **kw), stock.generate(ids, **kw))
    assert cache.stats()["prefix_hit_tokens"] == 24


def test_forks_share_the_index_and_files_load_into_one():
    stock, plugged, cache = _pair()
    kw = dict(max_new_tokens=5, do_sample=False)
    ids = _ids(30, 9)
    plugged.generate(ids, **kv(cache), **kw)
    fork = cache.fork()
    fork.reset()
    again = torch.cat([ids[:, :25], _ids(3, 10)], 1)
    assert torch.equal(plugged.generate(again, **kv(fork), **kw), stock.generate(again, **kw))
    assert cache.stats()["prefix_hit_tokens"] == 24  # one index, counted once


def test_save_load_with_prefix_caching(tmp_path):
    stock, plugged, cache = _pair()
    ids = _ids(30, 11)
    ref = DynamicCache(config=stock.config)
    with torch.no_grad():
        plugged(ids, **kv(cache))
        stock(ids, **kv(ref))
    cache.save(tmp_path / "c.safetensors")
    loaded = hf_kvplug.PlugCache.load(tmp_path / "c.safetensors", plugged, prefix_caching=True)
    turn = torch.cat([ids, _ids(3, 12)], 1)
    kw = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(plugged.generate(turn, **kv(loaded), **kw), stock.generate(turn, **kv(ref), **kw))


def _logits(model, ids, cache=None, **kw):
    out = model.generate(ids, **(kv(cache) if cache is not None else {}), max_new_tokens=6, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.logits)


def _as_stock(stock, plugged, cache, ids, **kw):
    """A request into the cache, reset: stock's tokens, and its logits within 1e-4."""
    cache.reset()
    seq, logits = _logits(plugged, ids, cache, **kw)
    ref_seq, ref_logits = _logits(stock, ids, **kw)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("order", ["inferred first", "given first"])
def test_a_prompt_without_a_mask_is_keyed_by_the_mask_generate_infers(order):
    """Passed no attention_mask, generate() hides the pad token where it occurs in the prompt: those blocks' K/V were
    computed under that mask, and a request giving the same tokens every column visible must not reuse them (nor the
    other way round)."""
    stock, plugged, cache = _pair()
    ids = _ids(20, 3)
    ids[0, [2, 5, 9]] = stock.generation_config.pad_token_id
    calls = [{}, {"attention_mask": torch.ones_like(ids)}]
    for kw in calls if order == "inferred first" else calls[::-1]:
        _as_stock(stock, plugged, cache, ids, **kw)
    assert cache.stats()["prefix_hit_tokens"] == 0
    _as_stock(stock, plugged, cache, ids, **calls[0])  # the same call again does reuse
    assert cache.stats()["prefix_hit_tokens"] == 16


@pytest.mark.parametrize("extra", ["position_ids", "inputs_embeds"])
def test_calls_whose_kv_other_inputs_decide_neither_reuse_nor_index(extra):
    """position_ids, or inputs_embeds beside the ids (soft prompts, a vision model's placeholders), decide K/V the
    tokens and mask do not show: such a call reuses nothing and indexes nothing."""
    stock, plugged, cache = _pair()
    ids = _ids(20, 4)
    with torch.no_grad():
        if extra == "position_ids":
            kws = [{"position_ids": torch.arange(20)[None] + 7}]
        else:
            kws = [{"inputs_embeds": plugged.get_input_embeddings()(ids) * s} for s in (1.0, 0.5)]
    plugged.generate(ids, **kv(cache), max_new_tokens=6, do_sample=False)  # indexed: plain ids
    for kw in kws:
        _as_stock(stock, plugged, cache, ids, **kw)
    assert cache.stats()["prefix_hit_tokens"] == 0


@pytest.mark.parametrize("how", ["refused", "prefill fails"])
def test_a_call_that_fails_before_its_prompt_is_in_leaves_the_cache_empty(how):
    """A request that reuses indexed blocks and fails before its prompt is in (refused by generate() itself for a
    max_length under the prompt, or an error in the first layer of the rest's prefill) leaves the cache empty, as a
    stock cache stays: the next request does not continue from the mapped prefix."""
    stock, plugged, cache = _pair()
    ids, other = _ids(20, 5), _ids(20, 6)
    reused = []
    real = type(cache).reuse_prefix
    cache.reuse_prefix = lambda *a: reused.append(real(cache, *a)) or reused[-1]
    plugged.generate(ids, **kv(cache), max_new_tokens=6, do_sample=False)
    cache.reset()
    if how == "refused":  # a max_length under the prompt: generate() refuses it before any forward
        with pytest.raises(ValueError):
            plugged.generate(ids, **kv(cache), max_length=5, do_sample=False)
    else:
        def fail(*args):
            raise torch.OutOfMemoryError("simulated")
        hook = plugged.model.layers[0].register_forward_pre_hook(fail)
        with pytest.raises(torch.OutOfMemoryError):
            plugged.generate(ids, **kv(cache), max_new_tokens=6, do_sample=False)
        hook.remove()
    assert reused[-1] == 16  # the failed call did reuse the prompt's blocks
    assert cache.get_seq_length() == 0 and cache.stats()["prefix_hit_tokens"] == 0
    assert torch.equal(plugged.generate(other, **kv(cache), max_new_tokens=6, do_sample=False),
                       stock.generate(other, max_new_tokens=6, do_sample=False))



@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_sliding"])
def test_refused_where_blocks_do_not_hold_the_state(family):
    plugged = hf_kvplug.patch(tiny_model(family))
    with pytest.raises(ValueError, match="prefix_caching=True needs"):
        hf_kvplug.PlugCache(plugged, max_batch_size=1, max_cache_len=64, block_size=BS, prefix_caching=True)
    if family == "qwen3_sliding":  # every token kept: its window layers reuse as full attention does
        stock = tiny_model(family)
        cache = hf_kvplug.PlugCache(plugged, max_batch_size=1, max_cache_len=64, block_size=BS,
                                    prefix_caching=True, trim_windows=False)
        kw = dict(max_new_tokens=6, do_sample=False)
        system = _ids(25, 13)
        for request in range(2):
            ids = torch.cat([system, _ids(3, 80 + request)], 1)
            cache.reset()
            assert torch.equal(plugged.generate(ids, **kv(cache), **kw), stock.generate(ids, **kw))
        assert cache.stats()["prefix_hit_tokens"] == 24


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_refused_where_rope_depends_on_the_length(rope_type, tmp_path):
    """Dynamic NTK and LongRoPE change RoPE's frequencies with each forward's length: a prefix's K/V depend on the
    request that wrote them, so prefix caching is refused at construction. Without it the cache follows stock."""
    from transformers import AutoModelForCausalLM

    from models import tiny_config

    cfg = tiny_config("llama", max_position_embeddings=32)
    rope = {"rope_type": rope_type, "factor": 2.0, "rope_theta": 10000.0}
    if rope_type == "longrope":
        half = cfg.hidden_size // cfg.num_attention_heads // 2
        rope.update(short_factor=[1.0] * half, long_factor=[2.0] * half, original_max_position_embeddings=16)
    cfg.rope_parameters = rope
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    stock, plugged = (AutoModelForCausalLM.from_pretrained(tmp_path).eval() for _ in range(2))
    hf_kvplug.patch(plugged)
    with pytest.raises(ValueError, match="prefix_caching=True.*" + rope_type):
        hf_kvplug.PlugCache(plugged, max_batch_size=1, max_cache_len=128, block_size=BS, prefix_caching=True)
    cache = hf_kvplug.PlugCache(plugged, max_batch_size=1, max_cache_len=128, block_size=BS)
    _as_stock(stock, plugged, cache, _ids(40, 7), pad_token_id=0)  # past the original length: other frequencies
