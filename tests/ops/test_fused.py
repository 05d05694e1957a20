"""tinyserve.ops fused decoder-layer ops: rms_norm, fused_add_rms_norm, rotary_embedding (+ q/k norm),
silu_and_mul, against the float64 references of ops/reference.py and the PyTorch formulas they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tinyserve import ops
from tinyserve.ops.reference import (
    fused_add_rms_norm_ref,
    rms_norm_ref,
    rotary_embedding_ref,
    silu_and_mul_ref,
)

from .cuda_graph import capture

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# ||out - ref|| / ||ref|| against the float64 reference: a few roundings to the dtype.
REL_TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def _randn(*shape, seed: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(device)


def _weight(n: int, seed: int, dtype, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1000)
    return (1 + 0.2 * torch.randn(n, generator=g)).to(dtype).to(device)


def _assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    out64 = out.detach().cpu().double()
    assert not out64.isnan().any(), f"{what}: NaN in the output (unwritten or poisoned elements)"
    err = ((out64 - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    if err >= REL_TOL[dtype]:
        diff = (out64 - ref).abs()
        worst = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(
            f"{what}: relative error {err:.3g} >= {REL_TOL[dtype]:.1g} ({dtype}); worst element {worst}: "
            f"got {out64[worst].item():.6g}, want {ref[worst].item():.6g}"
        )


# ---- rms_norm -------------------------------------------------------------------------------------

ROW_SHAPES = [(1, 64), (7, 97), (17, 1024), (97, 4096), (3, 8), (5, 130), (2, 1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=lambda s: "t{}-h{}".format(*s))
@pytest.mark.parametrize("given_out", [False, True], ids=["new-out", "given-out"])
def test_rms_norm(device, dtype, shape, given_out):
    seed = sum(shape)
    x = _randn(*shape, seed=seed, dtype=dtype, device=device)
    w = _weight(shape[1], seed, dtype, device)
    out = torch.full(shape, float("nan"), dtype=dtype, device=device) if given_out else None
    x_before = x.clone()
    got = ops.rms_norm(x, w, 1e-5, out=out)
    if given_out:
        assert got is out
    assert got.shape == x.shape and got.dtype == dtype
    assert torch.equal(x, x_before), "x must not change"
    _assert_close(got, rms_norm_ref(x, w, 1e-5), dtype, f"rms_norm {shape}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_transformers_order(device, dtype):
    """weight * T(x * rsqrt(mean(x^2) + eps)): within one ulp of LlamaRMSNorm's formula."""
    x = _randn(33, 256, seed=3, dtype=dtype, device=device) * 3
    w = _weight(256, 3, dtype, device)
    x32 = x.float()
    want = w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    got = ops.rms_norm(x, w, 1e-6)
    ulp = {torch.float32: 2.0**-21, torch.float16: 2.0**-9, torch.bfloat16: 2.0**-6}[dtype]  # ~2 ulp
    torch.testing.assert_close(got, want, rtol=ulp, atol=1e-6)
    if dtype != torch.float32:  # float32 keeps the sum-order difference; 16-bit types round it away
        assert (got == want).float().mean() > 0.9


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_3d_strided_heads(device, dtype):
    """Qwen3's per-head q norm on a strided view of a fused qkv output, out-of-place and in place."""
    num_tokens, num_heads, num_kv_heads, head_dim = 13, 6, 2, 128
    qkv = _randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, seed=5, dtype=dtype, device=device)
    q = qkv[:, :num_heads]  # [num_tokens, num_heads, head_dim], token stride (num_heads + 4) * head_dim
    assert not q.is_contiguous()
    w = _weight(head_dim, 5, dtype, device)
    ref = rms_norm_ref(q, w, 1e-6)
    _assert_close(ops.rms_norm(q, w, 1e-6), ref, dtype, "3-D")
    rest = qkv[:, num_heads:].clone()
    assert ops.rms_norm(q, w, 1e-6, out=q) is q  # in place
    _assert_close(q, ref, dtype, "3-D in place")
    assert torch.equal(qkv[:, num_heads:], rest), "k/v heads must not be touched"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
def test_rms_norm_strided_rows(device, dtype, offset):
    """Rows of a wider buffer; offset 1 breaks 16-byte alignment (the scalar path)."""
    hidden = 96
    buf = _randn(9, hidden + 16, seed=6, dtype=dtype, device=device)
    x = buf[:, offset : offset + hidden]
    w = _weight(hidden, 6, dtype, device)
    out_buf = torch.full((9, hidden + 8), float("nan"), dtype=dtype, device=device)
    out = out_buf[:, 8:]
    ops.rms_norm(x, w, 1e-5, out=out)
    _assert_close(out, rms_norm_ref(x, w, 1e-5), dtype, "strided")
    assert out_buf[:, :8].isnan().all(), "wrote outside out"


