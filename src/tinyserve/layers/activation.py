"""SwiGLU's gate: silu(gate) * up on a fused [gate | up] projection output, in one kernel (ops.fused)."""

from __future__ import annotations

import torch
from torch import nn

from tinyserve import ops
from tinyserve.layers.norm import FoldedNorm


class SiluAndMul(nn.Module):
    """forward(x [num_tokens, 2 * d]) -> [num_tokens, d] = silu(x[:, :d]) * x[:, d:].

    Computed as transformers' LlamaMLP computes it in x's dtype: silu in float32, stored in x's dtype,
    then the product (`ops.silu_and_mul`). Leading dims other than num_tokens are flattened.
    """

    def forward(self, x: torch.Tensor, folded_norm: FoldedNorm | None = None) -> torch.Tensor:
        """folded_norm: x is the product of un-normalised rows with the norm's weight folded in; each
        row is first scaled by 1 / rms of the norm's rows (ops.silu_and_mul's rms_of); x 2-D."""
        if folded_norm is not None:
            return ops.silu_and_mul(x, rms_of=folded_norm.rows, eps=folded_norm.eps)
        if x.dim() == 2 and x.stride(-1) == 1:
            return ops.silu_and_mul(x)
        out = ops.silu_and_mul(x.reshape(-1, x.shape[-1]))  # [num_rows, d]
        return out.view(*x.shape[:-1], out.shape[-1])
