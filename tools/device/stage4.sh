#!/usr/bin/env bash
# Device stage 4: why a static libstdc++ lands in the module; op tests; Llama-3-8B throughput.
set -u
export PYTHONPATH=$PWD/.devpkg${PYTHONPATH:+:$PYTHONPATH}
env | grep -iE "^(LD|CXX|C|CPP|CUDA|NVCC)FLAGS" ; echo "---"
source tools/device/setup.sh || exit 1
ninja -C build/cp312-cp312-linux_x86_64 -t commands 2>/dev/null | grep -E " -shared| -o _C" | tail -1 | tr ' ' '\n' | grep -E "static|^-l|^-Wl|fopenmp|gomp" | tr '\n' ' '; echo
so=$(ls build/cp312*/_C*.so | head -1)
nm -C "$so" | grep -c " T std::" ; readelf -d "$so" | grep NEEDED | tr '\n' ' '; echo
python3 -c "
import torch, sagellm
try: torch.ops.sagellm.rms_norm(torch.empty(4, 7), torch.randn(4, 8), torch.ones(8), 1e-6)
except RuntimeError as e: print('caught:', str(e)[:80])"; echo "badcall rc=$?"
echo "=== op tests"
timeout 400 python3 -m pytest tests/ops -q -p no:cacheprovider -n 12 -k "not real_tensors" \
  >"$OUT/ops_tests.log" 2>&1
echo "ops tests rc=$?"; grep -E "passed|failed" "$OUT/ops_tests.log" | tail -1
grep -E "^FAILED|^ERROR" "$OUT/ops_tests.log" | head -12