# ---- fused_add_rms_norm -------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=lambda s: "t{}-h{}".format(*s))
def test_fused_add_rms_norm(device, dtype, shape):
    seed = 7 + sum(shape)
    x = _randn(*shape, seed=seed, dtype=dtype, device=device)
    residual = _randn(*shape, seed=seed + 1, dtype=dtype, device=device)
    w = _weight(shape[1], seed, dtype, device)
    want_out, want_residual = fused_add_rms_norm_ref(x, residual, w, 1e-6)
    ops.fused_add_rms_norm(x, residual, w, 1e-6)
    assert torch.equal(residual.cpu(), want_residual), "residual must be exactly x + residual in the dtype"
    _assert_close(x, want_out, dtype, f"fused_add_rms_norm {shape}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
def test_fused_add_rms_norm_strided(device, dtype, offset):
    hidden = 64
    xb = _randn(11, hidden + 8, seed=8, dtype=dtype, device=device)
    rb = _randn(11, hidden + 8, seed=9, dtype=dtype, device=device)
    x, residual = xb[:, offset : offset + hidden], rb[:, 8:]
    w = _weight(hidden, 8, dtype, device)
    want_out, want_residual = fused_add_rms_norm_ref(x, residual, w, 1e-6)
    rb_head = rb[:, :8].clone()
    ops.fused_add_rms_norm(x, residual, w, 1e-6)
    assert torch.equal(residual.cpu(), want_residual)
    _assert_close(x, want_out, dtype, "strided fused add")
    assert torch.equal(rb[:, :8], rb_head), "wrote outside residual"


def test_rms_norm_bad_input():
    x = _randn(4, 16, seed=10)
    w = torch.ones(16)
    cases = [
        (lambda: ops.rms_norm(x.double(), w.double(), 1e-6), TypeError, "x has dtype float64"),
        (lambda: ops.rms_norm(x, w.half(), 1e-6), TypeError, "weight has dtype float16"),
        (lambda: ops.rms_norm(x, torch.ones(15), 1e-6), ValueError, r"weight must be \[16\]"),
        (lambda: ops.rms_norm(x[0], w, 1e-6), ValueError, "must be 2-D"),
        (lambda: ops.rms_norm(x.t(), torch.ones(4), 1e-6), ValueError, "contiguous in its last dimension"),
        (lambda: ops.rms_norm(x, w, 1e-6, out=torch.empty(4, 15)), ValueError, "out has shape"),
        (lambda: ops.rms_norm(x, w, 1e-6, out=x.half()), TypeError, "out has dtype float16"),
        (lambda: ops.rms_norm(x.tolist(), w, 1e-6), TypeError, "x must be a torch.Tensor"),
        (lambda: ops.fused_add_rms_norm(x, x[:3].clone(), w, 1e-6), ValueError, "residual has shape"),
        (lambda: ops.fused_add_rms_norm(x, x.half(), w, 1e-6), TypeError, "residual has dtype"),
        (lambda: ops.fused_add_rms_norm(x, x, w, 1e-6), ValueError, "different tensors"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()


# ---- rotary_embedding ---------------------------------------------------------------------------


def _cos_sin_cache(max_position: int, rotary_dim: int, dtype, device) -> torch.Tensor:
    """[max_position, rotary_dim] = [cos | sin], built as layers/rotary.py builds it."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    freqs = torch.outer(torch.arange(max_position).float(), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype).to(device)


def _torch_rope(
    x: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor, rotary_dim: int
) -> torch.Tensor:
    """The unfused PyTorch formula (transformers' order and dtype) that the kernels reproduce bit for bit."""
    half = rotary_dim // 2
    cos_sin = cache[positions.long()][:, None]  # [num_tokens, 1, rotary_dim]
    cos, sin = cos_sin[..., :half], cos_sin[..., half:]
    x1, x2 = x[..., :half], x[..., half:rotary_dim]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rotary_dim:]], dim=-1)


def _qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device, seed):
    """q, k, v as strided views of one fused qkv output [num_tokens, (h + 2 kv) * head_dim]."""
    qkv = _randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, seed=seed, dtype=dtype, device=device)
    q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(
        num_tokens, num_kv_heads, head_dim
    )
    v = qkv[:, (num_heads + num_kv_heads) * head_dim :]
    return qkv, q, k, v


