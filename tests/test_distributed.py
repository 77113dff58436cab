"""Distributed and split models: transformers' tensor / pipeline parallelism (one 2-rank launch on the CPU, gloo),
the per-rank geometry, and device_map (offloaded layers refused clearly)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_kvplug
from hf_kvplug.cache import RemoteLayer
from hf_kvplug.compat import cache_kwargs as kv
from hf_kvplug.config import RankLayout
from models import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def test_two_ranks_tensor_and_pipeline_parallel():
    """Llama and Qwen3, fp and INT8, greedy and beam, TP=2 and PP=2 (PP where transformers has it): plugged tokens and
    logits equal stock's under the same setup and in one process; prefix caching under TP maps the index's blocks
    (tests/dist_run.py says what is checked)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "tests"))
    env.pop("TRITON_INTERPRET", None)
    # the module form: the `torchrun` script's shebang may point at another environment
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(ROOT / "tests" / "dist_run.py")], env=env, capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "PASSED" in out, out[-6000:]
    print(out[-3000:])


def test_rank_layout_from_a_config():
    """`PlugCache(config, ..., layout=)`: a rank's heads (tensor parallel) and layers (pipeline parallel)."""
    config = tiny_model("llama", num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2).config
    cache = hf_kvplug.PlugCache(config, max_batch_size=1, max_cache_len=16, dtype=torch.float32, device="cpu",
                                kv_dtype="int8", layout=RankLayout(tp_size=2, layers=(2, 3)))
    assert cache.config.nheads == 2 and cache.config.nheads_k == 1 and cache.config.head_dim == 16
    assert [type(layer).__name__ for layer in cache.layers] == ["RemoteLayer"] * 2 + ["PlugLayer"] * 2
    assert cache.attn_layers[0].k_scale.shape[1] == 1  # INT8 scales per token and local head
    one = hf_kvplug.PlugCache(config, max_batch_size=1, max_cache_len=16, dtype=torch.float32, device="cpu",
                              kv_dtype="int8")
    assert cache.bytes_per_token() * 4 == one.bytes_per_token()  # half the heads of half the layers
    assert cache.nbytes * 4 == one.nbytes
    assert isinstance(cache.layers[0], RemoteLayer) and cache.layers[0].get_seq_length() == 0


@pytest.mark.parametrize("heads, kv_heads", [(4, 1), (6, 3), (3, 3)])
def test_heads_that_do_not_split_are_refused(heads, kv_heads):
    config = tiny_model("llama", num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_size=48).config
    with pytest.raises(ValueError, match="divisible by 2.*fails in the first forward"):
        hf_kvplug.PlugCache(config, max_batch_size=1, max_cache_len=16, dtype=torch.float32, device="cpu",
                            layout=RankLayout(tp_size=2))


def test_plan_that_keeps_attention_whole():
    """A tensor-parallel plan that leaves k_proj unsplit: every rank holds all heads (transformers' own rule)."""
    from hf_kvplug import compat

    assert compat.kv_heads_per_rank({"model.layers.*.mlp.up_proj": "colwise"}, 2, 2) == 2
    assert compat.kv_heads_per_rank(None, 2, 2) == 1


def test_offloaded_layers_are_refused(tmp_path):
    """device_map that offloads a layer to disk leaves its weights on the meta device: a clear error."""
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map=device_map,
                                                     offload_folder=str(tmp_path / "off"))
    hf_kvplug.patch(offloaded)
    with pytest.raises(ValueError, match="meta device"):
        hf_kvplug.PlugCache(offloaded, max_batch_size=1, max_cache_len=16)


def test_device_map_on_one_device_from_pretrained(tmp_path):
    """A real from_pretrained(device_map=...) (all on the CPU here): every layer's buffers where its weights are."""
    from transformers import AutoModelForCausalLM

    stock = tiny_model("qwen3")
    stock.save_pretrained(tmp_path / "m")
    model = hf_kvplug.patch(AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map={"": "cpu"}))
    cache = hf_kvplug.PlugCache(model, max_batch_size=1, max_cache_len=32, block_size=8)
    assert all(layer.k_cache.device.type == "cpu" for layer in cache.attn_layers)
    ids = torch.randint(2, 128, (1, 6))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kv(cache), **kw), stock.generate(ids, **kw))
