"""The Llama and Qwen families as users run them today: MoE (Mixtral, Qwen2-MoE, Qwen3-MoE), sliding windows from
each family's own rule, and the hybrid Qwen3-Next / Qwen3.5 (gated DeltaNet layers kept in transformers' own cache
layers, an output gate, partial RoPE). Each against an unpatched twin with a stock cache."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend
from torch._dynamo.utils import counters
from transformers import DynamicCache
from transformers.generation.configuration_utils import CompileConfig

import hf_kvplug
from hf_kvplug import compat
from hf_kvplug.compat import cache_kwargs as kv
from models import HYBRID_FAMILIES, MOE_FAMILIES, tiny_model

_OLD = pytest.mark.skipif(not compat.HYBRID_CACHE_LAYERS, reason="hybrid models need transformers >= 5.5")
HYBRIDS = [pytest.param(f, marks=_OLD) for f in HYBRID_FAMILIES]
NEW = list(MOE_FAMILIES) + HYBRIDS
SLIDING = ["mixtral_sliding", "qwen2_moe_sliding", "qwen3_moe_sliding"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pair(family, **cache_kw):
    stock = tiny_model(family)
    plugged = hf_kvplug.patch(tiny_model(family))
    cache = hf_kvplug.PlugCache(plugged, **{"max_batch_size": 6, "max_cache_len": 48, "block_size": 4, **cache_kw})
    return stock, plugged, cache


def _batch():
    ids = torch.randint(2, 128, (3, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, 4:6] = 0  # a hole
    return ids, mask


@pytest.mark.parametrize("family", NEW + SLIDING)
def test_greedy_padded_batch_and_logits(family):
    stock, plugged, cache = _pair(family)
    ids, mask = _batch()
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, output_logits=True,
              return_dict_in_generate=True)
    ref = stock.generate(ids, **kw)
    out = plugged.generate(ids, **kv(cache), **kw)
    assert torch.equal(ref.sequences, out.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(ref.logits, out.logits)) < 1e-4
    assert out.sequences[:, 9:].unique().numel() > 2


@pytest.mark.parametrize("family", NEW)
def test_sampling_beams_and_return_sequences(family):
    stock, plugged, cache = _pair(family, max_batch_size=12)
    ids, mask = _batch()
    for kw in (dict(do_sample=True, top_k=20, num_return_sequences=2), dict(num_beams=3, num_return_sequences=2)):
        torch.manual_seed(3)
        ref = stock.generate(ids, attention_mask=mask, max_new_tokens=8, **kw)
        cache.reset()
        torch.manual_seed(3)
        assert torch.equal(ref, plugged.generate(ids, attention_mask=mask, **kv(cache), max_new_tokens=8, **kw))


@pytest.mark.parametrize("family", NEW)
def test_multi_turn_and_reset_with_another_batch(family):
    stock, plugged, cache = _pair(family)
    ref_cache = DynamicCache(config=stock.config)
    ids, _ = _batch()
    kw = dict(max_new_tokens=5, do_sample=False)
    first = plugged.generate(ids[:1], **kv(cache), **kw)
    assert torch.equal(first, stock.generate(ids[:1], **kv(ref_cache), **kw))
    turn2 = torch.cat([first, ids[1:2, :4]], 1)
    assert torch.equal(plugged.generate(turn2, **kv(cache), **kw), stock.generate(turn2, **kv(ref_cache), **kw))
    cache.reset()  # a stock cache keeps its linear-attention states' batch here; the PlugCache starts new ones
    assert torch.equal(plugged.generate(ids, **kv(cache), **kw), stock.generate(ids, **kw))


_LOOKUP = torch.tensor([[5, 9, 17, 33, 5, 9, 17, 33, 5, 9, 17, 40, 5, 9]])
_LOOKUP_KW = dict(max_new_tokens=10, do_sample=False, prompt_lookup_num_tokens=3, eos_token_id=127)
_REFUSES = pytest.mark.skipif(compat.ASSISTED_REFUSES_STATEFUL,
                              reason="this transformers refuses assisted decoding for stateful (hybrid) models")


@pytest.mark.parametrize("family", NEW)
def test_prompt_lookup_as_stock(family):
    """Assisted decoding: stock-equal tokens, the hybrids included where transformers decodes them with an assistant
    (5.25+: their linear-attention layers record recurrent states and crop back); where it refuses them (stateful
    models, before 5.25), the same error comes with a PlugCache."""
    stock, plugged, cache = _pair(family, max_batch_size=1)
    if family in HYBRID_FAMILIES and compat.ASSISTED_REFUSES_STATEFUL:  # the release's own rule
        with pytest.raises(ValueError, match="stateful") as stock_error:
            stock.generate(_LOOKUP, **_LOOKUP_KW)
        with pytest.raises(ValueError, match=str(stock_error.value)[:40]):
            plugged.generate(_LOOKUP, **kv(cache), **_LOOKUP_KW)
        return
    assert torch.equal(plugged.generate(_LOOKUP, **kv(cache), **_LOOKUP_KW), stock.generate(_LOOKUP, **_LOOKUP_KW))


@_REFUSES
@pytest.mark.parametrize("family", HYBRIDS)
def test_hybrid_assisted_after_reset_with_another_batch_then_plain(family):
    """A batch of 3, reset(), then prompt lookup on one row: the linear-attention layers are built anew for the new
    batch after generate() switched recording on, and still record (else the first crop raises). After the call no
    layer records any more (no state copies per token, compileable again), and a plain continuation and a fresh
    request equal stock's."""
    stock, plugged, cache = _pair(family)
    ids, mask = _batch()
    kw = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(plugged.generate(ids, attention_mask=mask, **kv(cache), **kw),
                       stock.generate(ids, attention_mask=mask, **kw))
    cache.reset()
    ref_cache = DynamicCache(config=stock.config)
    out = plugged.generate(_LOOKUP, **kv(cache), **_LOOKUP_KW)
    assert torch.equal(out, stock.generate(_LOOKUP, **kv(ref_cache), **_LOOKUP_KW))
    assert not any(cache.is_recording_past(i) for i in range(len(cache.layers))) and cache.is_compileable
    turn2 = torch.cat([out, torch.tensor([[7, 8, 9]])], 1)
    assert torch.equal(plugged.generate(turn2, **kv(cache), **kw), stock.generate(turn2, **kv(ref_cache), **kw))
    cache.reset()
    assert torch.equal(plugged.generate(ids[:1], **kv(cache), **kw), stock.generate(ids[:1], **kw))


