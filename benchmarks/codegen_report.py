"""Offline codegen report for Hopper (sm_90), no GPU needed: registers, spills, shared memory and the decode loop's
instruction mix of the kernels as shipped.

Compiles the decode and extend kernels with their shipped launch configs through Triton's own compiler for an sm_90
target, then reads the cubin with the `cuobjdump` that Triton bundles: `-res-usage` for registers and stack (spilled)
bytes, `-sass` for the instructions of the decode kernel's main loop (the body of its longest backward branch, one
K/V tile). A static proxy for what the GPU benchmarks measure: it catches spills and slow instructions (I2F runs at
16 per SM and clock on sm_90) in a session without a GPU. Integer arguments are compiled as the launches specialize
them: pointers and the strides of q, K/V and the caches 16-divisible.

    python benchmarks/codegen_report.py                  # Llama-3-8B and Qwen2.5-7B shapes, fp16/bf16, INT8 or not
    python benchmarks/codegen_report.py --json --shapes llama3-8b
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

SHAPES = {"llama3-8b": (32, 8, 128), "qwen2.5-7b": (28, 4, 128), "llama3.2-1b": (32, 8, 64),
          "qwen2.5-0.5b": (14, 2, 64)}  # nheads, nheads_k, head_dim
UNALIGNED = ("stride_sb", "stride_sh", "stride_ss", "stride_lb", "stride_lh", "stride_bt", "stride_mb")  # may be odd
ARCH = 90
NO_FLASH_EXTRAS = dict(ALIBI=False, SOFTCAP=False, RETURN_LSE=False)  # flash_attn_with_kvcache's options: off


def _triton():
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("codegen_report compiles for a GPU target: run it without TRITON_INTERPRET=1")
    import triton

    return triton


def cuobjdump() -> Path:
    return Path(_triton().__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def compile_kernel(jit, pointer_types: dict, constexprs: dict, num_warps: int, num_stages: int, arch: int = ARCH):
    """triton.compile for `cuda:arch` without a device; `pointer_types` maps each pointer argument to its dtype."""
    triton = _triton()
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    for i, name in enumerate(jit.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = "*" + pointer_types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32" if name == "qk_scale" else "i32"
            if name.startswith("stride") and name not in UNALIGNED:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(jit, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _dump(compiled, flag: str) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(compiled.asm["cubin"])
        return subprocess.run([str(cuobjdump()), flag, str(path)], capture_output=True, text=True, check=True).stdout


def resources(compiled) -> tuple[int, int]:
    """(registers per thread, stack bytes per thread: spills) from cuobjdump -res-usage."""
    m = re.search(r"REG:(\d+) STACK:(\d+)", _dump(compiled, "-res-usage"))
    return int(m.group(1)), int(m.group(2))


def loop_mix(sass: str) -> collections.Counter:
    """Opcode counts (without modifiers) of the longest loop body: from a backward branch's target to the branch."""
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)([^;]*);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2).split(".")[0], m.group(3)))
    best = (0, -1)
    for addr, op, rest in ins:
        target = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
        if target and int(target.group(1), 16) < addr and addr - int(target.group(1), 16) > best[1] - best[0]:
            best = (int(target.group(1), 16), addr)
    return collections.Counter(op for addr, op, _ in ins if best[0] <= addr <= best[1])


def _pointer_types(jit, dtype: str, kv: str) -> dict:
    cache = {"int8": "i8", "int4": "u8"}.get(kv, dtype)
    types = {}
    for name in jit.arg_names:
        if name.endswith("_ptr"):
            if name in ("k_cache_ptr", "v_cache_ptr"):
                types[name] = cache
            elif "scale" in name:
                types[name] = "fp16" if kv == "int4" else "fp32"
            elif name.startswith("part_"):
                types[name] = "fp32"
            elif name in ("block_table_ptr", "cache_seqlens_ptr", "cache_starts_ptr", "status_ptr"):
                types[name] = "i32"
            elif name == "cache_valid_ptr":
                types[name] = "u8"
            elif name in ("alibi_ptr", "lse_ptr"):
                types[name] = "fp32"
            else:
                types[name] = dtype
    return types


