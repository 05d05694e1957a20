"""ops.fused_norm_linear (the residual add, RMSNorm and one product at one or two rows, as one op)
against the unfused ops and a float64 reference, on the CPU twin and CUDA; CUDA-graph replay and
bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tinyserve import ops

from .cuda_graph import capture
from .tolerance import close_to_scale as _close

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
EPS = 1e-6


def _tensors(m: int, k: int, n: int, dtype: torch.dtype, device: str, seed: int, bias: bool):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    residual = torch.randn(m, k, generator=g).to(dtype)
    norm = (1 + 0.1 * torch.randn(k, generator=g)).to(dtype)
    weight = (torch.randn(n, k, generator=g) * k**-0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return [t.to(device) if t is not None else None for t in (x, residual, norm, weight, b)]


def _unfused(x, residual, norm, weight, bias):
    """fused_add_rms_norm (or rms_norm) then the product: (out, new residual)."""
    if residual is None:
        return F.linear(ops.rms_norm(x, norm, EPS), weight, bias), x
    h, r = x.clone(), residual.clone()
    ops.fused_add_rms_norm(h, r, norm, EPS)
    return F.linear(h, weight, bias), r


def _float64(x, residual, norm, weight, bias):
    r = x.double() + (residual.double() if residual is not None else 0)
    y = (r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + EPS) * norm.double()) @ weight.double().T
    return y + (bias.double() if bias is not None else 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("m", "k", "n"),
    [(1, 1024, 4096), (2, 1024, 4096), (1, 4096, 6144), (2, 200, 100), (1, 64, 3), (2, 2056, 517)],
)
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_matches_unfused_ops(device, dtype, m, k, n, with_residual, bias) -> None:
    x, residual, norm, weight, b = _tensors(m, k, n, dtype, device, seed=m + k + n, bias=bias)
    if not with_residual:
        residual = None
    want, r_want = _unfused(x, residual, norm, weight, b)
    want64 = _float64(x, residual, norm, weight, b)
    x_in = x.clone()
    res_in = residual.clone() if residual is not None else None
    out, r = ops.fused_norm_linear(x_in, norm, EPS, weight, res_in, b)
    what = f"{device} {dtype} m={m} K={k} N={n} residual={with_residual} bias={bias}"
    assert out.shape == (m, n) and out.dtype == dtype
    assert torch.equal(x_in, x)  # inputs are only read
    if residual is None:
        assert r is x_in
    else:
        assert torch.equal(res_in, residual) and r.data_ptr() not in (x_in.data_ptr(), res_in.data_ptr())
        assert torch.equal(r, r_want), what  # the add rounds exactly as fused_add_rms_norm's
    _close(out, want, what + " vs unfused", 2e-2)
    _close(out, want64, what + " vs float64", 3e-2)


@pytest.mark.cuda
def test_cuda_graph_replay() -> None:
    """Back-to-back launches and graph replays (a chain of layers feeding each other) give the eager
    result every time: the summation order is fixed."""
    dtype, device, m, k = torch.bfloat16, "cuda", 2, 1024
    layers = [_tensors(m, k, k, dtype, device, seed=s, bias=False)[2:4] for s in range(3)]
    x0, res0, _, _, _ = _tensors(m, k, k, dtype, device, seed=9, bias=False)

    def step(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        for norm, weight in layers:
            x, residual = ops.fused_norm_linear(x, norm, EPS, weight, residual)
        return x + residual

    eager = step(x0, res0)
    for _ in range(3):
        assert torch.equal(step(x0, res0), eager)
    graph, result = capture(lambda: step(x0, res0))
    for _ in range(3):
        graph.replay()
        assert torch.equal(result, eager)


@pytest.mark.cuda
def test_cuda_supported_sizes() -> None:
    """The kernel keeps the normalised rows in shared memory as floats: 4096 and 16384 wide fit at two
    rows; 65536 does not, and that is refused with a clear error."""
    assert ops.fused_norm_linear_supported(2, 4096, torch.bfloat16, "cuda")
    assert ops.fused_norm_linear_supported(2, 16384, torch.float16, "cuda")
    assert not ops.fused_norm_linear_supported(2, 65536, torch.bfloat16, "cuda")
    assert not ops.fused_norm_linear_supported(3, 1024, torch.bfloat16, "cuda")
    assert not ops.fused_norm_linear_supported(1, 1024, torch.float32, "cuda")
    x = torch.zeros(2, 65536, dtype=torch.bfloat16, device="cuda")
    w = torch.zeros(8, 65536, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="shared memory"):
        ops.fused_norm_linear(x, x[0], EPS, w)


def test_cpu_takes_any_width() -> None:
    assert ops.fused_norm_linear_supported(2, 65536, torch.bfloat16, "cpu")
    assert not ops.fused_norm_linear_supported(2, 100, torch.bfloat16, "cpu")  # not a multiple of 8


def test_bad_input() -> None:
    dtype = torch.bfloat16
    x, residual, norm, weight, bias = _tensors(2, 64, 32, dtype, "cpu", seed=0, bias=True)
    with pytest.raises(ValueError, match="1 to 2 rows"):
        ops.fused_norm_linear(torch.zeros(3, 64, dtype=dtype), norm, EPS, weight)
    with pytest.raises(TypeError, match="float16, bfloat16"):
        ops.fused_norm_linear(x.float(), norm.float(), EPS, weight.float())
    with pytest.raises(ValueError, match="weight must be"):
        ops.fused_norm_linear(x, norm, EPS, weight[:, :32])
    with pytest.raises(ValueError, match="norm_weight must be"):
        ops.fused_norm_linear(x, norm[:32], EPS, weight)
    with pytest.raises(ValueError, match="bias must be"):
        ops.fused_norm_linear(x, norm, EPS, weight, bias=bias[:5])
    with pytest.raises(ValueError, match="residual has shape"):
        ops.fused_norm_linear(x, norm, EPS, weight, residual[:1])
    with pytest.raises(ValueError, match="multiple of 8"):
        ops.fused_norm_linear(x[:, :60].contiguous(), norm[:60], EPS, weight[:, :60].contiguous())
    with pytest.raises(ValueError, match="contiguous"):
        ops.fused_norm_linear(x, norm, EPS, weight.T.contiguous().T)
    with pytest.raises(TypeError, match="dtype"):
        ops.fused_norm_linear(x, norm, EPS, weight.half())
