"""Dense projections: a plain linear layer and a fused one holding several projections of the same
input (q/k/v, gate/up) in one weight, so each runs as one matrix product."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tinyserve import ops
from tinyserve.layers.norm import RMSNorm


class Linear(nn.Module):
    """y = x @ weight.T (+ bias). weight [output_size, input_size], bias [output_size] (HF layout)."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool = False, dtype: torch.dtype | None = None
    ):
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        # NOTE: torch.empty: the loader (or dummy init) writes every element before first use.
        self.weight = nn.Parameter(torch.empty(output_size, input_size, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(output_size, dtype=dtype)) if bias else None
        # Token counts at which ops.skinny_linear runs instead of cuBLAS: measured per card by the
        # runner (runner/linear_tuning.py); empty until then.
        self.skinny_rows: frozenset[int] = frozenset()
        # The faster skinny kernel variant (ops.skinny_linear's unroll) per token count, measured
        # with skinny_rows; 2 where not measured.
        self.skinny_unroll: dict[int, int] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [num_tokens, input_size] -> [num_tokens, output_size]."""
        if x.shape[0] in self.skinny_rows and x.is_contiguous():
            return ops.skinny_linear(x, self.weight, self.bias, unroll=self.skinny_unroll.get(x.shape[0], 2))
        return F.linear(x, self.weight, self.bias)

    def fused(
        self,
        x: torch.Tensor,
        *,
        norm: RMSNorm | None = None,
        silu_input: bool = False,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The product at decode sizes (skinny GEMM) with its neighbours in the same kernel:
        `norm(x)` instead of x, or `silu_and_mul(x)` for a [gate | up] x; with `residual`, the result
        is added to it in place and `residual` is returned. Rounded as the unfused ops round."""
        return ops.skinny_linear(
            x,
            self.weight,
            self.bias,
            out=residual,
            norm_weight=None if norm is None else norm.weight,
            eps=0.0 if norm is None else norm.eps,
            silu_input=silu_input,
            residual=residual,
            unroll=self.skinny_unroll.get(x.shape[0], 2),
        )

    def add_into(self, x: torch.Tensor, stream: torch.Tensor) -> None:
        """`stream += self(x)` in place, in one kernel where it can: the skinny GEMM's residual
        epilogue at its measured token counts, else cuBLAS accumulating into stream (addmm_, beta 1:
        the sum is rounded once). x [num_tokens, input_size]; stream [num_tokens, output_size]."""
        if x.shape[0] in self.skinny_rows and x.is_contiguous() and self.fused_supported(x):
            self.fused(x, residual=stream)
        elif self.bias is None:
            stream.addmm_(x, self.weight.t())
        else:
            stream.add_(self(x))

    def fused_supported(self, x: torch.Tensor, silu_input: bool = False) -> bool:
        """Whether `fused(x, ...)` takes an input of x's shape, dtype, device and alignment."""
        return ops.skinny_linear_supported(x, self.weight, self.bias, silu_input)

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, bias={self.bias is not None}"


class MergedLinear(Linear):
    """Several projections of one input stacked along the output dim: weight = cat(W_0, W_1, ...).

    The loader writes checkpoint tensor i into `shard(param, i)`; `split(y)` cuts the output back into
    per-projection views.
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: Sequence[int],
        bias: bool = False,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(input_size, sum(output_sizes), bias, dtype)
        self.output_sizes = tuple(output_sizes)
        self.offsets = tuple(sum(self.output_sizes[:i]) for i in range(len(self.output_sizes)))

    def shard(self, param: torch.Tensor, index: int) -> torch.Tensor:
        """The rows of `param` (this layer's weight or bias) that hold projection `index` (a view)."""
        return param.narrow(0, self.offsets[index], self.output_sizes[index])

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """y [num_tokens, sum(output_sizes)] -> one view [num_tokens, output_sizes[i]] per projection."""
        return y.split(self.output_sizes, dim=-1)

    def extra_repr(self) -> str:
        return f"in={self.input_size}, outs={self.output_sizes}, bias={self.bias is not None}"
