"""Quantized caches store keys rotated by an orthonormal signed Hadamard matrix (`hf_kvplug.rotation`): scores are
unchanged, outlier key channels stop taking a quantized key's range; files say how their keys are stored."""

from __future__ import annotations

import pytest
import torch

import hf_kvplug
from hf_kvplug.compat import cache_kwargs as kv
from hf_kvplug.reference import dequantize, quantize
from hf_kvplug.rotation import VERSION, hadamard, key_rotation, rotation_gain
from models import tiny_model


@pytest.mark.parametrize("head_dim", [6, 16, 64, 80, 96, 128, 256])
def test_rotation_is_orthogonal_exact_and_fixed(head_dim):
    """R R^T = g I exactly, g in {1, 1/2}; entries are powers of two, the same in every float dtype."""
    r, g = key_rotation(head_dim), rotation_gain(head_dim)
    assert r.shape == (head_dim, head_dim) and r.dtype == torch.float32 and g in (1.0, 0.5)
    assert torch.equal(r @ r.T, g * torch.eye(head_dim))
    for dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(r.to(dtype).float(), r)
    assert torch.equal(r, key_rotation(head_dim))  # stored keys depend on it: the same every call and process
    block = head_dim & -head_dim
    assert (r.abs() > 0).sum() == head_dim * block  # block-diagonal: every channel mixed within its block
    assert torch.equal(hadamard(4) @ hadamard(4).T, 4 * torch.eye(4))


@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
def test_rotation_spreads_outlier_channels(kv_dtype):
    """Keys with two outlier channels (as trained LLMs have): the scores q.k read back from the quantized store are
    closer to the exact ones when the keys (and queries) are rotated: INT8 several times, INT4 (whose rounding of
    the bulk dominates once the outliers are spread) well over a third."""
    g = torch.Generator().manual_seed(0)
    k = torch.randn(512, 2, 64, generator=g)
    k[..., 3] += 20
    k[..., 40] -= 15
    q = torch.randn(8, 2, 64, generator=g)
    exact = torch.einsum("qhd,khd->hqk", q, k)
    r = key_rotation(64)
    storage = torch.int8 if kv_dtype == "int8" else torch.uint8
    plain = torch.einsum("qhd,khd->hqk", q, dequantize(*quantize(k, storage), torch.float32))
    rotated = torch.einsum("qhd,khd->hqk", q @ r, dequantize(*quantize(k @ r, storage), torch.float32))
    rotated = rotated / rotation_gain(64)
    err_plain, err_rot = (plain - exact).abs().mean(), (rotated - exact).abs().mean()
    assert err_rot < err_plain / {"int8": 3, "int4": 1.5}[kv_dtype], (err_plain, err_rot)


