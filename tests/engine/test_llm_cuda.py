"""The engine on the GPU: CUDA graphs (padded batch buckets) and eager mode give the reference outputs."""

from __future__ import annotations

import gc
import json
import random

import pytest

from tinyserve import SamplingParams

pytestmark = pytest.mark.cuda


def _free_gpu_memory() -> None:
    """After `del llm`: collect the engine (reference cycles) and return its KV pool and graph
    memory to the device, so that the next engine of a test sizes its pool from a clean card."""
    import torch

    gc.collect()
    torch.cuda.empty_cache()


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
    _free_gpu_memory()


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


# ---- async scheduling (the CUDA default) against synchronous steps ---------------------------------


@pytest.fixture(scope="module")
def cuda_sync_llm(stories260k_path):
    from tinyserve import LLM

    llm = LLM(
        str(stories260k_path),
        device="cuda",
        dtype="float32",
        max_num_seqs=24,
        num_kv_blocks=512,
        async_scheduling=False,
    )
    yield llm
    del llm
    _free_gpu_memory()


def _mixed_workload(n: int, seed: int):
    """Greedy and seeded rows only (unseeded draws depend on the batch), with every sampler stage."""
    rng = random.Random(seed)
    prompts = [[1] + [rng.randint(3, 511) for _ in range(rng.randint(1, 60))] for _ in range(n)]
    params = []
    for _ in prompts:
        max_tokens = rng.choice([1, 7, 30, 300])
        params.append(
            SamplingParams(
                n=rng.choice([1, 1, 2]),
                temperature=rng.choice([0.0, 0.7, 1.0]),
                top_k=rng.choice([-1, 20]),
                top_p=rng.choice([1.0, 0.9]),
                min_p=rng.choice([0.0, 0.05]),
                repetition_penalty=rng.choice([1.0, 1.2]),
                presence_penalty=rng.choice([0.0, 0.5]),
                seed=rng.randint(0, 1000),
                max_tokens=max_tokens,
                min_tokens=min(rng.choice([0, 3]), max_tokens),
                ignore_eos=rng.random() < 0.3,
                stop=rng.choice([None, None, ["the"]]),
                logprobs=rng.choice([None, 2]),
            )
        )
    return [{"prompt_token_ids": p} for p in prompts], params


def _assert_same(got, want) -> None:
    for g, w in zip(got, want, strict=True):
        for a, b in zip(g.outputs, w.outputs, strict=True):
            assert (a.token_ids, a.finish_reason, a.stop_reason, a.text) == (
                b.token_ids,
                b.finish_reason,
                b.stop_reason,
                b.text,
            )
            if b.logprobs is not None:
                for ea, eb in zip(a.logprobs, b.logprobs, strict=True):
                    assert ea.keys() == eb.keys()
                    assert all(ea[t].logprob == pytest.approx(eb[t].logprob, abs=1e-3) for t in ea)


def test_async_scheduling_is_the_cuda_default(cuda_llm, cuda_sync_llm):
    assert cuda_llm.engine.async_scheduling is True
    assert cuda_sync_llm.engine.async_scheduling is False


def test_async_equals_sync_on_cuda(cuda_llm, cuda_sync_llm):
    prompts, params = _mixed_workload(40, seed=1)
    got = cuda_llm.generate(prompts, params, use_tqdm=False)
    want = cuda_sync_llm.generate(prompts, params, use_tqdm=False)
    _assert_same(got, want)
    assert any(c.finish_reason == "stop" for o in want for c in o.outputs)
    for llm in (cuda_llm, cuda_sync_llm):
        assert llm.engine.stats().kv.num_used_blocks == 0


def test_async_prompt_logprobs_on_cuda(cuda_llm, cuda_sync_llm):
    prompts, _ = _mixed_workload(4, seed=2)
    params = SamplingParams(temperature=0, max_tokens=5, prompt_logprobs=3, ignore_eos=True)
    got = cuda_llm.generate(prompts, params, use_tqdm=False)
    want = cuda_sync_llm.generate(prompts, params, use_tqdm=False)
    _assert_same(got, want)
    for g, w in zip(got, want, strict=True):
        for a, b in zip(g.prompt_logprobs[1:], w.prompt_logprobs[1:], strict=True):
            assert a.keys() == b.keys()
            assert all(a[t].logprob == pytest.approx(b[t].logprob, abs=1e-3) for t in a)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_kv_blocks": 7, "max_num_seqs": 8},
        {"num_kv_blocks": 512, "max_num_seqs": 8, "max_num_batched_tokens": 24},
    ],
    ids=["preemption", "chunked-prefill"],
)
def test_async_equals_sync_with_a_small_pool_or_budget_on_cuda(stories260k_path, kwargs):
    from tinyserve import LLM

    prompts, params = _mixed_workload(12, seed=3)
    outs = []
    for async_scheduling in (True, False):
        llm = LLM(
            str(stories260k_path), device="cuda", dtype="float32", async_scheduling=async_scheduling, **kwargs
        )
        outs.append(llm.generate(prompts, [_fit(p, 40) for p in params], use_tqdm=False))
        assert llm.engine.stats().kv.num_used_blocks == 0
        if kwargs["num_kv_blocks"] == 7:
            assert llm.engine.stats().num_preemptions > 0
        del llm
        _free_gpu_memory()
    _assert_same(*outs)


