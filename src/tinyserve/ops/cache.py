"""Writing new keys and values into the paged KV cache, and the checks every op on that cache shares.

The KV cache of one layer is a pair of tensors `key_cache`, `value_cache`, each
`[num_blocks, block_size, num_kv_heads, head_dim]`; token t of a sequence lives in physical block
`block_table[t // block_size]` at offset `t % block_size`, i.e. at flat slot
`block_id * block_size + offset`.
"""

from __future__ import annotations

import torch

from tinyserve import _C

from ._tensor import check_tensor, stream_of, view

KV_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
_SLOT_DTYPES = (torch.int32, torch.int64)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_kv_cache(key_cache: torch.Tensor, value_cache: torch.Tensor) -> tuple[int, int, int, int]:
    """Checks the pair of cache tensors; returns (num_blocks, block_size, num_kv_heads, head_dim)."""
    check_tensor("key_cache", key_cache)
    check_tensor("value_cache", value_cache)
    if key_cache.dim() != 4:
        raise ValueError(
            "key_cache must be 4-D [num_blocks, block_size, num_kv_heads, head_dim], "
            f"got shape {tuple(key_cache.shape)}"
        )
    if value_cache.shape != key_cache.shape:
        raise ValueError(
            f"value_cache shape {tuple(value_cache.shape)} differs from "
            f"key_cache shape {tuple(key_cache.shape)}"
        )
    if key_cache.dtype not in KV_DTYPES or value_cache.dtype != key_cache.dtype:
        raise TypeError(
            f"key_cache/value_cache have dtypes {_dtype_name(key_cache.dtype)}/"
            f"{_dtype_name(value_cache.dtype)}; "
            "supported: one of float32, float16, bfloat16 for both"
        )
    if key_cache.device != value_cache.device:
        raise ValueError(f"key_cache is on {key_cache.device} but value_cache is on {value_cache.device}")
    num_blocks, block_size, num_kv_heads, head_dim = key_cache.shape
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size (key_cache.shape[1]) must be a power of two, got {block_size}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim (key_cache.shape[3]) must be in [1, {MAX_HEAD_DIM}], got {head_dim}")
    if key_cache.stride(3) != 1 or value_cache.stride(3) != 1:
        raise ValueError("key_cache and value_cache must be contiguous in their last (head_dim) dimension")
    return num_blocks, block_size, num_kv_heads, head_dim


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Writes each token's key and value into its slot of the paged KV cache (in place).

    Args:
        key: [num_tokens, num_kv_heads, head_dim]; any strides with a unit last stride (e.g. a
            slice of a fused QKV projection).
        value: [num_tokens, num_kv_heads, head_dim]; like `key`.
        key_cache: [num_blocks, block_size, num_kv_heads, head_dim]; same dtype and device as `key`.
        value_cache: [num_blocks, block_size, num_kv_heads, head_dim]; like `key_cache`.
        slot_mapping: [num_tokens] int32 or int64 flat slot ids `block_id * block_size + offset`;
            a slot of -1 is skipped (padding tokens).

    Supported: float32, float16, bfloat16 (key, value and caches of one dtype); CPU and CUDA.
    The copy is exact. On CUDA nothing is read back to the host, so out-of-range slots are not
    detected there (the CPU twin raises ValueError for them).
    """
    check_cache_write(key, value, key_cache, value_cache, slot_mapping)
    if key.shape[0] == 0:
        return
    _C.reshape_and_cache(
        view(key), view(value), view(key_cache), view(value_cache), view(slot_mapping), stream_of(key_cache)
    )


def check_cache_write(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """The argument checks of reshape_and_cache (also for ops that write the cache as they go)."""
    check_tensor("key", key)
    check_tensor("value", value)
    check_tensor("slot_mapping", slot_mapping)
    _, _, num_kv_heads, head_dim = check_kv_cache(key_cache, value_cache)
    if key.dim() != 3 or value.shape != key.shape:
        raise ValueError(
            "key and value must both be [num_tokens, num_kv_heads, head_dim], "
            f"got {tuple(key.shape)} and {tuple(value.shape)}"
        )
    if key.shape[1] != num_kv_heads or key.shape[2] != head_dim:
        raise ValueError(
            f"key is {tuple(key.shape)} but the cache holds num_kv_heads={num_kv_heads}, head_dim={head_dim}"
        )
    if key.dtype != key_cache.dtype or value.dtype != key_cache.dtype:
        raise TypeError(
            f"key/value dtypes {_dtype_name(key.dtype)}/{_dtype_name(value.dtype)} "
            "must equal the cache dtype "
            f"{_dtype_name(key_cache.dtype)}"
        )
    if slot_mapping.dtype not in _SLOT_DTYPES:
        raise TypeError(f"slot_mapping has dtype {_dtype_name(slot_mapping.dtype)}; supported: int32, int64")
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(
            f"slot_mapping must be [num_tokens={key.shape[0]}], got shape {tuple(slot_mapping.shape)}"
        )
    device = key_cache.device
    if key.device != device or value.device != device or slot_mapping.device != device:
        raise ValueError(
            f"all tensors must be on one device; got key on {key.device}, value on {value.device}, "
            f"slot_mapping on {slot_mapping.device}, caches on {device}"
        )
    if key.stride(2) != 1 or value.stride(2) != 1:
        raise ValueError("key and value must be contiguous in their last (head_dim) dimension")
