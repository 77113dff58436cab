"""The kernels as compiled for sm_90 (offline, no GPU): no register spills, and no I2F in the decode loops.

Runs benchmarks/codegen_report.py in subprocesses without TRITON_INTERPRET (the suite sets it for the kernel tests).
A static guard of the GPU speed: spills and quarter-rate conversions in the decode loop are what the GPU benchmarks
would show as lost bandwidth.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
pytestmark = pytest.mark.skipif(not CUOBJDUMP.exists(), reason="Triton's NVIDIA backend (cuobjdump) is not installed")


@pytest.fixture(scope="module")
def rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    runs = [["--shapes", "llama3-8b", "--dtypes", "fp16,bf16", "--holes"],
            ["--shapes", "qwen2.5-7b", "--dtypes", "bf16", "--holes", "--flash"]]
    procs = [subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "codegen_report.py"), "--json", *args],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for args in runs]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-2000:]
        out += json.loads(stdout.strip().splitlines()[-1])["rows"]
    return out


def _id(r):
    return f"{r['kernel']}-{r['nheads']}x{r['nheads_k']}-{r['dtype']}-{r['kv']}" + ("-holes" if r["holes"] else "")


def test_no_spills(rows):
    """Llama-3-8B (GQA 4) and Qwen2.5-7B (GQA 7) shapes, fp16/bf16, INT8 and INT4 caches, decode (split or not),
    extend, each also in the variant for attention masks with holes; Qwen2.5-7B also attend-only (split decode) and
    non-causal (extend), as flash_attn_with_kvcache's callers use them, and with its ALiBi, softcap and log-sum-exp
    (split decode, non-causal extend; not int4)."""
    assert len(rows) == 74
    model = [r for r in rows if not r["kernel"].endswith(("_attend_only", "_full", "_extras"))]  # PlugCache's
    spilled = [(_id(r), r["regs"], r["spill_bytes"]) for r in model if r["spill_bytes"]]
    assert not spilled, spilled
    # the flash-style variants may keep a few values on the stack outside the loop (int8 attend-only with holes:
    # 16 bytes, Triton 3.9), never inside it
    assert all(r["loop_spills"] == 0 for r in rows if "loop_spills" in r), [(_id(r), r["loop_spills"]) for r in rows]
    assert all(r["spill_bytes"] <= 32 for r in rows), [(_id(r), r["spill_bytes"]) for r in rows]


def test_decode_loop_has_no_i2f(rows):
    """INT8 and INT4 dequantization by integer ops: I2F (16 per SM and clock) in the K/V loop would bound it (the
    new token's conversion, outside the loop, may use it)."""
    decode = [r for r in rows if r["kernel"].startswith("decode")]
    assert decode and all(r["loop_instructions"] > 100 for r in decode), [(_id(r), r["loop_instructions"])
                                                                         for r in decode]
    assert all(r["loop_i2f"] == 0 for r in decode), [(_id(r), r["loop_i2f"]) for r in decode]
