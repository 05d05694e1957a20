"""Paged attention against torch scaled_dot_product_attention on contiguous K/V (issue 4).

    python benchmarks/attention.py                 # GPU table
    python benchmarks/attention.py --device cpu    # smaller sizes on the CPU

GPU: decode for (num_seqs, context_len) in (1, 8192), (8, 8192), (64, 2048), (256, 1024) with 32
query heads, 8 KV heads, head_dim 128, bf16, block size 16 and random block tables: time, achieved
GB/s (K+V bytes read / time), the ratio to the device-to-device copy bandwidth measured in the same
run, and the speed relative to SDPA on the same K/V laid out contiguously. Prefill: 8 prompts x 2048
tokens, causal, TFLOP/s and the ratio to SDPA. Each op is captured `--calls` times in a CUDA graph
(so host overhead stays out, and capturability is exercised), cycling over several copies of the
inputs when one copy would fit in L2; the median of the replays after warm-up is reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import copy_bandwidth, device_name, time_cpu  # noqa: E402
from tinyserve import ops  # noqa: E402

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16


def time_graph(calls: list[Callable[[], object]], repeat: int = 15) -> float:
    """Median seconds per call of `calls`, captured back to back in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph (first-call setup, allocator)
        for fn in calls:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / len(calls))
    return statistics.median(samples)


