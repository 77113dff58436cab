#!/usr/bin/env bash
# GPU validation in stages, each small enough for one device call (10 minutes):
#   bash benchmarks/gpu_validate.sh quick    # the essential evidence in <= 9 minutes (a session's first call)
#   bash benchmarks/gpu_validate.sh tests    # pytest -m gpu: kernels on silicon, real-shape generate() vs stock
#   bash benchmarks/gpu_validate.sh compile  # pytest -m gpu tests/test_compile.py: Inductor, CUDA graphs, recompiles
#   bash benchmarks/gpu_validate.sh flash    # flash_attn_with_kvcache's modes on silicon (tests/test_flash_api.py and
#                                            # the flash / attend-only kernel tests; more variants to compile)
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
# Budget of `quick` (a session has 15 device-minutes, machine start included, so one call must give the essentials
# in 9): every step runs under its own timeout and writes its files as it goes, so a slow step costs only itself.
#   ~0.5 min  environment, GPU name, editable install
#   <= 3 min  GPU tests that matter most: every kernel against the reference on silicon (the covering subset of
#             tests/test_kernels.py: fp16/bf16/fp32/INT8/INT4, d64/80/128, MHA/GQA/MQA, windows, holes, overflow status,
#             NaN in hidden slots), real-shape generate() vs stock (tests/test_gpu_e2e.py: Llama-3-8B, Qwen2.5-7B,
#             Qwen3-8B attention shapes, fp32 tokens identical, bf16 agreement), Inductor + CUDA graphs for one
#             model (tests/test_compile.py, 128 decode steps: one graph, no re-records); flash_attn_with_kvcache's
#             modes (attend only, non-causal, k/v of another length: more kernel variants to compile) wait for `flash`
#   <= 1.5 min decode kernel, Llama-3-8B shape, batch 1 and 8 x context 4k and 32k, fp16, INT8 and INT4, beside SDPA
#             (HF's static layout and the exact length) and the copy bandwidth measured in the same run
#   <= 3.5 min end to end, Llama-3-8B (random weights) bf16, batch 1, 1k prompt, 128 new tokens: kvplug + compile
#             and HF StaticCache + compile (each compiles once, ~1-1.5 min), kvplug eager
# The CPU cannot time these; the step limits add to 8.5 minutes plus install.
case "${1:-tests}" in
  quick)
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
    python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
      'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
    HF_KVPLUG_COMPILE_GPU_STEPS=128 timeout 180 python3 -m pytest -q -rs -x --durations=10 -m "not slow" \
      -k "not flash and not attend_only" tests/test_kernels.py tests/test_gpu_e2e.py \
      "tests/test_compile.py::test_gpu_reduce_overhead[llama-None]" \
      "tests/test_compile.py::test_gpu_graph_holds_triton_op[int8]" 2>&1 | tee "$out/pytest-gpu-quick.log"
    timeout 90 python3 benchmarks/bench_decode_kernel.py --quick --out "$out/kernel" 2>&1 | tee "$out/kernel.log"
    timeout 210 python3 benchmarks/bench_e2e.py --new-tokens 128 --providers kvplug_compile,hf_static_compile,kvplug \
      --out "$out/e2e" 2>&1 | tee "$out/e2e.log" ;;
  tests)
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
    python3 -m pytest -m gpu tests -q -rs -s --durations=15 --ignore=tests/test_compile.py 2>&1 \
      | tee "$out/pytest-gpu.log" ;;
  compile)
    python3 -m pytest -m gpu tests/test_compile.py -q -rs -s --durations=10 2>&1 | tee "$out/pytest-gpu-compile.log" ;;
  flash)
    python3 -m pytest -q -rs --durations=10 tests/test_flash_api.py tests/test_kernels.py \
      -k "flash or attend_only or paged_layout or lost_new_tokens" 2>&1 | tee "$out/pytest-gpu-flash.log" ;;
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
  *) echo "unknown stage $1 (quick | tests | compile | kernel | tune | e2e | sweep)"; exit 2 ;;
esac
