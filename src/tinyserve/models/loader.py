"""From a model folder (or hub id) to a ready model on the target device and dtype.

Weights are copied tensor by tensor straight into parameters that already live on the device, q/k/v and
gate/up into their fused parameters; every checkpoint tensor must land somewhere and every parameter
must be written, or loading fails naming the tensor.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from tinyserve.config import LOAD_FORMATS
from tinyserve.layers.linear import MergedLinear
from tinyserve.layers.norm import RMSNorm

from .checkpoint import CheckpointError, find_checkpoint_files, iterate_tensors
from .config import ModelArchConfig, load_arch_config
from .registry import get_model_class

if TYPE_CHECKING:
    from .llama import LlamaForCausalLM

# Checkpoint tensors that carry no weights of ours (old Llama exports saved the RoPE table).
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PROGRESS_MIN_BYTES = 256 * 2**20
DUMMY_STD = 0.02


def load_model(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "auto",
    load_format: str = "auto",
    *,
    allow_pickle: bool = False,
    revision: str | None = None,
    seed: int = 0,
    show_progress: bool | None = None,
    fold_norms: bool = True,
) -> tuple[LlamaForCausalLM, ModelArchConfig]:
    """Build the model described by `path`/config.json on `device` in `dtype` and fill its weights.

    path: a local Hugging Face folder, or a hub id ("org/name") fetched with huggingface_hub.
    device: "cpu", "cuda", "cuda:N", or "auto" (CUDA when available).
    dtype: "auto" (config's torch_dtype; float32 checkpoints run bfloat16 on CUDA, float16 ones
        bfloat16 on CPU), or "float32" / "bfloat16" / "float16" / a torch.dtype.
    load_format: "auto" (safetensors; pickle files only with allow_pickle), "safetensors", "pt"
        (pickle, needs allow_pickle=True), or "dummy" (random weights, needs only config.json).
    fold_norms: fold the decoder layers' RMSNorm weights into the products after them
        (LlamaForCausalLM.fold_norms), so the plain layers run no norm kernels.
    Returns (model in eval mode without gradients, its ModelArchConfig).
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(
            f"load_format {load_format!r} is not supported; supported: {', '.join(LOAD_FORMATS)}"
        )
    model_dir = resolve_model_path(
        path, revision=revision, weights=load_format != "dummy", allow_pickle=allow_pickle
    )
    arch = load_arch_config(model_dir)
    target_device = resolve_device(device)
    target_dtype = resolve_dtype(dtype, arch.torch_dtype, target_device)
    model_cls = get_model_class(arch.architecture)
    with torch.device(target_device):
        model = model_cls(arch, target_dtype)
    model.requires_grad_(False)
    model.eval()
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        checkpoint = find_checkpoint_files(model_dir, load_format, allow_pickle)
        if show_progress is None:
            show_progress = checkpoint.total_bytes >= _PROGRESS_MIN_BYTES
        with torch.no_grad():
            load_weights(
                model,
                iterate_tensors(checkpoint),
                progress_total=checkpoint.total_bytes if show_progress else None,
            )
    if fold_norms:
        model.fold_norms()
    return model, arch  # type: ignore[return-value]


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device} is not supported; supported: cpu, cuda, auto")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(
    dtype: str | torch.dtype, config_dtype: torch.dtype | None, device: torch.device
) -> torch.dtype:
    """The dtype the model runs in. CPU kernels run float32 and bfloat16; CUDA also float16."""
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if isinstance(dtype, str) and dtype != "auto":
        if dtype not in names:
            raise ValueError(f"dtype {dtype!r} is not supported; supported: auto, {', '.join(names)}")
        dtype = names[dtype]
    if dtype == "auto":
        if device.type == "cuda":
            # As vLLM: half-precision checkpoints keep their dtype, float32 ones run in bfloat16.
            return config_dtype if config_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        return torch.bfloat16 if config_dtype == torch.float16 else (config_dtype or torch.float32)
    assert isinstance(dtype, torch.dtype)
    allowed = (torch.float32, torch.bfloat16) if device.type == "cpu" else tuple(names.values())
    if dtype not in allowed:
        raise ValueError(
            f"dtype {dtype} is not supported on {device.type}; "
            f"supported: {', '.join(str(d) for d in allowed)}"
        )
    return dtype


