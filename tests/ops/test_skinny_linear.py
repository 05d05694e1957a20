"""tinyserve.ops.skinny_linear (the decode-time GEMM, CPU twin and CUDA kernel) against a float64
reference: awkward n and k (tails of the 8-row mma tiles, 32-row blocks and 64-wide k steps), 1-16
token rows (both CUDA kernels), bias or none, split-K shapes, CUDA-graph capture, and rejected inputs."""

from __future__ import annotations

import pytest
import torch

from tinyserve import ops

from .cuda_graph import capture

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
@pytest.mark.parametrize("unroll", [2, 4])
def test_skinny_linear(case, dtype, device, unroll):
    m, n, k, bias = case
    x, w, b = _inputs(m, n, k, bias, dtype, device, seed=m * 1000 + n + k)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=device)  # poison: every element is written
    res = ops.skinny_linear(x, w, b, out=out, unroll=unroll)
    assert res.data_ptr() == out.data_ptr()
    _check(out, x, w, b)
    _check(ops.skinny_linear(x, w, b, unroll=unroll), x, w, b)  # a new output tensor


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
    graph, outs = capture(lambda: [ops.skinny_linear(x, w, b) for x, w, b in inputs])
    for x, _, _ in inputs:
        x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    for out, (x, w, b) in zip(outs, inputs, strict=True):
        _check(out, x, w, b)


# ---- fused prologue (RMSNorm or SiLU-and-mul of x) and epilogue (residual add) -------------------
# (num_tokens, out_features n, in_features k, bias)
FUSED_CASES = [
    (1, 40, 64, False),
    (3, 97, 1032, True),
    (8, 64, 4096, False),  # split-K across a cluster on sm_90
    (12, 130, 1024, True),  # the 16-token-row kernel
    (16, 4096, 1024, False),  # no split-K: 16 rows of the whole k staged beside the static buffers
    (1, 1024, 3072, False),  # Qwen3-0.6B down_proj
    (16, 40, 14336, True),  # a block's range of x too large to stage in shared memory: per-fragment prologue
]


def _case_id(c) -> str:
    return "m{}_n{}_k{}{}".format(*c[:3], "_bias" if c[3] else "")