def _fit(params: SamplingParams, max_tokens: int) -> SamplingParams:
    """The same parameters with max_tokens capped (a 7-block pool holds 112 tokens; prompts have up to 61)."""
    import dataclasses

    capped = min(params.max_tokens or max_tokens, max_tokens)
    return dataclasses.replace(params, max_tokens=capped, min_tokens=min(params.min_tokens, capped))


def test_async_steps_never_sync_with_the_host(cuda_llm):
    """In decode steps (every sampler stage, stops and finishes included) the only wait is for the
    previous step's sampled ids, a CUDA event, which sync debug mode doesn't flag: no .item(), no
    .tolist() of a device tensor, no blocking copy."""
    import dataclasses

    import torch

    engine = cuda_llm.engine
    prompts, params = _mixed_workload(16, seed=4)
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        # n = 1: every request is admitted in the first step, so the checked steps are all decodes
        engine.add_request(f"nosync-{i}", p["prompt_token_ids"], dataclasses.replace(_fit(sp, 60), n=1))
    for _ in range(3):  # the prefills (eager) and the first decodes
        engine.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            engine.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    while engine.has_unfinished_requests():
        engine.step()
    engine.step()
    assert engine.stats().kv.num_used_blocks == 0


def _same_up_to_near_ties(got, want, what: str, tol: float = 1e-3) -> None:
    """Greedy outputs with logprobs=2 agree token by token; they may part only where the top two
    tokens' logprobs are within `tol` of each other (a near tie, where a different split of the
    keys, or of a product's sum, legitimately picks the other one)."""
    a, b = got.outputs[0], want.outputs[0]
    for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=True)):
        if x != y:
            top = sorted((lp.logprob for lp in a.logprobs[i].values()), reverse=True)
            assert top[0] - top[1] < tol, f"{what}: token {i} differs ({x} vs {y}) without a near tie: {top}"
            return


def test_graph_length_bounds_match_eager(tmp_path):
    """Decode graphs are captured per context-length bound (1024, 2048 and 4096 here): sequences
    that cross the bounds while they decode, alone or batched, get the eager engine's tokens."""
    from tests.models.tiny_models import random_prompt, save_tiny_checkpoint
    from tinyserve import LLM

    save_tiny_checkpoint("qwen3", tmp_path, seed=5)
    config = json.loads((tmp_path / "config.json").read_text())
    config["max_position_embeddings"] = 4096  # the tiny config's 256 is a choice, not a limit of RoPE
    (tmp_path / "config.json").write_text(json.dumps(config))
    batches = [[1000], [2030], [1010, 2030, 40, 3000]]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=2)
    outs = {}
    for eager in (False, True):
        llm = LLM(
            str(tmp_path),
            device="cuda",
            dtype="float32",
            max_model_len=4096,
            max_num_seqs=8,
            num_kv_blocks=1024,
            enable_prefix_caching=False,
            enforce_eager=eager,
            skip_tokenizer_init=True,
        )
        if not eager:
            assert llm.engine.runner.graphs.len_bounds == [1024, 2048, 4096]
        outs[eager] = [
            llm.generate([{"prompt_token_ids": random_prompt(n, n)} for n in lens], params, use_tqdm=False)
            for lens in batches
        ]
        del llm
        _free_gpu_memory()
    for lens, got, want in zip(batches, outs[False], outs[True], strict=True):
        for n, g, w in zip(lens, got, want, strict=True):
            _same_up_to_near_ties(g, w, f"prompt of {n} tokens in batch {lens}")


def _greedy_under_modes(path, monkeypatch, var: str, modes, batches, check_engine) -> dict:
    """For each value of the environment variable `var`: a bf16 engine on the checkpoint at `path`
    (decode graphs up to 16 sequences), `check_engine(mode, llm)`, then the greedy outputs of each
    batch of prompt lengths. Returns {mode: [outputs of each batch]}."""
    from tests.models.tiny_models import random_prompt
    from tinyserve import LLM

    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True, logprobs=2)
    outs = {}
    for mode in modes:
        monkeypatch.setenv(var, mode)
        llm = LLM(
            str(path),
            device="cuda",
            dtype="bfloat16",
            max_num_seqs=16,
            num_kv_blocks=256,
            skip_tokenizer_init=True,
        )
        check_engine(mode, llm)
        outs[mode] = [
            llm.generate([{"prompt_token_ids": random_prompt(n, n)} for n in lens], params, use_tqdm=False)
            for lens in batches
        ]
        del llm
        _free_gpu_memory()
    return outs


