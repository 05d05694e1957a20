"""Fused ops of the decoder layer: RMSNorm (with the residual add fused in), RoPE (with Qwen3's
per-head q/k RMSNorm fused in) and SiLU-and-mul, each one kernel where PyTorch needs several; and
for one or two tokens a step, the weight-streaming blocks fused_mlp (o projection, norm and MLP)
and fused_norm_linear (norm and the qkv product). All round where the unfused PyTorch formulas
(and transformers) round.

NOTE: on CUDA these ops never synchronise or read device tensors on the host, so they can be captured
in CUDA graphs.
"""

from __future__ import annotations

import torch

from tinyserve import _C

from ._tensor import check_tensor, overlaps, stream_of, view
from .cache import check_cache_write

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_POSITION_DTYPES = (torch.int32, torch.int64)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_float(name: str, t: object) -> torch.Tensor:
    t = check_tensor(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {_name(t.dtype)}; supported: float32, float16, bfloat16")
    return t


def _check_like(
    name: str, t: object, ref: torch.Tensor, ref_name: str, same_shape: bool = True
) -> torch.Tensor:
    """t has ref's dtype and device (and shape, when asked)."""
    t = check_tensor(name, t)
    if t.device != ref.device:
        raise ValueError(
            f"{name} is on {t.device} but {ref_name} is on {ref.device}; all tensors must be on one device"
        )
    if t.dtype != ref.dtype:
        raise TypeError(
            f"{name} has dtype {_name(t.dtype)} but {ref_name} has {_name(ref.dtype)}; they must match"
        )
    if same_shape and t.shape != ref.shape:
        raise ValueError(
            f"{name} has shape {tuple(t.shape)} but {ref_name} has {tuple(ref.shape)}; they must match"
        )
    return t


def _check_rows(name: str, t: torch.Tensor) -> None:
    if t.dim() not in (2, 3):
        raise ValueError(
            f"{name} must be 2-D [num_tokens, hidden] or 3-D [num_tokens, num_heads, head_dim], "
            f"got shape {tuple(t.shape)}"
        )
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (strides {t.stride()})")


def _check_weight(name: str, weight: object, x: torch.Tensor, x_name: str) -> torch.Tensor:
    weight = _check_like(name, weight, x, x_name, same_shape=False)
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"{name} must be [{x.shape[-1]}] (the last dim of {x_name}), got shape {tuple(weight.shape)}"
        )
    if not weight.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return weight


