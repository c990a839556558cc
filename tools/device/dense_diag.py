"""Why does bf16 dense_linear (cuBLAS through ATen) differ from fp64 at M=8 N=7 K=4097?"""

import torch
import torch.nn.functional as F

import sagellm.ops.linear as L

g = torch.Generator().manual_seed(0)
for k in (4096, 4097):
    x = torch.randn(8, k, generator=g).bfloat16().cuda()
    w = (torch.randn(7, k, generator=g) / k**0.5).bfloat16().cuda()
    b = torch.randn(7, generator=g).bfloat16().cuda()
    ref = x.double() @ w.double().t() + b.double()
    for flag in (True, False):
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = flag
        e1 = (F.linear(x, w, b).double() - ref).abs().max().item()
        e2 = (L.dense_linear(x, w, b).double() - ref).abs().max().item()
        e3 = (F.linear(x, w).double() + b.double() - ref).abs().max().item()
        print(
            f"K={k} reduced={flag}: F.linear err {e1:.4f}  dense_linear {e2:.4f}  no-bias {e3:.4f}"
        )
