"""One table of tolerances for every op test: kernel output vs the fp32/fp64 reference.

bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.0039), fp16 11 (2^-11 = 0.00049); the kernels
accumulate in fp32, so the error is dominated by rounding of inputs and the final output.
"""

import torch

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 1.6e-2, "rtol": 1.6e-2},
}

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def tol(dtype: torch.dtype) -> dict[str, float]:
    return TOLERANCES[dtype]


def poisoned(*shape, dtype, device="cpu") -> torch.Tensor:
    """An output buffer full of NaN, so any element a kernel forgets to write fails the test."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)
