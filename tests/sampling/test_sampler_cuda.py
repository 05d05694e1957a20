"""On a GPU: building the metadata and sampling never sync with the host (only to_host does)."""

from __future__ import annotations

import pytest
import torch

from tinyserve.sampling import RequestSamplingState, Sampler, SamplingMetadata
from tinyserve.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

VOCAB = 151_936  # Qwen's vocabulary: the size the sampler meets in practice


def mixed_batch(num_seqs: int) -> tuple[list[SamplingParams], list[RequestSamplingState]]:
    params, states = [], []
    for i in range(num_seqs):
        kind = i % 5
        p = [
            SamplingParams(temperature=0.0, logprobs=5),
            SamplingParams(temperature=0.8, top_k=50, seed=i),
            SamplingParams(temperature=1.0, top_p=0.9, min_p=0.05, repetition_penalty=1.2, min_tokens=4),
            SamplingParams(temperature=0.7, presence_penalty=0.5, frequency_penalty=0.3, logprobs=2),
            SamplingParams(temperature=1.1, top_k=20, top_p=0.95, seed=1000 + i),
        ][kind]
        params.append(p)
        states.append(
            RequestSamplingState(list(range(i, i + 40)), list(range(3 * i, 3 * i + 2 + i % 7)), p.seed)
        )
    return params, states


@pytest.mark.parametrize("all_greedy", [False, True])
def test_no_host_sync_inside_the_sampler(all_greedy: bool) -> None:
    params, states = mixed_batch(64)
    if all_greedy:
        params = [SamplingParams(temperature=0.0) for _ in params]
    logits = torch.randn(64, VOCAB, device="cuda", dtype=torch.bfloat16)
    sampler = Sampler()
    sampler(
        logits, SamplingMetadata.build(params, states, vocab_size=VOCAB, device="cuda", eos_token_ids=[2])
    )
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        md = SamplingMetadata.build(params, states, vocab_size=VOCAB, device="cuda", eos_token_ids=[2])
        out = sampler(logits, md)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    host = out.to_host()
    assert len(host.sampled_token_ids) == 64 and all(0 <= t < VOCAB for t in host.sampled_token_ids)
    if not all_greedy:
        assert host.logprobs is not None and len(host.logprobs.token_ids[0]) == 6


def test_benchmark_step_time() -> None:
    """Not asserted: prints the time of one build + sample step of 256 rows (CUDA events)."""
    params, states = mixed_batch(256)
    logits = torch.randn(256, VOCAB, device="cuda", dtype=torch.bfloat16)
    sampler = Sampler()
    configs = {
        "all greedy": ([SamplingParams(temperature=0.0)] * 256, [RequestSamplingState()] * 256),
        "random, top-k/p": ([SamplingParams(top_k=50, top_p=0.9)] * 256, [RequestSamplingState()] * 256),
        "mixed (penalties, seeds, logprobs)": (params, states),
    }
    for name, (ps, ss) in configs.items():
        for _ in range(3):
            sampler(logits, SamplingMetadata.build(ps, ss, vocab_size=VOCAB, device="cuda")).to_host()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            sampler(logits, SamplingMetadata.build(ps, ss, vocab_size=VOCAB, device="cuda")).to_host()
        end.record()
        end.synchronize()
        print(
            f"{torch.cuda.get_device_name()} 256 x {VOCAB} {name}: {start.elapsed_time(end) / 10:.3f} ms/step"
        )


@pytest.mark.parametrize(
    "extra",
    [{}, {"top_k": 50}, {"top_p": 0.9}, {"top_k": 40, "min_p": 0.02, "presence_penalty": 0.5}],
    ids=["plain", "top-k", "top-p", "top-k-min-p-penalty"],
)
def test_seeded_rows_same_tokens_on_cpu_and_cuda(extra: dict) -> None:
    """Seeded rows draw the same noise on both devices (up to the last bit of a log), so they pick
    the same tokens, on every sampler path."""
    num_seqs = 32
    logits = torch.randn(num_seqs, VOCAB, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    params = [SamplingParams(temperature=0.8, seed=5000 + i, **extra) for i in range(num_seqs)]
    states = [RequestSamplingState([1, 2], list(range(i % 9)), p.seed) for i, p in enumerate(params)]
    picked = {}
    for device in ("cpu", "cuda"):
        md = SamplingMetadata.build(params, states, vocab_size=VOCAB, device=device)
        picked[device] = Sampler()(logits.to(device), md).sampled_token_ids.cpu()
    same = (picked["cpu"] == picked["cuda"]).sum().item()
    assert same >= num_seqs - 1, f"{num_seqs - same} rows differ (only exact float near-ties may)"


def test_metadata_on_cuda_matches_cpu() -> None:
    """The single packed host->device copy (float columns, then uint64 keys and counters at an 8-byte
    offset) gives the same per-row tensors as the CPU build."""
    params, states = mixed_batch(37)
    built = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)  # the same step key for the unseeded rows
        built[device] = SamplingMetadata.build(
            params, states, vocab_size=VOCAB, device=device, eos_token_ids=[2]
        )
    names = ["temperature", "is_greedy", "top_k", "top_p", "min_p", "presence_penalty", "noise_keys"]
    for name in [*names, "noise_counters", "frequency_penalty", "repetition_penalty"]:
        cpu, cuda = getattr(built["cpu"], name), getattr(built["cuda"], name)
        assert cpu is not None and cuda is not None and cuda.device.type == "cuda", name
        assert torch.equal(cpu, cuda.cpu()), name
