#!/usr/bin/env bash
# Device stage 1: build, op tests on both devices, decode benchmarks.
# Usage on the device machine: bash tools/device/kernels.sh   (results under $OUT)
set -u
export PYTHONPATH=$PWD/.devpkg${PYTHONPATH:+:$PYTHONPATH}
source tools/device/setup.sh || exit 1
echo "=== op tests (CPU + CUDA)"
timeout 330 python3 -m pytest tests/ops -q -p no:cacheprovider --maxfail=40 -n 8 \
  >"$OUT/ops_tests.log" 2>&1
echo "ops tests rc=$?"; grep -E "passed|failed|error" "$OUT/ops_tests.log" | tail -2
grep -E "^FAILED|^ERROR" "$OUT/ops_tests.log" | head -30
echo "=== dense diag"; timeout 60 python3 tools/device/dense_diag.py
echo "=== decode bench"
for bc in "64 2048" "16 8192"; do
  set -- $bc
  timeout 150 python3 -m sagellm.bench op paged_attention_decode --device cuda --dtype bf16 \
    --batch "$1" --context "$2" --output "$OUT/decode_b$1_c$2.json" 2>&1 | tail -6
done
