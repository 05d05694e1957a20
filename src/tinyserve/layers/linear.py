"""Dense projections: a plain linear layer and a fused one holding several projections of the same
input (q/k/v, gate/up) in one weight, so each runs as one matrix product, and the dispatch every
product with a weight goes through (`linear`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tinyserve import ops


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [num_tokens, in_features] @ weight.T [in_features, out_features] (+ bias [out_features]).

    Decode-sized products on CUDA (at most ops.SKINNY_MAX_ROWS token rows, float16/bfloat16, what
    ops.skinny_linear takes) run TinyServe's skinny GEMM, which streams the weight at close to the
    card's bandwidth where cuBLAS picks slower split-K kernels; everything else goes to F.linear.
    NOTE: the choice depends only on shapes, dtypes, devices and alignment, never on values, so a
    CUDA graph captured for a batch size keeps replaying the right kernel.
    """
    if x.is_cuda and x.shape[0] <= ops.SKINNY_MAX_ROWS and ops.skinny_linear_supported(x, weight, bias):
        return ops.skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [num_tokens, input_size] -> [num_tokens, output_size]."""
        return linear(x, self.weight, self.bias)

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
