"""Finding and reading the weight files of a Hugging Face model folder.

safetensors only, unless the caller explicitly allows unpickling (`.bin` / `.pt` / `.pth` files run
arbitrary code when loaded by pickle; safetensors cannot).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

SAFETENSORS_INDEX = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: missing, unexpected or mis-shaped tensors, bad files."""


@dataclass(frozen=True)
class CheckpointFiles:
    """The weight files to read, all of one format."""

    files: tuple[Path, ...]
    format: str  # "safetensors" | "pickle"

    @property
    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def find_checkpoint_files(
    model_dir: Path, load_format: str = "auto", allow_pickle: bool = False
) -> CheckpointFiles:
    """The weight files of `model_dir`.

    load_format "safetensors": *.safetensors only (the files named by model.safetensors.index.json when
    present). "pt": pickle checkpoints, which needs allow_pickle=True. "auto": safetensors when there
    are any, else pickle when allowed, else a CheckpointError saying why.
    """
    if load_format not in ("auto", "safetensors", "pt"):
        raise ValueError(
            f"load_format {load_format!r} is not a checkpoint format; use auto, safetensors or pt"
        )
    if load_format in ("auto", "safetensors"):
        safetensors = _safetensors_files(model_dir)
        if safetensors:
            return CheckpointFiles(safetensors, "safetensors")
        if load_format == "safetensors":
            raise CheckpointError(f"no *.safetensors files in {model_dir}")
    pickles = tuple(sorted(p for p in model_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES and p.is_file()))
    if not pickles:
        present = ", ".join(sorted(p.name for p in model_dir.iterdir())) or "nothing"
        raise CheckpointError(
            f"no weight files (*.safetensors) in {model_dir} (it holds: {present}); "
            "use load_format='dummy' for random weights from config.json alone"
        )
    if not allow_pickle:
        names = ", ".join(p.name for p in pickles)
        raise CheckpointError(
            f"{model_dir} has only pickle checkpoints ({names}); TinyServe does not unpickle files by "
            "default because unpickling can run arbitrary code. Convert them to safetensors, or pass "
            "allow_pickle=True "
            "if you trust their source."
        )
    return CheckpointFiles(pickles, "pickle")


def _safetensors_files(model_dir: Path) -> tuple[Path, ...]:
    index_path = model_dir / SAFETENSORS_INDEX
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path} has no valid 'weight_map': {e}") from e
        files = tuple(model_dir / name for name in sorted(set(weight_map.values())))
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(
                f"{index_path.name} names files that are not in {model_dir}: {', '.join(missing)}"
            )
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    # Mistral repos ship consolidated.safetensors (Mistral's own layout) beside the HF shards.
    hf_files = [f for f in files if not f.name.startswith("consolidated")]
    return tuple(hf_files or files)


def iterate_tensors(checkpoint: CheckpointFiles) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """(name, CPU tensor, file) for every tensor, one file at a time (safetensors: memory-mapped)."""
    for path in checkpoint.files:
        if checkpoint.format == "safetensors":
            yield from _iterate_safetensors(path)
        else:
            yield from _iterate_pickle(path)


def _iterate_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor, Path]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                yield name, f.get_tensor(name), path
    except SafetensorError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


def _iterate_pickle(path: Path) -> Iterator[tuple[str, torch.Tensor, Path]]:
    # weights_only=True restricts unpickling to tensors and plain containers; still only on explicit opt-in.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict (got {type(state).__name__})")
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: entry {name!r} is a {type(tensor).__name__}, not a tensor")
        yield name, tensor, path
