#!/usr/bin/env bash
# Device stage 3: crash diagnosis (CPU-only build vs CUDA build), qwen throughput.
set -u
export PYTHONPATH=$PWD/.devpkg${PYTHONPATH:+:$PYTHONPATH}
source tools/device/setup.sh || exit 1
cat > /tmp/badcall2.py <<'PY'
import sys, torch
torch.ops.load_library(sys.argv[1])
try:
    torch.ops.sagellm.rms_norm(torch.empty(4, 7), torch.randn(4, 8), torch.ones(8), 1e-6)
except RuntimeError as e:
    print("caught:", str(e)[:100])
PY
echo "=== CPU-only build"
SAGELLM_CUDA=OFF SAGELLM_NO_INSTALL=1 PYTHON=python3 timeout 200 tools/dev_build.sh build/nocuda 2>&1 | tail -1
timeout 30 python3 /tmp/badcall2.py build/nocuda/_C*.so; echo "cpu-only rc=$?"
so=$(ls build/cp312*/_C*.so 2>/dev/null | head -1); echo "cuda build: $so"
timeout 30 python3 /tmp/badcall2.py "$so"; echo "cuda-build rc=$?"
timeout 60 cuda-gdb -batch -ex run -ex "info symbol \$pc" -ex "x/6i \$pc" -ex "info sharedlibrary" \
  --args python3 /tmp/badcall2.py "$so" 2>&1 | grep -v "^\[New Thread\|^\[Thread" | grep -E "SIGSEGV|in section|=>|stdc\+\+|_C\.|libc10" | head -20
echo "=== fixed runtime test"
timeout 120 python3 -m pytest -q -p no:cacheprovider -n 6 tests/runtime/test_cuda_runner.py \
  -k "waits_for_the_device" 2>&1 | tail -3
echo "=== qwen"
PYTHON=python3 timeout 420 tools/device/e2e_cuda.sh qwen 2>&1 | tail -40
