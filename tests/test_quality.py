"""The shipped pylm checkpoint, INT8 quality bounds on it, and `hf-kvplug quality` end to end on a tiny run."""

import csv
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_kvplug
from hf_kvplug.cli import main
from hf_kvplug.config import KV_DTYPES
from hf_kvplug.tools import pylm, quality


@pytest.fixture(scope="module")
def model_and_stream():
    model = AutoModelForCausalLM.from_pretrained(pylm.path(), attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(pylm.path())
    return hf_kvplug.patch(model), quality.heldout_stream(tokenizer)


def test_shipped_checkpoint_loads_from_the_package():
    root = pylm.path()
    assert os.path.dirname(root) == os.path.dirname(os.path.abspath(quality.__file__))
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "README.md"):
        assert os.path.isfile(os.path.join(root, name)), name
    assert os.path.getsize(os.path.join(root, "model.safetensors")) <= 10 * 1024 * 1024
    model = AutoModelForCausalLM.from_pretrained(root)
    c = model.config
    assert c.model_type == "llama" and model.dtype == torch.float32
    assert c.num_attention_heads > c.num_key_value_heads  # GQA
    assert c.max_position_embeddings >= 1024
    tokenizer = AutoTokenizer.from_pretrained(root)
    ids = tokenizer("def f(x):\n    return x\n").input_ids
    assert ids[0] == c.bos_token_id and tokenizer.decode(ids[1:]) == "def f(x):\n    return x\n"


def test_heldout_split_is_by_file_and_stable():
    files = pylm.stdlib_files()
    held = [rel for rel, _ in files if pylm.is_heldout(rel)]
    assert 0 < len(held) < len(files) / 10
    assert held == sorted(held) and pylm.heldout_texts() == [t for rel, t in files if pylm.is_heldout(rel)]


def test_formats_follow_kv_dtypes(model_and_stream):
    model, _ = model_and_stream
    names = [f.name for f in quality.formats(model, 64, split_kv=False)]
    assert names == ["stock-dynamic"] + [f"plug-{k or 'fp32'}" for k in KV_DTYPES] + ["plug-int4-no-tail"]


@pytest.fixture(scope="module")
def measured(model_and_stream):
    """Teacher-forced over 496 held-out positions at context 512 (4-token forwards through the cache) and greedy
    over 64 tokens, every format in KV_DTYPES at once."""
    model, stream = model_and_stream
    s = quality.Settings(contexts=[512], tokens=512, chunk=4, gen_prompts=1, gen_prompt_len=128, gen_tokens=64)
    rows, greedy = quality.measure(model, stream, "pylm", s, log=lambda *_: None)
    return s, {r.format: r for r in rows}, {r.format: r for r in greedy}


def test_int8_quality_bounds_on_pylm(measured):
    """Measured with these settings: NLL +0.0001 nats/token, top-1 agreement 99.6% (2 flips, both with the
    reference's two best logits 0.025 apart or less), max |logit error| 0.085, mean 0.0036, greedy identical;
    docs/quality.md has the full run. The bounds: the issue's NLL target, top-1 loosened from 99.5% to 99% for the
    small sample, logit errors at about 5x the measured ones, flips only at near-ties."""
    s, by, g = measured
    assert by["stock-dynamic"].max_logit_err < 1e-3 and by["stock-dynamic"].top1 == 1.0
    int8 = by["plug-int8"]
    assert int8.positions == 512 - s.prefill
    assert abs(int8.nll_delta) <= 0.01
    assert int8.top1 >= 0.99
    assert 0 < int8.max_logit_err < 0.5 and int8.mean_logit_err < 0.02  # not 0: INT8 K/V are really read back
    assert int8.flipped_margin < 0.25
    assert g["plug-int8"].prefix_agreement >= 0.95


def test_int4_quality_bounds_on_pylm(measured):
    """INT4 with the same settings. Measured: NLL -0.0013 nats/token, top-1 agreement 96.6%, max |logit error|
    0.72, mean 0.048; greedy prefix agreement over 64 tokens 14% (a near-tie model: INT8 itself reaches 86% over
    256 tokens; docs/int4.md). The bounds: the issue's NLL target (0.05) and about 2x the measured errors."""
    _, by, _ = measured
    int4 = by["plug-int4"]
    assert abs(int4.nll_delta) <= 0.05
    assert int4.top1 >= 0.93
    assert 0 < int4.max_logit_err < 1.5 and int4.mean_logit_err < 0.1


def test_round_trip_emulation_matches_the_int8_cache(model_and_stream):
    """The K/V split diagnosis is trustworthy: a DynamicCache storing K and V through the INT8 round trip gives the
    INT8 PlugCache's logits."""
    model, stream = model_and_stream
    plug = hf_kvplug.PlugCache(model, max_batch_size=1, max_cache_len=96, kv_dtype="int8")
    fmts = [quality.Format("plug-int8", "int8", lambda: (plug.reset(), plug)[1], is_reference=True),
            quality.Format("emul-int8", "int8", lambda: quality.RoundTripCache(
                model.config, quality.ROUND_TRIPS["int8"], keys=True, values=True, rotate_keys=True))]
    stats = {f.name: quality.Stats() for f in fmts}
    quality.teacher_forced(model, stream[None, 1000:1097], fmts, prefill=16, chunk=1, stats=stats)
    assert stats["emul-int8"].positions == 80
    assert stats["emul-int8"].max_err < 1e-3 and stats["emul-int8"].top1 == 80


def test_quality_command_writes_its_files(tmp_path):
    assert main(["quality", "--contexts", "48,64", "--tokens", "48", "--gen-prompts", "1", "--gen-prompt-len",
                 "16", "--gen-tokens", "4", "--split-kv", "--half-baselines", "--device", "cpu", "--out",
                 str(tmp_path)]) == 0
    with open(tmp_path / "quality.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["context"], r["format"]) for r in rows[:3]] == [("48", "stock-dynamic"), ("48", "plug-fp32"),
                                                               ("48", "plug-int8")]
    assert {r["format"] for r in rows} >= {"emul-int8-k-only", "emul-int8-v-only", "emul-bf16", "emul-fp16"}
    with open(tmp_path / "greedy.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows) // 2
    meta = json.loads((tmp_path / "quality.json").read_text())["meta"]
    assert meta["command"].startswith("hf-kvplug quality --contexts 48,64")
    md = (tmp_path / "quality.md").read_text()
    assert "## Targets" in md and "plug-int8: met: top-1 agreement" in md
    assert (tmp_path / "quality.png").stat().st_size > 0


def test_quality_refuses_contexts_past_the_model(tmp_path):
    with pytest.raises(SystemExit, match="context is 1024 tokens"):
        main(["quality", "--contexts", "2048", "--device", "cpu", "--out", str(tmp_path)])
