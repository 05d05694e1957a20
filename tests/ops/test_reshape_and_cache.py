"""tinyserve.ops.reshape_and_cache: an exact scatter of keys/values into the paged KV cache."""

from __future__ import annotations

import pytest
import torch

from tinyserve import ops
from tinyserve.ops.reference import reshape_and_cache_ref

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(
    num_tokens, num_kv_heads, head_dim, num_blocks, block_size, dtype, device, seed, slot_dtype=torch.int64
):
    g = torch.Generator().manual_seed(seed)
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g).to(dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g).to(dtype)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(cache_shape, generator=g).to(dtype)
    value_cache = torch.randn(cache_shape, generator=g).to(dtype)
    # Distinct random slots, some of them padding (-1).
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[torch.rand(num_tokens, generator=g) < 0.2] = -1
    return [t.to(device) for t in (key, value, key_cache, value_cache, slots.to(slot_dtype))]


def _check(key, value, key_cache, value_cache, slots):
    want_k, want_v = reshape_and_cache_ref(key, value, key_cache, value_cache, slots)
    ops.reshape_and_cache(key, value, key_cache, value_cache, slots)
    assert torch.equal(key_cache.cpu(), want_k), "key_cache differs (the copy must be exact)"
    assert torch.equal(value_cache.cpu(), want_v), "value_cache differs (the copy must be exact)"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize(
    "shape",
    [
        (1, 1, 8, 4, 16),
        (7, 4, 8, 3, 16),
        (17, 8, 128, 5, 16),
        (97, 2, 64, 8, 32),
        (33, 3, 80, 9, 8),
        (5, 2, 256, 2, 16),
        (40, 1, 40, 11, 4),
    ],
    ids=lambda s: "t{}-kv{}-d{}-nb{}-bs{}".format(*s),
)
def test_reshape_and_cache(device, dtype, slot_dtype, shape):
    _check(*_inputs(*shape, dtype, device, seed=sum(shape), slot_dtype=slot_dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_reshape_and_cache_strided_key_value(device):
    """key and value as slices of a fused QKV projection output."""
    num_tokens, num_heads, num_kv_heads, head_dim = 21, 8, 2, 64
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, device=device)
    key = qkv[:, num_heads : num_heads + num_kv_heads]
    value = qkv[:, num_heads + num_kv_heads :]
    assert not key.is_contiguous()
    _, _, key_cache, value_cache, slots = _inputs(
        num_tokens, num_kv_heads, head_dim, 4, 16, torch.float32, device, 1
    )
    _check(key, value, key_cache, value_cache, slots)


@pytest.mark.parametrize("device", DEVICES)
def test_reshape_and_cache_strided_cache(device):
    """Caches that are views into one [2, num_blocks, ...] allocation (key and value halves)."""
    key, value, _, _, slots = _inputs(13, 2, 32, 3, 16, torch.bfloat16, device, 2)
    kv = (
        torch.randn(3, 2, 16, 2, 32, device=device).bfloat16().transpose(0, 1)
    )  # [2, blocks, ...] non-contiguous
    _check(key, value, kv[0], kv[1], slots)


@pytest.mark.parametrize("device", DEVICES)
def test_reshape_and_cache_all_padding_and_empty(device):
    key, value, key_cache, value_cache, slots = _inputs(5, 2, 16, 2, 16, torch.float32, device, 3)
    before = key_cache.clone()
    ops.reshape_and_cache(key, value, key_cache, value_cache, torch.full_like(slots, -1))
    assert torch.equal(key_cache, before)
    ops.reshape_and_cache(key[:0], value[:0], key_cache, value_cache, slots[:0])
    assert torch.equal(key_cache, before)


def test_reshape_and_cache_bad_input():
    key, value, key_cache, value_cache, slots = _inputs(4, 2, 16, 2, 16, torch.float32, "cpu", 4)
    cases = [
        ((key.half(), value, key_cache, value_cache, slots), TypeError, "must equal the cache dtype float32"),
        ((key, value, key_cache, value_cache, slots.float()), TypeError, "slot_mapping has dtype float32"),
        (
            (key, value, key_cache, value_cache, slots[:3]),
            ValueError,
            r"slot_mapping must be \[num_tokens=4\]",
        ),
        ((key[:, :1], value[:, :1], key_cache, value_cache, slots), ValueError, "num_kv_heads=2"),
        ((key, value[:3], key_cache, value_cache, slots), ValueError, "key and value must both be"),
        ((key, value, key_cache[0], value_cache[0], slots), ValueError, "key_cache must be 4-D"),
        (
            (key, value, key_cache.double(), value_cache.double(), slots),
            TypeError,
            "supported: one of float32",
        ),
        (
            (key.transpose(1, 2), value, key_cache, value_cache, slots),
            ValueError,
            "key and value must both be",
        ),
        (
            (key, value, key_cache, value_cache, slots.tolist()),
            TypeError,
            "slot_mapping must be a torch.Tensor",
        ),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            ops.reshape_and_cache(*args)
    with pytest.raises(ValueError, match=r"slot_mapping\[0\] = 32 is outside"):
        ops.reshape_and_cache(key, value, key_cache, value_cache, torch.tensor([32, 0, 1, 2]))


@pytest.mark.cuda
def test_reshape_and_cache_mixed_devices():
    key, value, key_cache, value_cache, slots = _inputs(4, 2, 16, 2, 16, torch.float32, "cpu", 5)
    with pytest.raises(ValueError, match="one device"):
        ops.reshape_and_cache(key, value, key_cache.cuda(), value_cache.cuda(), slots)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_then_attend(device, dtype):
    """The serving flow: write a chunk's K/V with reshape_and_cache, then prefill over the cache."""
    num_heads, num_kv_heads, head_dim, block_size = 8, 2, 64, 16
    g = torch.Generator().manual_seed(6)
    prompt_len = 45
    key = torch.randn(prompt_len, num_kv_heads, head_dim, generator=g).to(dtype).to(device)
    value = torch.randn(prompt_len, num_kv_heads, head_dim, generator=g).to(dtype).to(device)
    query = torch.randn(prompt_len, num_heads, head_dim, generator=g).to(dtype).to(device)
    key_cache = torch.full((6, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=device)
    value_cache = torch.full_like(key_cache, float("nan"))
    blocks = torch.tensor([4, 1, 3], dtype=torch.int32)
    pos = torch.arange(prompt_len)
    slots = (blocks[pos // block_size].long() * block_size + pos % block_size).to(device)
    ops.reshape_and_cache(key, value, key_cache, value_cache, slots)
    out = ops.paged_attention_prefill(
        query,
        key_cache,
        value_cache,
        blocks[None].to(device),
        torch.tensor([0, prompt_len], dtype=torch.int32, device=device),
        torch.tensor([prompt_len], dtype=torch.int32, device=device),
        head_dim**-0.5,
    )
    # Dense causal attention on the same data.
    k = key.double().cpu().repeat_interleave(num_heads // num_kv_heads, dim=1)
    v = value.double().cpu().repeat_interleave(num_heads // num_kv_heads, dim=1)
    ref = torch.nn.functional.scaled_dot_product_attention(
        query.double().cpu().transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True
    ).transpose(0, 1)
    err = ((out.double().cpu() - ref).norm() / ref.norm()).item()
    assert err < (2e-5 if dtype == torch.float32 else 1.2e-2), f"relative error {err:.3g}"
