"""The matmul table from the original notes: our kernels against torch, CPU and GPU.

    python benchmarks/matmul.py [--sizes 100 1000 4096] [--no-cpu-large]

For each n: C = A @ B with n x n float32 inputs; our CPU kernel vs torch on CPU (MKL/OpenBLAS),
our CUDA kernel vs cuBLAS (float32 FMA, TF32 off), both timed with CUDA events after warm-up,
and whether our results equal torch's (allclose at float32 tolerance).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import print_table  # noqa: E402
from _timing import device_name, time_cpu, time_cuda  # noqa: E402
from tinyserve import ops  # noqa: E402


def close(x: torch.Tensor, y: torch.Tensor, n: int) -> bool:
    # Both are fp32 sums of n products; allow error growing like sqrt(n).
    return torch.allclose(x.float().cpu(), y.float().cpu(), rtol=1e-4, atol=1e-5 * n**0.5)


def fmt(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.3f} ms" if seconds < 1 else f"{seconds:.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 4096])
    parser.add_argument("--cpu-max", type=int, default=4096, help="skip CPU timings above this n")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    has_gpu = torch.cuda.is_available() and ops.cuda_kernels_available()

    rows = []
    for n in args.sizes:
        g = torch.Generator().manual_seed(n)
        a = torch.randn(n, n, generator=g)
        b = torch.randn(n, n, generator=g)
        ours_cpu = torch_cpu = ours_gpu = cublas = None
        equal = []
        if n <= args.cpu_max:
            ours_cpu = time_cpu(lambda a=a, b=b: ops.matmul(a, b), repeat=3)
            torch_cpu = time_cpu(lambda a=a, b=b: torch.matmul(a, b), repeat=3)
            equal.append(close(ops.matmul(a, b), torch.matmul(a, b), n))
        if has_gpu:
            da, db = a.cuda(), b.cuda()
            out = torch.empty_like(da)
            ours_gpu = time_cuda(lambda da=da, db=db, out=out: ops.matmul(da, db, out=out))
            cublas = time_cuda(lambda da=da, db=db, out=out: torch.matmul(da, db, out=out))
            equal.append(close(ops.matmul(da, db), torch.matmul(da, db), n))
        rows.append((n, ours_cpu, torch_cpu, ours_gpu, cublas, all(equal)))

    print(f"\nmatmul, float32, device: {device_name()}, CPU threads: {torch.get_num_threads()}")
    head = (
        "n",
        "ours CPU",
        "torch CPU",
        "CPU ratio",
        "ours GPU",
        "cuBLAS",
        "GPU ratio",
        "GPU TFLOP/s",
        "equal",
    )
    table = []
    for n, oc, tc, og, cb, eq in rows:
        cpu_ratio = f"{oc / tc:.2f}x" if oc and tc else "-"
        gpu_ratio = f"{og / cb:.2f}x" if og and cb else "-"
        tflops = f"{2 * n**3 / og / 1e12:.1f}" if og else "-"
        table.append(
            (
                str(n),
                fmt(oc),
                fmt(tc),
                cpu_ratio,
                fmt(og),
                fmt(cb),
                gpu_ratio,
                tflops,
                f"Results are equal: {eq}",
            )
        )
    print_table(head, table)


if __name__ == "__main__":
    main()