def _fused_inputs(case, dtype, device, seed):
    m, n, k, bias = case
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    # Weights scaled like a trained layer's, so the residual and the product are of one magnitude.
    return rnd(m, k), rnd(n, k, scale=k**-0.5), rnd(n) if bias else None, rnd(k), rnd(m, n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", FUSED_CASES, ids=_case_id)
def test_skinny_linear_norm_prologue(case, dtype, device):
    """norm_weight: the product of rms_norm(x) (the op as it stores it), x itself untouched."""
    x, w, b, gamma, _ = _fused_inputs(case, dtype, device, seed=sum(case[:3]))
    x0 = x.clone()
    out = ops.skinny_linear(x, w, b, norm_weight=gamma, eps=1e-5)
    assert torch.equal(x, x0)
    _check(out, ops.rms_norm(x, gamma, 1e-5), w, b)
    # The norm matters: the plain product is far off.
    with pytest.raises(AssertionError):
        _check(out, x, w, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", FUSED_CASES, ids=_case_id)
def test_skinny_linear_silu_prologue(case, dtype, device):
    """silu_input: x is [gate | up]; the product takes silu_and_mul(x) as that op stores it."""
    m, n, k, bias = case
    x, w, b, _, _ = _fused_inputs((m, n, 2 * k, bias), dtype, device, seed=sum(case[:3]))
    w = w[:, :k].contiguous()
    out = ops.skinny_linear(x, w, b, silu_input=True)
    assert out.shape == (m, n)
    _check(out, ops.silu_and_mul(x), w, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", FUSED_CASES, ids=_case_id)
@pytest.mark.parametrize("prologue", ["plain", "norm", "silu"])
@pytest.mark.parametrize("unroll", [2, 4])
def test_skinny_linear_residual_epilogue(case, dtype, device, prologue, unroll):
    """residual: out = residual + T(product), in place (out=residual) or into a separate out; equal
    to the unfused product followed by the add, up to the product's summation order."""
    m, n, k, bias = case
    kx = 2 * k if prologue == "silu" else k
    x, w, b, gamma, res = _fused_inputs((m, n, kx, bias), dtype, device, seed=7 + sum(case[:3]))
    w = w[:, :k].contiguous()
    gamma = gamma[:k].contiguous()
    kw = {"norm": {"norm_weight": gamma, "eps": 1e-6}, "silu": {"silu_input": True}}.get(prologue, {})
    kw["unroll"] = unroll
    operand = {"norm": lambda: ops.rms_norm(x, gamma, 1e-6), "silu": lambda: ops.silu_and_mul(x)}.get(
        prologue, lambda: x
    )()
    product = ops.skinny_linear(x, w, b, **kw)
    _check(product, operand, w, b)

    separate = torch.full_like(res, float("nan"))
    res0 = res.clone()
    got = ops.skinny_linear(x, w, b, out=separate, residual=res, **kw)
    assert got.data_ptr() == separate.data_ptr() and torch.equal(res, res0)
    # The same kernel without the add gave `product`: the add must be exactly T(product) + residual.
    assert torch.equal(got, (product.float() + res.float()).to(dtype))

    inplace = ops.skinny_linear(x, w, b, out=res, residual=res, **kw)
    assert inplace.data_ptr() == res.data_ptr()
    assert torch.equal(res, got)


def test_skinny_linear_fusion_bad_input():
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    w = torch.randn(4, 32, dtype=torch.bfloat16)
    g = torch.randn(32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="unroll must be 2 or 4"):
        ops.skinny_linear(x, w, unroll=3)
    with pytest.raises(ValueError, match="cannot be combined"):
        ops.skinny_linear(torch.randn(2, 64, dtype=torch.bfloat16), w, norm_weight=g, silu_input=True)
    with pytest.raises(ValueError, match=r"norm_weight must be a contiguous \[32\]"):
        ops.skinny_linear(x, w, norm_weight=g[:16])
    with pytest.raises(TypeError, match="norm_weight must be bfloat16"):
        ops.skinny_linear(x, w, norm_weight=g.float())
    with pytest.raises(ValueError, match=r"with silu_input, x must be \[num_tokens, 2 \* in_features\]"):
        ops.skinny_linear(x, w, silu_input=True)
    assert not ops.skinny_linear_supported(x, w, silu_input=True)
    assert ops.skinny_linear_supported(torch.randn(2, 64, dtype=torch.bfloat16), w, silu_input=True)
    with pytest.raises(ValueError, match=r"residual must be a contiguous \[2, 4\]"):
        ops.skinny_linear(x, w, residual=torch.zeros(4, 2, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="residual must be bfloat16"):
        ops.skinny_linear(x, w, residual=torch.zeros(2, 4))
    both = torch.randn(2, 36, dtype=torch.bfloat16)  # x and out/residual in one buffer
    with pytest.raises(ValueError, match="must not overlap"):
        ops.skinny_linear(both.view(-1)[:64].view(2, 32), w, out=both.view(-1)[60:68].view(2, 4))
    with pytest.raises(ValueError, match="must not overlap"):
        ops.skinny_linear(both.view(-1)[:64].view(2, 32), w, residual=both.view(-1)[60:68].view(2, 4))


@pytest.mark.cuda
def test_skinny_linear_fused_captures_and_ignores_launch_mode():
    """The fused forms in a CUDA graph, replayed on new inputs; with programmatic dependent launch
    on and off the results are bit-identical (it changes when blocks start, not what they sum)."""
    case = (4, 1024, 3072, True)
    x, w, b, gamma, res = _fused_inputs(case, torch.bfloat16, "cuda", seed=3)
    gu = torch.randn(4, 2 * 3072, dtype=torch.bfloat16, device="cuda")
    w2 = torch.randn(3072, 1024, dtype=torch.bfloat16, device="cuda") * 0.03

    def chain():
        h = ops.skinny_linear(x, w, b, norm_weight=gamma, eps=1e-6)  # [4, 1024]
        up = ops.skinny_linear(h, w2)  # [4, 3072]
        r = res.clone()
        ops.skinny_linear(gu, w, b, silu_input=True, residual=r, out=r)
        return h, up, r

    results = {}
    try:
        for mode in (False, True):
            ops.set_programmatic_launch(mode)
            eager = chain()
            graph, outs = capture(chain)
            graph.replay()
            torch.cuda.synchronize()
            for e, o in zip(eager, outs, strict=True):
                assert torch.equal(e, o)
            results[mode] = eager
    finally:
        ops.set_programmatic_launch(None)
    for a, c in zip(results[False], results[True], strict=True):
        assert torch.equal(a, c)
    _check(results[True][0], ops.rms_norm(x, gamma, 1e-6), w, b)
