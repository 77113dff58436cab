"""The `hf-kvplug` command: plan arithmetic, the demo on its embedded model, argument errors, the quickstart."""

import os
import re
import runpy

import pytest
import torch

from hf_kvplug.tools import shapes
from hf_kvplug.tools.bench import parse_providers, parse_sizes
from hf_kvplug.cli import build_parser, main, plan_numbers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _number(text: str, label: str) -> list[int]:
    line = next(line for line in text.splitlines() if line.startswith(label))
    return [int(n.replace(",", "")) for n in re.findall(r"\d[\d,]*", line[len(label):])]


def test_plan_llama3_8b_bytes_per_token(capsys):
    assert main(["plan", "--model", "llama3-8b", "--batch", "2", "--context", "4k", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    # fp16: 32 layers x 8 KV heads x 128 x 2 (K, V) x 2 bytes; int8: 32 x 8 x (2 x 128 x 1 + 2 x 4 scale bytes);
    # int4: 32 x 8 x 2 x (64 + 2 halves x 2 fp16 params x 2 bytes) = 0.281 x fp16
    assert _number(out, "KV bytes / token") == [131072, 67584, 36864]
    assert "8.03 B parameters" in out
    assert "16.06 GB" in out  # bf16 weights
    assert "tokens that fit" in out


def test_plan_numbers_totals_and_fit():
    n = plan_numbers(shapes.llama3_8b(), batch=2, context=100, dtype=torch.bfloat16, block_size=64, free=10**11)
    assert n["bpt_fp"] == 131072 and n["bpt_int8"] == 67584
    assert n["total_fp"] == 2 * 100 * 131072
    assert n["alloc_fp"] == 2 * 128 * 131072  # rows rounded up to whole 64-token blocks
    assert n["fit_int8"] == (10**11 - n["weights"]) // 67584
    assert plan_numbers(shapes.tiny(), 1, 10, torch.float16, 64, None)["fit_fp"] is None


def test_plan_other_shapes(capsys):
    assert main(["plan", "--model", "qwen2.5-7b", "--device", "cpu"]) == 0
    assert _number(capsys.readouterr().out, "KV bytes / token") == [28 * 4 * 128 * 2 * 2, 28 * 4 * (256 + 8),
                                                                    28 * 4 * (128 + 16)]
    assert main(["plan", "--model", "qwen3-8b", "--device", "cpu"]) == 0
    assert _number(capsys.readouterr().out, "KV bytes / token") == [36 * 8 * 128 * 2 * 2, 36 * 8 * (256 + 8),
                                                                    36 * 8 * (128 + 16)]


def test_plan_mla_prefix_index_and_attention_kinds(capsys):
    """DeepSeek-V3's latent cache as arithmetic (61 layers x (512 + 64) x 2 bytes in bf16: 70,272 bytes per token,
    the published figure), a prefix index beside the batch, and the table of attention kinds."""
    assert main(["plan", "--model", "deepseek-v3", "--batch", "1", "--context", "1k", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert _number(out, "KV bytes / token") == [61 * 576 * 2, 61 * (576 + 4), 61 * (288 + 8)]
    assert "671.03 B parameters" in out and "holds no MLA model" in out
    assert _number(out, "  MLA  latent 512 + rope 64 (this model)") == [1152]
    assert _number(out, "  MHA  128 heads x (K 192 + V 128)") == [128 * 320 * 2]
    n = plan_numbers(shapes.llama3_8b(), batch=2, context=1000, dtype=torch.bfloat16, block_size=64, free=10**11,
                     prefix_cache=1000)
    assert n["prefix_tokens"] == 1024 and n["prefix_int8"] == 1024 * 67584
    assert n["fit_int8"] == (10**11 - n["weights"] - 1024 * 67584) // 67584
    kinds = {k: size for k, (_, size) in n["kinds"].items()}
    assert kinds == {"MHA": 32 * 128 * 2 * 2, "GQA": 8 * 128 * 2 * 2, "MQA": 128 * 2 * 2, "MLA": 576 * 2}


def test_plan_per_rank_hybrid_and_shared_prompts(capsys):
    """--tp / --pp: a rank's heads and layers; a hybrid model counts its attention layers and its linear-attention
    state; --share / --prompt: rows expanded from one prompt store it once."""
    assert main(["plan", "--model", "llama3-8b", "--tp", "2", "--pp", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "16 attention layers of 32, 16 query / 4 KV heads" in out
    assert _number(out, "KV bytes / token") == [131072 // 4, 67584 // 4, 36864 // 4]
    n = plan_numbers(shapes.qwen35_9b(), batch=8, context=32768, dtype=torch.bfloat16, block_size=64, free=None,
                     share=4, prompt=16384)
    assert n["layers"] == 8 and n["bpt_fp"] == 8 * 4 * 256 * 2 * 2
    assert n["linear_state"] == 8 * 24 * ((2 * 16 * 128 + 32 * 128) * 4 * 2 + 32 * 128 * 128 * 4)
    assert n["shared_tokens"] == (2 * 256 + 8 * 256) * 64  # 2 prompts of 256 blocks once, 256 own blocks a row
    with pytest.raises(SystemExit, match="divisible by 3"):
        main(["plan", "--model", "llama3-8b", "--tp", "3", "--device", "cpu"])


def test_plan_sliding_windows_are_a_fixed_cost(capsys):
    """Mistral-7B's layers all slide over 4096 tokens: each keeps a ring of 4352 slots per row (the window and a
    slack of 256, rounded up to blocks; `--window-slack 4096` gives the 2 x window of a ring that takes any forward
    in one piece), whatever the context, so no token count bounds the batch."""
    n = plan_numbers(shapes.mistral_7b(), batch=8, context=32768, dtype=torch.bfloat16, block_size=64, free=10**11)
    assert n["window_layers"] == 32 and n["ring_slots"] == 4352 and n["bpt_fp"] == 0
    assert n["ring_fp"] == n["total_fp"] == n["alloc_fp"] == 8 * 4352 * 32 * 8 * 128 * 2 * 2
    assert n["fit_fp"] is None and n["fits_any_fp"]
    wide = plan_numbers(shapes.mistral_7b(), batch=8, context=32768, dtype=torch.bfloat16, block_size=64,
                        free=10**11, window_slack=4096)
    assert wide["ring_slots"] == 8192
    assert main(["plan", "--model", "mistral-7b", "--batch", "8", "--context", "32k", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "32 sliding-window layers (window 4096) keep a ring of 4352 slots per row" in out
    assert "sliding-window rings (batch)" in out
    assert main(["plan", "--model", "mistral-7b", "--context", "32k", "--device", "cpu", "--window-slack", "64"]) == 0
    assert "keep a ring of 4160 slots per row" in capsys.readouterr().out


def test_plan_unknown_model_is_a_clear_error():
    with pytest.raises(SystemExit, match="error: --model 'no-such-model' is neither a known shape"):
        main(["plan", "--model", "no-such-model", "--device", "cpu"])


def test_demo_default_model_completes_python(capsys):
    assert main(["demo", "--max-new-tokens", "8", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "pylm, a 4.2M-parameter Llama trained on the Python standard library" in out
    assert "  │ def copyfile(src, dst):" in out  # the prompt, as text
    assert "kvplug (fp32) vs stock (DynamicCache): identical tokens (8/8)" in out
    assert "kvplug (int8) vs stock (DynamicCache)" in out
    assert re.search(r"stock \(DynamicCache\)\s+prefill\s+[\d.]+ ms \| decode\s+[\d.]+ ms/token", out)
    assert "On cpu the plugged runs take hf_kvplug's PyTorch path" in out


def test_demo_random_model_and_marked_difference(capsys):
    assert main(["demo", "--model", "random", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "embedded tiny random llama" in out
    assert "kvplug (fp32) vs stock (DynamicCache): identical tokens (4/4)" in out
    assert main(["demo", "--family", "qwen3", "--max-new-tokens", "4", "--device", "cpu", "--kv-dtype", "none"]) == 0
    assert "embedded tiny random qwen3" in capsys.readouterr().out


def test_demo_marks_the_first_differing_token():
    from hf_kvplug.tools.demo import DemoRun, compare, completion

    ref = DemoRun("stock", torch.tensor([5, 6, 7, 8]), 1.0, 1.0, 1.0)
    run = DemoRun("int8", torch.tensor([5, 6, 9, 8]), 1.0, 1.0, 1.0)
    assert completion(run, None, 2) == "[5, 6, ⟦9⟧, 8]"
    assert compare(run, ref) == "int8 vs stock: tokens differ (3/4 equal, first divergence at new token 2)"

    class Chars:  # a tokenizer whose token i decodes to chr(ord('a') + i)
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(97 + i) for i in ids)
    assert completion(run, Chars(), 2) == "fg⟦j⟧i"
    assert completion(ref, Chars(), None) == "fghi"


def test_demo_stock_margin_is_the_gap_of_the_two_best_logits():
    from hf_kvplug.tools.demo import DemoRun, build_demo_model, stock_margin

    model = build_demo_model("llama", torch.float32, torch.device("cpu"))
    prompt = torch.tensor([[1, 5, 9]])
    ref = DemoRun("stock", torch.tensor([7, 8, 9]), 1.0, 1.0, 1.0)
    with torch.inference_mode():
        top = model(torch.tensor([[1, 5, 9, 7, 8]])).logits[0, -1].topk(2).values
    assert stock_margin(model, prompt, ref, 2) == pytest.approx(float(top[0] - top[1]), abs=1e-5)


def test_demo_model_is_deterministic_and_leaves_the_rng_alone():
    from hf_kvplug.tools.demo import build_demo_model

    state = torch.random.get_rng_state()
    a = build_demo_model("qwen3", torch.float32, torch.device("cpu"), seed=3)
    assert torch.equal(state, torch.random.get_rng_state())
    b = build_demo_model("qwen3", torch.float32, torch.device("cpu"), seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_argument_errors():
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--providers", "kvplug,nope"])
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--context", "4x"])
    with pytest.raises(SystemExit):
        parser.parse_args([])
    assert parse_sizes("32k,1k, 4K,1024") == [1024, 4096, 32768]
    assert parse_providers("kvplug,hf_dynamic,kvplug") == ["kvplug", "hf_dynamic"]


def test_quickstart_runs(capsys):
    runpy.run_path(os.path.join(ROOT, "examples", "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert re.fullmatch(r"\[\[(\d+, ){11}\d+\]\]\n", out)
