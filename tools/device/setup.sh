#!/usr/bin/env bash
# Device-machine set-up (source it): the Python packages the image lacks, carried as wheels in
# .whl/ (see docs/cuda.md), then sageLLM built with its CUDA kernels from this checkout in one
# command. Writes the build log to $OUT/build.log.
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "wheel install failed"; return 1 2>/dev/null || exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  export PATH=/tmp/site/bin:$PATH
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
grep -o -m1 'avx512[a-z_]*' /proc/cpuinfo | head -1 || echo "no avx512"
start=$(date +%s)
# The one command that builds and installs sageLLM with CUDA kernels:
SAGELLM_CUDA=ON python3 -m pip install --no-build-isolation --no-deps --no-index -e . \
  >"$OUT/build.log" 2>&1
rc=$?
echo "build rc=$rc in $(( $(date +%s) - start )) s"
if [ $rc -ne 0 ]; then tail -60 "$OUT/build.log"; fi
python3 -c 'import sagellm.ops as o; print(o.build_info())'