def resolve_model_path(
    path: str | os.PathLike[str],
    *,
    revision: str | None = None,
    weights: bool = True,
    allow_pickle: bool = False,
) -> Path:
    """A local folder as is; a hub id ("org/name") downloaded (or found in the cache) by huggingface_hub."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    text = os.fspath(path)
    if local.exists() or not _HUB_ID.match(text):
        raise FileNotFoundError(f"model path {text!r} is not a directory (nor a hub id like 'org/name')")
    try:
        from huggingface_hub import snapshot_download  # imported here: only the hub path needs it
    except ImportError as e:
        raise FileNotFoundError(
            f"{text!r} is not a local folder; downloading it as a hub id needs `pip install huggingface_hub`"
        ) from e
    patterns = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    if weights:
        patterns.append("*.safetensors")
        if allow_pickle:
            patterns += ["*.bin", "*.pt", "*.pth"]
    return Path(snapshot_download(repo_id=text, revision=revision, allow_patterns=patterns))


@dataclass
class _Target:
    """Where one checkpoint tensor goes: a parameter, or one shard (row block) of a fused parameter."""

    param_name: str
    view: torch.Tensor


def checkpoint_targets(model: nn.Module) -> dict[str, _Target]:
    """Checkpoint tensor name -> the parameter view it fills, with fused parameters split back into the
    checkpoint's per-projection names (qkv_proj.weight -> q_proj.weight, k_proj.weight, v_proj.weight)."""
    packed: dict[str, tuple[str, ...]] = getattr(model, "packed_modules", {})
    targets: dict[str, _Target] = {}
    seen: set[int] = set()  # a tied lm_head shares the embedding's Parameter; it is filled once
    for module_name, module in model.named_modules():
        prefix, _, leaf = module_name.rpartition(".")
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            full_name = f"{module_name}.{param_name}"
            if isinstance(module, MergedLinear) and leaf in packed:
                for i, shard_leaf in enumerate(packed[leaf]):
                    shard_name = (
                        f"{prefix}.{shard_leaf}.{param_name}" if prefix else f"{shard_leaf}.{param_name}"
                    )
                    targets[shard_name] = _Target(full_name, module.shard(param.data, i))
            else:
                targets[full_name] = _Target(full_name, param.data)
    return targets


def load_weights(
    model: nn.Module,
    tensors: Iterable[tuple[str, torch.Tensor, Path]],
    progress_total: int | None = None,
) -> None:
    """Copy (name, tensor, source file) triples into the model, converting dtype and device on the way.

    Raises CheckpointError naming the tensor for an unexpected name, a shape mismatch, a tensor given
    twice, or (at the end) parameters no tensor filled.
    """
    targets = checkpoint_targets(model)
    tied = getattr(getattr(model, "arch_config", None), "tie_word_embeddings", False)
    loaded: set[str] = set()
    with tqdm(
        total=progress_total,
        unit="B",
        unit_scale=True,
        desc="Loading weights",
        disable=progress_total is None,
    ) as bar:
        for name, tensor, source in tensors:
            bar.update(tensor.numel() * tensor.element_size())
            if _IGNORED.search(name) or (tied and name == "lm_head.weight"):
                continue  # a tied checkpoint may still carry a copy of the embedding as lm_head.weight
            target = targets.get(name)
            if target is None:
                raise CheckpointError(
                    f"unexpected tensor {name!r} in {source.name}: the model has no such weight"
                )
            if name in loaded:
                raise CheckpointError(
                    f"tensor {name!r} appears twice in the checkpoint (again in {source.name})"
                )
            if tuple(tensor.shape) != tuple(target.view.shape):
                raise CheckpointError(
                    f"tensor {name!r} in {source.name} has shape {tuple(tensor.shape)}, "
                    f"the model expects {tuple(target.view.shape)}"
                )
            target.view.copy_(tensor)
            loaded.add(name)
    missing = sorted(set(targets) - loaded)
    if missing:
        shown = ", ".join(repr(n) for n in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise CheckpointError(f"missing tensor(s) in the checkpoint: {shown}{more}")


def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights of the right shapes: normal(0, 0.02) everywhere, norm weights around 1.

    Seeded, and generated on the parameters' own device (fast on CUDA).
    """
    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for module in model.modules():
            for param in module.parameters(recurse=False):
                gen = generators.get(param.device)
                if gen is None:
                    gen = generators[param.device] = torch.Generator(param.device).manual_seed(seed)
                mean = 1.0 if isinstance(module, RMSNorm) else 0.0
                param.normal_(mean, DUMMY_STD, generator=gen)
