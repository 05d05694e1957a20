"""The engine on the GPU: CUDA graphs (padded batch buckets) and eager mode give the reference outputs."""

from __future__ import annotations

import random

import pytest

from tinyserve import SamplingParams

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module", params=[False, True], ids=["graphs", "eager"])
def cuda_llm(request, stories260k_path):
    from tinyserve import LLM

    # A fixed, small pool: the two parametrised engines may be alive at once.
    llm = LLM(
        str(stories260k_path),
        device="cuda",
        dtype="float32",
        max_num_seqs=24,
        enforce_eager=request.param,
        num_kv_blocks=512,
    )
    assert (llm.engine.runner.graphs is None) == request.param
    yield llm
    del llm
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()


def test_reference_greedy_on_cuda(cuda_llm, stories_reference):
    ref = stories_reference["greedy"]
    params = SamplingParams(temperature=0.0, max_tokens=len(ref["new_token_ids"]), ignore_eos=True)
    out = cuda_llm.generate(stories_reference["prompt"], params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref["new_token_ids"]
    assert out.text == ref["continuation_text"]


def test_batches_of_every_bucket_equal_cpu(cuda_llm, stories_llm):
    # 1..19 sequences: padded graph buckets (1, 2, 4, 8, 16, 24) and finishing at different steps
    rng = random.Random(0)
    prompts = [[1] + [rng.randint(3, 511) for _ in range(rng.randint(1, 40))] for _ in range(19)]
    params = [
        SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 30), ignore_eos=True) for _ in prompts
    ]
    got = cuda_llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    want = stories_llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for g, w in zip(got, want, strict=True):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids


def test_seeded_sampling_reproducible_on_cuda(cuda_llm):
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=42, max_tokens=20, ignore_eos=True)
    a = cuda_llm.generate("Once upon a time", params, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)] * 3
    outs = cuda_llm.generate(
        ["Lily", "Once upon a time", "Tom"], [others[0], params, others[1]], use_tqdm=False
    )
    assert outs[1].outputs[0].token_ids == a


def test_no_blocks_leak_on_cuda(cuda_llm):
    engine = cuda_llm.engine
    for i in range(6):
        engine.add_request(f"leak-{i}", [1, 5, 6, 7], SamplingParams(max_tokens=40, ignore_eos=True))
    for _ in range(4):
        engine.step()
    for i in range(3):
        engine.abort_request(f"leak-{i}")
    while engine.has_unfinished_requests():
        engine.step()
    engine.step()
    assert engine.stats().kv.num_used_blocks == 0
