"""Engine configuration: frozen dataclasses, each validated in `__post_init__`, passed explicitly.

NOTE: this is the one place environment variables may be read (none are, so far). Add new configs
(ModelConfig, EngineConfig, ...) beside the existing ones; keep every field's default and meaning.
"""

from __future__ import annotations

from dataclasses import dataclass


def _check_int(owner: str, name: str, value: object, *, minimum: int, maximum: int | None = None) -> None:
    # bool is an int subclass; `block_size=True` is a mistake, not 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{owner}.{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum or (maximum is not None and value > maximum):
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{owner}.{name} must be {allowed}, got {value}")


def _check_float(
    owner: str, name: str, value: object, *, low: float, high: float, low_open: bool, high_open: bool = False
) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{owner}.{name} must be a float, got {type(value).__name__} ({value!r})")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{owner}.{name} must be in {interval}, got {value}")


def _check_bool(owner: str, name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{owner}.{name} must be a bool, got {type(value).__name__} ({value!r})")


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache.

    Attributes:
        block_size: tokens per KV block (16 by default; kernels may require a power of two).
        num_blocks: physical blocks in the pool; None means "size it from free memory" (the engine's
            job, after a profiling forward) and must be resolved before a KVCacheManager is built.
        enable_prefix_caching: keep freed full blocks reusable by later requests with the same prefix.
        watermark: fraction of all blocks kept free when admitting a new request, so that running
            decodes can grow without immediate preemption. In [0, 1).
        gpu_memory_utilization: fraction of device memory the engine may use (weights, activations
            and KV cache together) when it sizes `num_blocks`. In (0, 1].
    """

    block_size: int = 16
    num_blocks: int | None = None
    enable_prefix_caching: bool = True
    watermark: float = 0.01
    gpu_memory_utilization: float = 0.9

    def __post_init__(self) -> None:
        _check_int("CacheConfig", "block_size", self.block_size, minimum=1, maximum=1024)
        if self.num_blocks is not None:
            _check_int("CacheConfig", "num_blocks", self.num_blocks, minimum=1)
        _check_bool("CacheConfig", "enable_prefix_caching", self.enable_prefix_caching)
        watermark = self.watermark
        _check_float("CacheConfig", "watermark", watermark, low=0.0, high=1.0, low_open=False, high_open=True)
        utilization = self.gpu_memory_utilization
        _check_float("CacheConfig", "gpu_memory_utilization", utilization, low=0.0, high=1.0, low_open=True)


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits for one engine step.

    Attributes:
        max_num_batched_tokens: token budget of one step (decode tokens plus prefill chunks).
        max_num_seqs: most requests running (holding KV blocks) at once; also the most per step.
        max_model_len: longest sequence (prompt + generated tokens) a request may reach; None means
            no limit other than the KV pool. A request whose prompt + max_tokens exceeds it is rejected.
        async_scheduling: allow `schedule()` of step n + 1 before `update()` of step n: the tokens
            step n is still sampling are fed as placeholders (see scheduler/scheduler.py).
    """

    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    max_model_len: int | None = None
    async_scheduling: bool = False

    def __post_init__(self) -> None:
        _check_int("SchedulerConfig", "max_num_batched_tokens", self.max_num_batched_tokens, minimum=1)
        _check_int("SchedulerConfig", "max_num_seqs", self.max_num_seqs, minimum=1)
        if self.max_model_len is not None:
            _check_int("SchedulerConfig", "max_model_len", self.max_model_len, minimum=1)
        _check_bool("SchedulerConfig", "async_scheduling", self.async_scheduling)
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"SchedulerConfig.max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_num_seqs ({self.max_num_seqs}), so that every running request can decode each step"
            )