def _check_rms_of(rms_of: object, ref: torch.Tensor, ref_name: str, num_tokens: int) -> torch.Tensor:
    """A folded norm's rows (the ops' rms_of): [num_tokens, hidden > 0] of ref's dtype and device, unit
    last stride."""
    rms_of = _check_like("rms_of", rms_of, ref, ref_name, same_shape=False)
    if rms_of.dim() != 2 or rms_of.shape[0] != num_tokens or rms_of.shape[1] == 0:
        raise ValueError(
            f"rms_of must be [num_tokens={num_tokens}, hidden > 0], got shape {tuple(rms_of.shape)}"
        )
    if rms_of.stride(1) != 1:
        raise ValueError(f"rms_of must be contiguous in its last dimension (strides {rms_of.stride()})")
    return rms_of


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """RMSNorm over the last dim: `weight * T(x * rsqrt(mean(x^2) + eps))`, as transformers' LlamaRMSNorm
    computes it (float32 statistics, the normalised value rounded to x's dtype T before the weight).

    Args:
        x: [num_tokens, hidden] or [num_tokens, num_heads, head_dim] (per-head q/k norm); any strides
            with a unit last stride. float32, float16 or bfloat16; CPU or CUDA.
        weight: [hidden] (or [head_dim]), contiguous, x's dtype and device.
        eps: added to the mean square.
        out: optional output of x's shape, dtype and device, unit last stride; may be x itself.

    Returns:
        `out` (a new contiguous tensor when not given), x's shape and dtype.
    """
    _check_float("x", x)
    _check_rows("x", x)
    _check_weight("weight", weight, x, "x")
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    else:
        _check_like("out", out, x, "x")
        _check_rows("out", out)
    if x.numel():
        _C.rms_norm(view(x), None, view(weight), view(out), float(eps), stream_of(x))
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """In place: `residual += x` (rounded to the dtype, as `x + residual` in PyTorch), then
    `x = rms_norm(residual, weight, eps)`. The pre-norm decoder's `h, res = norm(h, res)` in one pass.

    Args:
        x: [num_tokens, hidden] (or 3-D [num_tokens, num_heads, head_dim]); any strides with a unit
            last stride; float32, float16 or bfloat16; overwritten with the normalised sum.
        residual: x's shape, dtype and device, unit last stride; overwritten with x + residual.
            Must not overlap x.
        weight: [hidden], contiguous, x's dtype and device.
        eps: added to the mean square.
    """
    _check_float("x", x)
    _check_rows("x", x)
    _check_like("residual", residual, x, "x")
    _check_rows("residual", residual)
    _check_weight("weight", weight, x, "x")
    if residual.data_ptr() == x.data_ptr() and x.numel():
        raise ValueError("residual and x must be different tensors (both are written)")
    if x.numel():
        _C.rms_norm(view(x), view(residual), view(weight), view(x), float(eps), stream_of(x))


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    rotary_dim: int,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    value: torch.Tensor | None = None,
    key_cache: torch.Tensor | None = None,
    value_cache: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
    rms_of: torch.Tensor | None = None,
    rms_eps: float = 1e-6,
) -> None:
    """In place: rotary position embedding in Hugging Face's half-split ("neox") layout, optionally
    after Qwen3's per-head RMSNorm of q and k (`q = rms_norm(q, q_norm_weight, eps)` per head), and
    optionally writing the KV cache as well.

    With `rms_of`, query, key and value are the qkv product of the un-normalised rows h = rms_of, with
    the input RMSNorm's weight folded into the product (LlamaForCausalLM.fold_norms): first, every
    element of token t's q, k and v heads is multiplied by rsqrt(mean(h[t]^2) + rms_eps), in float32,
    and rounded to the dtype, in place. That is the product of the normalised rows as it would have
    been stored, so the norm needs no kernel of its own.

    Dims i and i + rotary_dim/2 (i < rotary_dim/2) of every head rotate by the angle of
    `cos_sin_cache[positions[t]]`; dims past rotary_dim pass through (partial rotary). Products are
    rounded to the dtype exactly as `x1*cos - x2*sin`, `x2*cos + x1*sin` in PyTorch (and transformers)
    round them.

    Args:
        positions: [num_tokens] int32 or int64, each in [0, max_position). CPU raises ValueError for
            others; CUDA leaves those tokens untouched (it never reads positions on the host).
        query: [num_tokens, num_heads, head_dim]; any strides with a unit last stride (e.g. a view of a
            fused qkv projection output); float32, float16 or bfloat16.
        key: [num_tokens, num_kv_heads, head_dim]; like query, same dtype and device; must not overlap it.
        cos_sin_cache: [max_position, rotary_dim] = [cos | sin] of each position (RotaryEmbedding's
            table), query's dtype and device, unit last stride.
        rotary_dim: even, in (0, head_dim].
        q_norm_weight, k_norm_weight: both None, or both [head_dim] contiguous of query's dtype.
        eps: the q/k norm's epsilon.
        value, key_cache, value_cache, slot_mapping: all None, or all given: then the rotated key and
            `value` also go into the paged caches, exactly as `reshape_and_cache(key, value,
            key_cache, value_cache, slot_mapping)` after the rotation would write them (same
            arguments and checks). On CUDA it is the same kernel (one launch instead of two); on
            the CPU a slot outside the cache raises ValueError after q and k were rotated (and with
            rms_of, q, k and v scaled), with the caches untouched.
        rms_of: optional [num_tokens, hidden] of query's dtype and device, unit last stride; needs the
            cache write (value is scaled too); must not overlap query, key or value.
        rms_eps: the folded norm's epsilon (with rms_of).
    """
    _check_float("query", query)
    _check_like("key", key, query, "query", same_shape=False)
    _check_like("cos_sin_cache", cos_sin_cache, query, "query", same_shape=False)
    check_tensor("positions", positions)
    for name, t in (("query", query), ("key", key)):
        if t.dim() != 3:
            raise ValueError(
                f"{name} must be 3-D [num_tokens, num_heads, head_dim], got shape {tuple(t.shape)}"
            )
        if t.stride(2) != 1:
            raise ValueError(
                f"{name} must be contiguous in its last (head_dim) dimension (strides {t.stride()})"
            )
    num_tokens, _, head_dim = query.shape
    if key.shape[0] != num_tokens or key.shape[2] != head_dim:
        raise ValueError(
            f"key {tuple(key.shape)} must be [num_tokens={num_tokens}, num_kv_heads, head_dim={head_dim}]"
        )
    if positions.dtype not in _POSITION_DTYPES:
        raise TypeError(f"positions has dtype {_name(positions.dtype)}; supported: int32, int64")
    if positions.dim() != 1 or positions.shape[0] != num_tokens:
        raise ValueError(f"positions must be [num_tokens={num_tokens}], got shape {tuple(positions.shape)}")
    if positions.device != query.device:
        raise ValueError(f"positions is on {positions.device} but query is on {query.device}")
    if not isinstance(rotary_dim, int) or rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"rotary_dim must be an even int in (0, head_dim={head_dim}], got {rotary_dim!r}")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != rotary_dim or cos_sin_cache.stride(1) != 1:
        raise ValueError(
            f"cos_sin_cache must be [max_position, rotary_dim={rotary_dim}] with a unit last stride, "
            f"got shape {tuple(cos_sin_cache.shape)} strides {cos_sin_cache.stride()}"
        )
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("give both q_norm_weight and k_norm_weight, or neither")
    qw = kw = None
    if q_norm_weight is not None and k_norm_weight is not None:
        qw = view(_check_weight("q_norm_weight", q_norm_weight, query, "query"))
        kw = view(_check_weight("k_norm_weight", k_norm_weight, query, "query"))
    cache_args = (value, key_cache, value_cache, slot_mapping)
    writes_cache = key_cache is not None
    if any((t is None) == writes_cache for t in cache_args):
        raise ValueError("give value, key_cache, value_cache and slot_mapping together, or none of them")
    if writes_cache:
        assert value is not None and key_cache is not None
        assert value_cache is not None and slot_mapping is not None
        check_cache_write(key, value, key_cache, value_cache, slot_mapping)
    if rms_of is not None:
        _check_rms_of(rms_of, query, "query", num_tokens)
        if not writes_cache:
            raise ValueError("rms_of needs the cache write (value, key_cache, value_cache, slot_mapping)")
        for name, t in (("query", query), ("key", key), ("value", value)):
            assert t is not None
            if overlaps(rms_of, t):
                raise ValueError(f"rms_of must not overlap {name} (it is scaled in place)")
    if num_tokens == 0:
        return
    _C.rotary_embedding(
        view(positions),
        view(query),
        view(key),
        view(cos_sin_cache),
        rotary_dim,
        qw,
        kw,
        float(eps),
        *(view(t) if t is not None else None for t in cache_args),
        view(rms_of) if rms_of is not None else None,
        float(rms_eps),
        stream_of(query),
    )


