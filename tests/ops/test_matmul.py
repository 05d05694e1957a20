"""tinyserve.ops.matmul against torch.matmul in float64."""

from __future__ import annotations

import pytest
import torch

from tinyserve import ops

SHAPES = [(1, 1, 1), (17, 33, 5), (100, 100, 100), (1000, 1000, 1000), (1, 4096, 1), (7, 97, 130)]
# ‖out − ref‖ / ‖ref‖ bounds per dtype (fp32 FMA; fp16/bf16 operands with fp32 accumulation).
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _check(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    ref = a.double().cpu() @ b.double().cpu()
    got = out.double().cpu()
    assert got.shape == ref.shape
    assert torch.isfinite(got).all(), "non-finite (unwritten?) output elements"
    err = (got - ref).norm() / ref.norm().clamp_min(1e-30)
    worst = (got - ref).abs().argmax()
    assert err < TOL[a.dtype], (
        f"relative error {err:.3g} > {TOL[a.dtype]} for {a.dtype} {tuple(a.shape)}x{tuple(b.shape)}; "
        f"worst element {divmod(worst.item(), ref.shape[1])}: got {got.flatten()[worst]:.6g}, "
        f"want {ref.flatten()[worst]:.6g}"
    )


def _inputs(m, k, n, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return a, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matmul_cpu(shape, dtype):
    a, b = _inputs(*shape, dtype, "cpu", seed=sum(shape))
    _check(ops.matmul(a, b), a, b)


def test_matmul_cpu_strided_and_out():
    a, b = _inputs(40, 50, 60, torch.float32, "cpu", seed=1)
    at = a.t().contiguous().t()  # column-major view of the same values
    bs = torch.randn(50, 120)[:, ::2]  # every other column: stride (120, 2)
    out = torch.full((40, 60), float("nan"))
    res = ops.matmul(at, bs, out=out)
    assert res.data_ptr() == out.data_ptr()
    _check(out, at, bs)


def test_matmul_cpu_empty_k():
    out = ops.matmul(torch.randn(3, 0), torch.randn(0, 4))
    assert torch.equal(out, torch.zeros(3, 4))


@pytest.mark.parametrize(
    "a,b,exc,match",
    [
        (
            torch.randn(3, 4),
            torch.randn(5, 6),
            ValueError,
            "a.shape\\[1\\] \\(4\\) must equal b.shape\\[0\\] \\(5\\)",
        ),
        (torch.randn(3), torch.randn(3, 2), ValueError, "must be 2-D"),
        (torch.randn(2, 3, 4), torch.randn(4, 2), ValueError, "must be 2-D"),
        (torch.randn(3, 4), torch.randn(4, 2, dtype=torch.float64), TypeError, "same dtype"),
        (torch.randint(0, 5, (3, 4)), torch.randint(0, 5, (4, 2)), TypeError, "supported: float32, float64"),
        ([[1.0]], torch.randn(1, 1), TypeError, "must be a torch.Tensor"),
    ],
)
def test_matmul_bad_input(a, b, exc, match):
    with pytest.raises(exc, match=match):
        ops.matmul(a, b)


def test_matmul_bad_out():
    with pytest.raises(ValueError, match="out must be"):
        ops.matmul(torch.randn(2, 3), torch.randn(3, 4), out=torch.empty(4, 2))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matmul_cuda(shape, dtype):
    a, b = _inputs(*shape, dtype, "cuda", seed=sum(shape))
    out = torch.full((shape[0], shape[2]), float("nan"), device="cuda", dtype=dtype)
    ops.matmul(a, b, out=out)
    torch.cuda.synchronize()
    _check(out, a, b)


@pytest.mark.cuda
def test_matmul_cuda_strided():
    a, b = _inputs(130, 70, 90, torch.float32, "cuda", seed=3)
    _check(ops.matmul(a.t().contiguous().t(), b), a, b)


@pytest.mark.cuda
def test_matmul_mixed_devices():
    with pytest.raises(ValueError, match="one device"):
        ops.matmul(torch.randn(2, 2), torch.randn(2, 2, device="cuda"))
