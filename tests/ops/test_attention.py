"""tinyserve.ops.paged_attention_decode / paged_attention_prefill against the naive float64
references in tinyserve.ops.reference (per-sequence gather through the block table)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from tinyserve import ops
from tinyserve.ops.reference import paged_attention_decode_ref, paged_attention_prefill_ref

from .cuda_graph import capture

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# ‖out − ref‖ / ‖ref‖ bounds: float32 accumulation everywhere; 16-bit inputs are exact in the
# reference, so the error is the output rounding plus (CUDA tensor cores) the 16-bit softmax weights.
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}


@dataclass
class Batch:
    """A paged KV cache holding `seq_lens` tokens per sequence and queries for the last `q_lens`."""

    query: torch.Tensor  # [num_tokens, num_heads, head_dim]
    key_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    scale: float


def make_batch(
    seq_lens: list[int],
    q_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: str,
    seed: int,
    spare_blocks: int = 3,
    spare_columns: int = 2,
) -> Batch:
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    value_cache = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    # Every sequence gets distinct physical blocks in random (non-contiguous) order; unused table
    # entries hold -1, which a kernel must never dereference.
    perm = torch.randperm(num_blocks, generator=g)
    max_blocks = max(blocks_per_seq, default=0) + spare_columns
    block_tables = torch.full((len(seq_lens), max_blocks), -1, dtype=torch.int32)
    start = 0
    for s, n in enumerate(blocks_per_seq):
        block_tables[s, :n] = perm[start : start + n].int()
        start += n
    qsl = torch.tensor([0] + q_lens, dtype=torch.int64).cumsum(0).int()
    query = torch.randn(int(qsl[-1]), num_heads, head_dim, generator=g, dtype=torch.float64).to(dtype)
    return Batch(
        query.to(device),
        key_cache.to(device),
        value_cache.to(device),
        block_tables.to(device),
        qsl.to(device),
        torch.tensor(seq_lens, dtype=torch.int32, device=device),
        head_dim**-0.5,
    )


def check_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    got = out.detach().double().cpu()
    assert got.shape == ref.shape
    nonfinite = (~torch.isfinite(got)).nonzero()
    assert nonfinite.numel() == 0, (
        f"{what}: {nonfinite.shape[0]} non-finite (unwritten?) elements, first at {nonfinite[0].tolist()}"
    )
    err = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    if err >= TOL[dtype]:
        idx = (got - ref).abs().flatten().argmax().item()
        where = torch.unravel_index(torch.tensor(idx), got.shape)
        pytest.fail(
            f"{what}: relative error {err:.3g} >= {TOL[dtype]} for {dtype}; worst element "
            f"[token, head, dim] = {[int(i) for i in where]}: "
            f"got {got.flatten()[idx]:.6g}, want {ref.flatten()[idx]:.6g}"
        )


def run_decode(b: Batch, out: torch.Tensor | None = None, **kw) -> torch.Tensor:
    res = ops.paged_attention_decode(
        b.query, b.key_cache, b.value_cache, b.block_tables, b.seq_lens, b.scale, out=out, **kw
    )
    if res.is_cuda:
        torch.cuda.synchronize()
    return res


def run_prefill(b: Batch, out: torch.Tensor | None = None, **kw) -> torch.Tensor:
    res = ops.paged_attention_prefill(
        b.query,
        b.key_cache,
        b.value_cache,
        b.block_tables,
        b.query_start_loc,
        b.seq_lens,
        b.scale,
        out=out,
        **kw,
    )
    if res.is_cuda:
        torch.cuda.synchronize()
    return res


def decode_ref(b: Batch) -> torch.Tensor:
    return paged_attention_decode_ref(
        b.query, b.key_cache, b.value_cache, b.block_tables, b.seq_lens, b.scale
    )


def prefill_ref(b: Batch) -> torch.Tensor:
    return paged_attention_prefill_ref(
        b.query, b.key_cache, b.value_cache, b.block_tables, b.query_start_loc, b.seq_lens, b.scale
    )


def poisoned(b: Batch) -> torch.Tensor:
    return torch.full_like(b.query, float("nan"))


def capture_decode(b: Batch, out: torch.Tensor, max_seq_len: int) -> torch.cuda.CUDAGraph:
    """One decode call into `out` captured in a CUDA graph, its launch sized for max_seq_len (as the
    runner's decode graphs are); replays read b's tensors as they then stand."""
    graph, _ = capture(
        lambda: ops.paged_attention_decode(
            b.query,
            b.key_cache,
            b.value_cache,
            b.block_tables,
            b.seq_lens,
            b.scale,
            out=out,
            max_seq_len=max_seq_len,
        )
    )
    return graph


def replay_and_check(
    graph: torch.cuda.CUDAGraph, out: torch.Tensor, b: Batch, dtype: torch.dtype, what: str
) -> None:
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    check_close(out, decode_ref(b), dtype, what)


# ---- decode ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_notes_config(device, dtype):
    """The original notes: 2 sequences, 32 heads, block size 16."""
    b = make_batch([37, 200], [1, 1], 32, 32, 128, 16, dtype, device, seed=1)
    out = run_decode(b, out=poisoned(b))
    check_close(out, decode_ref(b), dtype, "decode notes config")


DECODE_CASES = [
    # (context_lens, num_heads, num_kv_heads, head_dim, block_size)
    ([1, 7, 17, 97], 8, 8, 64, 16),  # MHA, awkward lengths
    ([15, 16, 17, 31, 32, 33], 32, 8, 128, 16),  # GQA 4, block boundary +-1
    ([1, 63, 64, 65, 200], 16, 2, 128, 32),  # GQA 8
    ([5, 300], 8, 4, 8, 16),  # stories260K heads: head_dim 8, GQA 2
    ([9, 40, 1], 12, 4, 80, 8),  # head_dim 80, block size 8
    ([33, 70], 4, 1, 96, 16),  # MQA, head_dim 96
    ([19, 130], 4, 2, 256, 16),  # head_dim 256
    ([23], 6, 3, 40, 64),  # head_dim 40, block size 64
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"{c[1]}h{c[2]}kv-d{c[3]}-bs{c[4]}")
def test_decode(device, dtype, case):
    lens, num_heads, num_kv_heads, head_dim, block_size = case
    b = make_batch(
        lens, [1] * len(lens), num_heads, num_kv_heads, head_dim, block_size, dtype, device, seed=len(lens)
    )
    out = run_decode(b, out=poisoned(b))
    check_close(out, decode_ref(b), dtype, f"decode {case}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_long_context(device, dtype):
    """Context lengths up to 4096 (split-KV on CUDA), mixed with short ones."""
    b = make_batch([4096, 1, 2049, 513], [1] * 4, 8, 2, 128, 16, dtype, device, seed=7)
    check_close(run_decode(b, out=poisoned(b)), decode_ref(b), dtype, "decode long context")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 8, 80])
def test_decode_split_kv_cuda(dtype, head_dim):
    """One or two long sequences: few thread blocks, so the context is split and merged."""
    b = make_batch([3001, 4096], [1, 1], 8, 1, head_dim, 16, dtype, "cuda", seed=head_dim)
    ref = decode_ref(b)
    check_close(run_decode(b, out=poisoned(b)), ref, dtype, "split-KV")
    # Host-side bounds: exact, generous, and too small (must stay correct, only slower).
    for bound in (4096, 1 << 15, 300):
        check_close(run_decode(b, out=poisoned(b), max_seq_len=bound), ref, dtype, f"max_seq_len={bound}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_seqs", [24, 160])
def test_decode_few_and_many_blocks_cuda(dtype, num_seqs):
    """The decode kernel buffers three K/V tiles per block for launches of a couple of waves and two
    (more blocks per SM) for larger ones: 24 x 8 KV heads blocks take the first, 160 x 8 (more than
    two waves of 3 blocks on each of up to 132 SMs) the second."""
    lens = torch.randint(1, 700, (num_seqs,), generator=torch.Generator().manual_seed(num_seqs)).tolist()
    b = make_batch(lens, [1] * num_seqs, 16, 8, 128, 16, dtype, "cuda", seed=num_seqs)
    check_close(run_decode(b, out=poisoned(b)), decode_ref(b), dtype, f"decode {num_seqs} sequences")


@pytest.mark.cuda
@pytest.mark.parametrize("bound", [2048, 4096])
def test_decode_split_over_many_waves_cuda(bound):
    """112 sequences x 8 KV heads under a long length bound (a decode graph's): about two waves of
    blocks without splits, so the launch is split (on an H100/H200, three ways) into several waves
    of split blocks. One graph is replayed with all sequences long (every split leaves a partial in
    the workspace), then with lengths that are empty, short, at key-tile edges and long: no stale
    partial may reach a merged row, and no row may be left unwritten."""
    n, dtype = 112, torch.bfloat16
    g = torch.Generator().manual_seed(bound)
    edges = [0, 1, 63, 64, 65, 511, 512, 513, 1023, 1024, 1025, 1407, 1408, 1409, 2047, 2048]
    mixed = edges + torch.randint(1, 2049, (n - len(edges),), generator=g).tolist()
    # Made on the GPU (make_batch draws float64 keys on the CPU: far too slow at this size); block tables
    # wide enough for the bound, so that the launch is sized for it.
    gd = torch.Generator(device="cuda").manual_seed(bound)
    blocks = 2048 // 16
    caches = [torch.randn((n * blocks, 16, 8, 128), generator=gd, device="cuda").to(dtype) for _ in range(2)]
    tables = torch.full((n, 2 * blocks), -1, dtype=torch.int32, device="cuda")
    tables[:, :blocks] = torch.randperm(n * blocks, generator=gd, device="cuda").view(n, blocks).int()
    query = torch.randn((n, 16, 128), generator=gd, device="cuda").to(dtype)
    starts = torch.arange(n + 1, dtype=torch.int32, device="cuda")
    seq_lens = torch.full((n,), 2048, dtype=torch.int32, device="cuda")
    b = Batch(query, caches[0], caches[1], tables, starts, seq_lens, 128**-0.5)
    out = torch.empty_like(b.query)
    graph = capture_decode(b, out, bound)
    short = torch.randint(0, 1025, (n,), generator=g).tolist()
    cases = {"all long": [2048] * n, "mixed": mixed, "short": short, "mixed, permuted": mixed[::-1]}
    for name, lens in cases.items():
        b.seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        replay_and_check(graph, out, b, dtype, f"{name}, bound {bound}")


def _cache_with_block_stride(
    stride0: int,
    num_blocks: int,
    block_size: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: str,
    g: torch.Generator,
) -> torch.Tensor:
    """A [num_blocks, block_size, kv_heads, head_dim] cache whose blocks lie stride0 elements apart
    (only the blocks themselves are written; the storage between them is never read)."""
    block = block_size * kv_heads * head_dim
    storage = torch.empty((num_blocks - 1) * stride0 + block, dtype=dtype, device=device)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    cache = storage.as_strided(shape, (stride0, kv_heads * head_dim, head_dim, 1))
    cache.copy_(torch.randn(cache.shape, generator=g, dtype=torch.float64).to(dtype))
    return cache


@pytest.mark.parametrize(
    "device,stride_bytes",
    [
        ("cpu", 8192 + 128),
        # Just past 4 GB between blocks: block 1 lies beyond the tensor-core kernel's 32-bit row
        # offsets, so the launch must take the CUDA-core kernel (attention.cu, mma_layout_ok).
        pytest.param("cuda", (1 << 32) + 8192, marks=pytest.mark.cuda),
    ],
    ids=["cpu", "cuda-4GB"],
)
def test_decode_cache_with_a_wide_block_stride(device, stride_bytes):
    """A cache view whose blocks are far apart (a slice of a larger pool): every block is read at its
    own address, with the tensor-core kernel's 32-bit offsets or without them."""
    bs, kv_heads, head_dim, heads, dtype = 16, 2, 128, 4, torch.bfloat16
    stride0 = stride_bytes // 2
    if device == "cuda" and torch.cuda.mem_get_info()[0] < 2 * stride_bytes + (1 << 30):
        pytest.skip("needs about 9 GB of free GPU memory")
    g = torch.Generator().manual_seed(7)
    key_cache = _cache_with_block_stride(stride0, 2, bs, kv_heads, head_dim, dtype, device, g)
    value_cache = _cache_with_block_stride(stride0, 2, bs, kv_heads, head_dim, dtype, device, g)
    b = Batch(
        torch.randn(2, heads, head_dim, generator=g, dtype=torch.float64).to(device=device, dtype=dtype),
        key_cache,
        value_cache,
        torch.tensor([[1, 0], [1, -1]], dtype=torch.int32, device=device),  # both reach block 1
        torch.tensor([0, 1, 2], dtype=torch.int32, device=device),
        torch.tensor([20, 9], dtype=torch.int32, device=device),
        head_dim**-0.5,
    )
    check_close(run_decode(b, out=poisoned(b)), decode_ref(b), dtype, "decode, wide block stride")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_metadata_ready_changes_nothing(device, dtype):
    """metadata_ready lets the CUDA kernel read lengths and block tables before its PDL wait: the
    result is the same bits, with and without splits (and on the CPU the flag is ignored)."""
    b = make_batch([700, 1, 3000, 65, 0], [1] * 5, 16, 8, 128, 16, dtype, device, seed=11)
    for bound in (None, 4096):
        want = run_decode(b, max_seq_len=bound)
        assert torch.equal(run_decode(b, max_seq_len=bound, metadata_ready=True), want)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_empty_context_gives_zeros(device):
    b = make_batch([0, 5], [1, 1], 4, 2, 64, 16, torch.float32, device, seed=3)
    out = run_decode(b, out=poisoned(b))
    assert torch.equal(out[0].cpu(), torch.zeros(4, 64))
    check_close(out, decode_ref(b), torch.float32, "empty context")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_strided_query_and_out(device, dtype):
    """query sliced out of a fused QKV tensor; out a strided view whose other half must stay untouched."""
    num_heads, num_kv_heads, head_dim = 8, 2, 64
    b = make_batch([17, 100, 33], [1] * 3, num_heads, num_kv_heads, head_dim, 16, dtype, device, seed=11)
    qkv = torch.randn(3, num_heads + 2 * num_kv_heads, head_dim, dtype=dtype, device=device)
    qkv[:, :num_heads] = b.query
    b.query = qkv[:, :num_heads]
    assert not b.query.is_contiguous()
    wide = torch.full((3, num_heads, 2 * head_dim), float("nan"), dtype=dtype, device=device)
    out = wide[:, :, head_dim:]
    res = run_decode(b, out=out)
    assert res.data_ptr() == out.data_ptr()
    check_close(out, decode_ref(b), dtype, "strided decode")
    assert torch.isnan(wide[:, :, :head_dim]).all(), "wrote outside out's view"


# ---- prefill --------------------------------------------------------------------------------------

PREFILL_CASES = [
    # (seq_lens, q_lens, num_heads, num_kv_heads, head_dim, block_size)
    ([1, 7, 17, 97], [1, 7, 17, 97], 8, 8, 64, 16),  # full prompts, MHA
    ([40, 33, 16, 200], [8, 1, 16, 97], 32, 8, 128, 16),  # cached prefixes + chunks, GQA 4
    ([65, 129], [65, 2], 16, 2, 128, 32),  # GQA 8, decode-like q_len 2
    ([300, 21], [260, 21], 8, 4, 8, 16),  # stories260K heads
    ([50, 9], [17, 9], 12, 4, 80, 8),  # head_dim 80, block size 8
    ([70], [70], 4, 1, 96, 16),  # MQA
    ([31, 130], [31, 99], 4, 2, 256, 16),  # head_dim 256
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: f"{c[2]}h{c[3]}kv-d{c[4]}-bs{c[5]}")
def test_prefill(device, dtype, case):
    seq_lens, q_lens, num_heads, num_kv_heads, head_dim, block_size = case
    b = make_batch(
        seq_lens, q_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, device, seed=sum(q_lens)
    )
    out = run_prefill(b, out=poisoned(b))
    check_close(out, prefill_ref(b), dtype, f"prefill {case}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_chunked_long_prefix(device, dtype):
    """Chunked prefill: short chunks after cached prefixes of up to 4000 tokens, plus a decode row."""
    b = make_batch([4000, 1025, 513], [96, 64, 1], 8, 2, 128, 16, dtype, device, seed=5)
    check_close(run_prefill(b, out=poisoned(b)), prefill_ref(b), dtype, "chunked prefill")


@pytest.mark.parametrize("device", DEVICES)
def test_prefill_chunks_compose(device):
    """Prefilling a prompt in two chunks gives the rows of one full prefill."""
    b = make_batch([77], [77], 8, 2, 64, 16, torch.float32, device, seed=9)
    full = run_prefill(b)
    q = b.query
    for lo, hi in ((0, 30), (30, 77)):
        b.query = q[lo:hi]
        b.seq_lens = torch.tensor([hi], dtype=torch.int32, device=device)
        b.query_start_loc = torch.tensor([0, hi - lo], dtype=torch.int32, device=device)
        torch.testing.assert_close(run_prefill(b), full[lo:hi], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_with_q_len_one_matches_decode(device, dtype):
    b = make_batch([1, 16, 17, 250], [1, 1, 1, 1], 16, 4, 64, 16, dtype, device, seed=13)
    check_close(run_prefill(b, out=poisoned(b)), decode_ref(b), dtype, "prefill as decode")
    torch.testing.assert_close(run_prefill(b).float(), run_decode(b).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_prefill_strided_query_and_out(device):
    num_heads, num_kv_heads, head_dim = 8, 4, 64
    b = make_batch([20, 45], [20, 13], num_heads, num_kv_heads, head_dim, 16, torch.float32, device, seed=17)
    qkv = torch.randn(33, num_heads + 2 * num_kv_heads, head_dim, device=device)
    qkv[:, :num_heads] = b.query
    b.query = qkv[:, :num_heads]
    wide = torch.full((33, num_heads, 2 * head_dim), float("nan"), device=device)
    out = wide[:, :, :head_dim]
    run_prefill(b, out=out)
    check_close(out, prefill_ref(b), torch.float32, "strided prefill")
    assert torch.isnan(wide[:, :, head_dim:]).all(), "wrote outside out's view"


@pytest.mark.parametrize("device", DEVICES)
def test_prefill_empty_sequence_in_batch(device):
    """A sequence with no query tokens (q_len 0) between others."""
    b = make_batch([10, 30, 5], [3, 0, 5], 4, 4, 64, 16, torch.float32, device, seed=19)
    check_close(run_prefill(b, out=poisoned(b)), prefill_ref(b), torch.float32, "q_len 0")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_hints_cuda(dtype):
    """max_query_len / max_seq_len hints (exact, generous, too small) and a split-KV prefill."""
    b = make_batch([3000, 40], [12, 40], 8, 1, 128, 16, dtype, "cuda", seed=23)
    ref = prefill_ref(b)
    for kw in (
        {},
        {"max_query_len": 40, "max_seq_len": 3000},
        {"max_query_len": 64, "max_seq_len": 1 << 14},
        {"max_seq_len": 100},
    ):
        check_close(run_prefill(b, out=poisoned(b), **kw), ref, dtype, f"hints {kw}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_large_cuda(dtype):
    """Long prompts with many query tiles and the causal mask everywhere."""
    b = make_batch([2048, 1000, 777], [2048, 1000, 500], 16, 4, 128, 16, dtype, "cuda", seed=29)
    check_close(run_prefill(b, out=poisoned(b)), prefill_ref(b), dtype, "large prefill")


# ---- errors ---------------------------------------------------------------------------------------


def _good(device: str = "cpu") -> Batch:
    return make_batch([5, 9], [1, 1], 4, 2, 16, 16, torch.float32, device, seed=0)


def _decode_args(b: Batch) -> list:
    return [b.query, b.key_cache, b.value_cache, b.block_tables, b.seq_lens, b.scale]


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.__setitem__(0, a[0].double()), TypeError, "query has dtype float64"),
        (lambda a: a.__setitem__(0, a[0].bfloat16()), TypeError, "supported: float32, float16, bfloat16"),
        (lambda a: a.__setitem__(1, a[1].half()), TypeError, "key_cache/value_cache have dtypes"),
        (
            lambda a: a.__setitem__(3, a[3].long()),
            TypeError,
            "block_tables has dtype int64; supported: int32",
        ),
        (lambda a: a.__setitem__(4, a[4].long()), TypeError, "context_lens has dtype int64"),
        (lambda a: a.__setitem__(0, a[0][:, :3]), ValueError, "multiple of num_kv_heads"),
        (lambda a: a.__setitem__(0, a[0][0]), ValueError, "query must be 3-D"),
        (lambda a: a.__setitem__(0, a[0][:, :, :8]), ValueError, "head_dim 8 differs"),
        (lambda a: a.__setitem__(1, a[1][:, :12]), ValueError, "value_cache shape"),
        (
            lambda a: (a.__setitem__(1, a[1][:, :12]), a.__setitem__(2, a[2][:, :12])),
            ValueError,
            "power of two",
        ),
        (lambda a: a.__setitem__(4, a[4][:1]), ValueError, "context_lens 1 entries"),
        (lambda a: a.__setitem__(3, a[3][:, None]), ValueError, "block_tables must be 2-D"),
        (lambda a: a.__setitem__(0, "query"), TypeError, "query must be a torch.Tensor"),
        (lambda a: a.__setitem__(0, a[0].transpose(1, 2)), ValueError, "head_dim"),
    ],
)
def test_decode_bad_input(mutate, exc, match):
    args = _decode_args(_good())
    mutate(args)
    with pytest.raises(exc, match=match):
        ops.paged_attention_decode(*args)


def test_bad_head_dim_and_out():
    big = torch.randn(2, 16, 2, 300)
    with pytest.raises(ValueError, match=r"head_dim \(key_cache.shape\[3\]\) must be in \[1, 256\]"):
        ops.paged_attention_decode(
            torch.randn(2, 2, 300),
            big,
            big,
            torch.zeros(2, 1, dtype=torch.int32),
            torch.ones(2, dtype=torch.int32),
            1.0,
        )
    b = _good()
    with pytest.raises(ValueError, match="out must be"):
        run_decode(b, out=torch.empty(2, 4, 8))
    with pytest.raises(ValueError, match="out must be"):
        run_decode(b, out=torch.empty_like(b.query).bfloat16())
    with pytest.raises(ValueError, match="max_seq_len must be a non-negative int"):
        run_decode(b, max_seq_len=-1)
    with pytest.raises(ValueError, match="max_query_len must be a non-negative int"):
        run_prefill(b, max_query_len=2.5)


def test_cpu_checks_lengths_and_tables():
    """On the CPU the lengths are host memory, so they are validated (CUDA cannot without a sync)."""
    b = _good()
    b.seq_lens = torch.tensor([5, 100], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"seq_lens\[1\] = 100 is outside"):
        run_decode(b)
    b = _good()
    b.block_tables[1, 0] = 999
    with pytest.raises(ValueError, match=r"block_tables\[1, 0\] = 999 is outside"):
        run_decode(b)
    b = make_batch([5, 9], [2, 3], 4, 2, 16, 16, torch.float32, "cpu", seed=0)
    b.query_start_loc = torch.tensor([0, 4, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="query_start_loc must be non-decreasing"):
        run_prefill(b)


def test_prefill_bad_input():
    b = make_batch([5, 9], [2, 3], 4, 2, 16, 16, torch.float32, "cpu", seed=0)
    with pytest.raises(ValueError, match="query_start_loc 3 entries"):
        ops.paged_attention_prefill(
            b.query, b.key_cache, b.value_cache, b.block_tables, b.query_start_loc[:2], b.seq_lens, b.scale
        )
    with pytest.raises(TypeError, match="query_start_loc has dtype int64"):
        ops.paged_attention_prefill(
            b.query, b.key_cache, b.value_cache, b.block_tables, b.query_start_loc.long(), b.seq_lens, b.scale
        )
    with pytest.raises(ValueError, match="seq_lens must be 1-D"):
        ops.paged_attention_prefill(
            b.query, b.key_cache, b.value_cache, b.block_tables, b.query_start_loc, b.seq_lens[None], b.scale
        )


@pytest.mark.cuda
def test_mixed_devices_raise():
    b = _good()
    args = _decode_args(b)
    args[0] = args[0].cuda()
    with pytest.raises(ValueError, match="query is on cuda:0 but the KV cache is on cpu"):
        ops.paged_attention_decode(*args)
    args = _decode_args(b)
    args[1], args[2] = args[1].cuda(), args[2].cuda()
    args[0] = args[0].cuda()
    with pytest.raises(ValueError, match="block_tables is on cpu but the KV cache is on cuda"):
        ops.paged_attention_decode(*args)


# ---- CUDA graphs ----------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_cuda_graph_replay(dtype):
    """Captured once with a fixed max_seq_len; replayed after lengths and tables change in place."""
    b = make_batch([4096, 4096, 4096], [1] * 3, 16, 4, 128, 16, dtype, "cuda", seed=31)
    out = torch.full_like(b.query, float("nan"))
    graph = capture_decode(b, out, 4096)
    g = torch.Generator().manual_seed(0)
    for lens in ([100, 3000, 1], [4096, 17, 2049], [0, 1, 256]):
        b.seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        b.block_tables.copy_(b.block_tables[torch.randperm(3, generator=g)])
        b.query.copy_(torch.randn(b.query.shape, generator=g).to(dtype))
        replay_and_check(graph, out, b, dtype, f"graph replay {lens}")


@pytest.mark.cuda
def test_prefill_cuda_graph_replay():
    b = make_batch([4000, 2000], [40, 24], 8, 2, 64, 16, torch.float16, "cuda", seed=37)
    out = torch.full_like(b.query, float("nan"))
    graph, _ = capture(
        lambda: ops.paged_attention_prefill(
            b.query,
            b.key_cache,
            b.value_cache,
            b.block_tables,
            b.query_start_loc,
            b.seq_lens,
            b.scale,
            out=out,
            max_query_len=64,
            max_seq_len=4096,
        )
    )
    for qsl, lens in (([0, 40, 64], [4000, 2000]), ([0, 1, 64], [300, 63]), ([0, 64, 64], [64, 5])):
        b.query_start_loc.copy_(torch.tensor(qsl, dtype=torch.int32))
        b.seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check_close(out, prefill_ref(b), torch.float16, f"graph replay {qsl} {lens}")
