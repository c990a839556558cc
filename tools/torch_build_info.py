"""Print what CMake needs to build against the installed torch, one KEY=value per line."""

import os

import torch
from torch.utils import cpp_extension

print(f"TORCH_VERSION={torch.__version__}")
print(f"TORCH_LIB_DIR={os.path.join(os.path.dirname(torch.__file__), 'lib')}")
print(f"TORCH_INCLUDE_DIRS={'|'.join(cpp_extension.include_paths())}")
print(f"TORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
print(f"TORCH_CUDA_VERSION={torch.version.cuda}")

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
