"""Random generate() calls, stock against plugged (`tests/fuzz.py`): a fixed range of its cases in every run of the
suite. Longer runs, and one case again: `python tests/fuzz.py --help`."""

from __future__ import annotations

import pytest
import torch

import fuzz

CASES = 120  # seeds 0..119: every family, generate mode and follow-up the draw knows, about 20 s
CHUNK = 20


@pytest.mark.parametrize("first", range(0, CASES, CHUNK))
def test_random_generate_calls_give_stock_results(first):
    torch.set_num_threads(1)
    failed = {}
    for seed in range(first, first + CHUNK):
        diff = fuzz.run(fuzz.draw(seed))
        if diff:
            failed[seed] = diff
    assert not failed, "\n".join(f"seed {s} ({fuzz.draw(s)}): {d}" for s, d in failed.items())


@pytest.mark.parametrize("kv_dtype, dtype", [("int8", "bfloat16"), ("int4", "float16"), ("int4", "bfloat16")])
def test_quantized_caches_in_half_precision_decode_as_the_reference(kv_dtype, dtype):
    """INT8 / INT4 caches in a half-precision model against the reference backend's, in decode loops of one's own
    (`fuzz.narrow`), compared step by step up to a tie: a few seeds each (more: `python tests/fuzz.py --kv-dtype
    int4 --dtype bfloat16 --cases N`)."""
    torch.set_num_threads(1)
    cases = [fuzz.narrow(fuzz.draw(seed), kv_dtype, dtype) for seed in range(8)]
    assert all(c["mode"] == "loop" and c["kv_dtype"] == kv_dtype and c["dtype"] == dtype for c in cases)
    failed = {c["seed"]: d for c in cases if (d := fuzz.run(c))}
    assert not failed, failed


def test_the_draw_covers_what_it_claims():
    """The suite's seeds reach every family, dtype, K/V format, mode and follow-up, prefix caching, eager attention,
    padding, output fields and embeddings (so the fixed range does not silently narrow when the draw changes)."""
    cases = [fuzz.draw(seed) for seed in range(CASES)]
    hybrid = fuzz.HYBRID if not fuzz.compat.HYBRID_CACHE_LAYERS else set()  # (run as llama there)
    assert {c["family"] for c in cases} == set(fuzz.FAMILIES) - hybrid
    assert {c["mode"] for c in cases} == set(fuzz.MODES) | {"loop"}
    assert {c["then"] for c in cases} == set(fuzz.FOLLOW_UPS)
    assert any(c["cache"]["prefix_caching"] and c["then"] == "again" for c in cases)
    assert any(c["attn"] == "eager" and c["gen"].get("output_attentions") for c in cases)
    assert any(any(c["pads"]) for c in cases) and any(c["embeds"] for c in cases)
    assert any(c["gen"].get("output_hidden_states") for c in cases) and any(c["gen"].get("prefill_chunk_size")
                                                                            for c in cases)
    assert {c["kv_dtype"] for c in cases} == {None, "int8", "int4"} and {c["dtype"] for c in cases} == set(fuzz.DTYPES)
    assert any(c["cache"]["slack"] == 0 and c["cache"]["max_batch_size"] == c["batch"] * max(
        c["gen"].get("num_beams", 1), c["gen"].get("num_return_sequences", 1)) for c in cases)


def test_a_difference_is_reported(monkeypatch):
    """The harness can fail: a plugged model that returns other tokens is caught."""
    case = next(c for c in map(fuzz.draw, range(CASES)) if c["mode"] == "greedy")
    original = fuzz._generate

    def off_by_one(model, *args, **kwargs):
        out, err = original(model, *args, **kwargs)
        if hasattr(model, "_kvplug_patched") or any(hasattr(m, "_kvplug_original_forward") for m in model.modules()):
            seq = out.sequences if hasattr(out, "sequences") else out
            seq[:, -1] = (seq[:, -1] + 1) % fuzz.VOCAB
        return out, err

    monkeypatch.setattr(fuzz, "_generate", off_by_one)
    assert "sequences differ" in fuzz.run(case)


@pytest.mark.parametrize("kv_dtype", [None, "int8", "int4"])
def test_caches_sharing_a_pool_never_change_each_others_reads(kv_dtype):
    """Forks over one pool and prefix index, in random interleavings of generate() calls, forks, drops, crops and
    row reorders (`tests/fuzz_sharing.py`): no operation on one cache changes what another reads, and no indexed
    block changes (more: `python tests/fuzz_sharing.py --kv-dtype int4 --seeds 0 500`)."""
    import fuzz_sharing

    torch.set_num_threads(1)
    bad = fuzz_sharing.run(kv_dtype, range(10))
    assert not bad, "\n".join(bad)
