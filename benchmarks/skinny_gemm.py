"""Decode-time linear layers: TinyServe's skinny GEMM (ops.skinny_linear) against torch F.linear
(cuBLAS), bf16, on the GPU.

    python benchmarks/skinny_gemm.py [--rows 1 2 4 8 16] [--calls 16]

y[M, N] = x[M, K] @ W[N, K]^T for every weight of a decoder layer (qkv, o, gate_up, down) and the
LM head of the Qwen3-0.6B and Llama-3-8B shapes (benchmarks/models/*/config.json), at M token rows.
Each product is captured at least `--calls` times in one CUDA graph (host overhead out), cycling
over enough copies of the weight that they cannot stay in L2 (a decode step reads every weight
once), median of the replays. Rate = weight bytes / time; the share is of the device-to-device copy
bandwidth measured in the same run (bytes read + written, as benchmarks/headline.py measures it).
The second table adds up one decode step's products: layers x (qkv + o + gate_up + down) + LM head.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _bench import print_table, time_graph  # noqa: E402
from _timing import copy_bandwidth, device_name  # noqa: E402
from tinyserve import ops  # noqa: E402
from tinyserve.models.config import load_arch_config  # noqa: E402

MODELS = {"Qwen3-0.6B": HERE / "models" / "qwen3-0.6b", "Llama-3-8B": HERE / "models" / "llama3-8b"}
DTYPE = torch.bfloat16


@dataclass(frozen=True)
class Shape:
    model: str
    layer: str
    n: int  # out_features
    k: int  # in_features
    per_step: int  # how many times one decode step runs this product

    @property
    def weight_bytes(self) -> int:
        return self.n * self.k * DTYPE.itemsize


def model_shapes(name: str, path: Path) -> list[Shape]:
    c = load_arch_config(path)
    layers = c.num_layers
    return [
        Shape(name, "qkv", c.q_size + 2 * c.kv_size, c.hidden_size, layers),
        Shape(name, "o", c.hidden_size, c.q_size, layers),
        Shape(name, "gate_up", 2 * c.intermediate_size, c.hidden_size, layers),
        Shape(name, "down", c.hidden_size, c.intermediate_size, layers),
        Shape(name, "lm_head", c.vocab_size, c.hidden_size, 1),
    ]


def time_shape(
    shape: Shape, rows: list[int], calls: int, l2_bytes: int
) -> dict[int, tuple[float, float, float]]:
    """M -> (ours seconds, cuBLAS seconds, relative difference of the two results)."""
    gen = torch.Generator(device="cuda").manual_seed(shape.n + shape.k)
    num_copies = min(64, max(1, -(-2 * l2_bytes // shape.weight_bytes)))
    weights = [
        torch.randn(shape.n, shape.k, generator=gen, device="cuda", dtype=DTYPE) for _ in range(num_copies)
    ]
    repeats = max(1, -(-calls // num_copies))
    results = {}
    for m in rows:
        x = torch.randn(m, shape.k, generator=gen, device="cuda", dtype=DTYPE)
        t_ours = time_graph([lambda w=w, x=x: ops.skinny_linear(x, w) for w in weights] * repeats)
        t_cublas = time_graph([lambda w=w, x=x: F.linear(x, w) for w in weights] * repeats)
        ours, ref = ops.skinny_linear(x, weights[0]).double(), F.linear(x, weights[0]).double()
        results[m] = (t_ours, t_cublas, ((ours - ref).norm() / ref.norm()).item())
    del weights
    torch.cuda.empty_cache()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="token rows M")
    parser.add_argument("--calls", type=int, default=16, help="products per captured graph, at least")
    args = parser.parse_args()
    if not torch.cuda.is_available() or not ops.cuda_kernels_available():
        raise SystemExit("needs a CUDA GPU and a CUDA build of tinyserve._C")
    if max(args.rows) > ops.SKINNY_MAX_ROWS:
        raise SystemExit(f"--rows: the skinny kernel takes at most {ops.SKINNY_MAX_ROWS} rows")

    copy_bw = copy_bandwidth()
    l2_bytes = torch.cuda.get_device_properties(0).L2_cache_size
    shapes = [s for name, path in MODELS.items() for s in model_shapes(name, path)]
    timings = {s: time_shape(s, args.rows, args.calls, l2_bytes) for s in shapes}

    print(
        f"\nskinny GEMM vs F.linear (cuBLAS), bf16; device: {device_name()}; "
        f"copy bandwidth {copy_bw / 1e9:.0f} GB/s.\nCells: ours GB/s (share of copy bandwidth) / cuBLAS GB/s."
    )
    head = ("model", "layer", "N x K", "MB", *(f"M={m}" for m in args.rows))
    rows = []
    for s in shapes:
        cells = []
        for m in args.rows:
            t_ours, t_cublas, _ = timings[s][m]
            ours_bw = s.weight_bytes / t_ours
            cells.append(
                f"{ours_bw / 1e9:.0f} ({ours_bw / copy_bw:.0%}) / {s.weight_bytes / t_cublas / 1e9:.0f}"
            )
        rows.append((s.model, s.layer, f"{s.n} x {s.k}", f"{s.weight_bytes / 1e6:.1f}", *cells))
    print_table(head, rows)

    print("\nOne decode step's products (layers x qkv, o, gate_up, down + LM head): ours / cuBLAS, speed-up.")
    step_rows = []
    for name in MODELS:
        per_model = [s for s in shapes if s.model == name]
        cells = []
        for m in args.rows:
            ours = sum(s.per_step * timings[s][m][0] for s in per_model)
            cublas = sum(s.per_step * timings[s][m][1] for s in per_model)
            cells.append(f"{ours * 1e3:.3f} / {cublas * 1e3:.3f} ms ({cublas / ours:.2f}x)")
        step_rows.append((name, *cells))
    print_table(("model", *(f"M={m}" for m in args.rows)), step_rows)

    worst = max(err for per_m in timings.values() for _, _, err in per_m.values())
    print(
        f"\nlargest relative difference between ours and F.linear: {worst:.1e} "
        "(each rounds to bf16: a few 1e-3)"
    )


if __name__ == "__main__":
    main()
