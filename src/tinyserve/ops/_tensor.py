"""Turning torch tensors into the TensorView tuples that tinyserve._C understands, and the shared
argument checks of the ops layer."""

from __future__ import annotations

from collections.abc import Iterable

import torch

# NOTE: must match tinyserve::DType in csrc/tensor_view.h.
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float64: 3,
    torch.int32: 4,
    torch.int64: 5,
    torch.uint8: 6,
}

TensorViewTuple = tuple[int, int, tuple[int, ...], tuple[int, ...], int]


def view(t: torch.Tensor) -> TensorViewTuple:
    """(data_ptr, dtype_code, shape, strides, device_index) — a non-owning view for C++.

    The caller keeps `t` alive for the duration of the call (and of the kernel, on CUDA).
    """
    dev = t.device
    return (
        t.data_ptr(),
        DTYPE_CODES[t.dtype],
        tuple(t.shape),
        t.stride(),
        dev.index if dev.type == "cuda" else -1,
    )


def stream_of(t: torch.Tensor) -> int:
    """The raw handle of torch's current CUDA stream on t's device (0 for CPU tensors)."""
    if t.device.type != "cuda":
        return 0
    return torch.cuda.current_stream(t.device).cuda_stream


def check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} is on device {t.device}; supported devices: cpu, cuda")
    return t


def check_dtype(name: str, t: torch.Tensor, allowed: Iterable[torch.dtype]) -> None:
    allowed = tuple(allowed)
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{name} has dtype {str(t.dtype).removeprefix('torch.')}; supported: {names}")


def check_ndim(name: str, t: torch.Tensor, ndim: int, shape_doc: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {shape_doc}, got shape {tuple(t.shape)}")


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device; got {listed}")
    return first


def check_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(
            f"{name} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()}); "
            "call .contiguous() first"
        )


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory ranges two tensors can touch overlap: exact for contiguous tensors, a
    conservative check for strided views (the span from the first to the last element)."""

    def span(t: torch.Tensor) -> tuple[int, int]:
        extent = sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True)) + 1 if t.numel() else 0
        return t.data_ptr(), t.data_ptr() + extent * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1