ROPE_SHAPES = [  # num_tokens, num_heads, num_kv_heads, head_dim, rotary_dim
    (1, 16, 8, 128, 128),  # Qwen3-0.6B decode
    (7, 4, 1, 64, 64),
    (17, 5, 5, 80, 40),  # partial rotary, half = 20 (not a 16-byte multiple in 16-bit types)
    (97, 8, 2, 128, 64),
    (3, 2, 1, 96, 32),
    (5, 3, 1, 34, 34),  # odd half
    (2, 1, 1, 256, 256),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROPE_SHAPES, ids=lambda s: "t{}-h{}-kv{}-d{}-r{}".format(*s))
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
def test_rotary_embedding(device, dtype, shape, pos_dtype):
    num_tokens, num_heads, num_kv_heads, head_dim, rotary_dim = shape
    max_position = 300
    qkv, q, k, v = _qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device, sum(shape))
    cache = _cos_sin_cache(max_position, rotary_dim, dtype, device)
    positions = torch.randint(0, max_position, (num_tokens,), generator=torch.Generator().manual_seed(1))
    positions = positions.to(pos_dtype).to(device)
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    ops.rotary_embedding(positions, q, k, cache, rotary_dim)
    # Bit for bit the PyTorch formula (every product rounded to the dtype, no FMA).
    assert torch.equal(q, _torch_rope(q0, positions, cache, rotary_dim)), (
        "query differs from the torch formula"
    )
    assert torch.equal(k, _torch_rope(k0, positions, cache, rotary_dim)), "key differs from the torch formula"
    assert torch.equal(v, v0), "value must not be touched"
    _assert_close(q, rotary_embedding_ref(positions, q0, cache, rotary_dim), dtype, "query vs float64")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROPE_SHAPES, ids=lambda s: "t{}-h{}-kv{}-d{}-r{}".format(*s))
def test_rotary_embedding_with_qk_norm(device, dtype, shape):
    """Qwen3: per-head RMSNorm of q and k, then RoPE, in one kernel."""
    num_tokens, num_heads, num_kv_heads, head_dim, rotary_dim = shape
    qkv, q, k, v = _qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device, 3 + sum(shape))
    cache = _cos_sin_cache(64, rotary_dim, dtype, device)
    positions = torch.randint(0, 64, (num_tokens,), generator=torch.Generator().manual_seed(2)).to(device)
    qw, kw = _weight(head_dim, 11, dtype, device), _weight(head_dim, 12, dtype, device)
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    ops.rotary_embedding(positions, q, k, cache, rotary_dim, qw, kw, 1e-6)
    assert torch.equal(v, v0), "value must not be touched"
    _assert_close(q, rotary_embedding_ref(positions, q0, cache, rotary_dim, qw, 1e-6), dtype, "normed query")
    _assert_close(k, rotary_embedding_ref(positions, k0, cache, rotary_dim, kw, 1e-6), dtype, "normed key")
    # And close to the unfused torch path: normalise (layers/norm.py's order), then rotate.
    x32 = q0.float()
    normed = qw * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    want = _torch_rope(normed, positions, cache, rotary_dim)
    if dtype == torch.float32:
        torch.testing.assert_close(q, want, rtol=1e-5, atol=1e-6)
    else:  # the sum-order difference is rounded away almost everywhere
        assert (q == want).float().mean() > 0.9, "most elements should match the unfused path bit for bit"


@pytest.mark.parametrize("device", DEVICES)
def test_rotary_embedding_contiguous_and_unaligned(device):
    """Contiguous q/k, and views starting one element in (no 16-byte accesses possible)."""
    dtype, rotary_dim = torch.bfloat16, 64
    cache = _cos_sin_cache(32, rotary_dim, dtype, device)
    positions = torch.arange(9, device=device) * 3
    for offset in (0, 1):
        buf = _randn(9 * 4 * 64 + offset, seed=20 + offset, dtype=dtype, device=device)
        q = buf[offset:].view(9, 4, 64)
        k = _randn(9, 2, 64, seed=22, dtype=dtype, device=device)
        q0, k0 = q.clone(), k.clone()
        ops.rotary_embedding(positions, q, k, cache, rotary_dim)
        assert torch.equal(q, _torch_rope(q0, positions, cache, rotary_dim))
        assert torch.equal(k, _torch_rope(k0, positions, cache, rotary_dim))


