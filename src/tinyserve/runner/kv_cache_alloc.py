"""Sizing and allocating the paged KV cache: from free GPU memory after a profiling forward, or from a
byte budget on the CPU."""

from __future__ import annotations

import torch

from tinyserve.models.llama import LlamaForCausalLM

GiB = 1 << 30
# CPU default: a quarter of the machine's available memory, at most 4 GiB.
CPU_KV_FRACTION = 0.25
CPU_KV_MAX_BYTES = 4 * GiB


def kv_bytes_per_block(model: LlamaForCausalLM, block_size: int) -> int:
    """Bytes of K and V, all layers, for one block of `block_size` tokens."""
    per_token = 2 * model.num_layers * model.num_kv_heads * model.head_dim * model.dtype.itemsize
    return per_token * block_size


def available_cpu_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * GiB


def cpu_kv_budget(kv_cache_memory_bytes: int | None) -> int:
    if kv_cache_memory_bytes is not None:
        return kv_cache_memory_bytes
    return int(min(CPU_KV_MAX_BYTES, CPU_KV_FRACTION * available_cpu_memory()))


def cuda_kv_budget(device: torch.device, gpu_memory_utilization: float, activation_peak_bytes: int) -> int:
    """Bytes left for the KV cache: util * total, minus everything in use now (weights, CUDA context,
    other processes), minus the activation peak measured by the profiling forward."""
    free, total = torch.cuda.mem_get_info(device)
    in_use = total - free
    return int(total * gpu_memory_utilization - in_use - activation_peak_bytes)


def allocate_kv_caches(
    model: LlamaForCausalLM, num_blocks: int, block_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (key_cache, value_cache) pair per layer, each [num_blocks, block_size, num_kv_heads, head_dim]."""
    device = next(model.parameters()).device
    shape = model.kv_cache_shape(num_blocks, block_size)
    # NOTE: zero-filled on the GPU, where padding rows of a CUDA-graph batch may read block 0; left
    # untouched on the CPU so that the pool's pages are only committed as they are used.
    alloc = torch.zeros if device.type == "cuda" else torch.empty
    return [
        (alloc(shape, dtype=model.dtype, device=device), alloc(shape, dtype=model.dtype, device=device))
        for _ in range(model.num_layers)
    ]