class DecodeCase:
    """A paged KV cache (random block order) and the same K/V contiguous for SDPA."""

    def __init__(self, num_seqs: int, context_len: int, device: str, dtype: torch.dtype, seed: int) -> None:
        g = torch.Generator(device=device).manual_seed(seed)
        blocks_per_seq = -(-context_len // BLOCK_SIZE)
        num_blocks = num_seqs * blocks_per_seq
        shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
        self.key_cache = torch.randn(shape, generator=g, device=device, dtype=dtype)
        self.value_cache = torch.randn(shape, generator=g, device=device, dtype=dtype)
        perm = torch.randperm(num_blocks, generator=g, device=device)
        self.block_tables = perm.reshape(num_seqs, blocks_per_seq).int()
        self.context_lens = torch.full((num_seqs,), context_len, dtype=torch.int32, device=device)
        self.query = torch.randn(num_seqs, NUM_HEADS, HEAD_DIM, generator=g, device=device, dtype=dtype)
        self.out = torch.empty_like(self.query)
        self.context_len = context_len

        # Contiguous [num_seqs, num_kv_heads, context_len, head_dim] copies for SDPA.
        def dense(cache: torch.Tensor) -> torch.Tensor:
            gathered = cache[self.block_tables.long()]  # [seqs, blocks, block_size, kv_heads, head_dim]
            flat = gathered.reshape(num_seqs, -1, NUM_KV_HEADS, HEAD_DIM)[:, :context_len]
            return flat.transpose(1, 2).contiguous()

        self.k_dense, self.v_dense = dense(self.key_cache), dense(self.value_cache)
        self.q_dense = self.query[:, :, None, :]  # [seqs, heads, 1, head_dim]
        self.sdpa_out = torch.empty(num_seqs, NUM_HEADS, 1, HEAD_DIM, device=device, dtype=dtype)

    def ours(self) -> torch.Tensor:
        return ops.paged_attention_decode(
            self.query,
            self.key_cache,
            self.value_cache,
            self.block_tables,
            self.context_lens,
            HEAD_DIM**-0.5,
            out=self.out,
            max_seq_len=self.context_len,
        )

    def sdpa(self) -> torch.Tensor:
        return F.scaled_dot_product_attention(self.q_dense, self.k_dense, self.v_dense, enable_gqa=True)

    def kv_bytes(self) -> int:
        return (
            2
            * self.context_lens.numel()
            * self.context_len
            * NUM_KV_HEADS
            * HEAD_DIM
            * self.query.element_size()
        )


class PrefillCase:
    def __init__(self, num_seqs: int, prompt_len: int, device: str, dtype: torch.dtype, seed: int) -> None:
        g = torch.Generator(device=device).manual_seed(seed)
        blocks_per_seq = -(-prompt_len // BLOCK_SIZE)
        num_blocks = num_seqs * blocks_per_seq
        shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
        self.key_cache = torch.randn(shape, generator=g, device=device, dtype=dtype)
        self.value_cache = torch.randn(shape, generator=g, device=device, dtype=dtype)
        perm = torch.randperm(num_blocks, generator=g, device=device)
        self.block_tables = perm.reshape(num_seqs, blocks_per_seq).int()
        self.seq_lens = torch.full((num_seqs,), prompt_len, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(num_seqs + 1, dtype=torch.int32, device=device) * prompt_len
        self.query = torch.randn(
            num_seqs * prompt_len, NUM_HEADS, HEAD_DIM, generator=g, device=device, dtype=dtype
        )
        self.out = torch.empty_like(self.query)
        self.num_seqs, self.prompt_len = num_seqs, prompt_len

        def dense(cache: torch.Tensor) -> torch.Tensor:
            gathered = cache[self.block_tables.long()].reshape(num_seqs, -1, NUM_KV_HEADS, HEAD_DIM)
            return gathered[:, :prompt_len].transpose(1, 2).contiguous()

        self.k_dense, self.v_dense = dense(self.key_cache), dense(self.value_cache)
        self.q_dense = (
            self.query.reshape(num_seqs, prompt_len, NUM_HEADS, HEAD_DIM).transpose(1, 2).contiguous()
        )

    def ours(self) -> torch.Tensor:
        return ops.paged_attention_prefill(
            self.query,
            self.key_cache,
            self.value_cache,
            self.block_tables,
            self.query_start_loc,
            self.seq_lens,
            HEAD_DIM**-0.5,
            out=self.out,
            max_query_len=self.prompt_len,
            max_seq_len=self.prompt_len,
        )

    def sdpa(self) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            self.q_dense, self.k_dense, self.v_dense, is_causal=True, enable_gqa=True
        )

    def sdpa_as_ours(self) -> torch.Tensor:  # [tokens, heads, head_dim]
        return self.sdpa().transpose(1, 2).reshape(-1, NUM_HEADS, HEAD_DIM)

    def flops(self) -> float:  # QK^T and PV over the causal triangle
        n = self.prompt_len
        return 4.0 * self.num_seqs * NUM_HEADS * HEAD_DIM * n * (n + 1) / 2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def run_gpu(args: argparse.Namespace) -> None:
    dtype = torch.bfloat16
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    copy_bw = copy_bandwidth()
    rows = []
    for num_seqs, context_len in ((1, 8192), (8, 8192), (64, 2048), (256, 1024)):
        first = DecodeCase(num_seqs, context_len, "cuda", dtype, seed=num_seqs)
        # Enough copies that one pass over them cannot live in L2.
        copies = [first] + [
            DecodeCase(num_seqs, context_len, "cuda", dtype, seed=num_seqs + i)
            for i in range(1, min(8, max(1, -(-4 * l2 // first.kv_bytes()))))
        ]
        calls = [c.ours for c in copies] * max(1, args.calls // len(copies))
        t_ours = time_graph(calls)
        t_sdpa = time_graph([c.sdpa for c in copies] * max(1, args.calls // len(copies)))
        err = rel_err(first.ours(), first.sdpa()[:, :, 0])
        gbs = first.kv_bytes() / t_ours
        rows.append(
            (
                f"decode {num_seqs} x {context_len}",
                fmt_time(t_ours),
                f"{gbs / 1e9:.0f} GB/s",
                f"{gbs / copy_bw * 100:.0f}%",
                fmt_time(t_sdpa),
                f"{t_sdpa / t_ours:.2f}x",
                f"{err:.1e}",
            )
        )
        del copies, first
        torch.cuda.empty_cache()
    case = PrefillCase(8, 2048, "cuda", dtype, seed=1)
    t_ours = time_graph([case.ours] * 5)
    t_sdpa = time_graph([case.sdpa] * 5)
    err = rel_err(case.ours(), case.sdpa_as_ours())
    rows.append(
        (
            "prefill 8 x 2048 causal",
            fmt_time(t_ours),
            f"{case.flops() / t_ours / 1e12:.0f} TFLOP/s",
            "-",
            fmt_time(t_sdpa),
            f"{t_sdpa / t_ours:.2f}x",
            f"{err:.1e}",
        )
    )
    print(
        f"\npaged attention, bf16, {NUM_HEADS} heads / {NUM_KV_HEADS} KV heads, head_dim {HEAD_DIM}, "
        f"block size {BLOCK_SIZE}; device: {device_name()}; copy bandwidth {copy_bw / 1e9:.0f} GB/s"
    )
    print_table(
        (
            "case",
            "ours",
            "ours rate",
            "of copy BW",
            "SDPA (contiguous)",
            "SDPA time / ours",
            "rel. err vs SDPA",
        ),
        rows,
    )


def run_cpu(args: argparse.Namespace) -> None:
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    rows = []
    for num_seqs, context_len in ((1, 2048), (8, 1024), (32, 256)):
        case = DecodeCase(num_seqs, context_len, "cpu", dtype, seed=num_seqs)
        t_ours = time_cpu(case.ours, repeat=5)
        t_sdpa = time_cpu(case.sdpa, repeat=5)
        err = rel_err(case.ours(), case.sdpa()[:, :, 0])
        rows.append(
            (
                f"decode {num_seqs} x {context_len}",
                fmt_time(t_ours),
                f"{case.kv_bytes() / t_ours / 1e9:.1f} GB/s",
                "-",
                fmt_time(t_sdpa),
                f"{t_sdpa / t_ours:.2f}x",
                f"{err:.1e}",
            )
        )
    case = PrefillCase(2, 256, "cpu", dtype, seed=1)
    t_ours = time_cpu(case.ours, repeat=3)
    t_sdpa = time_cpu(case.sdpa, repeat=3)
    rows.append(
        (
            "prefill 2 x 256 causal",
            fmt_time(t_ours),
            f"{case.flops() / t_ours / 1e9:.1f} GFLOP/s",
            "-",
            fmt_time(t_sdpa),
            f"{t_sdpa / t_ours:.2f}x",
            f"{rel_err(case.ours(), case.sdpa_as_ours()):.1e}",
        )
    )
    print(
        f"\npaged attention, {args.dtype}, {NUM_HEADS} heads / {NUM_KV_HEADS} KV heads, head_dim {HEAD_DIM}, "
        f"block size {BLOCK_SIZE}; device: {device_name()}"
    )
    print_table(
        (
            "case",
            "ours",
            "ours rate",
            "of copy BW",
            "SDPA (contiguous)",
            "SDPA time / ours",
            "rel. err vs SDPA",
        ),
        rows,
    )


def print_table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="CPU runs only")
    parser.add_argument("--calls", type=int, default=16, help="op calls per captured graph (GPU)")
    args = parser.parse_args()
    if args.device == "cuda":
        if not ops.cuda_kernels_available():
            raise SystemExit("tinyserve._C was built without CUDA")
        run_gpu(args)
    else:
        run_cpu(args)


if __name__ == "__main__":
    main()