def _paged_cache(num_kv_heads, head_dim, dtype, device, block_size=16, num_blocks=9):
    poison = float("nan") if dtype.is_floating_point else 0
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return (
        torch.full(shape, poison, dtype=dtype, device=device),
        torch.full(shape, poison, dtype=dtype, device=device),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROPE_SHAPES, ids=lambda s: "t{}-h{}-kv{}-d{}-r{}".format(*s))
@pytest.mark.parametrize("norm", [False, True], ids=["rope", "qk-norm"])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_rotary_embedding_writes_kv_cache(device, dtype, shape, norm, slot_dtype):
    """With the caches given, the op is rotary_embedding then reshape_and_cache, bit for bit: q and k
    rotated in place, the rotated key and the value in their slots, padding (-1) slots untouched."""
    num_tokens, num_heads, num_kv_heads, head_dim, rotary_dim = shape
    _, q, k, v = _qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device, 5 + sum(shape))
    v = v.view(num_tokens, num_kv_heads, head_dim)
    cos_sin = _cos_sin_cache(300, rotary_dim, dtype, device)
    gen = torch.Generator().manual_seed(sum(shape))
    positions = torch.randint(0, 300, (num_tokens,), generator=gen).to(device)
    slots = torch.randperm(9 * 16, generator=gen)[:num_tokens]
    slots[::3] = -1  # padding tokens
    slots = slots.to(slot_dtype).to(device)
    w = (_weight(head_dim, 1, dtype, device), _weight(head_dim, 2, dtype, device), 1e-6) if norm else ()
    q_ref, k_ref = q.clone(), k.clone()
    kc_ref, vc_ref = _paged_cache(num_kv_heads, head_dim, dtype, device)
    ops.rotary_embedding(positions, q_ref, k_ref, cos_sin, rotary_dim, *w)
    ops.reshape_and_cache(k_ref, v, kc_ref, vc_ref, slots)
    kc, vc = _paged_cache(num_kv_heads, head_dim, dtype, device)
    ops.rotary_embedding(
        positions, q, k, cos_sin, rotary_dim, *w, value=v, key_cache=kc, value_cache=vc, slot_mapping=slots
    )
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref), "q/k differ from the unfused rotation"
    # NaN poison stays NaN where nothing is written: compare with NaNs equal.
    assert torch.equal(kc.nan_to_num(7.0), kc_ref.nan_to_num(7.0)), "key cache differs from reshape_and_cache"
    assert torch.equal(vc.nan_to_num(7.0), vc_ref.nan_to_num(7.0)), (
        "value cache differs from reshape_and_cache"
    )
    written = int((slots >= 0).sum()) * num_kv_heads * head_dim
    assert int(kc.isfinite().sum()) == written and int(vc.isfinite().sum()) == written


@pytest.mark.parametrize("device", DEVICES)
def test_rotary_embedding_kv_cache_bad_input(device):
    cos_sin = _cos_sin_cache(16, 16, torch.float32, device)
    q, k = _randn(3, 4, 16, seed=1, device=device), _randn(3, 2, 16, seed=2, device=device)
    v = _randn(3, 2, 16, seed=3, device=device)
    kc, vc = _paged_cache(2, 16, torch.float32, device, num_blocks=2)
    pos, slots = torch.arange(3, device=device), torch.tensor([0, 1, 2], device=device)
    with pytest.raises(ValueError, match="together, or none"):
        ops.rotary_embedding(pos, q, k, cos_sin, 16, value=v, key_cache=kc, value_cache=vc)
    with pytest.raises(ValueError, match="key and value must both be"):
        ops.rotary_embedding(
            pos, q, k, cos_sin, 16, value=v[:, :1], key_cache=kc, value_cache=vc, slot_mapping=slots
        )
    with pytest.raises(TypeError, match="slot_mapping has dtype float32"):
        ops.rotary_embedding(
            pos, q, k, cos_sin, 16, value=v, key_cache=kc, value_cache=vc, slot_mapping=slots.float()
        )
    if device == "cpu":
        q0 = q.clone()
        with pytest.raises(ValueError, match=r"slot_mapping\[2\] = 99 is outside"):
            ops.rotary_embedding(
                pos,
                q,
                k,
                cos_sin,
                16,
                value=v,
                key_cache=kc,
                value_cache=vc,
                slot_mapping=torch.tensor([0, 1, 99]),
            )
        assert kc.isnan().all() and vc.isnan().all(), "a refused slot leaves the caches untouched"
        assert not torch.equal(q, q0), "q/k were rotated before the slots were checked (documented)"


