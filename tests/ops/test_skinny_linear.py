"""tinyserve.ops.skinny_linear (the decode-time GEMM, CPU twin and CUDA kernel) against a float64
reference: awkward n and k (tails of the 8-row mma tiles, 32-row blocks and 64-wide k steps), 1-16
token rows (both CUDA kernels), bias or none, split-K shapes, CUDA-graph capture, and rejected inputs."""

from __future__ import annotations

import pytest
import torch

from tinyserve import ops

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.bfloat16, torch.float16]
# ‖out − ref‖ / ‖ref‖ bounds: float32 sums rounded once to the dtype.
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}

# (num_tokens, out_features n, in_features k, bias)
CASES = [
    (1, 1, 8, False),
    (1, 7, 24, True),
    (2, 17, 40, False),
    (3, 97, 72, True),
    (7, 33, 1000, False),
    (8, 300, 136, True),
    (8, 64, 4096, False),  # few row blocks, long rows: split-K across a cluster on sm_90
    (9, 130, 1032, True),  # 9-16 rows: the 16-token-row kernel
    (16, 1000, 2056, False),
    (16, 40, 8, True),
    (1, 130, 14336, True),  # Llama-3-8B down_proj's k
    (4, 4100, 256, False),  # many row blocks
    (5, 1024, 3072, True),  # Qwen3-0.6B down_proj
]


def _inputs(m: int, n: int, k: int, bias: bool, dtype: torch.dtype, device: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    w = torch.randn(n, k, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    b = torch.randn(n, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) if bias else None
    return x, w, b


def _check(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    ref = x.double().cpu() @ w.double().cpu().T
    if b is not None:
        ref += b.double().cpu()
    got = out.double().cpu()
    assert got.shape == ref.shape
    assert torch.isfinite(got).all(), "non-finite (unwritten?) output elements"
    err = (got - ref).norm() / ref.norm().clamp_min(1e-30)
    worst = (got - ref).abs().argmax().item()
    assert err < TOL[x.dtype], (
        f"relative error {err:.3g} > {TOL[x.dtype]} for {x.dtype} x {tuple(x.shape)}, weight "
        f"{tuple(w.shape)}, bias {b is not None}; worst element {divmod(worst, ref.shape[1])}: "
        f"got {got.flatten()[worst]:.6g}, want {ref.flatten()[worst]:.6g}"
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "m{}_n{}_k{}{}".format(*c[:3], "_bias" if c[3] else ""))
def test_skinny_linear(case, dtype, device):
    m, n, k, bias = case
    x, w, b = _inputs(m, n, k, bias, dtype, device, seed=m * 1000 + n + k)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=device)  # poison: every element is written
    res = ops.skinny_linear(x, w, b, out=out)
    assert res.data_ptr() == out.data_ptr()
    _check(out, x, w, b)
    _check(ops.skinny_linear(x, w, b), x, w, b)  # a new output tensor


@pytest.mark.parametrize("device", DEVICES)
def test_skinny_linear_empty(device):
    x = torch.randn(0, 16, dtype=torch.bfloat16, device=device)
    w = torch.randn(5, 16, dtype=torch.bfloat16, device=device)
    assert ops.skinny_linear(x, w).shape == (0, 5)
    assert ops.skinny_linear(torch.randn(3, 16, dtype=torch.bfloat16, device=device), w[:0]).shape == (3, 0)
    b = torch.randn(4, dtype=torch.float16, device=device)
    empty_k = ops.skinny_linear(torch.randn(2, 0, dtype=torch.float16, device=device), b[:, None][:, :0], b)
    torch.testing.assert_close(empty_k, b.expand(2, 4))  # k = 0: the bias alone


def _bad(shape_x=(2, 16), shape_w=(4, 16), x_dtype=torch.bfloat16, w_dtype=torch.bfloat16):
    return torch.randn(shape_x).to(x_dtype), torch.randn(shape_w).to(w_dtype)


@pytest.mark.parametrize(
    "args,exc,match",
    [
        (_bad(x_dtype=torch.float32), TypeError, "supported: float16, bfloat16"),
        (_bad(w_dtype=torch.float16), TypeError, "weight has dtype float16 but x has bfloat16"),
        (_bad((2, 12), (4, 12)), ValueError, r"in_features \(12\) must be a multiple of 8"),
        (_bad((17, 16)), ValueError, "x has 17 rows; skinny_linear takes at most 16"),
        (_bad((2, 16), (4, 24)), ValueError, "in_features differ"),
        (_bad((16,)), ValueError, "must be 2-D"),
        (_bad((2, 16), (4, 16, 1)), ValueError, "must be 2-D"),
        (([[1.0]], torch.randn(1, 8)), TypeError, "x must be a torch.Tensor"),
    ],
)
def test_skinny_linear_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        ops.skinny_linear(*args)
    if isinstance(args[0], torch.Tensor):
        assert not ops.skinny_linear_supported(*args)


def test_skinny_linear_rejects_strided_and_bad_bias_or_out():
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    w = torch.randn(4, 32, dtype=torch.bfloat16)
    assert ops.skinny_linear_supported(x, w)
    with pytest.raises(ValueError, match="x must be contiguous"):
        ops.skinny_linear(torch.randn(2, 64, dtype=torch.bfloat16)[:, :32], w)
    with pytest.raises(ValueError, match="weight must be contiguous"):
        ops.skinny_linear(x, w.t().contiguous().t())
    with pytest.raises(ValueError, match=r"bias must be \[4\]"):
        ops.skinny_linear(x, w, torch.randn(5, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="bias has dtype float32"):
        ops.skinny_linear(x, w, torch.randn(4))
    with pytest.raises(ValueError, match="out must be"):
        ops.skinny_linear(x, w, out=torch.empty(4, 2, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out must be contiguous"):
        ops.skinny_linear(x, w, out=torch.empty(4, 2, dtype=torch.bfloat16).t())


@pytest.mark.cuda
def test_skinny_linear_cuda_rejects_misaligned_and_mixed_devices():
    w = torch.randn(4, 16, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(1, 17, dtype=torch.bfloat16, device="cuda")[:, 1:]  # one row: contiguous, 2 bytes in
    assert x.is_contiguous() and x.data_ptr() % 16
    assert not ops.skinny_linear_supported(x, w)
    with pytest.raises(ValueError, match="16-byte boundary"):
        ops.skinny_linear(x, w)
    with pytest.raises(ValueError, match="one device"):
        ops.skinny_linear(torch.randn(1, 16, dtype=torch.bfloat16), w)


@pytest.mark.cuda
@pytest.mark.parametrize("case", [(3, 300, 136), (8, 64, 4096), (12, 1000, 2056)], ids=str)
def test_skinny_linear_cuda_deterministic(case):
    x, w, b = _inputs(*case, True, torch.bfloat16, "cuda", seed=5)
    assert torch.equal(ops.skinny_linear(x, w, b), ops.skinny_linear(x, w, b))


@pytest.mark.cuda
def test_skinny_linear_captures_in_a_cuda_graph():
    """Both kernels (<= 8 and 9-16 rows), with and without split-K, replayed on new inputs."""
    cases = [(1, 4100, 256, True), (8, 64, 4096, False), (12, 1000, 2056, True)]
    inputs = [_inputs(*c, torch.bfloat16, "cuda", seed=i) for i, c in enumerate(cases)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph
        for x, w, b in inputs:
            ops.skinny_linear(x, w, b)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [ops.skinny_linear(x, w, b) for x, w, b in inputs]
    for x, _, _ in inputs:
        x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    for out, (x, w, b) in zip(outs, inputs, strict=True):
        _check(out, x, w, b)
