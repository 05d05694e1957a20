"""Our own matrix products. Neither is on the serving path, where dense products go through torch
(cuBLAS / MKL); both are kept as experiments with benchmarks.

- `matmul`: the teaching GEMM (CPU and CUDA).
- `skinny_linear`: the linear layer at decode sizes (up to 16 token rows against a whole weight),
  a tensor-core GEMV with cluster split-K. Measured on an H100 (benchmarks/RESULTS.md) it is slower
  than cuBLAS at every decode size (0.85x over a Qwen3-0.6B decode step's products), so layers do
  not route to it.
"""

from __future__ import annotations

import torch

from tinyserve import _C

from ._tensor import check_dtype, check_ndim, check_same_device, check_tensor, stream_of, view

_CPU_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

SKINNY_MAX_ROWS: int = _C.skinny_max_rows
SKINNY_DTYPES = (torch.float16, torch.bfloat16)
_CUDA_BUILT: bool = bool(_C.build_info()["cuda"])


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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _skinny_error(x: object, weight: object, bias: object) -> Exception | None:
    """Why skinny_linear cannot take these arguments; None when it can."""
    tensors = {"x": x, "weight": weight} if bias is None else {"x": x, "weight": weight, "bias": bias}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            return TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    assert isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)
    if x.dtype not in SKINNY_DTYPES:
        return TypeError(f"x has dtype {_dtype_name(x.dtype)}; supported: float16, bfloat16")
    for name, t in tensors.items():
        if t.dtype != x.dtype:
            return TypeError(f"{name} has dtype {_dtype_name(t.dtype)} but x has {_dtype_name(x.dtype)}")
        if t.device != x.device:
            return ValueError(f"{name} is on {t.device} but x is on {x.device}; all must be on one device")
    if x.device.type not in ("cpu", "cuda"):
        return ValueError(f"x is on device {x.device}; supported devices: cpu, cuda")
    if x.dim() != 2 or weight.dim() != 2:
        return ValueError(
            f"x must be 2-D [num_tokens, in_features] and weight 2-D [out_features, in_features], "
            f"got shapes {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    (m, k), n = x.shape, weight.shape[0]
    if m > SKINNY_MAX_ROWS:
        return ValueError(f"x has {m} rows; skinny_linear takes at most {SKINNY_MAX_ROWS} (use F.linear)")
    if weight.shape[1] != k:
        return ValueError(
            f"x is {tuple(x.shape)} and weight {tuple(weight.shape)}: "
            f"in_features differ ({k} vs {weight.shape[1]})"
        )
    if k % 8:
        return ValueError(f"in_features ({k}) must be a multiple of 8 (16-byte rows)")
    if isinstance(bias, torch.Tensor) and tuple(bias.shape) != (n,):
        return ValueError(f"bias must be [{n}] (out_features), got shape {tuple(bias.shape)}")
    for name, t in tensors.items():
        if not t.is_contiguous():
            return ValueError(
                f"{name} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()}); "
                "call .contiguous() first"
            )
    if x.is_cuda and (x.data_ptr() % 16 or weight.data_ptr() % 16):
        return ValueError("on CUDA, x and weight must start on a 16-byte boundary (16-byte vector loads)")
    return None


def skinny_linear_supported(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """True when `skinny_linear(x, weight, bias)` accepts these arguments (on CUDA: and the extension
    holds the CUDA kernels). Depends only on shapes, dtypes, devices and alignment, never on values."""
    if x.is_cuda and not _CUDA_BUILT:
        return False
    return _skinny_error(x, weight, bias) is None


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ weight.T (+ bias) for a few token rows: the decode-time linear layer, bound by reading
    the weight once. float32 accumulation, one rounding to the dtype (after the bias add).

    Args:
        x: [num_tokens, in_features], num_tokens <= SKINNY_MAX_ROWS (16); contiguous; float16 or
            bfloat16; CPU or CUDA (on CUDA starting on a 16-byte boundary).
        weight: [out_features, in_features] (torch Linear layout), in_features a multiple of 8;
            contiguous, x's dtype and device (on CUDA 16-byte aligned).
        bias: optional [out_features], contiguous, x's dtype and device.
        out: optional [num_tokens, out_features], contiguous, x's dtype and device; written in full.

    Returns:
        `out` (a new tensor when not given), [num_tokens, out_features] in x's dtype.

    NOTE: on CUDA it never synchronises or reads device tensors on the host, so it can be captured
    in a CUDA graph.
    """
    err = _skinny_error(x, weight, bias)
    if err is not None:
        raise err
    m, n = x.shape[0], weight.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    else:
        check_tensor("out", out)
        if out.dtype != x.dtype or out.device != x.device or tuple(out.shape) != (m, n):
            raise ValueError(
                f"out must be {(m, n)} of dtype {_dtype_name(x.dtype)} on {x.device}, got "
                f"{tuple(out.shape)} of {_dtype_name(out.dtype)} on {out.device}"
            )
        if not out.is_contiguous():
            raise ValueError(f"out must be contiguous (strides {out.stride()})")
    _C.skinny_gemm(view(x), view(weight), None if bias is None else view(bias), view(out), stream_of(x))
    return out