def _inv_rms64(rows: torch.Tensor, eps: float) -> torch.Tensor:
    """float64 [num_tokens, 1] on the CPU: 1 / sqrt(mean(rows^2) + eps) per row."""
    r = rows.cpu().double()
    return torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROPE_SHAPES, ids=lambda s: "t{}-h{}-kv{}-d{}-r{}".format(*s))
@pytest.mark.parametrize("norm", [False, True], ids=["rope", "qk-norm"])
def test_rotary_embedding_with_folded_norm(device, dtype, shape, norm):
    """rms_of: q, k and v are first scaled by each token's 1 / rms of rms_of (a folded input norm), in
    place; then the op is what it is without rms_of on the scaled heads: rotation (after the q/k norm)
    and the cache write of the rotated key and the scaled value."""
    num_tokens, num_heads, num_kv_heads, head_dim, rotary_dim = shape
    _, q, k, v = _qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device, 9 + sum(shape))
    v = v.view(num_tokens, num_kv_heads, head_dim)
    hidden = 3 * head_dim + 1  # not a multiple of the vector width
    rows = _randn(num_tokens, hidden, seed=sum(shape), dtype=dtype, device=device) * 3
    eps = 1e-5
    cos_sin = _cos_sin_cache(300, rotary_dim, dtype, device)
    gen = torch.Generator().manual_seed(7 + sum(shape))
    positions = torch.randint(0, 300, (num_tokens,), generator=gen).to(device)
    slots = torch.randperm(9 * 16, generator=gen)[:num_tokens]
    slots[1::3] = -1  # padding tokens: their v is still scaled in place, nothing is cached
    slots = slots.to(device)
    w = (_weight(head_dim, 3, dtype, device), _weight(head_dim, 4, dtype, device)) if norm else (None, None)
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    kc, vc = _paged_cache(num_kv_heads, head_dim, dtype, device)
    ops.rotary_embedding(
        positions, q, k, cos_sin, rotary_dim, *w, 1e-6,
        value=v, key_cache=kc, value_cache=vc, slot_mapping=slots, rms_of=rows, rms_eps=eps,
    )  # fmt: skip
    inv = _inv_rms64(rows, eps)  # [num_tokens, 1]
    _assert_close(v, v0.cpu().double() * inv[:, :, None], dtype, "value scaled in place")
    for got, x0, nw, what in ((q, q0, w[0], "query"), (k, k0, w[1], "key")):
        scaled = x0.cpu().double() * inv[:, :, None]
        ref = rotary_embedding_ref(positions, scaled, cos_sin, rotary_dim, nw, 1e-6)
        _assert_close(got, ref, dtype, what)
    # The caches hold exactly the rotated key and the scaled value of the tokens with a slot.
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            block, offset = divmod(slot, 16)
            assert torch.equal(kc[block, offset], k[t]) and torch.equal(vc[block, offset], v[t])
    written = int((slots >= 0).sum()) * num_kv_heads * head_dim
    assert int(kc.isfinite().sum()) == written and int(vc.isfinite().sum()) == written
    # The same op on heads scaled by the PyTorch formula (float32 statistics, rounded to the dtype).
    s32 = torch.rsqrt(rows.float().pow(2).mean(-1, keepdim=True) + eps)[:, :, None]
    qs, ks = (q0.float() * s32).to(dtype), (k0.float() * s32).to(dtype)
    ops.rotary_embedding(positions, qs, ks, cos_sin, rotary_dim, *w, 1e-6)
    for got, want in ((q, qs), (k, ks), (v, (v0.float() * s32).to(dtype))):
        if dtype == torch.float32:  # the statistics' sum order shows in the last bits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        else:  # and is rounded away almost everywhere
            assert (got == want).float().mean() > 0.9


