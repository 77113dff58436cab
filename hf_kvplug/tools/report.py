"""Benchmark output: the run's environment, CSV / JSON / markdown / PNG files, and the speedup ratios."""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import os
import re
import subprocess
from pathlib import Path

import torch

from .cases import BenchRow

FIELDS = [f.name for f in dataclasses.fields(BenchRow)]


# ------------------------------------------------------------------------------------------------ environment

def environment(gpu_name: str) -> dict:
    """Versions, commit and date stamped on every row."""
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "n/a"
    return dict(gpu_name=gpu_name, torch=torch.__version__, triton=triton_version,
                transformers=transformers.__version__, git_commit=git_commit(),
                date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))


def git_commit() -> str:
    """Short commit of the hf_kvplug checkout ('+dirty' with uncommitted changes), or 'unknown'.

    HF_KVPLUG_COMMIT overrides it, for copies of the tree without `.git` (a remote GPU machine)."""
    if os.environ.get("HF_KVPLUG_COMMIT"):
        return os.environ["HF_KVPLUG_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "") if sha else "unknown"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "x"


def default_out_dir(gpu_name: str, model_label: str, root: str = "benchmarks/results") -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{stamp}-{slug(gpu_name)}-{slug(model_label)}"


# ------------------------------------------------------------------------------------------------ files

def write_csv(rows: list[BenchRow], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in dataclasses.asdict(row).items()})


def write_json(rows: list[BenchRow], meta: dict, path: Path) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1, default=str)


