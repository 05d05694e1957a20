"""ops.fused_mlp (the decoder layer's o product, residual add, RMSNorm, gate/up product, SiLU-and-mul,
down product and output add in one op) against the unfused ops and a float64 reference, on the CPU
twin and CUDA; its grid barriers' counters, CUDA-graph replay and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tinyserve import ops

from .cuda_graph import capture
from .tolerance import close_to_scale as _close

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
EPS = 1e-6


def _weights(h: int, inter: int, dtype: torch.dtype, device: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    norm = (1 + 0.1 * torch.randn(h, generator=g)).to(dtype)
    gate_up = (torch.randn(2 * inter, h, generator=g) * h**-0.5).to(dtype)
    down = (torch.randn(h, inter, generator=g) * inter**-0.5).to(dtype)
    return norm.to(device), gate_up.to(device), down.to(device)


def _stream(m: int, h: int, dtype: torch.dtype, device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, h, generator=g).to(dtype).to(device), torch.randn(m, h, generator=g).to(dtype).to(
        device
    )


def _unfused(residual, hidden, norm, gate_up, down):
    """The unfused ops in the decoder layer's order: (mlp output, new residual)."""
    residual, hidden = residual.clone(), hidden.clone() if hidden is not None else None
    if hidden is None:
        x = ops.rms_norm(residual, norm, EPS)
    else:
        ops.fused_add_rms_norm(hidden, residual, norm, EPS)
        x = hidden
    y = F.linear(ops.silu_and_mul(F.linear(x, gate_up)), down)
    return y, residual