def _same_batches(batches, got, want, what: str) -> None:
    for lens, g_batch, w_batch in zip(batches, got, want, strict=True):
        for n, g, w in zip(lens, g_batch, w_batch, strict=True):
            _same_up_to_near_ties(g, w, f"bf16, {what}: prompt of {n} tokens in batch {lens}", tol=0.1)


def test_fused_layers_match_unfused(tmp_path, monkeypatch):
    """bf16 decode graphs with the fused decoder layers at every batch size up to 16 seqs
    (TINYSERVE_FUSED_LAYERS=1) against graphs without them (=0): the same greedy tokens, alone and
    batched, or a near tie at the first difference (bf16 products summed in another order); and the
    default (auto) keeps exactly the batch sizes it measured faster fused."""
    from tests.models.tiny_models import save_tiny_checkpoint

    save_tiny_checkpoint("qwen3", tmp_path, seed=3)
    batches = [[7], [40, 100, 3, 65, 17]]
    monkeypatch.setenv("TINYSERVE_FUSED_MLP", "0")  # the layer forms only (the fused MLP, qkv: below)
    monkeypatch.setenv("TINYSERVE_FUSED_QKV", "0")

    def check(mode, llm) -> None:
        graphs = llm.engine.runner.graphs
        fused_rows = llm.engine.runner.model.model.fused_rows
        if mode == "0":
            assert fused_rows == frozenset() and graphs.fused_choices == []
        elif mode == "1":
            assert fused_rows == frozenset({1, 2, 4, 8, 16})
        else:
            assert [c.batch_size for c in graphs.fused_choices] == [1, 2, 4, 8, 16]
            assert all(c.unfused_s > 0 and c.fused_s > 0 for c in graphs.fused_choices)
            assert fused_rows == frozenset(c.batch_size for c in graphs.fused_choices if c.fused)
            inner = llm.engine.runner.model.model
            assert inner.mlp_rows == frozenset(c.batch_size for c in graphs.fused_choices if c.fused_mlp)
            assert inner.qkv_rows == frozenset(c.batch_size for c in graphs.fused_choices if c.fused_qkv)

    outs = _greedy_under_modes(
        tmp_path, monkeypatch, "TINYSERVE_FUSED_LAYERS", ("0", "1", "auto"), batches, check
    )
    _same_batches(batches, outs["1"], outs["0"], "fused vs unfused")


def test_fused_mlp_matches_plain(tmp_path, monkeypatch):
    """bf16 decode graphs with the fused MLP (TINYSERVE_FUSED_MLP=1: batch sizes 1 and 2,
    plain layers otherwise) against graphs without it (=0): the same greedy tokens, alone and batched,
    or a near tie at the first difference."""
    from tests.models.tiny_models import save_tiny_checkpoint

    save_tiny_checkpoint("qwen3", tmp_path, seed=4)
    batches = [[9], [40, 100]]
    monkeypatch.setenv("TINYSERVE_FUSED_LAYERS", "0")
    monkeypatch.setenv("TINYSERVE_FUSED_QKV", "0")

    def check(mode, llm) -> None:
        mlp_rows = llm.engine.runner.model.model.mlp_rows
        assert mlp_rows == (frozenset({1, 2}) if mode == "1" else frozenset())

    outs = _greedy_under_modes(tmp_path, monkeypatch, "TINYSERVE_FUSED_MLP", ("0", "1"), batches, check)
    _same_batches(batches, outs["1"], outs["0"], "fused MLP vs plain")


@pytest.mark.parametrize("layers", ["0", "1"])
def test_fused_qkv_matches_plain(tmp_path, monkeypatch, layers):
    """bf16 decode graphs with the input norm and qkv product as one op (TINYSERVE_FUSED_QKV=1:
    batch sizes 1 and 2), in the unfused and the skinny fused layer forms, with the fused MLP,
    against graphs with neither (=0): the same greedy tokens, alone and batched, or a near tie at
    the first difference."""
    from tests.models.tiny_models import save_tiny_checkpoint

    save_tiny_checkpoint("qwen2", tmp_path, seed=5)  # q/k/v biases: the op's bias path
    batches = [[11], [33, 90]]
    monkeypatch.setenv("TINYSERVE_FUSED_LAYERS", layers)

    def check(mode, llm) -> None:
        inner = llm.engine.runner.model.model
        want = frozenset({1, 2}) if mode == "1" else frozenset()
        assert inner.qkv_rows == want and inner.mlp_rows == want

    def run(mode):
        monkeypatch.setenv("TINYSERVE_FUSED_MLP", mode)
        return _greedy_under_modes(tmp_path, monkeypatch, "TINYSERVE_FUSED_QKV", (mode,), batches, check)[
            mode
        ]

    _same_batches(batches, run("1"), run("0"), f"fused qkv + MLP vs plain (layers {layers})")
