#!/usr/bin/env bash
# Developer build: configure + build sagellm._C with CMake/ninja into a build folder, then place
# the module inside the source tree (sagellm/_C*.so) so `import sagellm` works from the checkout.
# Usage: tools/dev_build.sh [BUILD_DIR]   (default build/dev). Honours SAGELLM_CUDA etc.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bdir=${1:-$root/build/dev}
mkdir -p "$bdir"
py=${PYTHON:-python3}
jobs=${SAGELLM_BUILD_JOBS:-$(nproc)}
cmake -S "$root" -B "$bdir" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$(command -v "$py")" \
  -DSAGELLM_CUDA="${SAGELLM_CUDA:-AUTO}" -DSAGELLM_CUDA_ARCHES="${SAGELLM_CUDA_ARCHES:-80;90a}" \
  >"$bdir.configure.log" 2>&1 || { cat "$bdir.configure.log"; exit 1; }
cmake --build "$bdir" -j "$jobs"
so=$(ls "$bdir"/_C*.so)
# SAGELLM_NO_INSTALL=1: build only (e.g. a compile check against another torch, whose module
# would not load in the checkout's torch).
if [ -n "${SAGELLM_NO_INSTALL:-}" ]; then echo "built $so (not installed)"; exit 0; fi
# Atomic replace: another process may be importing the old module right now.
cp "$so" "$root/sagellm/.$(basename "$so").tmp.$$"
mv -f "$root/sagellm/.$(basename "$so").tmp.$$" "$root/sagellm/$(basename "$so")"
# An editable pip install (scikit-build-core's redirect mode) imports the module from
# site-packages, not from the checkout: refresh that copy too when it exists.
purelib=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -f "$purelib/sagellm/$(basename "$so")" ]; then
  cp "$so" "$purelib/sagellm/.$(basename "$so").tmp.$$"
  mv -f "$purelib/sagellm/.$(basename "$so").tmp.$$" "$purelib/sagellm/$(basename "$so")"
fi
echo "built $(basename "$so")"