def _float64(residual, hidden, norm, gate_up, down):
    r = residual.double() + (hidden.double() if hidden is not None else 0)
    x = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + EPS) * norm.double()
    gu = x @ gate_up.double().T
    inter = down.shape[1]
    return (F.silu(gu[:, :inter]) * gu[:, inter:]) @ down.double().T, r


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("m", "h", "inter"), [(1, 1024, 3072), (2, 200, 328), (1, 256, 1024), (2, 64, 2056), (1, 2048, 14336)]
)
@pytest.mark.parametrize("mode", ["hidden", "no hidden", "hidden into residual"])
def test_matches_unfused_ops(device, dtype, m, h, inter, mode) -> None:
    norm, gate_up, down = _weights(h, inter, dtype, device, seed=m + h)
    residual, hidden = _stream(m, h, dtype, device, seed=inter)
    if mode == "no hidden":
        hidden = None
    y_ref, r_ref = _unfused(residual, hidden, norm, gate_up, down)
    y64, r64 = _float64(residual, hidden, norm, gate_up, down)
    workspace = ops.fused_mlp_workspace(m, h, inter, dtype, device)
    res, hid = residual.clone(), hidden.clone() if hidden is not None else None
    what = f"{device} {dtype} m={m} H={h} I={inter} {mode}"
    if mode == "hidden into residual":  # residual += hidden, then += y: two rounded adds
        out = ops.fused_mlp(res, norm, EPS, gate_up, down, workspace, hidden=hid, out=res)
        assert out is res and torch.equal(hid, hidden)
        _close(out, r_ref + y_ref, what + " vs unfused", 2e-2)
        _close(out, r64 + y64, what + " vs float64", 4e-2)
        return
    out = ops.fused_mlp(res, norm, EPS, gate_up, down, workspace, hidden=hid)
    if hidden is not None:
        assert out.data_ptr() == hid.data_ptr()  # in place by default
        assert torch.equal(res, r_ref), what  # the residual add rounds exactly as the unfused one
        _close(out, y_ref, what + " vs unfused", 2e-2)
        _close(out, y64, what + " vs float64", 4e-2)
    else:
        assert out.data_ptr() == res.data_ptr()
        _close(out, r_ref + y_ref, what + " vs unfused", 2e-2)
        _close(out, r64 + y64, what + " vs float64", 4e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_separate_out(device) -> None:
    norm, gate_up, down = _weights(128, 256, torch.bfloat16, device, seed=1)
    residual, hidden = _stream(2, 128, torch.bfloat16, device, seed=2)
    y_ref, r_ref = _unfused(residual, hidden, norm, gate_up, down)
    out = torch.full_like(hidden, 7.0)
    hid = hidden.clone()
    got = ops.fused_mlp(
        residual,
        norm,
        EPS,
        gate_up,
        down,
        ops.fused_mlp_workspace(2, 128, 256, torch.bfloat16, device),
        hidden=hid,
        out=out,
    )
    assert got is out and torch.equal(hid, hidden)  # hidden is only read
    assert torch.equal(residual, r_ref)
    _close(out, y_ref, "separate out", 2e-2)


def _check_repeats_and_replays(step, residual0: torch.Tensor, workspace: torch.Tensor, barriers: int) -> None:
    """step(residual) runs several fused_mlp launches on the stream in place: back-to-back eager runs
    and CUDA-graph replays all give the first run's result (a fixed summation order), and after each
    the barriers' words (one u32 in every two) are ready for the next launch: their low 31 bits are
    zero (the top bit flips at every barrier), and the spare words stay zero."""

    def counters_ready() -> bool:
        torch.cuda.synchronize()
        words = workspace[: 8 * barriers].view(torch.int32).cpu()
        return bool(((words[0::2] & 0x7FFFFFFF) == 0).all()) and bool((words[1::2] == 0).all())

    eager = step(residual0.clone())
    assert counters_ready()
    for _ in range(3):
        assert torch.equal(step(residual0.clone()), eager)
    stream = residual0.clone()
    graph, result = capture(lambda: step(stream))
    for _ in range(3):
        stream.copy_(residual0)
        graph.replay()
        assert torch.equal(result, eager)
    assert counters_ready()


@pytest.mark.cuda
def test_cuda_repeated_calls_and_graph_replay() -> None:
    """The grid barriers' words are ready again after every launch, so back-to-back launches (as the
    layers of one step make) and graph replays give the eager result every time."""
    dtype, device, m, h, inter = torch.bfloat16, "cuda", 2, 1024, 3072
    layers = [_weights(h, inter, dtype, device, seed=s) for s in range(3)]
    residual0, hidden0 = _stream(m, h, dtype, device, seed=5)
    workspace = ops.fused_mlp_workspace(m, h, inter, dtype, device)

    def step(residual: torch.Tensor) -> torch.Tensor:
        for norm, gate_up, down in layers:
            ops.fused_mlp(residual, norm, EPS, gate_up, down, workspace)
        return residual

    _check_repeats_and_replays(step, residual0, workspace, barriers=2)
    # with hidden, against the unfused ops, after the graph runs
    norm, gate_up, down = layers[0]
    res, hid = residual0.clone(), hidden0.clone()
    y_ref, r_ref = _unfused(residual0, hidden0, norm, gate_up, down)
    ops.fused_mlp(res, norm, EPS, gate_up, down, workspace, hidden=hid)
    assert torch.equal(res, r_ref)
    _close(hid, y_ref, "after graph", 2e-2)


@pytest.mark.cuda
def test_cuda_supported_sizes() -> None:
    """The kernel keeps x and a of every row in shared memory as floats: Llama-3-8B's MLP fits at 1
    and 2 rows; an intermediate of 32,768 at 2 rows (256 KB) does not, and that is refused with a
    clear error."""
    assert ops.fused_mlp_supported(1, 4096, 14336, torch.bfloat16, "cuda")
    assert ops.fused_mlp_supported(2, 4096, 14336, torch.bfloat16, "cuda")
    assert not ops.fused_mlp_supported(2, 1024, 32768, torch.bfloat16, "cuda")
    assert not ops.fused_mlp_supported(1, 1024, 3072, torch.float32, "cuda")
    assert not ops.fused_mlp_supported(3, 1024, 3072, torch.bfloat16, "cuda")
    norm, gate_up, down = _weights(1024, 32768, torch.bfloat16, "cuda", seed=3)
    residual, _ = _stream(2, 1024, torch.bfloat16, "cuda", seed=4)
    ws = ops.fused_mlp_workspace(2, 1024, 32768, torch.bfloat16, "cuda")
    with pytest.raises(ValueError, match="shared memory"):
        ops.fused_mlp(residual, norm, EPS, gate_up, down, ws)
    # with the o product, the attention output of every row is staged too
    assert ops.fused_mlp_supported(2, 4096, 14336, torch.bfloat16, "cuda", attn=4096)
    assert not ops.fused_mlp_supported(2, 1024, 3072, torch.bfloat16, "cuda", attn=32768)


def test_bad_input() -> None:
    dtype = torch.bfloat16
    norm, gate_up, down = _weights(64, 96, dtype, "cpu", seed=0)
    residual, hidden = _stream(2, 64, dtype, "cpu", seed=0)
    ws = ops.fused_mlp_workspace(2, 64, 96, dtype, "cpu")
    with pytest.raises(ValueError, match="1 to 2 rows"):
        ops.fused_mlp(torch.zeros(3, 64, dtype=dtype), norm, EPS, gate_up, down, ws)
    with pytest.raises(TypeError, match="float16, bfloat16"):
        ops.fused_mlp(residual.float(), norm.float(), EPS, gate_up.float(), down.float(), ws)
    with pytest.raises(ValueError, match="gate_up_weight"):
        ops.fused_mlp(residual, norm, EPS, gate_up[:100], down, ws)
    with pytest.raises(ValueError, match="norm_weight must be"):
        ops.fused_mlp(residual, norm[:32], EPS, gate_up, down, ws)
    with pytest.raises(ValueError, match="out must be None"):
        ops.fused_mlp(residual, norm, EPS, gate_up, down, ws, out=hidden)
    with pytest.raises(ValueError, match="must not overlap residual"):
        ops.fused_mlp(residual, norm, EPS, gate_up, down, ws, hidden=residual)
    with pytest.raises(ValueError, match="overlap none"):
        ops.fused_mlp(residual, norm, EPS, gate_up, down, ws, hidden=hidden, out=residual[:])
    o = (torch.randn(64, 32) * 0.1).to(dtype)
    with pytest.raises(ValueError, match="o_weight needs hidden"):
        ops.fused_mlp(residual, norm, EPS, gate_up, down, ws, o_weight=o)
    with pytest.raises(ValueError, match="attention output"):
        ops.fused_mlp(residual, norm, EPS, gate_up, down, ws, hidden=hidden, o_weight=o)
    with pytest.raises(ValueError, match="o_weight must be"):
        ops.fused_mlp(residual, norm, EPS, gate_up, down, ws, hidden=hidden[:, :32], o_weight=o[:32])
    with pytest.raises(ValueError, match="contiguous"):
        ops.fused_mlp(residual, norm, EPS, gate_up.T.contiguous().T, down, ws)
    with pytest.raises(TypeError, match="dtype"):
        ops.fused_mlp(residual, norm, EPS, gate_up.half(), down, ws)


def _o_weight(h: int, q: int, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(h, q, generator=g) * q**-0.5).to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("m", "h", "q", "inter"),
    [
        (1, 1024, 2048, 3072),
        (2, 1024, 2048, 3072),
        (2, 200, 136, 328),
        (1, 4096, 4096, 1024),
        (2, 64, 2056, 96),
    ],
)
@pytest.mark.parametrize("separate", [False, True], ids=["into-residual", "separate-out"])
def test_with_o_matches_unfused_ops(device, dtype, m, h, q, inter, separate) -> None:
    """With o_weight, hidden is the attention output: the o product (rounded) comes first, then the
    block as without it."""
    norm, gate_up, down = _weights(h, inter, dtype, device, seed=m + h)
    o = _o_weight(h, q, dtype, device, seed=q)
    residual, _ = _stream(m, h, dtype, device, seed=inter)
    attn = torch.randn(m, q, generator=torch.Generator().manual_seed(m * q)).to(dtype).to(device)
    o_out = F.linear(attn, o)  # the unfused o product, rounded to dtype
    y_ref, r_ref = _unfused(residual, o_out, norm, gate_up, down)
    y64, r64 = _float64(residual, attn.double() @ o.double().T, norm, gate_up, down)
    workspace = ops.fused_mlp_workspace(m, h, inter, dtype, device)
    res, a = residual.clone(), attn.clone()
    what = f"{device} {dtype} m={m} H={h} Q={q} I={inter} separate={separate}"
    if separate:
        out = torch.full_like(residual, 3.0)
        got = ops.fused_mlp(res, norm, EPS, gate_up, down, workspace, hidden=a, out=out, o_weight=o)
        assert got is out and torch.equal(a, attn)
        _close(res, r_ref, what + " residual vs unfused", 1e-2)
        _close(out, y_ref, what + " vs unfused", 2e-2)
        _close(out, y64, what + " vs float64", 4e-2)
    else:
        got = ops.fused_mlp(res, norm, EPS, gate_up, down, workspace, hidden=a, o_weight=o)
        assert got is res and torch.equal(a, attn)
        _close(res, r_ref + y_ref, what + " vs unfused", 2e-2)
        _close(res, r64 + y64, what + " vs float64", 4e-2)


@pytest.mark.cuda
def test_cuda_with_o_repeated_calls_and_graph_replay() -> None:
    """Both grid barriers' words are ready again after every launch: back-to-back launches with the o
    product and graph replays give the eager result every time."""
    dtype, device, m, h, q, inter = torch.bfloat16, "cuda", 2, 1024, 2048, 3072
    layers = [
        (*_weights(h, inter, dtype, device, seed=s), _o_weight(h, q, dtype, device, seed=s)) for s in range(3)
    ]
    residual0, _ = _stream(m, h, dtype, device, seed=6)
    attn = torch.randn(m, q, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    workspace = ops.fused_mlp_workspace(m, h, inter, dtype, device)

    def step(residual: torch.Tensor) -> torch.Tensor:
        for norm, gate_up, down, o in layers:
            ops.fused_mlp(residual, norm, EPS, gate_up, down, workspace, hidden=attn, o_weight=o)
        return residual

    _check_repeats_and_replays(step, residual0, workspace, barriers=2)
