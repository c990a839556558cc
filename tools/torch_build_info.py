"""Print what CMake needs to build against the installed torch, one KEY=value per line."""

import inspect
import os
import re

import torch
from torch.utils import cpp_extension

print(f"TORCH_VERSION={torch.__version__}")
print(f"TORCH_LIB_DIR={os.path.join(os.path.dirname(torch.__file__), 'lib')}")
print(f"TORCH_INCLUDE_DIRS={'|'.join(cpp_extension.include_paths())}")
print(f"TORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
print(f"TORCH_CUDA_VERSION={torch.version.cuda}")


# The C++ standard torch builds its extensions with (17 up to torch 2.11, 20 from later
# releases). Extensions must use the same one: torch's headers change with the standard, and a
# mismatch broke C++ exceptions thrown into torch (a segfault on the first TORCH_CHECK failure).
def cxx_standard() -> int:
    try:
        src = inspect.getsource(cpp_extension)
    except (OSError, TypeError):
        return 17
    found = re.findall(r"common_cflags \+= \['-std=c\+\+(\d+)'", src)
    return int(found[0]) if found else 17


print(f"TORCH_CXX_STANDARD={cxx_standard()}")

# A pip-installed CUDA torch brings the CUDA library headers its own headers include (cusparse.h,
# cublas_v2.h ...) as nvidia-* wheels; a bare toolkit (nvcc + cudart) may lack them. They are
# searched after the toolkit's own include directory.
extra = []
if torch.version.cuda:
    site = os.path.dirname(os.path.dirname(torch.__file__))
    nvidia = os.path.join(site, "nvidia")
    if os.path.isdir(nvidia):
        for root, dirs, _ in os.walk(nvidia):
            if os.path.basename(root) == "include":
                extra.append(root)
                dirs[:] = []
print(f"TORCH_CUDA_EXTRA_INCLUDES={'|'.join(sorted(extra))}")


# The libstdc++ this process (and so torch) runs with. The module links it by path: a compiler
# whose own libstdc++ is only a static archive would otherwise copy the library into the module,
# and two libstdc++ in one process crash on the first formatted error message.
def loaded_libstdcxx() -> str:
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            for line in maps:
                path = line.split()[-1]
                if "/libstdc++.so" in path and os.path.exists(path):
                    return path
    except OSError:
        pass
    return ""


print(f"TORCH_LIBSTDCXX={loaded_libstdcxx()}")
