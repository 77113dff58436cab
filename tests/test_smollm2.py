"""SmolLM2-135M-Instruct, a pretrained Llama (30 layers, 9 query / 3 KV heads, head_dim 64; Q4_1 GGUF weights
dequantized to fp32), through every KV format on the CPU: teacher-forced on the quality tool's held-out text, and a
greedy chat.

Needs the GGUF file (`bash scripts/get_smollm2.sh`, or $SMOLLM2_GGUF) and the `gguf` package; skipped without them,
failed instead where HF_KVPLUG_REQUIRE_SMOLLM2=1 (CI's main stage). `pytest -s` prints the measured figures.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import hf_kvplug
from hf_kvplug.tools import models as bm
from hf_kvplug.tools import quality
from hf_kvplug.tools.demo import CHAT_PROMPTS, chat_ids

# Bounds on the teacher-forced figures against the fp32 PlugCache (NLL increase in nats/token, top-1 agreement).
INT8_NLL_DELTA = 0.004  # measured +0.0016 (these 4 windows, 320 positions)
INT8_TOP1 = 0.975  # measured 99.06% (3 flips, all near-ties); 2.5% leaves room for another CPU's rounding
# INT4 with its exact tail, measured on these 4 windows: +0.0158 and 94.7% (without the tail: +0.0551, 91.3%); issue
# 23's 0.01 and 97% are missed on them (docs/int4.md has larger samples)
INT4_NLL_DELTA = 0.03
INT4_TOP1 = 0.92
STOCK_LOGIT_TOL = 1e-3  # stock DynamicCache vs the fp32 PlugCache: max |logit difference|, argmax identical
CHAT_NEAR_TIE = 0.5  # INT8 greedy may depart from stock only where stock's two best logits are closer than this

# Teacher-forced: WINDOWS evenly spaced held-out windows, each PREFILL tokens in one forward (exact), then STEPS
# single-token decode steps through each cache (stock DynamicCache on the first window only).
WINDOWS, PREFILL, STEPS = 4, 256, 80
CHAT_TOKENS = 48


def test_resolve_gguf_finds_the_file_and_never_downloads(tmp_path, monkeypatch):
    """'smollm2': $SMOLLM2_GGUF first, then the script's cache directory, else an error naming the script; a .gguf
    path or a directory holding one resolves to that file; a checkpoint directory or a shape to None."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.delenv("SMOLLM2_GGUF", raising=False)
    with pytest.raises(bm.ModelFileNotFoundError, match="scripts/get_smollm2.sh"):
        bm.resolve_gguf(bm.SMOLLM2)
    cached = cache / "hf_kvplug" / "smollm2" / bm.SMOLLM2_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert bm.resolve_gguf(bm.SMOLLM2) == str(cached) and bm.smollm2_cache_dir() == str(cached.parent)
    other = tmp_path / "elsewhere" / "m.gguf"
    other.parent.mkdir()
    other.write_bytes(b"")
    monkeypatch.setenv("SMOLLM2_GGUF", str(other))
    assert bm.resolve_gguf(bm.SMOLLM2) == str(other)
    monkeypatch.setenv("SMOLLM2_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(bm.ModelFileNotFoundError, match="SMOLLM2_GGUF"):
        bm.resolve_gguf(bm.SMOLLM2)
    assert bm.resolve_gguf(str(other)) == bm.resolve_gguf(str(other.parent)) == str(other)
    assert bm.gguf_label(str(cached)) == bm.SMOLLM2_LABEL and bm.gguf_label(str(other)) == "m"
    (other.parent / "n.gguf").write_bytes(b"")
    with pytest.raises(bm.ModelFileNotFoundError, match="name one"):
        bm.resolve_gguf(str(other.parent))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    assert bm.resolve_gguf(str(tmp_path / "ckpt")) is None and bm.resolve_gguf("llama3-8b") is None


def _missing(reason: str):
    if os.environ.get("HF_KVPLUG_REQUIRE_SMOLLM2") == "1":
        pytest.fail(f"HF_KVPLUG_REQUIRE_SMOLLM2=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def smollm2():
    """(patched fp32 model on the CPU, tokenizer, {format name: Format}) of SmolLM2."""
    try:
        file = bm.resolve_gguf(bm.SMOLLM2)
    except bm.ModelFileNotFoundError as e:
        _missing(str(e))
    if importlib.util.find_spec("gguf") is None:
        _missing("loading a GGUF model needs the `gguf` package (pip install gguf)")
    model, label = bm.build_model(file, torch.float32, torch.device("cpu"))
    assert label == bm.SMOLLM2_LABEL and model.config.num_key_value_heads == 3
    tokenizer = bm.load_tokenizer(file)
    hf_kvplug.patch(model)
    fmts = {f.name: f for f in quality.formats(model, PREFILL + STEPS + 1, split_kv=False)}
    return model, tokenizer, fmts


@pytest.fixture(scope="module")
def teacher_forced(smollm2):
    """{format name: quality.Stats against the fp32 PlugCache} over WINDOWS x STEPS held-out positions."""
    model, tokenizer, fmts = smollm2
    stream = quality.heldout_stream(tokenizer)
    stats = {name: quality.Stats() for name in fmts}
    for i, w in enumerate(quality.windows(stream, WINDOWS, PREFILL + STEPS + 1)):
        some = [f for name, f in fmts.items() if i == 0 or name != "stock-dynamic"]
        quality.teacher_forced(model, w[None], some, PREFILL, 1, stats)
    ref = stats["plug-fp32"]
    print(f"\nSmolLM2-135M-Instruct fp32, teacher-forced: {WINDOWS} windows x {STEPS} decode steps after a "
          f"{PREFILL}-token prefill, against the fp32 PlugCache (NLL {ref.nll_ref / ref.positions:.4f})")
    for name, st in stats.items():
        print(f"  {name:<14} positions {st.positions}  dNLL {(st.nll - st.nll_ref) / st.positions:+.5f} nats/token  "
              f"top-1 {st.top1 / st.positions:.2%}  max|err| {st.max_err:.4g}  mean|err| {st.abs_err / st.elements:.4g}"
              f"  largest flipped margin {st.flipped_margin:.3f}")
    return stats


def _delta_top1(st: quality.Stats) -> tuple[float, float]:
    return (st.nll - st.nll_ref) / st.positions, st.top1 / st.positions


def test_stock_dynamic_cache_matches_the_fp32_plugcache(teacher_forced):
    st = teacher_forced["stock-dynamic"]
    assert st.positions == STEPS and st.top1 == st.positions
    assert st.max_err <= STOCK_LOGIT_TOL


@pytest.mark.parametrize("kv_dtype, max_delta, min_top1",
                         [("int8", INT8_NLL_DELTA, INT8_TOP1), ("int4", INT4_NLL_DELTA, INT4_TOP1)])
def test_quantized_quality_on_heldout_text(teacher_forced, kv_dtype, max_delta, min_top1):
    delta, top1 = _delta_top1(teacher_forced[f"plug-{kv_dtype}"])
    assert teacher_forced[f"plug-{kv_dtype}"].positions == WINDOWS * STEPS
    assert delta <= max_delta, f"{kv_dtype}: NLL +{delta:.5f} nats/token"
    assert top1 >= min_top1, f"{kv_dtype}: top-1 agreement {top1:.2%}"


def test_the_exact_tail_is_what_int4_needs(teacher_forced):
    """INT4 with each row's partial block kept exact against INT4 without it (every token read quantized): the
    tail at least halves the NLL increase and the mean logit error (measured: 3.5x and 2.1x)."""
    tail, plain = teacher_forced["plug-int4"], teacher_forced["plug-int4-no-tail"]
    assert _delta_top1(tail)[0] * 2 <= _delta_top1(plain)[0]
    assert tail.abs_err * 2 <= plain.abs_err and tail.top1 > plain.top1


def test_greedy_chat(smollm2):
    """The factorial prompt through the chat template: the fp32 PlugCache gives stock's tokens; INT8 gives them too
    or departs first where stock's two best logits were a near-tie."""
    model, tokenizer, fmts = smollm2
    prompt = chat_ids(tokenizer, CHAT_PROMPTS[0])
    stock, margins = quality.greedy(model, prompt, fmts["stock-dynamic"], CHAT_TOKENS)
    fp32 = quality.greedy(model, prompt, fmts["plug-fp32"], CHAT_TOKENS)[0]
    int8 = quality.greedy(model, prompt, fmts["plug-int8"], CHAT_TOKENS)[0]
    first = quality.agreement(int8, stock)[2]
    print(f"\nchat greedy, {CHAT_TOKENS} tokens: {tokenizer.decode(stock, skip_special_tokens=True)!r}\n"
          f"  fp32 PlugCache {'equal to' if torch.equal(fp32, stock) else 'DIFFERENT from'} stock; INT8 "
          + ("equal to stock" if first is None else f"departs at new token {first} (stock's top-2 gap there "
                                                     f"{float(margins[first]):.3f})")
          + f"; smallest top-2 gap over stock's steps {float(margins.min()):.3f}")
    assert torch.equal(fp32, stock)
    assert first is None or float(margins[first]) < CHAT_NEAR_TIE
