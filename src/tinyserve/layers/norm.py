"""RMSNorm, with the residual add of the next sub-layer fused into the same call."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """y = weight * (x / sqrt(mean(x^2) + eps)), normalised in float32 and cast back to x's dtype before
    the weight is applied (the order transformers uses, so fp32 outputs match bit for bit).

    `forward(x, residual=None) -> (out, residual)`: with a residual, x + residual is formed first (in x's
    dtype) and returned as the new residual; without one, x itself is the new residual. That is the
    pre-norm decoder's data flow: `h, res = norm(h, res)` at every sub-layer.
    """

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))  # [hidden_size]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Plain RMSNorm over the last dim of x [..., hidden_size] (e.g. Qwen3's per-head q/k norm)."""
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x, residual: [num_tokens, hidden_size] -> (normed [num_tokens, hidden_size], new residual)."""
        if residual is not None:
            x = x + residual
        return self.normalize(x), x

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"