def test_rotary_embedding_folded_norm_bad_input():
    cos_sin = _cos_sin_cache(16, 16, torch.float32, "cpu")
    qkv = _randn(3, 8 * 16, seed=1)
    q, k = qkv[:, :64].view(3, 4, 16), qkv[:, 64:96].view(3, 2, 16)
    v = qkv[:, 96:].view(3, 2, 16)
    kc, vc = _paged_cache(2, 16, torch.float32, "cpu", num_blocks=2)
    pos, slots = torch.arange(3), torch.tensor([0, 1, 2])
    cache = dict(value=v, key_cache=kc, value_cache=vc, slot_mapping=slots)
    rows = _randn(3, 32, seed=2)
    cases = [
        (
            lambda: ops.rotary_embedding(pos, q, k, cos_sin, 16, rms_of=rows),
            ValueError,
            "needs the cache write",
        ),
        (
            lambda: ops.rotary_embedding(pos, q, k, cos_sin, 16, rms_of=rows[:2], **cache),
            ValueError,
            r"rms_of must be \[num_tokens=3",
        ),
        (
            lambda: ops.rotary_embedding(pos, q, k, cos_sin, 16, rms_of=rows.half(), **cache),
            TypeError,
            "rms_of has dtype float16",
        ),
        (
            lambda: ops.rotary_embedding(pos, q, k, cos_sin, 16, rms_of=rows.t().contiguous().t(), **cache),
            ValueError,
            "rms_of must be contiguous",
        ),
        (
            lambda: ops.rotary_embedding(pos, q, k, cos_sin, 16, rms_of=qkv[:, 100:], **cache),
            ValueError,
            "rms_of must not overlap",
        ),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
    assert kc.isnan().all() and vc.isnan().all(), "a refused call writes nothing"


@pytest.mark.cuda
def test_rotary_embedding_kv_cache_position_out_of_range_on_cuda():
    """CUDA leaves a token with an out-of-range position unrotated; its key still goes to the cache as
    it is (what reshape_and_cache after the rotation would write)."""
    cos_sin = _cos_sin_cache(8, 16, torch.bfloat16, "cuda")
    q, k = (
        _randn(2, 2, 16, seed=1, dtype=torch.bfloat16, device="cuda"),
        _randn(2, 1, 16, seed=2, dtype=torch.bfloat16, device="cuda"),
    )
    v = _randn(2, 1, 16, seed=3, dtype=torch.bfloat16, device="cuda")
    kc, vc = _paged_cache(1, 16, torch.bfloat16, "cuda", num_blocks=1)
    positions, slots = torch.tensor([3, 8], device="cuda"), torch.tensor([5, 6], device="cuda")
    k0 = k.clone()
    ops.rotary_embedding(
        positions, q, k, cos_sin, 16, value=v, key_cache=kc, value_cache=vc, slot_mapping=slots
    )
    assert torch.equal(kc[0, 6], k0[1]) and torch.equal(vc[0, 6], v[1])
    assert torch.equal(kc[0, 5], k[0]) and not torch.equal(k[0], k0[0])


def test_rotary_embedding_position_out_of_range_raises_on_cpu():
    cache = _cos_sin_cache(8, 16, torch.float32, "cpu")
    q, k = _randn(2, 2, 16, seed=1), _randn(2, 1, 16, seed=2)
    with pytest.raises(ValueError, match=r"positions\[1\] = 8 is outside"):
        ops.rotary_embedding(torch.tensor([0, 8]), q, k, cache, 16)


@pytest.mark.cuda
def test_rotary_embedding_position_out_of_range_is_skipped_on_cuda():
    cache = _cos_sin_cache(8, 16, torch.float32, "cuda")
    q, k = _randn(2, 2, 16, seed=1, device="cuda"), _randn(2, 1, 16, seed=2, device="cuda")
    q0, k0 = q.clone(), k.clone()
    positions = torch.tensor([3, 8], device="cuda")
    ops.rotary_embedding(positions, q, k, cache, 16)
    assert torch.equal(q[1], q0[1]) and torch.equal(k[1], k0[1]), "an out-of-range token is left as it was"
    assert torch.equal(q[0], _torch_rope(q0[:1], positions[:1], cache, 16)[0])


def test_rotary_embedding_bad_input():
    cache = _cos_sin_cache(16, 16, torch.float32, "cpu")
    q, k = _randn(3, 4, 16, seed=1), _randn(3, 2, 16, seed=2)
    pos = torch.arange(3)
    w = torch.ones(16)
    cases = [
        (lambda: ops.rotary_embedding(pos, q, k.half(), cache, 16), TypeError, "key has dtype float16"),
        (lambda: ops.rotary_embedding(pos, q, k, cache.half(), 16), TypeError, "cos_sin_cache has dtype"),
        (
            lambda: ops.rotary_embedding(pos.float(), q, k, cache, 16),
            TypeError,
            "positions has dtype float32",
        ),
        (
            lambda: ops.rotary_embedding(pos[:2], q, k, cache, 16),
            ValueError,
            r"positions must be \[num_tokens=3\]",
        ),
        (lambda: ops.rotary_embedding(pos, q, k[:2], cache, 16), ValueError, "key"),
        (lambda: ops.rotary_embedding(pos, q, k[..., :8], cache, 16), ValueError, "key"),
        (lambda: ops.rotary_embedding(pos, q[0], k, cache, 16), ValueError, "query must be 3-D"),
        (lambda: ops.rotary_embedding(pos, q, k, cache, 15), ValueError, "rotary_dim must be an even int"),
        (lambda: ops.rotary_embedding(pos, q, k, cache, 18), ValueError, "rotary_dim must be an even int"),
        (lambda: ops.rotary_embedding(pos, q, k, cache, 8), ValueError, "cos_sin_cache must be"),
        (
            lambda: ops.rotary_embedding(pos, q.transpose(1, 2), k, cache, 16),
            ValueError,
            "query must be contiguous",
        ),
        (lambda: ops.rotary_embedding(pos, q, k, cache, 16, w, None), ValueError, "both"),
        (lambda: ops.rotary_embedding(pos, q, k, cache, 16, w, torch.ones(8)), ValueError, r"must be \[16\]"),
        (
            lambda: ops.rotary_embedding(pos, q, k, cache, 16, w, w.half()),
            TypeError,
            "k_norm_weight has dtype",
        ),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()


# ---- silu_and_mul -------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 8), (7, 43), (17, 3072), (97, 256), (3, 1), (2, 14336)], ids=str)
@pytest.mark.parametrize("given_out", [False, True], ids=["new-out", "given-out"])
def test_silu_and_mul(device, dtype, shape, given_out):
    num_tokens, d = shape
    x = _randn(num_tokens, 2 * d, seed=num_tokens + d, dtype=dtype, device=device) * 2
    out = torch.full((num_tokens, d), float("nan"), dtype=dtype, device=device) if given_out else None
    got = ops.silu_and_mul(x, out=out)
    if given_out:
        assert got is out
    assert got.shape == (num_tokens, d) and got.dtype == dtype
    _assert_close(got, silu_and_mul_ref(x), dtype, f"silu_and_mul {shape}")
    # SiluAndMul's PyTorch formula, up to exp's last bit.
    want = F.silu(x[:, :d]) * x[:, d:]
    assert (got == want).float().mean() > 0.9


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
def test_silu_and_mul_strided(device, offset):
    dtype, d = torch.bfloat16, 64
    buf = _randn(5, 2 * d + 16, seed=30, dtype=dtype, device=device)
    x = buf[:, offset : offset + 2 * d]
    out_buf = torch.full((5, d + 8), float("nan"), dtype=dtype, device=device)
    ops.silu_and_mul(x, out=out_buf[:, 8:])
    _assert_close(out_buf[:, 8:], silu_and_mul_ref(x), dtype, "strided silu")
    assert out_buf[:, :8].isnan().all(), "wrote outside out"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape", [(1, 8, 64), (7, 43, 97), (17, 3072, 1024), (3, 1, 5), (2, 14336, 4096)], ids=str
)
def test_silu_and_mul_with_folded_norm(device, dtype, shape):
    """rms_of: each row of x is first scaled by 1 / rms of the same row of rms_of (a folded
    post-attention norm) and rounded to the dtype, then silu(gate) * up."""
    num_tokens, d, hidden = shape
    x = _randn(num_tokens, 2 * d, seed=num_tokens + d, dtype=dtype, device=device) * 6
    rows = _randn(num_tokens, hidden, seed=hidden, dtype=dtype, device=device) * 3
    eps = 1e-5
    got = ops.silu_and_mul(x, rms_of=rows, eps=eps)
    ref = silu_and_mul_ref(x.cpu().double() * _inv_rms64(rows, eps))
    _assert_close(got, ref, dtype, f"folded silu {shape}")
    # The PyTorch formula on the scaled product (float32 statistics, rounded to the dtype), up to exp's
    # last bit and the sum order of the statistics.
    scaled = (x.float() * torch.rsqrt(rows.float().pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    want = F.silu(scaled[:, :d]) * scaled[:, d:]
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    else:
        assert (got == want).float().mean() > 0.9
    out = torch.full((num_tokens, d + 3), float("nan"), dtype=dtype, device=device)[:, 3:]
    ops.silu_and_mul(x, out, rms_of=rows, eps=eps)  # a strided out: the same values
    assert torch.equal(out, got)


def test_silu_and_mul_bad_input():
    x = _randn(4, 16, seed=31)
    cases = [
        (lambda: ops.silu_and_mul(x[:, :15]), ValueError, r"\[num_tokens, 2 \* d\]"),
        (lambda: ops.silu_and_mul(x[0]), ValueError, "2-D"),
        (lambda: ops.silu_and_mul(x.to(torch.int32)), TypeError, "x has dtype int32"),
        (
            lambda: ops.silu_and_mul(x, out=torch.empty(4, 7)),
            ValueError,
            r"out must be \[num_tokens=4, d=8\]",
        ),
        (lambda: ops.silu_and_mul(x, out=torch.empty(4, 8).half()), TypeError, "out has dtype float16"),
        (lambda: ops.silu_and_mul(x.t().contiguous().t()), ValueError, "contiguous in its last dimension"),
        (lambda: ops.silu_and_mul(x, rms_of=x[:3]), ValueError, r"rms_of must be \[num_tokens=4"),
        (lambda: ops.silu_and_mul(x, rms_of=x.half()), TypeError, "rms_of has dtype float16"),
        (lambda: ops.silu_and_mul(x, rms_of=x[:, :0]), ValueError, "hidden > 0"),
        (lambda: ops.silu_and_mul(x, out=x[:, :8], rms_of=x), ValueError, "must not overlap out"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()


# ---- CUDA only: one device, and capture in a CUDA graph ---------------------------------------


@pytest.mark.cuda
def test_fused_ops_mixed_devices():
    x = _randn(4, 16, seed=40, device="cuda")
    with pytest.raises(ValueError, match="one device"):
        ops.rms_norm(x, torch.ones(16), 1e-6)
    with pytest.raises(ValueError, match="one device"):
        ops.fused_add_rms_norm(x, x.cpu(), torch.ones(16, device="cuda"), 1e-6)
    q, k = _randn(2, 2, 16, seed=1, device="cuda"), _randn(2, 1, 16, seed=2, device="cuda")
    cache = _cos_sin_cache(8, 16, torch.float32, "cuda")
    with pytest.raises(ValueError, match="positions is on cpu"):
        ops.rotary_embedding(torch.arange(2), q, k, cache, 16)


@pytest.mark.cuda
def test_fused_ops_capture_in_a_cuda_graph():
    """No host syncs: a decoder layer's worth of fused ops captured once, replayed on new inputs."""
    dtype, num_tokens, hidden, num_heads, num_kv_heads, head_dim, inter = torch.bfloat16, 3, 256, 4, 2, 64, 96
    dev = "cuda"
    x = _randn(num_tokens, hidden, seed=50, dtype=dtype, device=dev)
    residual = _randn(num_tokens, hidden, seed=51, dtype=dtype, device=dev)
    qkv = _randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, seed=52, dtype=dtype, device=dev)
    gate_up = _randn(num_tokens, 2 * inter, seed=53, dtype=dtype, device=dev)
    positions = torch.tensor([0, 5, 9], device=dev)
    w, qw, kw = (
        _weight(hidden, 1, dtype, dev),
        _weight(head_dim, 2, dtype, dev),
        _weight(head_dim, 3, dtype, dev),
    )
    cache = _cos_sin_cache(32, head_dim, dtype, dev)
    q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(
        num_tokens, num_kv_heads, head_dim
    )
    normed = torch.empty_like(x)
    act = torch.empty(num_tokens, inter, dtype=dtype, device=dev)

    def layer():
        ops.rms_norm(x, w, 1e-6, out=normed)
        ops.fused_add_rms_norm(x, residual, w, 1e-6)
        ops.rotary_embedding(positions, q, k, cache, head_dim, qw, kw, 1e-6)
        ops.silu_and_mul(gate_up, out=act)

    graph, _ = capture(layer)
    for seed in (60, 70):
        inputs = [
            _randn(*t.shape, seed=seed + i, dtype=dtype, device=dev)
            for i, t in enumerate((x, residual, qkv, gate_up))
        ]
        positions.copy_(torch.tensor([seed % 32, 1, 31]))
        for t, new in zip((x, residual, qkv, gate_up), inputs, strict=True):
            t.copy_(new)
        x0, r0, qkv0, gu0 = (t.clone() for t in inputs)
        graph.replay()
        torch.cuda.synchronize()
        _assert_close(normed, rms_norm_ref(x0, w, 1e-6), dtype, "graph rms_norm")
        want_x, want_r = fused_add_rms_norm_ref(x0, r0, w, 1e-6)
        assert torch.equal(residual.cpu(), want_r)
        _assert_close(x, want_x, dtype, "graph fused_add_rms_norm")
        q0 = qkv0[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
        _assert_close(q, rotary_embedding_ref(positions, q0, cache, head_dim, qw, 1e-6), dtype, "graph rope")
        _assert_close(act, silu_and_mul_ref(gu0), dtype, "graph silu_and_mul")
