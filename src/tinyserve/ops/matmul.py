"""The teaching matmul: our own GEMM kernels (CPU and CUDA). Not on the serving path, where dense
products go through torch (cuBLAS / MKL); kept as an experiment and a benchmark."""

from __future__ import annotations

import torch

from tinyserve import _C

from ._tensor import check_dtype, check_ndim, check_same_device, check_tensor, stream_of, view

_CPU_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """C = A @ B with TinyServe's own kernels.

    Args:
        a: [m, k]; any strides.
        b: [k, n]; same dtype and device as `a`; any strides.
        out: optional [m, n] of the same dtype and device; written in full.

    Returns:
        [m, n]. CPU: float32, float64. CUDA: float32 (FP32 FMA, no TF32), float16 and bfloat16
        (tensor cores, fp32 accumulation).
    """
    check_tensor("a", a)
    check_tensor("b", b)
    check_ndim("a", a, 2, "[m, k]")
    check_ndim("b", b, 2, "[k, n]")
    check_same_device(a=a, b=b)
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must have the same dtype, got {a.dtype} and {b.dtype}")
    check_dtype("a", a, _CUDA_DTYPES if a.is_cuda else _CPU_DTYPES)
    if a.shape[1] != b.shape[0]:
        raise ValueError(
            f"matmul shape mismatch: a is {tuple(a.shape)} and b is {tuple(b.shape)}; "
            f"a.shape[1] ({a.shape[1]}) must equal b.shape[0] ({b.shape[0]})"
        )
    m, n = a.shape[0], b.shape[1]
    if out is None:
        out = torch.empty((m, n), dtype=a.dtype, device=a.device)
    else:
        check_tensor("out", out)
        check_same_device(a=a, out=out)
        if out.dtype != a.dtype or tuple(out.shape) != (m, n):
            raise ValueError(
                f"out must be {(m, n)} of dtype {a.dtype}, got {tuple(out.shape)} of {out.dtype}"
            )
    _C.matmul(view(a), view(b), view(out), stream_of(out))
    return out
