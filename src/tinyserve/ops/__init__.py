"""The one binding layer between Python and the native kernels in tinyserve._C.

Every op checks dtype, device, shape and contiguity here, with errors that say what was wrong and
what is allowed, then hands C++ non-owning views (pointer, dtype, shape, strides, device) and the
current CUDA stream. Nothing outside this package imports tinyserve._C.
"""

from __future__ import annotations

from typing import Any

from .attention import paged_attention_decode, paged_attention_prefill
from .cache import reshape_and_cache
from .fused import (
    FUSED_MLP_MAX_ROWS,
    fused_add_rms_norm,
    fused_mlp,
    fused_mlp_supported,
    fused_mlp_workspace,
    fused_mlp_workspace_bytes,
    fused_norm_linear,
    fused_norm_linear_supported,
    rms_norm,
    rotary_embedding,
    silu_and_mul,
)
from .matmul import (
    SKINNY_MAX_ROWS,
    matmul,
    programmatic_launch_enabled,
    set_programmatic_launch,
    skinny_linear,
    skinny_linear_supported,
)
from .sampling import exponential_noise, sample_from_logits


def build_info() -> dict[str, Any]:
    """What the native extension was compiled with (CUDA on/off, version, architectures, OpenMP)."""
    from tinyserve import _C

    return _C.build_info()


def cuda_kernels_available() -> bool:
    """True when tinyserve._C holds CUDA kernels (it may still be run on a machine without a GPU)."""
    return bool(build_info()["cuda"])


__all__ = [
    "FUSED_MLP_MAX_ROWS",
    "SKINNY_MAX_ROWS",
    "build_info",
    "cuda_kernels_available",
    "exponential_noise",
    "fused_add_rms_norm",
    "fused_mlp",
    "fused_mlp_supported",
    "fused_mlp_workspace",
    "fused_mlp_workspace_bytes",
    "fused_norm_linear",
    "fused_norm_linear_supported",
    "matmul",
    "programmatic_launch_enabled",
    "set_programmatic_launch",
    "paged_attention_decode",
    "paged_attention_prefill",
    "reshape_and_cache",
    "rms_norm",
    "rotary_embedding",
    "sample_from_logits",
    "silu_and_mul",
    "skinny_linear",
    "skinny_linear_supported",
]