def silu_and_mul(
    x: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    rms_of: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """SwiGLU's gate on a fused [gate | up] projection: `silu(x[:, :d]) * x[:, d:]`, with silu's result
    rounded to x's dtype before the product (as `F.silu(gate) * up` in PyTorch).

    With `rms_of`, x is the [gate | up] product of the un-normalised rows h = rms_of, with an RMSNorm's
    weight folded into the product (LlamaForCausalLM.fold_norms): every element of row t is first
    multiplied by rsqrt(mean(h[t]^2) + eps), in float32, and rounded to x's dtype. That is the product
    of the normalised rows as it would have been stored, so the norm needs no kernel of its own.

    Args:
        x: [num_tokens, 2 * d]; any row stride with a unit last stride; float32, float16 or bfloat16.
        out: optional [num_tokens, d] of x's dtype and device, unit last stride.
        rms_of: optional [num_tokens, hidden] of x's dtype and device, unit last stride; must not
            overlap out.
        eps: the folded norm's epsilon (with rms_of).

    Returns:
        `out` (a new contiguous tensor when not given): [num_tokens, d].
    """
    _check_float("x", x)
    if x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"x must be 2-D [num_tokens, 2 * d], got shape {tuple(x.shape)}")
    if x.stride(1) != 1:
        raise ValueError(f"x must be contiguous in its last dimension (strides {x.stride()})")
    num_tokens, d = x.shape[0], x.shape[1] // 2
    if out is None:
        out = torch.empty(num_tokens, d, dtype=x.dtype, device=x.device)
    else:
        _check_like("out", out, x, "x", same_shape=False)
        if tuple(out.shape) != (num_tokens, d):
            raise ValueError(f"out must be [num_tokens={num_tokens}, d={d}], got shape {tuple(out.shape)}")
        if out.stride(1) != 1:
            raise ValueError(f"out must be contiguous in its last dimension (strides {out.stride()})")
    if rms_of is not None:
        _check_rms_of(rms_of, x, "x", num_tokens)
        if overlaps(rms_of, out):
            raise ValueError("rms_of must not overlap out (out is written while rms_of is read)")
    if out.numel():
        rows = view(rms_of) if rms_of is not None else None
        _C.silu_and_mul(view(x), view(out), rows, float(eps), stream_of(x))
    return out