@pytest.mark.skipif(not compat.RECORDS_RECURRENT_STATES, reason="transformers < 5.25 records no recurrent states")
def test_reset_leaves_no_recording_on():
    """Recording switched on by hand (as assisted decoding does) is off after reset(); the cache compiles again and
    the next request equals stock's."""
    stock, plugged, cache = _pair("qwen3_5")
    ids, _ = _batch()
    kw = dict(max_new_tokens=5, do_sample=False)
    plugged.generate(ids[:1], **kv(cache), **kw)
    cache.activate_past_recording(recurrent_states_to_keep=3)
    assert cache.get_recurrent_states_to_keep() == 3 and not cache.is_compileable
    cache.reset()
    assert cache.get_recurrent_states_to_keep() == 0 and cache.is_compileable
    assert torch.equal(plugged.generate(ids[:1], **kv(cache), **kw), stock.generate(ids[:1], **kw))


@pytest.mark.parametrize("family", NEW)
def test_int8_close(family):
    stock, plugged, cache = _pair(family, kv_dtype="int8")
    ids = stock.generate(torch.randint(2, 128, (1, 10)), max_new_tokens=16, do_sample=False)
    ref_cache = DynamicCache(config=stock.config)
    stock(ids[:, :10], **kv(ref_cache))
    plugged(ids[:, :10], **kv(cache))
    errs = []
    for t in range(10, ids.shape[1]):
        a = stock(ids[:, t:t + 1], **kv(ref_cache)).logits
        b = plugged(ids[:, t:t + 1], **kv(cache)).logits
        errs.append(((a - b).abs().max() / a.abs().max()).item())
    assert max(errs) < 0.02


