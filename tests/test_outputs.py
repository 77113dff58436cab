"""All that stock generate() returns, a plugged one returns the same: every output option, in every generate mode,
with left padding, right padding, masks with holes and multi-turn masks with zeros."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import hf_kvplug
from hf_kvplug import compat
from hf_kvplug.compat import cache_kwargs as kv
from models import tiny_model

ALL_OUTPUTS = dict(return_dict_in_generate=True, output_scores=True, output_logits=True, output_attentions=True,
                   output_hidden_states=True)


def assert_same(a, b, path="out"):
    """Recursively equal: tensors within fp32 rounding (the cached attention runs another kernel than stock)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, (path, getattr(b, "shape", b))
        if a.dtype in (torch.long, torch.int, torch.bool):
            assert torch.equal(a, b), path
        else:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=2e-5, msg=lambda m: f"{path}: {m}")
    elif isinstance(a, (tuple, list)):
        assert isinstance(b, (tuple, list)) and len(a) == len(b), (path, len(a), len(b) if b is not None else b)
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


def assert_same_scores(ref, out):
    """The processed scores within fp32 rounding, where a filter (top-k) may keep or drop a token whose raw logit ties
    the cut within that rounding: there one side is -inf, the other the logit, and the raw logits are compared
    anyway (`logits`)."""
    if ref.scores is None or ref.logits is None:
        return assert_same(ref.scores, out.scores, "scores")
    assert out.scores is not None and len(out.scores) == len(ref.scores)
    for i, (a, b, raw) in enumerate(zip(ref.scores, out.scores, ref.logits)):
        flip = a.isneginf() != b.isneginf()
        if flip.any():  # each flipped token's raw logit sits at its row's cut (the lowest logit kept), within rounding
            cut = torch.where(a.isneginf(), float("inf"), raw).amin(-1, keepdim=True).expand_as(raw)
            torch.testing.assert_close(raw[flip], cut[flip], rtol=1e-4, atol=2e-5, msg=lambda m: f"scores[{i}]: {m}")
        assert_same(a.masked_fill(flip, 0), b.masked_fill(flip, 0), f"scores[{i}]")


def assert_same_output(ref, out):
    for name in ("sequences", "scores", "logits", "attentions", "hidden_states", "sequences_scores", "beam_indices"):
        if name == "scores":
            assert_same_scores(ref, out)
        elif getattr(ref, name, None) is not None or getattr(out, name, None) is not None:
            assert_same(getattr(ref, name, None), getattr(out, name, None), name)
    ref_cache, cache = compat.output_cache(ref), compat.output_cache(out)
    assert isinstance(cache, hf_kvplug.PlugCache)
    assert cache.get_seq_length() == ref_cache.get_seq_length()
    for i, (mine, theirs) in enumerate(zip(cache.layers, ref_cache.layers)):
        assert_same(theirs.keys, mine.keys, f"cache.layers[{i}].keys")
        assert_same(theirs.values, mine.values, f"cache.layers[{i}].values")


def _masks():
    ids = torch.randint(2, 128, (3, 9), generator=torch.Generator().manual_seed(4))
    masks = {"left": [(0, 0), (1, 3), (2, 6)], "right": [(1, 6, 9), (2, 8, 9)], "holes": [(0, 2, 4), (2, 5, 6)]}
    out = {}
    for name, spans in masks.items():
        mask = torch.ones_like(ids)
        for span in spans:
            if len(span) == 2:
                mask[span[0], :span[1]] = 0
            else:
                mask[span[0], span[1]:span[2]] = 0
        out[name] = mask
    return ids, out


MODES = {
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, top_k=30),
    "beam": dict(do_sample=False, num_beams=2, num_return_sequences=2),
    "beam_sample": dict(do_sample=True, num_beams=2),
}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("mask_kind", ["left", "right", "holes"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_every_output_option(family, mode, mask_kind, attn):
    stock = tiny_model(family, attn=attn)
    plugged = hf_kvplug.patch(tiny_model(family, attn=attn))
    cache = hf_kvplug.PlugCache(plugged, max_batch_size=6, max_cache_len=32, block_size=4)
    ids, masks = _masks()
    kw = dict(attention_mask=masks[mask_kind], max_new_tokens=6, **MODES[mode], **ALL_OUTPUTS)
    torch.manual_seed(11)
    ref = stock.generate(ids, **kv(DynamicCache(config=stock.config)), **kw)
    torch.manual_seed(11)
    out = plugged.generate(ids, **kv(cache), **kw)
    assert_same_output(ref, out)
    if attn == "eager":
        assert out.attentions and all(a is not None for step in out.attentions for a in step)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_prompt_lookup_with_every_output(family, attn):
    """Assisted (prompt lookup) decoding with output_attentions once crashed inside transformers (no weights)."""
    stock = tiny_model(family, attn=attn)
    plugged = hf_kvplug.patch(tiny_model(family, attn=attn))
    cache = hf_kvplug.PlugCache(plugged, max_batch_size=1, max_cache_len=48, block_size=4)
    ids = torch.tensor([[5, 9, 17, 33, 5, 9, 17, 33, 5, 9, 17, 40, 5, 9]])
    kw = dict(max_new_tokens=10, do_sample=False, prompt_lookup_num_tokens=3, eos_token_id=127, **ALL_OUTPUTS)
    try:
        ref = stock.generate(ids, **kv(DynamicCache(config=stock.config)), **kw)
    except IndexError:  # transformers 5.24 with sdpa: no attention weights, and assisted decoding indexes them
        with pytest.raises(IndexError):
            plugged.generate(ids, **kv(cache), **kw)
        return
    out = plugged.generate(ids, **kv(cache), **kw)
    assert_same_output(ref, out)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_multi_turn_mask_with_zeros(family):
    """Turn two's mask marks tokens of turn one 0 (a mask built as ids != pad when pad is EOS): stock hides them
    from then on, and so does the plugged cache."""
    stock = tiny_model(family)
    plugged = hf_kvplug.patch(tiny_model(family))
    cache = hf_kvplug.PlugCache(plugged, max_batch_size=2, max_cache_len=48, block_size=4)
    ref_cache = DynamicCache(config=stock.config)
    ids = torch.randint(2, 128, (2, 6), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    kw = dict(max_new_tokens=5, do_sample=False)
    first_ref = stock.generate(ids, attention_mask=mask, **kv(ref_cache), **kw)
    first = plugged.generate(ids, attention_mask=mask, **kv(cache), **kw)
    assert torch.equal(first_ref, first)
    turn2 = torch.cat([first, torch.randint(2, 128, (2, 4))], 1)
    mask2 = torch.ones_like(turn2)
    mask2[1, :2] = 0
    mask2[0, 7:9] = 0  # two generated tokens hidden
    kw2 = dict(attention_mask=mask2, max_new_tokens=6, do_sample=False, output_logits=True,
               return_dict_in_generate=True)
    ref = stock.generate(turn2, **kv(ref_cache), **kw2)
    out = plugged.generate(turn2, **kv(cache), **kw2)
    assert torch.equal(ref.sequences, out.sequences)
    assert_same(ref.logits, out.logits, "logits")
