"""Async scheduling on CPU: the same workloads with async_scheduling on and off give the same tokens,
finish reasons, texts and logprobs, and leave every KV block free.

Only greedy and seeded rows are compared: unseeded rows draw with the step's key and their row index,
which depend on the batch, and the two modes batch a little differently (a request that finishes in step n was
already scheduled in step n + 1 with async scheduling).
"""

from __future__ import annotations

import random

import pytest

from tinyserve import SamplingParams
from tinyserve.config import EngineConfig


def _random_prompts(n: int, seed: int, lo: int = 3, hi: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    # ids 3..511: real pieces of the 512-token vocabulary, no BOS/EOS
    return [[1] + [rng.randint(3, 511) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _ids(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


def _llm(path, async_scheduling: bool, **kwargs):
    from tinyserve import LLM

    kwargs.setdefault("max_num_seqs", 32)
    llm = LLM(str(path), device="cpu", dtype="float32", async_scheduling=async_scheduling, **kwargs)
    assert llm.engine.async_scheduling is async_scheduling
    return llm


@pytest.fixture(scope="module")
def sync_llm(stories260k_path):
    return _llm(stories260k_path, False)


@pytest.fixture(scope="module")
def async_llm(stories260k_path):
    return _llm(stories260k_path, True)


def _summary(outputs) -> list[list[tuple]]:
    """Everything a request returns that must not depend on the mode; logprob values as pytest.approx
    (the two modes may batch a row differently, which may change the last bits of a float: rounding
    them instead failed on a 16-core machine, where a value sat on a rounding edge)."""
    summary = []
    for out in outputs:
        samples = []
        for c in out.outputs:
            logprobs = None
            if c.logprobs is not None:
                logprobs = [
                    {t: (pytest.approx(lp.logprob, abs=1e-4), lp.rank) for t, lp in e.items()}
                    for e in c.logprobs
                ]
            samples.append((c.token_ids, c.finish_reason, c.stop_reason, c.text, logprobs))
        summary.append(samples)
    return summary


def _same_outputs(sync_llm, async_llm, prompts, params) -> list:
    want = sync_llm.generate(_ids(prompts), params, use_tqdm=False)
    got = async_llm.generate(_ids(prompts), params, use_tqdm=False)
    assert _summary(got) == _summary(want)
    for llm in (sync_llm, async_llm):
        stats = llm.engine.stats()
        assert stats.kv.num_used_blocks == 0 and stats.num_running == 0 and stats.num_waiting == 0
    return got


def test_default_is_off_on_cpu(stories_llm):
    assert stories_llm.engine.async_scheduling is False
    assert EngineConfig(model="m").async_scheduling is None
    with pytest.raises(TypeError, match="async_scheduling must be a bool"):
        EngineConfig(model="m", async_scheduling=1)


def test_outputs_arrive_one_step_later(async_llm):
    engine = async_llm.engine
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    engine.add_request("late", [1, 50, 60, 70], params, stream=True)
    lengths = []
    while engine.has_unfinished_requests():
        lengths.append([len(o.outputs[0].token_ids) for o in engine.step()])
    assert lengths == [[], [1], [2], [3], [4], [5]]
    assert engine.stats().kv.num_used_blocks == 0


def test_greedy_with_varied_lengths(sync_llm, async_llm):
    prompts = _random_prompts(24, seed=1)
    rng = random.Random(1)
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(1, 40), ignore_eos=True) for _ in prompts]
    _same_outputs(sync_llm, async_llm, prompts, params)


def test_eos_stops_drop_the_extra_token(sync_llm, async_llm):
    # generation_config.json lists eos [2, 1]: stories end with BOS after a few hundred tokens
    prompts = [[1] + p[1:8] for p in _random_prompts(12, seed=2)]
    params = SamplingParams(temperature=0, max_tokens=400)
    outs = _same_outputs(sync_llm, async_llm, prompts, params)
    assert any(o.outputs[0].finish_reason == "stop" for o in outs)


def test_seeded_sampling_n_and_penalties(sync_llm, async_llm):
    prompts = _random_prompts(12, seed=3)
    rng = random.Random(3)
    params = [
        SamplingParams(
            n=rng.choice([1, 2, 3]),
            temperature=rng.choice([0.0, 0.7, 1.0]),
            top_p=rng.choice([1.0, 0.9]),
            top_k=rng.choice([-1, 20]),
            min_p=rng.choice([0.0, 0.05]),
            repetition_penalty=rng.choice([1.0, 1.3]),
            presence_penalty=rng.choice([0.0, 0.5]),
            frequency_penalty=rng.choice([0.0, 0.4]),
            seed=rng.randint(0, 1000),
            max_tokens=rng.randint(1, 30),
            min_tokens=rng.choice([0, 5]),
            logprobs=rng.choice([None, 2]),
        )
        for _ in prompts
    ]
    _same_outputs(sync_llm, async_llm, prompts, params)


def test_stop_strings_and_stop_ids(sync_llm, async_llm, stories_reference):
    ids = stories_reference["greedy"]["new_token_ids"]
    prompt = stories_reference["prompt_token_ids"]
    params = [
        SamplingParams(temperature=0, max_tokens=64, stop=["little girl"]),
        SamplingParams(temperature=0, max_tokens=64, stop=["little girl"], include_stop_str_in_output=True),
        SamplingParams(temperature=0, max_tokens=64, stop_token_ids=[ids[5]]),
        SamplingParams(temperature=0.8, seed=5, max_tokens=64, stop=["the", "."]),
    ]
    outs = _same_outputs(sync_llm, async_llm, [prompt] * 4, params)
    assert [o.outputs[0].finish_reason for o in outs[:3]] == ["stop"] * 3


def test_prompt_logprobs(sync_llm, async_llm):
    prompts = _random_prompts(3, seed=4, lo=20, hi=60)
    params = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=2, ignore_eos=True)
    want = sync_llm.generate(_ids(prompts), params, use_tqdm=False)
    got = async_llm.generate(_ids(prompts), params, use_tqdm=False)
    for g, w in zip(got, want, strict=True):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert len(g.prompt_logprobs) == len(w.prompt_logprobs)
        for a, b in zip(g.prompt_logprobs[1:], w.prompt_logprobs[1:], strict=True):
            assert a.keys() == b.keys()
            assert all(a[t].logprob == pytest.approx(b[t].logprob, abs=1e-4) for t in a)


def test_aborts_mid_run(sync_llm, async_llm):
    prompts = _random_prompts(8, seed=5)
    results = []
    for llm in (sync_llm, async_llm):
        engine = llm.engine
        for i, p in enumerate(prompts):
            engine.add_request(f"abort-{i}", p, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
        finished = {}
        for step in range(200):
            if step == 4:
                assert engine.abort_request("abort-1") and engine.abort_request("abort-6")
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out.outputs[0].token_ids
            if not engine.has_unfinished_requests():
                break
        engine.step()  # the runner learns of the last finished requests
        assert engine.stats().kv.num_used_blocks == 0
        results.append(finished)
    assert results[0] == results[1]
    assert set(results[1]) == {f"abort-{i}" for i in range(8)} - {"abort-1", "abort-6"}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_kv_blocks": 7, "max_num_seqs": 8},  # preemption: room for about one sequence
        {"max_num_seqs": 4, "max_num_batched_tokens": 20},  # chunked prefill mixed with decodes
        {"enable_prefix_caching": False},
    ],
    ids=["preemption", "chunked-prefill", "no-prefix-caching"],
)
def test_small_pools_and_budgets(stories260k_path, kwargs):
    prompts = _random_prompts(8, seed=6, lo=20, hi=40)
    params = [
        SamplingParams(temperature=0, max_tokens=60, ignore_eos=True),
        SamplingParams(temperature=0.9, seed=11, max_tokens=50, ignore_eos=True),
    ] * 4
    sync_llm = _llm(stories260k_path, False, **kwargs)
    async_llm = _llm(stories260k_path, True, **kwargs)
    _same_outputs(sync_llm, async_llm, prompts, params)
    if "num_kv_blocks" in kwargs:
        assert async_llm.engine.stats().num_preemptions > 0


