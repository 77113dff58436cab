"""End-to-end decode latency of one generate() call: Llama-3-8B shape (random weights), bf16, batch 1, 1k prompt,
256 new tokens; kvplug_compile, kvplug, hf_static_compile and hf_dynamic in one run.

Reports ms/token (median decode step, p20-p80) and the fraction of the bandwidth floor (weights + KV read per step
at the copy bandwidth measured in the same run) for each provider, and writes CSV / JSON / markdown / PNG under
benchmarks/results/. Extra arguments go to `hf-kvplug bench` and override these defaults, e.g.

    python benchmarks/bench_e2e.py                       # on a CUDA machine
    python benchmarks/bench_e2e.py --model /path/to/Meta-Llama-3-8B --new-tokens 128
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

PROVIDERS = "kvplug_compile,kvplug,hf_static_compile,hf_dynamic"
RESULTS = Path(__file__).resolve().parent / "results"


def default_args() -> list[str]:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return ["bench", "--model", "llama3-8b", "--dtype", "bf16", "--batch", "1", "--context", "1k",
            "--new-tokens", "256", "--providers", PROVIDERS, "--full-warmup", "--out", str(RESULTS / f"{stamp}-e2e")]


def summary(rows) -> list[str]:
    ok = {r.provider: r for r in rows if r.status == "ok"}
    lines = [f"{'provider':<20}{'ms/token p50 (p20-p80)':>26}{'tokens/s':>10}{'BW floor':>10}"]
    for r in rows:
        if r.status != "ok":
            lines.append(f"{r.provider:<20}{r.status + ': ' + r.note[:80]:>26}")
            continue
        span = f"{r.decode_ms_p50:.2f} ({r.decode_ms_p20:.2f}-{r.decode_ms_p80:.2f})"
        floor = "-" if r.bw_floor_fraction is None else f"{100 * r.bw_floor_fraction:.0f}%"
        lines.append(f"{r.provider:<20}{span:>26}{r.tokens_per_s:>10.1f}{floor:>10}")
    best = ok.get("kvplug_compile")
    for other in ("hf_static_compile", "hf_dynamic", "kvplug"):
        if best and other in ok:
            lines.append(f"kvplug_compile vs {other}: {ok[other].decode_ms_p50 / best.decode_ms_p50:.2f}x faster "
                         "per token")
    return lines


def main(argv: list[str] | None = None) -> int:
    from hf_kvplug.tools import bench
    from hf_kvplug.cli import build_parser

    args = build_parser().parse_args(default_args() + list(sys.argv[1:] if argv is None else argv))
    rows = bench.run(args)
    print("\nend-to-end (batch 1):")
    for line in summary(rows):
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
