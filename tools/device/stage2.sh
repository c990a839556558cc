#!/usr/bin/env bash
# Device stage 2: rebuild, a backtrace of the failing-TORCH_CHECK crash, decode variants,
# the CUDA runtime tests.
set -u
export PYTHONPATH=$PWD/.devpkg${PYTHONPATH:+:$PYTHONPATH}
source tools/device/setup.sh || exit 1
g++ --version | head -1; grep -o "std=c++[0-9]*" build/cp312*/build.ninja 2>/dev/null | sort | uniq -c
cat > /tmp/badcall.py <<'PY'
import torch, sagellm
x = torch.randn(4, 8)
for i in range(2):
    try:
        torch.ops.sagellm.rms_norm(torch.empty(4, 7), x, torch.ones(8), 1e-6)
    except RuntimeError as e:
        print("caught:", str(e)[:100])
PY
echo "=== bad call"; timeout 60 python3 /tmp/badcall.py; echo "rc=$?"
timeout 120 cuda-gdb -batch -ex run -ex bt --args python3 /tmp/badcall.py 2>&1 | grep -v "^\[New Thread\|^\[Thread" | tail -40
echo "=== decode stages=2"
for bc in "64 2048" "16 8192"; do
  set -- $bc
  SAGELLM_DECODE_STAGES=2 timeout 100 python3 -m sagellm.bench op paged_attention_decode \
    --device cuda --dtype bf16 --batch "$1" --context "$2" --no-reference 2>&1 | tail -2
done
echo "=== runtime tests"
timeout 330 python3 -m pytest -q -rs -p no:cacheprovider -n 4 tests/runtime/test_cuda_runner.py \
  tests/runtime/test_step_inputs.py >"$OUT/runtime_tests.log" 2>&1
echo "runtime tests rc=$?"; grep -E "^FAILED|^ERROR|passed|failed" "$OUT/runtime_tests.log" | tail -25
