"""RMSNorm, with the residual add of the next sub-layer fused into the same kernel (ops.fused)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tinyserve import ops


class RMSNorm(nn.Module):
    """y = weight * (x / sqrt(mean(x^2) + eps)), normalised in float32 and cast back to x's dtype before
    the weight is applied (the order transformers uses). One fused kernel (`ops.rms_norm`,
    `ops.fused_add_rms_norm`) on CPU and CUDA.

    `forward(x, residual=None) -> (out, residual)`: with a residual, x + residual is formed first (in x's
    dtype) and returned as the new residual; without one, x itself is the new residual. That is the
    pre-norm decoder's data flow: `h, res = norm(h, res)` at every sub-layer.

    NOTE: with a residual, forward works in place: `residual` becomes x + residual and `x` its normalised
    value, and those two tensors are returned. Pass tensors the caller no longer needs as they were.
    """

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))  # [hidden_size]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Plain RMSNorm over the last dim of x [..., hidden_size] (e.g. Qwen3's per-head q/k norm on
        [num_tokens, num_heads, head_dim]); returns a new tensor."""
        if x.dim() in (2, 3) and x.stride(-1) == 1:
            return ops.rms_norm(x, self.weight, self.eps)
        rows = x.reshape(-1, x.shape[-1])  # [num_rows, hidden_size]
        return ops.rms_norm(rows, self.weight, self.eps).view(x.shape)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x, residual: [num_tokens, hidden_size] -> (normed [num_tokens, hidden_size], new residual)."""
        if residual is None:
            return self.normalize(x), x
        ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
        return x, residual

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


@dataclass(frozen=True)
class FoldedNorm:
    """An RMSNorm whose weight was folded into the product after it (LlamaForCausalLM.fold_norms): the
    un-normalised rows [num_tokens, hidden] it would have normalised, and its epsilon. The kernel
    after the product scales each row of the product by 1 / rms of the matching row here (the ops'
    rms_of), so the norm runs no kernel of its own."""

    rows: torch.Tensor
    eps: float