@pytest.mark.parametrize("family", ["mixtral", HYBRIDS[1]])
def test_generate_auto_compile(family):
    """generate() compiles the decode step with a PlugCache (hybrid too): one graph, no breaks, stock tokens."""
    stock, plugged, cache = _pair(family)
    ids, mask = _batch()
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False)
    ref = stock.generate(ids, **kw)
    graphs = []
    config = CompileConfig(fullgraph=True, backend=lambda gm, ex: graphs.append(gm) or lookup_backend("eager")(gm, ex),
                           mode=None)
    config._compile_all_devices = True
    torch._dynamo.reset()
    counters.clear()
    try:
        out = plugged.generate(ids, **kv(cache), compile_config=config, **kw)
    finally:
        torch._dynamo.reset()
    assert torch.equal(ref, out)
    assert len(graphs) == 1 and not counters["graph_break"]


@pytest.mark.parametrize("family", HYBRIDS)
def test_hybrid_cache_holds_attention_layers_only(family):
    stock, plugged, cache = _pair(family)
    kinds = cache.config.layer_kinds
    assert kinds == ["linear", "linear", "linear", "attention"] * 2
    assert [type(layer).__name__ for layer in cache.layers] == [
        type(layer).__name__ if kind == "linear" else "PlugLayer"
        for layer, kind in zip(DynamicCache(config=stock.config).layers, kinds)]
    assert len(cache.attn_layers) == 2 and cache.layers[3] is cache.attn_layers[0]
    assert cache.bytes_per_token() == 2 * cache.config.nheads_k * 2 * cache.config.head_dim * 4  # 2 attention layers
    assert cache.config.linear_state_bytes > 0
    assert cache.is_linear == [k == "linear" for k in kinds]


@pytest.mark.parametrize("family", HYBRIDS)
def test_hybrid_crop_refused_by_transformers_leaves_the_cache_usable(family):
    """transformers' linear-attention layers refuse a crop when they keep no past (outside assisted decoding), before
    changing anything: stock's cache goes on, and so does the PlugCache (it is not taken for a crop stopped
    part-way)."""
    stock, plugged, cache = _pair(family)
    ids, step = torch.randint(2, 128, (1, 10)), torch.randint(2, 128, (1, 1))
    ref = DynamicCache(config=stock.config)
    with torch.no_grad():
        plugged(ids, **kv(cache))
        stock(ids, **kv(ref))
        for c in (ref, cache):
            with pytest.raises(RuntimeError, match="does not track past states"):
                c.crop(-2)
        assert cache.get_seq_length() == ref.get_seq_length() == 10
        torch.testing.assert_close(plugged(step, **kv(cache)).logits, stock(step, **kv(ref)).logits)


@pytest.mark.parametrize("family", NEW)
def test_patch_round_trip(family):
    model = tiny_model(family)
    before = {name: m.forward for name, m in model.named_modules()}
    hf_kvplug.patch(model)
    assert hf_kvplug.is_patched(model)
    hf_kvplug.unpatch(model)
    assert {name: m.forward for name, m in model.named_modules()} == before


@_OLD
def test_qwen3_5_vision_language_tower():
    """A Qwen3.5 vision-language model: its language tower holds the same attention class and is patched; text-only
    generate equals stock."""
    from transformers.models.qwen3_5 import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    text = tiny_model("qwen3_5").config.to_dict()
    config = Qwen3_5Config(text_config=text, vision_config=dict(depth=1, hidden_size=32, intermediate_size=64,
                                                                num_heads=2, out_hidden_size=64, patch_size=4,
                                                                num_position_embeddings=16),
                           image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123)
    torch.manual_seed(0)
    stock = Qwen3_5ForConditionalGeneration(config).eval()
    plugged = Qwen3_5ForConditionalGeneration(config).eval()
    plugged.load_state_dict(stock.state_dict())
    hf_kvplug.patch(plugged)
    cache = hf_kvplug.PlugCache(plugged, max_batch_size=2, max_cache_len=32, block_size=4)
    ids = torch.randint(2, 110, (2, 7))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(plugged.generate(ids, **kv(cache), **kw), stock.generate(ids, **kw))


@pytest.mark.skipif(compat.HYBRID_CACHE_LAYERS, reason="transformers >= 5.5 supports hybrid models")
def test_hybrid_refused_on_old_transformers():
    with pytest.raises(ValueError, match="from transformers 5.5"):
        hf_kvplug.PlugCache(tiny_model("qwen3_5"), max_batch_size=1, max_cache_len=16)
