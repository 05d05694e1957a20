"""SwiGLU's gate: silu(gate) * up on a fused [gate | up] projection output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """forward(x [num_tokens, 2 * d]) -> [num_tokens, d] = silu(x[:, :d]) * x[:, d:].

    Computed in x's dtype, as transformers' LlamaMLP does.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]