def write_all(rows: list[BenchRow], meta: dict, out: Path, plots: bool = True) -> list[Path]:
    """results.csv, results.json, results.md and (with matplotlib) tokens_per_s.png / decode_ms.png under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.csv", out / "results.json", out / "results.md"]
    write_csv(rows, written[0])
    write_json(rows, meta, written[1])
    written[2].write_text(markdown_report(rows, meta))
    if plots:
        written += write_plots(rows, out)
    return written


# ------------------------------------------------------------------------------------------------ markdown

def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _fmt(value, spec: str = ".2f", missing: str = "–") -> str:
    return missing if value is None else format(value, spec)


def markdown_table(rows: list[BenchRow]) -> str:
    head = ("| provider | batch | context | max_cache_len | prefill ms | decode ms/step p50 (p20–p80) | tokens/s "
            "| peak GB | KV bytes | KV in use | BW floor | status |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        decode = (f"{r.decode_ms_p50:.2f} ({r.decode_ms_p20:.2f}–{r.decode_ms_p80:.2f})"
                  if r.decode_ms_p50 is not None else "–")
        kv = "–" if r.kv_bytes is None else human_bytes(r.kv_bytes)
        in_use = "–" if r.kv_in_use_bytes is None else human_bytes(r.kv_in_use_bytes)
        floor = "–" if r.bw_floor_fraction is None else f"{100 * r.bw_floor_fraction:.0f}%"
        status = r.status if not r.note or r.status == "ok" else f"{r.status}: {r.note}"
        lines.append(f"| {r.provider} | {r.batch} | {r.context} | {_fmt(r.max_cache_len, 'd')} "
                     f"| {_fmt(r.prefill_ms, '.1f')} | {decode} | {_fmt(r.tokens_per_s, '.1f')} "
                     f"| {_fmt(r.peak_mem_gb, '.2f')} | {kv} | {in_use} | {floor} | {status.replace('|', '/')} |")
    return "\n".join(lines)


def _decoding(meta: dict) -> str:
    n = meta.get("return_sequences", 1) or 1
    return "Greedy decoding" if n == 1 else f"Sampling (top-k 50, {n} sequences per prompt: rows = batch × {n})"


def conditions(meta: dict) -> str:
    return (
        f"**Conditions.** {meta.get('gpu_name')} ({meta.get('device')}), torch {meta.get('torch')}, "
        f"triton {meta.get('triton')}, transformers {meta.get('transformers')}, hf_kvplug {meta.get('git_commit')}, "
        f"{meta.get('date')}. Model `{meta.get('model')}` ({meta.get('weights_note')}), {meta.get('dtype')}, "
        f"sdpa attention; weights {meta.get('weights_gb', 0):.2f} GB ({meta.get('weights_read_gb', 0):.2f} GB read "
        f"per decode step: all but an untied input embedding). {_decoding(meta)} of {meta.get('new_tokens')} new "
        "tokens (min = max, EOS ignored) after a "
        f"prompt of `context` random token ids. Each case: one warm-up generate ({meta.get('warmup')}; compile and "
        "CUDA-graph capture happen there, compiled providers start from a reset torch.compile state), then one "
        "measured generate. Prefill ms: generate call → first logits. Decode ms/step: median (p20–p80) over the "
        "decode steps, each timed by a LogitsProcessor after a device synchronize. tokens/s = rows × decode steps / "
        "decode time. Peak GB: torch.cuda.max_memory_allocated over the measured run (weights included). KV bytes: "
        "bytes the cache holds (PlugCache and StaticCache preallocate); KV in use: bytes of the blocks a PlugCache's "
        "rows map at the end (a prompt is stored once for the rows expanded from it), the held bytes for the others. "
        "BW floor: (weights read + KV read per step) "
        f"/ copy bandwidth ({meta.get('copy_bw_gbps', 0):.0f} GB/s, measured in this run by a device-to-device copy) "
        "divided by the measured median step; StaticCache reads its whole max_cache_len (2 × context), the others "
        "their filled slots."
    )


def markdown_report(rows: list[BenchRow], meta: dict) -> str:
    parts = [f"# hf_kvplug benchmark: {meta.get('model')} on {meta.get('gpu_name')}", "", conditions(meta), "",
             markdown_table(rows), ""]
    if meta.get("check"):
        parts += ["## Greedy agreement check", "", *[f"- {line}" for line in meta["check"]], ""]
    ratios = speedup_lines(rows)
    if ratios:
        parts += ["## Speedups", "", *[f"- {line}" for line in ratios], ""]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------ speedups

def _index(rows: list[BenchRow]) -> dict:
    return {(r.provider, r.batch, r.context): r for r in rows if r.status == "ok"}


def _ratio_lines(idx, num: str, den: str, metric: str, label: str, where=lambda b, c: True) -> list[str]:
    lines = []
    for (prov, batch, ctx), row in sorted(idx.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        other = idx.get((den, batch, ctx))
        if prov != num or other is None or not where(batch, ctx):
            continue
        a, b = getattr(row, metric), getattr(other, metric)
        if a and b:
            lines.append(f"{label} at batch {batch}, context {ctx}: {a / b:.2f}x")
    return lines


def speedup_lines(rows: list[BenchRow]) -> list[str]:
    """The ratios the issues target, for every (batch, context) where both sides ran."""
    idx = _index(rows)
    lines = _ratio_lines(idx, "kvplug_compile", "hf_static_compile", "tokens_per_s",
                         "tokens/s kvplug_compile / hf_static_compile")
    lines += _ratio_lines(idx, "kvplug", "hf_dynamic", "tokens_per_s", "tokens/s kvplug / hf_dynamic",
                          where=lambda b, c: b == 1)
    for q in ("int8", "int4"):
        lines += _ratio_lines(idx, f"kvplug_{q}", "kvplug", "decode_ms_p50", f"decode ms/step kvplug_{q} / kvplug")
        lines += _ratio_lines(idx, f"kvplug_{q}_compile", "kvplug_compile", "decode_ms_p50",
                              f"decode ms/step kvplug_{q}_compile / kvplug_compile")
        lines += _ratio_lines(idx, f"kvplug_{q}", "kvplug", "kv_bytes", f"KV bytes {q} / fp")[:1]  # same everywhere
    return lines


# ------------------------------------------------------------------------------------------------ plots

def write_plots(rows: list[BenchRow], out: Path) -> list[Path]:
    """tokens/s and decode ms/step vs context: one subplot per batch, one line per provider (Agg backend)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    ok = [r for r in rows if r.status == "ok" and r.tokens_per_s]
    if not ok:
        return []
    written = []
    for metric, ylabel, name in (("tokens_per_s", "tokens/s", "tokens_per_s.png"),
                                 ("decode_ms_p50", "decode ms/step (median)", "decode_ms.png")):
        batches = sorted({r.batch for r in ok})
        fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
        for ax, batch in zip(axes[0], batches):
            for prov in dict.fromkeys(r.provider for r in ok):
                pts = sorted((r.context, getattr(r, metric)) for r in ok if r.batch == batch and r.provider == prov)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
            ax.set_xscale("log", base=2)
            contexts = sorted({r.context for r in ok if r.batch == batch})
            ax.set_xticks(contexts, [f"{c // 1024}k" if c % 1024 == 0 else str(c) for c in contexts])
            ax.minorticks_off()
            ax.set_title(f"batch {batch}")
            ax.set_xlabel("context (prompt tokens)")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{ok[0].model} {ok[0].dtype} on {ok[0].gpu_name}")
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def rel(path: Path) -> str:
    """`path` relative to the working directory when it lies below it, else absolute."""
    try:
        text = os.path.relpath(path)
    except ValueError:
        return str(Path(path).resolve())
    return str(Path(path).resolve()) if text.startswith("..") else text