def test_defaults_and_exactness_in_full_precision():
    """On by default only for quantized caches; a rotated full-precision cache gives stock's tokens, and `keys`
    gives the keys as the model made them."""
    model = hf_kvplug.patch(tiny_model("llama"))
    ids = torch.randint(2, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    want = model.generate(ids, max_new_tokens=12, do_sample=False)
    for kv_dtype, rotated in ((None, None), ("int8", VERSION), ("int4", VERSION)):
        assert hf_kvplug.PlugCache(model, 2, 64, kv_dtype).config.key_rotation == rotated
    plain = hf_kvplug.PlugCache(model, 2, 64)
    spun = hf_kvplug.PlugCache(model, 2, 64, rotate_keys=True)
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False, **kv(spun)), want)
    model.generate(ids, max_new_tokens=12, do_sample=False, **kv(plain))
    for a, b in zip(plain.layers, spun.layers):
        torch.testing.assert_close(b.keys, a.keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(b.values, a.values, atol=1e-5, rtol=0)  # (a later layer: rounding of q R . k R)
    assert not torch.allclose(spun.layers[0].k_cache, plain.layers[0].k_cache)  # stored rotated


@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
@pytest.mark.parametrize("heads", [4, 2, 8])  # head_dim 16 (g = 1), 32 (g = 1/2) and 8 (g = 1/2)
def test_keys_read_back_unrotated(kv_dtype, heads):
    model = hf_kvplug.patch(tiny_model("llama", num_attention_heads=heads, num_key_value_heads=heads // 2))
    ids = torch.randint(2, 128, (1, 30), generator=torch.Generator().manual_seed(2))
    exact = hf_kvplug.PlugCache(model, 1, 64)
    quant = hf_kvplug.PlugCache(model, 1, 64, kv_dtype)
    spun = hf_kvplug.PlugCache(model, 1, 64, rotate_keys=True)
    want = model.generate(ids, max_new_tokens=4, do_sample=False)
    for cache in (exact, quant, spun):
        out = model.generate(ids, max_new_tokens=4, do_sample=False, **kv(cache))
    assert torch.equal(out, want)  # scores unchanged at either gain
    tol = {"int8": 0.02, "int4": 0.3}[kv_dtype]
    for a, b in zip(exact.layers, quant.layers):
        err = (b.keys - a.keys).abs().max() / a.keys.abs().max()
        assert err < tol, err


def test_files_say_how_keys_are_stored(tmp_path):
    """A rotated INT8 file loads rotated; a file of unrotated keys (written before rotation, or rotate_keys=False)
    loads as a cache that does not rotate, and goes on with the same tokens as the cache that wrote it; asking for
    the other storage is refused with the reason."""
    model = hf_kvplug.patch(tiny_model("llama"))
    ids = torch.randint(2, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    for rotate in (None, False):
        cache = hf_kvplug.PlugCache(model, 2, 96, "int8", rotate_keys=rotate)
        first = model.generate(ids, max_new_tokens=6, do_sample=False, **kv(cache))
        path = tmp_path / f"c{rotate}.safetensors"
        cache.save(path)
        loaded = hf_kvplug.PlugCache.load(path, model)
        assert loaded.config.key_rotation == cache.config.key_rotation
        more = torch.randint(2, 128, (2, 5), generator=torch.Generator().manual_seed(4))
        ids2 = torch.cat([first, more], 1)
        a = model.generate(ids2, max_new_tokens=6, do_sample=False, **kv(cache))
        b = model.generate(ids2, max_new_tokens=6, do_sample=False, **kv(loaded))
        assert torch.equal(a, b)
        with pytest.raises(ValueError, match="rotate_keys= must match how the file stores keys"):
            hf_kvplug.PlugCache.load(path, model, rotate_keys=rotate is False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,cos_rows", [(1, 1), (3, 3), (3, 1)])
@pytest.mark.parametrize("head_dim", [16, 64, 80])
def test_a_decode_step_rotates_in_its_rope(dtype, batch, cos_rows, head_dim):
    """A quantized cache's decode step applies RoPE and the key rotation in one product (`rope.one_pass_rotated`):
    the one-pass RoPE, then `x @ R`, to the rounding of the model dtype (fp32 inside, one rounding at the end), for
    position embeddings per row or one row for all."""
    from hf_kvplug import rope

    g = torch.Generator().manual_seed(head_dim + batch)
    q = torch.randn(batch, 1, 6, head_dim, generator=g).to(dtype)
    k = torch.randn(batch, 1, 2, head_dim, generator=g).to(dtype)
    pos = torch.randint(0, 4000, (cos_rows, 1, 1), generator=g).float()
    freqs = pos * 10000.0 ** -(torch.arange(0, head_dim, 2) / head_dim)
    emb = torch.cat((freqs, freqs), -1)
    tables = rope.tables(emb.cos().to(dtype), emb.sin().to(dtype))
    r = key_rotation(head_dim)
    got = rope.one_pass_rotated(q, k, rope.rotated_table(*tables, r))
    want = [x.float() @ r for x in rope.one_pass(q.float(), k.float(), *(t.float() for t in tables))]
    tol = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    for a, b in zip(got, want):
        assert a.dtype == dtype and a.shape == b.shape
        assert (a.float() - b).abs().max() <= tol * b.abs().max()
