"""`hf-kvplug bench` end to end on the tiny shape (CPU), its failure handling and its helpers."""

import csv
import json

import pytest
import torch

from hf_kvplug import PlugCache
from hf_kvplug.tools import cases as bench_cases
from hf_kvplug.tools import models as bench_models
from hf_kvplug.tools.bench import agreement
from hf_kvplug.tools.report import FIELDS, speedup_lines
from hf_kvplug.cli import main

TINY = ["bench", "--model", "tiny", "--device", "cpu", "--dtype", "fp32", "--new-tokens", "4"]
EXPECTED_COLUMNS = {"provider", "model", "batch", "context", "max_cache_len", "prefill_ms", "decode_ms_p50",
                    "decode_ms_p20", "decode_ms_p80", "tokens_per_s", "peak_mem_gb", "kv_bytes", "kv_in_use_bytes",
                    "bw_floor_fraction",
                    "status", "note", "gpu_name", "torch", "triton", "transformers", "git_commit", "date"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(TINY + ["--batch", "1,2", "--context", "16,32", "--providers", "hf_dynamic,kvplug,kvplug_int8",
                        "--check-tokens", "6", "--out", str(out)]) == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    return out, rows


def test_bench_writes_every_output(tiny_run):
    out, rows = tiny_run
    assert EXPECTED_COLUMNS <= set(rows[0])
    assert [r["provider"] for r in rows[:3]] == ["hf_dynamic", "kvplug", "kvplug_int8"]
    assert len(rows) == 2 * 2 * 3
    data = json.loads((out / "results.json").read_text())
    assert len(data["rows"]) == len(rows) and set(data["rows"][0]) == set(FIELDS)
    assert any("kvplug vs hf_dynamic: identical greedy tokens" in line for line in data["meta"]["check"])
    md = (out / "results.md").read_text()
    assert "**Conditions.**" in md and "| provider | batch | context |" in md and "kvplug_int8" in md
    for png in ("tokens_per_s.png", "decode_ms.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "errors.log").exists()


def test_bench_values_are_sane(tiny_run):
    _, rows = tiny_run
    for r in rows:
        assert r["status"] == "ok", r
        for key in ("prefill_ms", "decode_ms_p50", "decode_ms_p20", "decode_ms_p80", "tokens_per_s",
                    "bw_floor_fraction"):
            assert float(r[key]) > 0, (key, r)
        assert float(r["decode_ms_p20"]) <= float(r["decode_ms_p50"]) <= float(r["decode_ms_p80"])
        assert r["peak_mem_gb"] == ""  # CPU: not measured
        assert r["torch"] == torch.__version__ and r["model"] == "tiny"
    by = {(r["provider"], int(r["batch"]), int(r["context"])): r for r in rows}
    for batch in (1, 2):
        for ctx in (16, 32):
            fp, int8 = int(by["kvplug", batch, ctx]["kv_bytes"]), int(by["kvplug_int8", batch, ctx]["kv_bytes"])
            assert 0 < int8 < fp
            # tiny: 2 layers x 2 KV heads x 16 dims; fp32 K+V = 256 B/token/layer-head... x 64 slots per row
            assert fp == batch * 64 * 2 * 2 * (2 * 16 * 4)
            assert int(by["kvplug", batch, ctx]["max_cache_len"]) == 64
            dyn = by["hf_dynamic", batch, ctx]
            assert int(dyn["max_cache_len"]) == ctx + 4
            assert int(dyn["kv_bytes"]) == batch * (ctx + 3) * 2 * 2 * (2 * 16 * 4)


def test_return_sequences_show_what_sharing_saves(tmp_path):
    """--return-sequences 4: sampled rows expanded from each prompt; the PlugCache stores each prompt once, so the
    blocks its rows map hold less than the DynamicCache's four copies."""
    assert main(TINY + ["--batch", "2", "--context", "64", "--providers", "hf_dynamic,kvplug", "--block-size", "16",
                        "--return-sequences", "4", "--check-tokens", "0", "--no-plots", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "results.csv") as f:
        by = {r["provider"]: r for r in csv.DictReader(f)}
    per_token = 2 * 2 * (2 * 16 * 4)  # tiny fp32: layers x KV heads x K+V x head_dim x 4 bytes
    dyn, plug = by["hf_dynamic"], by["kvplug"]
    assert int(dyn["kv_in_use_bytes"]) == int(dyn["kv_bytes"]) == 8 * (64 + 3) * per_token
    # 2 prompts of 4 full blocks once, then each of the 8 rows its own block for the 4 new tokens
    assert int(plug["kv_in_use_bytes"]) == (2 * 4 + 8 * 1) * 16 * per_token
    assert int(plug["kv_bytes"]) == 8 * 80 * per_token  # the preallocated pool: 8 rows x 80 slots
    assert plug["return_sequences"] == "4" and float(plug["tokens_per_s"]) > 0
    assert "Sampling (top-k 50, 4 sequences per prompt" in (tmp_path / "results.md").read_text()


def test_oom_is_recorded_not_raised(tmp_path, monkeypatch):
    real = PlugCache.__init__

    def init_oom(self, model, *args, **kwargs):  # the model-dtype cache "runs out of memory", INT8 fits
        if kwargs.get("kv_dtype") is None:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        real(self, model, *args, **kwargs)

    monkeypatch.setattr(PlugCache, "__init__", init_oom)
    assert main(TINY + ["--batch", "1", "--context", "16,32", "--providers", "hf_dynamic,kvplug,kvplug_int8",
                        "--check-tokens", "0", "--no-plots", "--new-tokens", "2", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    status = {(r["provider"], r["context"]): (r["status"], r["note"]) for r in rows}
    assert status["hf_dynamic", 16][0] == "ok" and status["kvplug_int8", 32][0] == "ok"
    assert status["kvplug", 16] == ("OOM", "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB")
    assert status["kvplug", 32][0] == "OOM" and "not run" in status["kvplug", 32][1]  # a smaller case OOMed
    assert "OutOfMemoryError" in (tmp_path / "errors.log").read_text()


def test_other_failures_are_recorded_as_error_and_resume_reruns_them(tmp_path, monkeypatch):
    real = bench_cases.run_case

    def broken(model, case, settings):
        if case.provider == "kvplug":
            raise RuntimeError("kernel exploded\nsecond line")
        return real(model, case, settings)

    args = TINY + ["--batch", "1", "--context", "16", "--providers", "hf_dynamic,kvplug", "--check-tokens", "0",
                   "--no-plots", "--new-tokens", "2", "--out", str(tmp_path)]
    monkeypatch.setattr(bench_cases, "run_case", broken)
    assert main(args) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["provider"], r["status"], r["note"]) for r in rows] == [
        ("hf_dynamic", "ok", ""), ("kvplug", "ERROR", "RuntimeError: kernel exploded")]
    monkeypatch.setattr(bench_cases, "run_case", real)
    first = rows[0]
    assert main(args + ["--resume"]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert rows[0] == first  # kept, not re-measured


def test_compile_providers_are_skipped_on_cpu(tmp_path):
    assert main(TINY + ["--batch", "1", "--context", "16", "--providers", "kvplug_compile,hf_static_compile",
                        "--check-tokens", "0", "--no-plots", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["skipped", "skipped"]
    assert "--compile-on-cpu" in rows[0]["note"]


def test_random_model_on_meta_then_device_is_initialised():
    model, label = bench_models.build_model("tiny", torch.float32, torch.device("cpu"), seed=1)
    assert label == "tiny"
    rotary = model.model.rotary_emb
    fresh = type(rotary)(model.config)
    assert torch.equal(rotary.inv_freq, fresh.inv_freq)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all() and logits.std() > 0
    total, read = bench_models.weight_bytes(model)
    emb = model.get_input_embeddings().weight
    assert total - read == emb.numel() * 4  # an untied input embedding is not read per decode step


def test_agreement_and_speedups():
    a = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    b = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 8]])
    assert agreement(a, a) == (1.0, None)
    assert agreement(a, b) == (0.875, (1, 2))
    row = dict(model="m", dtype="bf16", device="cuda", batch=1, context=1024, new_tokens=64, status="ok")
    rows = [bench_cases.BenchRow(provider="hf_static_compile", tokens_per_s=50.0, **row),
            bench_cases.BenchRow(provider="kvplug_compile", tokens_per_s=100.0, **row)]
    assert speedup_lines(rows) == ["tokens/s kvplug_compile / hf_static_compile at batch 1, context 1024: 2.00x"]


def _decode_kernel_bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_decode_kernel.py"
    spec = importlib.util.spec_from_file_location("bench_decode_kernel", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.interpreter
@pytest.mark.parametrize("kv", ["fp16", "int8", "int4"])
def test_decode_kernel_bench_case_is_correct(kv):
    """The GPU-only kernel benchmark's paged copy, decode call and expected output agree (here on the interpreter),
    at both capacities it may pick."""
    bdk = _decode_kernel_bench()
    gen = torch.Generator().manual_seed(0)
    batch, nheads, nheads_k, d, context, bs = 2, 8, 2, 64, 45, 16
    keys, values = (torch.randn(batch, nheads_k, context, d, generator=gen, dtype=torch.float16) for _ in range(2))
    q = torch.randn(batch, 1, nheads, d, generator=gen, dtype=torch.float16)
    want = bdk.expected_output(q, keys, values, d ** -0.5, kv)
    for capacity in (2 * context, 48):
        got = bdk.kvplug_call(q, keys, values, d ** -0.5, bs, capacity, kv)()
        torch.testing.assert_close(got.float(), want.float(), atol=2e-3, rtol=2e-3)
    free = 10 * bdk.kv_bytes(batch, nheads_k, context, d, "fp16")
    assert bdk.kvplug_capacity(batch, nheads_k, context, d, bs, kv, free) == 96  # 2 x 45, rounded up to blocks
    if kv != "int4":  # a quarter of the bytes still fits 2 x the context there
        assert bdk.kvplug_capacity(batch, nheads_k, context, d, bs, kv, free // 4) == 48
    assert bdk.kvplug_capacity(batch, nheads_k, context, d, bs, kv, free // 10) is None


def test_decode_kernel_bench_judges_the_targets():
    bdk = _decode_kernel_bench()
    row = dict(provider="kvplug", status="ok", model="llama3-8b")
    rows = [dict(row, batch=8, context=16384, kv_dtype="fp16", pct_copy_bw=91.0, median_us=100.0),
            dict(row, batch=8, context=32768, kv_dtype="fp16", pct_copy_bw=88.5, median_us=200.0),
            dict(row, batch=8, context=32768, kv_dtype="int8", pct_copy_bw=80.0, median_us=105.0),
            dict(row, batch=8, context=32768, kv_dtype="int4", pct_copy_bw=70.0, median_us=100.0),
            dict(row, batch=1, context=32768, kv_dtype="fp16", pct_copy_bw=76.0, median_us=30.0),
            dict(row, batch=1, context=1024, kv_dtype="fp16", status="oom")]
    text = "\n".join(bdk.target_lines(rows))
    assert "88.5%-91.0% of copy bandwidth over 2 cases (target >= 90%: missed; lowest llama3-8b B=8 ctx=32768)" in text
    assert "single request at 32k, llama3-8b: 76.0% of copy bandwidth (target >= 75%: met)" in text
    assert "INT8 vs fp16 time at batch x context >= 256k: 1.90x-1.90x faster over 1 cases (target >= 1.8x: met" in text
    assert ("INT4 vs fp16 time at batch x context >= 256k: 2.00x-2.00x faster over 1 cases (target >= 2.5x: missed"
            in text)


@pytest.mark.interpreter
def test_decode_kernel_tune_plumbing(tmp_path, monkeypatch):
    """--tune on the CPU with small shapes and a fake clock: one row per distinct launch, the shipped config marked
    once per case, every config checked against the expected output, a failing case kept as an error row."""
    bdk = _decode_kernel_bench()
    monkeypatch.setattr(bdk, "DEVICE", "cpu")
    monkeypatch.setattr(bdk, "MODELS", {"llama3-8b": (8, 2, 64), "qwen2.5-7b": (7, 1, 64)})
    monkeypatch.setattr(bdk, "TUNE_CASES", [("llama3-8b", 1, 150), ("qwen2.5-7b", 2, 70)])
    clock = iter(range(1, 10_000))
    monkeypatch.setattr(bdk, "timed", lambda fn, rep=200: (fn(), (float(next(clock)), 0.0, 0.0))[1])
    real, calls = bdk.paged_cache, []

    def paged_cache(*args):
        calls.append(1)
        if len(calls) == 1 + len(bdk.DTYPES):  # the second case's first dtype
            raise torch.OutOfMemoryError("simulated")
        return real(*args)

    monkeypatch.setattr(bdk, "paged_cache", paged_cache)
    args = bdk.parse_args(["--tune", "--block-size", "16"])
    path = tmp_path / "tune.json"
    rows = bdk.tune(args, 1000.0, {"gpu_name": "cpu"}, path)
    assert json.loads(path.read_text())["rows"] == rows
    by_case = {}
    for r in rows:
        by_case.setdefault((r["model"], r["kv_dtype"]), []).append(r)
    assert [r["status"] for r in by_case[("qwen2.5-7b", "fp16")]] == ["error: OutOfMemoryError: simulated"]
    for key in [("llama3-8b", "fp16"), ("llama3-8b", "int8"), ("qwen2.5-7b", "int8"), ("llama3-8b", "int4")]:
        case = by_case[key]
        assert all(r["status"] == "ok" for r in case), [r["status"] for r in case]
        launches = [(r["block_n"], r["num_warps"], r["num_stages"], r["v_scale_on_p"], r["num_splits"]) for r in case]
        assert len(launches) == len(set(launches))
        assert {r["v_scale_on_p"] for r in case} == ({True, False} if key[1] == "int8" else {True})
        assert sum(r["default"] for r in case) == 1
        assert sorted(r["rank"] for r in case) == list(range(1, len(case) + 1))
