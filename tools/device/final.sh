#!/usr/bin/env bash
# Device: every test that exercises CUDA (ops, runtime, bench, GGUF guard), from a fresh build.
set -u
export PYTHONPATH=$PWD/.devpkg${PYTHONPATH:+:$PYTHONPATH}
source tools/device/setup.sh || exit 1
timeout 480 python3 -m pytest -q -p no:cacheprovider -n 12 -k "not real_tensors" tests/ops \
  tests/runtime/test_cuda_runner.py tests/runtime/test_step_inputs.py tests/bench \
  tests/backends >"$OUT/cuda_tests.log" 2>&1
echo "cuda tests rc=$?"; grep -E "passed|failed" "$OUT/cuda_tests.log" | tail -1
grep -E "^FAILED|^ERROR" "$OUT/cuda_tests.log" | head -20