FUSED_MLP_MAX_ROWS: int = _C.fused_mlp_max_rows  # also fused_norm_linear's
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _element_size(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def _device_index(device: torch.device) -> int | None:
    """-1 for the CPU, the CUDA index, or None where the extension has no CUDA kernels."""
    device = torch.device(device)
    if device.type == "cpu":
        return -1
    if device.type != "cuda" or not _C.build_info()["cuda"]:
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def fused_mlp_workspace_bytes(rows: int, hidden: int, intermediate: int, dtype: torch.dtype) -> int:
    """Bytes of a `fused_mlp` workspace for up to `rows` rows of H = hidden, I = intermediate."""
    return _C.fused_mlp_workspace_header + rows * (intermediate + hidden) * _element_size(dtype)


def fused_mlp_workspace(
    rows: int, hidden: int, intermediate: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A workspace for `fused_mlp` of up to `rows` rows: uint8, zeroed (its grid barriers' words must
    start at zero; every launch leaves them ready for the next). Allocate it once, outside CUDA-graph
    capture."""
    size = fused_mlp_workspace_bytes(rows, hidden, intermediate, dtype)
    return torch.zeros(size, dtype=torch.uint8, device=device)


def fused_mlp_supported(
    rows: int,
    hidden: int,
    intermediate: int,
    dtype: torch.dtype,
    device: torch.device,
    attn: int = 0,
) -> bool:
    """Whether `fused_mlp` takes `rows` rows of these sizes in this dtype on this device (CUDA: the
    extension holds the kernel and its shared memory holds a row block). attn: Q, the width of the
    attention output with an o projection, else 0."""
    if dtype not in _HALF_DTYPES or hidden % 8 or intermediate % 8 or attn % 8:
        return False
    index = _device_index(device)
    return index is not None and bool(_C.fused_mlp_fits(rows, hidden, intermediate, attn, index))


def _check_half_rows(op: str, name: str, t: object) -> tuple[int, int]:
    """t is a contiguous float16/bfloat16 [m, n] tensor with 1 <= m <= FUSED_MLP_MAX_ROWS."""
    t = _check_float(name, t)
    if t.dtype not in _HALF_DTYPES:
        raise TypeError(f"{name} has dtype {_name(t.dtype)}; {op} supports float16, bfloat16")
    if t.dim() != 2 or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous 2-D [m, n] tensor, got shape {tuple(t.shape)}")
    m, n = t.shape
    if not 1 <= m <= FUSED_MLP_MAX_ROWS:
        raise ValueError(f"{op} takes 1 to {FUSED_MLP_MAX_ROWS} rows, got {m}")
    return m, n


def _check_matrix(name: str, w: object, ref: torch.Tensor, ref_name: str) -> torch.Tensor:
    w = _check_like(name, w, ref, ref_name, same_shape=False)
    if w.dim() != 2 or not w.is_contiguous():
        raise ValueError(f"{name} must be a contiguous 2-D tensor, got shape {tuple(w.shape)}")
    return w


def fused_mlp(
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    gate_up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    workspace: torch.Tensor,
    hidden: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    o_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The second half of a pre-norm SwiGLU decoder layer at decode sizes, as one kernel on CUDA.
    With h = hidden, or h = o(hidden) = hidden . o_weight^T when o_weight is given (hidden is then
    the attention output, before its o projection), and y = down(silu(gate) * up) of
    RMSNorm(residual + h):

        out is residual:  residual += h, then += y, in place (two rounded adds); returns residual
        out elsewhere:    residual += h in place; out = y; returns out
        no hidden:        residual += y of RMSNorm(residual) in place; returns residual

    out defaults to residual with o_weight and to hidden (overwritten) without.

    Every intermediate is rounded to the dtype where the unfused ops (o product, fused_add_rms_norm,
    the gate_up product, silu_and_mul, the down product, the residual adds) store it, so the results
    match them up to the products' summation order.

    Args:
        residual: [m, H], 1 <= m <= FUSED_MLP_MAX_ROWS, float16 or bfloat16, contiguous.
        norm_weight: [H], the post-attention RMSNorm's weight; eps its epsilon.
        gate_up_weight: [2I, H], the gate rows then the up rows (MergedLinear's layout).
        down_weight: [H, I].
        workspace: from `fused_mlp_workspace` for at least m rows of H and I (CUDA; unused on the CPU).
        hidden: optional [m, H], the attention block's output, or [m, Q] with o_weight.
        out: optional [m, H]; may be hidden itself, else it must overlap no input.
        o_weight: optional [H, Q], the attention's o projection (no bias).
    All tensors on one device, of residual's dtype, contiguous.
    """
    m, h = _check_half_rows("fused_mlp", "residual", residual)
    _check_weight("norm_weight", norm_weight, residual, "residual")
    _check_matrix("gate_up_weight", gate_up_weight, residual, "residual")
    _check_matrix("down_weight", down_weight, residual, "residual")
    inter = down_weight.shape[1]
    if down_weight.shape[0] != h or tuple(gate_up_weight.shape) != (2 * inter, h):
        raise ValueError(
            f"with residual [m, {h}], down_weight must be [{h}, I] and gate_up_weight [2I, {h}]; got "
            f"down_weight {tuple(down_weight.shape)}, gate_up_weight {tuple(gate_up_weight.shape)}"
        )
    if h % 8 or inter % 8:
        raise ValueError(f"H = {h} and I = {inter} must be multiples of 8")
    attn = 0
    weights = [("norm_weight", norm_weight), ("gate_up_weight", gate_up_weight), ("down_weight", down_weight)]
    if o_weight is not None:
        _check_matrix("o_weight", o_weight, residual, "residual")
        attn = o_weight.shape[1]
        if o_weight.shape[0] != h or attn % 8:
            raise ValueError(f"o_weight must be [{h}, Q] with Q a multiple of 8, got {tuple(o_weight.shape)}")
        if hidden is None:
            raise ValueError("o_weight needs hidden, the attention output [m, Q]")
        weights.append(("o_weight", o_weight))
    if hidden is None:
        if out is not None:
            raise ValueError("without hidden the result is added into residual; out must be None")
        out = residual
    else:
        _check_like("hidden", hidden, residual, "residual", same_shape=False)
        if tuple(hidden.shape) != (m, attn or h):
            what = (
                f"the attention output [{m}, {attn}] (o_weight is [{h}, {attn}])" if attn else f"[{m}, {h}]"
            )
            raise ValueError(f"hidden must be {what}, got {tuple(hidden.shape)}")
        if not hidden.is_contiguous() or overlaps(hidden, residual):
            raise ValueError("hidden must be contiguous and must not overlap residual")
        if out is None:
            out = residual if o_weight is not None else hidden
        if out is not residual:
            _check_like("out", out, residual, "residual")
            if not out.is_contiguous():
                raise ValueError("out must be contiguous")
            if out.data_ptr() != hidden.data_ptr() and (overlaps(out, hidden) or overlaps(out, residual)):
                raise ValueError("out must be hidden itself or overlap none of hidden and residual")
    for name, w in weights:
        if overlaps(w, out) or (out is not residual and overlaps(w, residual)):
            raise ValueError(f"{name} must not overlap the outputs")
    if residual.is_cuda:
        check_tensor("workspace", workspace)
        need = fused_mlp_workspace_bytes(m, h, inter, residual.dtype)
        if workspace.dtype != torch.uint8 or workspace.dim() != 1 or workspace.device != residual.device:
            raise ValueError(
                f"workspace must be a 1-D uint8 tensor on {residual.device} (fused_mlp_workspace)"
            )
        if workspace.numel() < need:
            raise ValueError(
                f"workspace holds {workspace.numel()} bytes; {m} rows of H = {h}, I = {inter} need {need}"
            )
        if not fused_mlp_supported(m, h, inter, residual.dtype, residual.device, attn):
            raise ValueError(
                f"fused_mlp: {m} rows of H = {h}, I = {inter}"
                + (f", Q = {attn}" if attn else "")
                + " do not fit the CUDA kernel's shared memory on this device"
                " (or the extension was built without CUDA)"
            )
    _C.fused_mlp(
        None if hidden is None else view(hidden),
        None if o_weight is None else view(o_weight),
        view(residual),
        view(norm_weight),
        view(gate_up_weight),
        view(down_weight),
        view(out),
        view(workspace),
        float(eps),
        stream_of(residual),
    )
    return out


def fused_norm_linear_supported(rows: int, k: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `fused_norm_linear` takes `rows` rows of K = k in this dtype on this device."""
    if dtype not in _HALF_DTYPES or k % 8:
        return False
    index = _device_index(device)
    return index is not None and bool(_C.fused_norm_linear_fits(rows, k, index))


def fused_norm_linear(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    residual: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The start of a pre-norm block at decode sizes, as one kernel on CUDA (the weight streamed on
    CUDA cores at one or two rows):

        r = x + residual (rounded), or x without residual
        returns (RMSNorm(r) . weight^T (+ bias), r)

    r is a new tensor with residual (neither input is written), else x itself. Rounded where
    fused_add_rms_norm and the product store, so the result matches them up to the product's
    summation order.

    Args:
        x: [m, K], 1 <= m <= FUSED_MLP_MAX_ROWS, float16 or bfloat16, contiguous.
        norm_weight: [K], the RMSNorm's weight; eps its epsilon.
        weight: [N, K]; bias: optional [N].
        residual: optional [m, K], the residual stream.
    """
    m, k = _check_half_rows("fused_norm_linear", "x", x)
    _check_weight("norm_weight", norm_weight, x, "x")
    _check_matrix("weight", weight, x, "x")
    if weight.shape[1] != k:
        raise ValueError(f"weight must be [N, {k}] for x [m, {k}], got {tuple(weight.shape)}")
    if k % 8:
        raise ValueError(f"K = {k} must be a multiple of 8")
    n = weight.shape[0]
    if bias is not None:
        _check_like("bias", bias, x, "x", same_shape=False)
        if tuple(bias.shape) != (n,) or not bias.is_contiguous():
            raise ValueError(f"bias must be a contiguous [{n}] tensor, got shape {tuple(bias.shape)}")
    r_out = x
    if residual is not None:
        _check_like("residual", residual, x, "x")
        if not residual.is_contiguous():
            raise ValueError("residual must be contiguous")
        r_out = torch.empty_like(x)
    if x.is_cuda and not fused_norm_linear_supported(m, k, x.dtype, x.device):
        raise ValueError(
            f"fused_norm_linear: {m} rows of K = {k} do not fit the CUDA kernel's shared memory on this "
            "device (or the extension was built without CUDA)"
        )
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _C.fused_norm_linear(
        view(x),
        None if residual is None else view(residual),
        None if residual is None else view(r_out),
        view(norm_weight),
        view(weight),
        None if bias is None else view(bias),
        view(out),
        float(eps),
        stream_of(x),
    )
    return out, r_out