def test_prefix_caching(sync_llm, async_llm):
    rng = random.Random(7)
    system = [1] + [rng.randint(3, 511) for _ in range(70)]  # 4+ full blocks shared by every prompt
    prompts = [system + [rng.randint(3, 511) for _ in range(rng.randint(1, 20))] for _ in range(6)]
    before = async_llm.engine.stats().kv.prefix_cache_hits
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    _same_outputs(sync_llm, async_llm, prompts, params)
    _same_outputs(sync_llm, async_llm, prompts, params)  # again: blocks filled by placeholders too
    assert async_llm.engine.stats().kv.prefix_cache_hits > before


def test_many_random_requests(stories260k_path):
    kwargs = {"num_kv_blocks": 40, "max_num_seqs": 16, "max_num_batched_tokens": 64}
    rng = random.Random(9)
    prompts, params = [], []
    for _ in range(200):
        prompts.append([1] + [rng.randint(3, 511) for _ in range(rng.randint(0, 40))])
        temperature = rng.choice([0.0, 0.7, 1.0])
        params.append(
            SamplingParams(
                n=rng.choice([1, 1, 1, 2]),
                temperature=temperature,
                top_k=rng.choice([-1, 5, 50]),
                top_p=rng.choice([1.0, 0.8]),
                repetition_penalty=rng.choice([1.0, 1.2]),
                seed=rng.randint(0, 100),
                max_tokens=rng.randint(1, 12),
                stop=rng.choice([None, ["the"]]),
                logprobs=rng.choice([None, 2]),
            )
        )
    _same_outputs(
        _llm(stories260k_path, False, **kwargs), _llm(stories260k_path, True, **kwargs), prompts, params
    )


@pytest.mark.parametrize(
    ("flags", "expected"),
    [([], None), (["--async-scheduling"], True), (["--no-async-scheduling"], False)],
)
def test_cli_flag(flags, expected):
    import argparse

    from tinyserve.cli.engine_args import add_engine_args, engine_config_from_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    config = engine_config_from_args(parser.parse_args(["--model", "m", *flags]))
    assert config.async_scheduling is expected
