#!/usr/bin/env bash
# Device: the quantization and KV-quantization CUDA tests (device cases only) and the GEMM
# benchmarks of issue 8, from a fresh build. Usage: tools/device/quant_run.sh [tests] [bench] [e2e]
set -u
export PYTHONPATH=$PWD/.devpkg${PYTHONPATH:+:$PYTHONPATH}
source tools/device/setup.sh || exit 1
for stage in "$@"; do
  case $stage in
  tests)
    timeout 240 python3 -m pytest -v -p no:cacheprovider -n 14 -k "cuda" -rfE \
      tests/ops/test_kv_quant_cuda.py tests/ops/test_attention.py tests/ops/test_cache.py \
      tests/ops/test_quant_int.py tests/ops/test_gguf_cuda.py tests/ops/test_coverage.py \
      tests/runtime/test_cuda_runner.py >"$OUT/quant_tests.log" 2>&1
    echo "tests rc=$?"; grep -E "passed|failed" "$OUT/quant_tests.log" | tail -1
    grep -E "^FAILED|^ERROR" "$OUT/quant_tests.log" | head -40 ;;
  bench)
    timeout 150 python3 benchmarks/ops/bench_quant_cuda.py --output "$OUT/bench_quant_cuda.json" \
      >"$OUT/bench_quant_cuda.txt" 2>&1; echo "bench_quant rc=$?"; cat "$OUT/bench_quant_cuda.txt" | tail -60
    timeout 75 python3 benchmarks/ops/bench_gguf_cuda.py --output "$OUT/bench_gguf_cuda.json" \
      >"$OUT/bench_gguf_cuda.txt" 2>&1; echo "bench_gguf rc=$?"; tail -40 "$OUT/bench_gguf_cuda.txt" ;;
  final)
    timeout 150 python3 -m pytest -v -p no:cacheprovider -n 14 -rfE -k "cuda or coverage" \
      tests/ops/test_quant_int.py tests/ops/test_gguf_cuda.py tests/ops/test_kv_quant_cuda.py \
      tests/ops/test_cache.py tests/ops/test_coverage.py tests/models/test_quant_weights.py \
      tests/runtime/test_cuda_runner.py tests/runtime/test_kv_quant.py \
      >"$OUT/final_tests.log" 2>&1
    echo "tests rc=$?"; grep -E "passed|failed" "$OUT/final_tests.log" | tail -1
    grep -E "^FAILED|^ERROR|\] FAILED" "$OUT/final_tests.log" | head -30
    timeout 60 python3 benchmarks/ops/bench_quant_cuda.py --output "$OUT/bench_quant_cuda.json" \
      >"$OUT/bench_quant_cuda.txt" 2>&1; echo "bench_quant rc=$?"; cat "$OUT/bench_quant_cuda.txt"
    timeout 200 python3 benchmarks/throughput.py --shape llama3-8b --device cuda --batch-1 \
      --quantization none,int8,int4 --num-prompts 32 --output-len 64-128 \
      --output "$OUT/e2e_quant.json" >"$OUT/e2e_quant.txt" 2>&1
    echo "e2e rc=$?"; tail -12 "$OUT/e2e_quant.txt" ;;
  ar)
    SAGELLM_CUSTOM_AR_ONE_GPU=1 timeout 90 python3 -m pytest -q -p no:cacheprovider \
      tests/distributed/test_custom_all_reduce.py -k one_gpu >"$OUT/custom_ar.log" 2>&1
    echo "custom_ar rc=$?"; tail -5 "$OUT/custom_ar.log" ;;
  esac
done