def report(nheads: int, nheads_k: int, head_dim: int, dtype: str, kv: str | bool, block_size: int = 64,
           holes: bool = False, flash: bool = False, tail: bool = False) -> list[dict]:
    """The decode kernel (split and unsplit) and the extend kernel of one shape, as their launchers configure them
    for a PlugCache (overflow status on; `holes`: the variant for attention masks with holes; `flash`: also the
    attend-only split decode and the non-causal extend that `attend_with_kvcache` uses outside the model's forwards,
    and, but for int4, both with flash_attn_with_kvcache's ALiBi, softcap and log-sum-exp on; `tail`: for int4,
    also each variant with the exact tail). `kv`: "fp", "int8" or "int4" (True / False: int8 / fp)."""
    from hf_kvplug.kernels import decode_attn as DA
    from hf_kvplug.kernels import extend_attn as EA
    from hf_kvplug.kernels.host import next_pow2

    kv = {True: "int8", False: "fp"}.get(kv, kv)
    int8, int4 = kv == "int8", kv == "int4"
    group, d_pad = nheads // nheads_k, next_pow2(head_dim)
    elem = 4 if dtype == "fp32" else 2
    base = dict(dtype=dtype, kv=kv if kv != "fp" else dtype, nheads=nheads, nheads_k=nheads_k, head_dim=head_dim,
                holes=holes)
    rows = []
    cfg = DA.decode_config(head_dim, kv, elem)
    decode = DA._decode_attn_int4_kernel if int4 else DA._decode_attn_kernel
    variants = [(True, True, False), (False, True, False)]  # (split, new token, ALiBi + softcap + lse)
    if flash:
        variants += [(True, False, False)] + ([] if int4 else [(True, True, True)])
    tails = (False, True) if tail and int4 else (False,)
    for (split, new_kv, extras), has_tail in ((v, t) for t in tails for v in variants):
        consts = dict(GROUP=group, BLOCK_H=max(16, next_pow2(group)), BLOCK_N=cfg.block_n, BLOCK_SIZE=block_size,
                      HEAD_DIM=head_dim, D_PAD=d_pad, SPLIT=split, HAS_HOLES=holes, HAS_STATUS=True,
                      NEW_KV=new_kv)
        if int4:
            consts.update(HAS_TAIL=has_tail)
        else:
            consts.update(INT8=int8, V_SCALE_ON_P=int8 and cfg.v_scale_on_p, UPCAST=False,
                          **{f: extras for f in NO_FLASH_EXTRAS})
        k = compile_kernel(decode, _pointer_types(decode, dtype, kv), consts, cfg.num_warps, cfg.num_stages)
        sass = _dump(k, "-sass")
        mix = loop_mix(sass)
        regs, stack = resources(k)
        rows.append(dict(base, kernel="decode" + ("_split" if split else "") + ("" if new_kv else "_attend_only")
                         + ("_extras" if extras else "") + ("_tail" if has_tail else ""),
                         config=list(cfg)[:4 if int8 else 3],
                         regs=regs,
                         spill_bytes=stack, smem=k.metadata.shared, loop_instructions=sum(mix.values()),
                         loop_i2f=mix["I2F"], i2f_total=len(re.findall(r"\bI2F\b", sass)),
                         loop_spills=mix["LDL"] + mix["STL"],
                         loop_top=dict(mix.most_common(8))))
    block_r, block_n, num_warps, num_stages = EA.extend_config(head_dim, elem, kv)
    group_pad = next_pow2(group)
    extend = EA._extend_attn_int4_kernel if int4 else EA._extend_attn_kernel
    variants = [(True, False)] + ([(False, False)] + ([] if int4 else [(False, True)]) if flash else [])
    for (causal, extras), has_tail in ((v, t) for t in tails for v in variants):
        consts = dict(GROUP=group, GROUP_PAD=group_pad, BLOCK_M=max(1, block_r // group_pad), BLOCK_N=block_n,
                      BLOCK_SIZE=block_size, HEAD_DIM=head_dim, D_PAD=d_pad, HAS_HOLES=holes,
                      CAUSAL=causal)
        if int4:
            consts.update(HAS_TAIL=has_tail)
        else:
            consts.update(INT8=int8, UPCAST=False, **{f: extras for f in NO_FLASH_EXTRAS})
        k = compile_kernel(extend, _pointer_types(extend, dtype, kv), consts, num_warps, num_stages)
        regs, stack = resources(k)
        rows.append(dict(base, kernel="extend" + ("" if causal else "_full") + ("_extras" if extras else "")
                         + ("_tail" if has_tail else ""),
                         config=[block_r, block_n, num_warps, num_stages], regs=regs, spill_bytes=stack,
                         smem=k.metadata.shared))
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="llama3-8b,qwen2.5-7b", help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--dtypes", default="fp16,bf16", help="comma list of model dtypes: fp16, bf16, fp32")
    p.add_argument("--holes", action="store_true",
                   help="also the variants for attention masks with holes (the kernels then read a slot mask)")
    p.add_argument("--flash", action="store_true",
                   help="also the attend-only decode and non-causal extend variants, and those with ALiBi, softcap "
                        "and the log-sum-exp (flash_attn_with_kvcache's modes)")
    p.add_argument("--tail", action="store_true", help="also the int4 variants with the exact tail (HAS_TAIL)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args(argv)
    triton = _triton()
    rows = [r for shape in args.shapes.split(",") for dtype in args.dtypes.split(",") for kv in ("fp", "int8", "int4")
            for holes in ((False, True) if args.holes else (False,))
            if not (kv != "fp" and dtype == "fp32")
            for r in report(*SHAPES[shape], dtype, kv, holes=holes, flash=args.flash, tail=args.tail)]
    if args.json:
        print(json.dumps(dict(triton=triton.__version__, arch=ARCH, rows=rows)))
        return rows
    print(f"Triton {triton.__version__}, sm_{ARCH}: registers, spilled bytes, shared memory; decode loop per K/V tile")
    for r in rows:
        loop = (f" loop {r['loop_instructions']} instr, I2F {r['loop_i2f']}, top {r['loop_top']}"
                if "loop_top" in r else "")
        print(f"{r['kernel']:12s} {r['nheads']}/{r['nheads_k']} d{r['head_dim']} {r['dtype']:4s} kv {r['kv']:4s} "
              f"{'holes ' if r['holes'] else ''}"
              f"config {r['config']}: {r['regs']} regs, {r['spill_bytes']} B spilled, {r['smem']} B smem{loop}")
    return rows


if __name__ == "__main__":
    main()
