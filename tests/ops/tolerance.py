"""The fused decode ops' accuracy check: max error against the reference's largest value."""

from __future__ import annotations

import torch


def close_to_scale(got: torch.Tensor, want: torch.Tensor, what: str, tol: float) -> None:
    """max |got - want| <= tol * max |want| (bf16/fp16 rounding of products whose terms cancel is
    relative to the output's scale, not to each element)."""
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} against max |value| {scale:.3g}"
