#!/usr/bin/env bash
# GPU validation in stages, each small enough for one device call (10 minutes):
#   bash benchmarks/gpu_validate.sh tests    # pytest -m gpu: kernels on silicon, real-shape generate() vs stock
#   bash benchmarks/gpu_validate.sh compile  # pytest -m gpu tests/test_compile.py: Inductor, CUDA graphs, recompiles
#   bash benchmarks/gpu_validate.sh kernel   # decode-kernel benchmark, full sweep
#   bash benchmarks/gpu_validate.sh tune     # every decode config x split waves on 5 cases (~5 min): best vs default
#   bash benchmarks/gpu_validate.sh e2e      # Llama-3-8B bf16, batch 1, 1k prompt, 256 new tokens
#   bash benchmarks/gpu_validate.sh sweep    # hf-kvplug bench, llama3-8b, batch 1/8/32 x 1k..32k (resumable: below)
# Results go to $OUT (the device tool's folder) or ./bench-out; copy them into benchmarks/results/ and commit.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench-out}
mkdir -p "$out"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
export PYTHONUNBUFFERED=1
case "${1:-tests}" in
  tests)
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
    python3 -m pytest -m gpu tests -q -rs -s --durations=15 --ignore=tests/test_compile.py 2>&1 \
      | tee "$out/pytest-gpu.log" ;;
  compile)
    python3 -m pytest -m gpu tests/test_compile.py -q -rs -s --durations=10 2>&1 | tee "$out/pytest-gpu-compile.log" ;;
  kernel)
    python3 benchmarks/bench_decode_kernel.py --out "$out" 2>&1 | tee "$out/kernel.log" ;;
  tune)
    python3 benchmarks/bench_decode_kernel.py --tune --out "$out" 2>&1 | tee "$out/tune.log" ;;
  e2e)
    python3 benchmarks/bench_e2e.py --out "$out" 2>&1 | tee "$out/e2e.log" ;;
  sweep)
    # $OUT starts empty on every device call. To continue a sweep cut off by the time limit, copy the sweep/ folder
    # the last call returned to bench-out/sweep in the checkout and name bench-out in the call's `carry`.
    mkdir -p "$out/sweep"
    if [ "$out" != bench-out ] && [ -d bench-out/sweep ]; then cp -r bench-out/sweep/. "$out/sweep/"; fi
    python3 -m hf_kvplug bench --model llama3-8b --batch 1,8,32 --context 1k,4k,16k,32k --out "$out/sweep" \
      --resume 2>&1 | tee "$out/sweep.log" ;;
  *) echo "unknown stage $1 (tests | compile | kernel | tune | e2e | sweep)"; exit 2 ;;
esac
