"""Our own matrix products.

- `matmul`: the teaching GEMM (CPU and CUDA); not on the serving path.
- `skinny_linear`: the linear layer at decode sizes (up to 16 token rows against a whole weight), a
  tensor-core GEMV with cluster split-K, which can also apply the decoder layer's RMSNorm or
  SiLU-and-mul to its input and add the residual to its output. The runner measures where it beats
  cuBLAS on the card (runner/linear_tuning.py) and whether the fused decoder layer it makes
  possible beats the unfused one (runner/cuda_graphs.py).
"""

from __future__ import annotations

import torch

from tinyserve import _C

from ._tensor import check_dtype, check_ndim, check_same_device, check_tensor, overlaps, stream_of, view

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


def _skinny_error(x: object, weight: object, bias: object, silu: bool = False) -> Exception | None:
    """Why skinny_linear cannot take these arguments (silu: x is [m, 2k]); None when it can."""
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
    if silu:
        if k != 2 * weight.shape[1]:
            return ValueError(
                f"with silu_input, x must be [num_tokens, 2 * in_features] = [*, {2 * weight.shape[1]}] "
                f"([gate | up]), got {tuple(x.shape)}"
            )
        k //= 2
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


def skinny_linear_supported(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, silu_input: bool = False
) -> bool:
    """True when `skinny_linear(x, weight, bias, silu_input=silu_input)` accepts these arguments (on
    CUDA: and the extension holds the CUDA kernels). Depends only on shapes, dtypes, devices and
    alignment, never on values."""
    if x.is_cuda and not _CUDA_BUILT:
        return False
    return _skinny_error(x, weight, bias, silu_input) is None


def _like_x_error(name: str, t: object, x: torch.Tensor) -> Exception | None:
    """Why `t` cannot stand beside x (a tensor of x's dtype on x's device); None when it can."""
    if not isinstance(t, torch.Tensor):
        return TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != x.dtype or t.device != x.device:
        return TypeError(
            f"{name} must be {_dtype_name(x.dtype)} on {x.device} like x, got "
            f"{_dtype_name(t.dtype)} on {t.device}"
        )
    return None


def _fusion_error(
    x: torch.Tensor,
    weight: torch.Tensor,
    norm_weight: torch.Tensor | None,
    silu: bool,
    residual: torch.Tensor | None,
) -> Exception | None:
    """Why the fused prologue/epilogue arguments are not usable with x and weight; None when they are."""
    m, (n, k) = x.shape[0], weight.shape
    if norm_weight is not None:
        if silu:
            return ValueError("norm_weight and silu_input cannot be combined (one prologue per product)")
        if (err := _like_x_error("norm_weight", norm_weight, x)) is not None:
            return err
        if tuple(norm_weight.shape) != (k,) or not norm_weight.is_contiguous():
            return ValueError(
                f"norm_weight must be a contiguous [{k}] tensor, got shape {tuple(norm_weight.shape)}"
            )
        if x.is_cuda and norm_weight.data_ptr() % 16:
            return ValueError("on CUDA, norm_weight must start on a 16-byte boundary (16-byte vector loads)")
    if residual is not None:
        if (err := _like_x_error("residual", residual, x)) is not None:
            return err
        if tuple(residual.shape) != (m, n) or not residual.is_contiguous():
            return ValueError(
                f"residual must be a contiguous [{m}, {n}] tensor (num_tokens, out_features), got shape "
                f"{tuple(residual.shape)}"
            )
        if overlaps(x, residual):
            return ValueError("x and residual must not overlap: every block reads all of x")
    return None


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    silu_input: bool = False,
    residual: torch.Tensor | None = None,
    unroll: int = 2,
) -> torch.Tensor:
    """y = x @ weight.T (+ bias) for a few token rows: the decode-time linear layer, bound by reading
    the weight once. float32 accumulation, one rounding to the dtype (after the bias add).

    Args:
        x: [num_tokens, in_features] (with silu_input [num_tokens, 2 * in_features]),
            num_tokens <= SKINNY_MAX_ROWS (16); contiguous; float16 or bfloat16; CPU or CUDA (on CUDA
            starting on a 16-byte boundary).
        weight: [out_features, in_features] (torch Linear layout), in_features a multiple of 8;
            contiguous, x's dtype and device (on CUDA 16-byte aligned).
        bias: optional [out_features], contiguous, x's dtype and device.
        out: optional [num_tokens, out_features], contiguous, x's dtype and device; written in full.
            May be `residual` itself (the residual stream updated in place); must not overlap x.
        norm_weight: optional [in_features]: x is RMS-normalised first, exactly as `rms_norm(x,
            norm_weight, eps)` would store it (but never written out).
        eps: the RMSNorm epsilon (with norm_weight).
        silu_input: x holds a fused [gate | up] projection; the product takes
            `silu_and_mul(x)` (as that op rounds it) instead of x.
        residual: optional [num_tokens, out_features]: the result is `residual + y`, y rounded to the
            dtype before the add (as the unfused `y + residual`).
        unroll: CUDA kernel variant, 2 or 4 k-chunks of 32 per warp step (more loads in flight per
            thread against more registers); the same result either way up to summation order. The
            runner measures which is faster per weight shape (runner/linear_tuning.py).

    Returns:
        `out` (a new tensor when not given), [num_tokens, out_features] in x's dtype.

    NOTE: on CUDA it never synchronises or reads device tensors on the host, so it can be captured
    in a CUDA graph.
    """
    if unroll not in (2, 4):
        raise ValueError(f"unroll must be 2 or 4, got {unroll!r}")
    err = _skinny_error(x, weight, bias, silu_input)
    if err is None:
        err = _fusion_error(x, weight, norm_weight, silu_input, residual)
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
        if out.numel() and x.numel() and overlaps(x, out):
            raise ValueError("out must not overlap x: every block reads all of x")
    _C.skinny_gemm(
        view(x),
        view(weight),
        None if bias is None else view(bias),
        view(out),
        stream_of(x),
        norm_weight=None if norm_weight is None else view(norm_weight),
        eps=float(eps),
        silu=bool(silu_input),
        residual=None if residual is None else view(residual),
        unroll=unroll,
    )
    return out


def set_programmatic_launch(enabled: bool | None) -> None:
    """Launch TinyServe's CUDA kernels with programmatic dependent launch (sm_90+): True, False, or
    None to follow the environment (TINYSERVE_PDL=0 turns it off; on by default). Kernels captured in
    CUDA graphs keep the setting they were captured with."""
    _C.set_programmatic_launch(-1 if enabled is None else int(bool(enabled)))


def programmatic_launch_enabled(device: torch.device | int | None = None) -> bool:
    """Whether TinyServe's kernels launch with PDL on this CUDA device now (False without CUDA)."""
    if not _CUDA_BUILT or not torch.cuda.is_available():
        return False
    index = torch.cuda.current_device() if device is None else torch.device("cuda", device).index
    return bool(_C.programmatic_launch_enabled(0 if index is None else index))