LOAD_FORMATS = ("auto", "safetensors", "pt", "dummy")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine is built from; the fields of `LLM(...)` and the CLI's engine flags.

    Attributes:
        model: a local Hugging Face folder, or a hub id on machines with network.
        device: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N".
        dtype: "auto" (the checkpoint's; float32 checkpoints run bfloat16 on CUDA), "float32",
            "bfloat16" or "float16" (CUDA only).
        max_model_len: longest prompt + output; None = the model's max_position_embeddings.
        block_size: tokens per KV block (a power of two, 8 to 256).
        gpu_memory_utilization: fraction of GPU memory for weights, activations and the KV cache.
        num_kv_blocks: fix the KV pool size in blocks (overrides the memory-based sizing).
        kv_cache_memory_bytes: KV pool size in bytes (overrides gpu_memory_utilization; the CPU
            default is a quarter of available memory, at most 4 GiB).
        max_num_seqs: most requests running at once.
        max_num_batched_tokens: token budget of one step; None = max(8192, max_num_seqs).
        enable_prefix_caching: reuse KV blocks of identical prompt prefixes.
        seed: seeds the weights of dummy models and unseeded sampling.
        enforce_eager: no CUDA graphs.
        load_format: "auto", "safetensors", "pt" (needs allow_pickle) or "dummy" (random weights).
        tokenizer: tokenizer folder if not the model's; chat_template: a template file or text.
        skip_tokenizer_init: run without a tokenizer (prompts as token ids, outputs as ids only), e.g.
            for config-only folders benchmarked with load_format="dummy".
        async_scheduling: schedule and prepare step n + 1 while the device runs step n, and process
            step n's outputs after launching step n + 1 (same outputs, the host work overlaps the
            device's). None = on for CUDA, off for CPU (where torch ops are synchronous anyway).
    """

    model: str
    device: str = "auto"
    dtype: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    seed: int = 0
    enforce_eager: bool = False
    load_format: str = "auto"
    tokenizer: str | None = None
    chat_template: str | None = None
    allow_pickle: bool = False
    revision: str | None = None
    skip_tokenizer_init: bool = False
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"EngineConfig.model must be a model folder or hub id, got {self.model!r}")
        device = self.device
        if not isinstance(device, str) or not (
            device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())
        ):
            raise ValueError(f"EngineConfig.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"EngineConfig.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(
                f"EngineConfig.load_format must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}"
            )
        if self.max_model_len is not None:
            _check_int("EngineConfig", "max_model_len", self.max_model_len, minimum=2)
        _check_int("EngineConfig", "block_size", self.block_size, minimum=8, maximum=256)
        if self.block_size & (self.block_size - 1):
            raise ValueError(
                f"EngineConfig.block_size must be a power of two in [8, 256], got {self.block_size}"
            )
        _check_float(
            "EngineConfig",
            "gpu_memory_utilization",
            self.gpu_memory_utilization,
            low=0.0,
            high=1.0,
            low_open=True,
        )
        if self.num_kv_blocks is not None:
            _check_int("EngineConfig", "num_kv_blocks", self.num_kv_blocks, minimum=1)
        if self.kv_cache_memory_bytes is not None:
            _check_int("EngineConfig", "kv_cache_memory_bytes", self.kv_cache_memory_bytes, minimum=1)
        _check_int("EngineConfig", "max_num_seqs", self.max_num_seqs, minimum=1)
        if self.max_num_batched_tokens is not None:
            _check_int("EngineConfig", "max_num_batched_tokens", self.max_num_batched_tokens, minimum=1)
            if self.max_num_batched_tokens < self.max_num_seqs:
                raise ValueError(
                    f"EngineConfig.max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                    f"max_num_seqs ({self.max_num_seqs})"
                )
        _check_bool("EngineConfig", "enable_prefix_caching", self.enable_prefix_caching)
        _check_bool("EngineConfig", "enforce_eager", self.enforce_eager)
        _check_bool("EngineConfig", "allow_pickle", self.allow_pickle)
        _check_bool("EngineConfig", "skip_tokenizer_init", self.skip_tokenizer_init)
        if self.async_scheduling is not None:
            _check_bool("EngineConfig", "async_scheduling", self.async_scheduling)
        _check_int("EngineConfig", "seed", self.seed, minimum=0)
