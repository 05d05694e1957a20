"""LLM.generate end to end on CPU: reference outputs, batching invariance, preemption, prefix caching,
seeds, stop strings, n > 1, aborts and leaks."""

from __future__ import annotations

import random

import pytest

from tinyserve import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def _random_prompts(n: int, seed: int, lo: int = 3, hi: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    # ids 3..511: real pieces of the 512-token vocabulary, no BOS/EOS
    return [[1] + [rng.randint(3, 511) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _ids(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


def test_stories_reference_greedy(stories_llm, stories_reference):
    ref = stories_reference["greedy"]
    params = SamplingParams(temperature=0.0, max_tokens=len(ref["new_token_ids"]), ignore_eos=True)
    out = stories_llm.generate(stories_reference["prompt"], params, use_tqdm=False)[0]
    assert out.prompt_token_ids == stories_reference["prompt_token_ids"]
    assert out.outputs[0].token_ids == ref["new_token_ids"]
    assert out.outputs[0].text == ref["continuation_text"]
    assert out.outputs[0].finish_reason == "length"


def test_stories_stops_on_generation_config_eos(stories_llm):
    # generation_config.json lists eos [2, 1]: the story ends with BOS (id 1) as its 342nd token.
    out = stories_llm.generate(
        "Once upon a time", SamplingParams(temperature=0, max_tokens=400), use_tqdm=False
    )[0]
    c = out.outputs[0]
    assert c.finish_reason == "stop"
    assert len(c.token_ids) == 342 and c.token_ids[-1] == 1
    assert "<s>" not in c.text


def test_batch_equals_alone(stories_llm):
    prompts = _random_prompts(16, seed=1)
    batched = stories_llm.generate(_ids(prompts), GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, batched, strict=True):
        alone = stories_llm.generate(_ids([prompt]), GREEDY, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids
        assert out.prompt_token_ids == prompt


def test_preemption_gives_same_outputs(stories260k_path, stories_llm):
    from tinyserve import LLM

    prompts = _random_prompts(8, seed=2, lo=20, hi=40)
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in stories_llm.generate(_ids(prompts), params, use_tqdm=False)]
    # 7 blocks of 16 = 112 slots: room for one sequence of <= 100 tokens at a time, not eight.
    small = LLM(str(stories260k_path), device="cpu", dtype="float32", num_kv_blocks=7, max_num_seqs=8)
    got = [o.outputs[0].token_ids for o in small.generate(_ids(prompts), params, use_tqdm=False)]
    assert got == expected
    assert small.engine.stats().num_preemptions > 0
    assert small.engine.stats().kv.num_used_blocks == 0


def test_seeded_samples_depend_only_on_seed_and_position(stories260k_path, stories_llm):
    """Seeded rows (n = 2: keys seed and seed + 1) give the same tokens alone, in a batch, and when
    preemption recomputes them in a pool with room for about one sequence."""
    from tinyserve import LLM

    prompts = _random_prompts(6, seed=21, lo=20, hi=40)
    params = [
        SamplingParams(n=2, temperature=0.9, top_k=30, seed=100 + i, max_tokens=50, ignore_eos=True)
        for i in range(6)
    ]
    batched = stories_llm.generate(_ids(prompts), params, use_tqdm=False)
    samples = [[c.token_ids for c in o.outputs] for o in batched]
    assert all(a != b for a, b in samples), "sample i of n has its own key"
    alone = stories_llm.generate(_ids(prompts[3:4]), params[3], use_tqdm=False)[0]
    assert [c.token_ids for c in alone.outputs] == samples[3]
    small = LLM(str(stories260k_path), device="cpu", dtype="float32", num_kv_blocks=7, max_num_seqs=8)
    preempted = small.generate(_ids(prompts), params, use_tqdm=False)
    assert small.engine.stats().num_preemptions > 0
    assert [[c.token_ids for c in o.outputs] for o in preempted] == samples


def test_request_too_large_for_pool_is_rejected(stories260k_path):
    from tinyserve import LLM

    small = LLM(str(stories260k_path), device="cpu", dtype="float32", num_kv_blocks=4)
    with pytest.raises(ValueError, match="4 blocks|block"):
        small.generate(_ids([[1] * 80]), SamplingParams(max_tokens=10), use_tqdm=False)
    assert not small.engine.has_unfinished_requests()


def test_prefix_cache_hits_and_same_outputs(stories260k_path, stories_llm):
    from tinyserve import LLM

    rng = random.Random(3)
    system = [1] + [rng.randint(3, 511) for _ in range(70)]  # 4+ full blocks shared by every prompt
    prompts = [system + [rng.randint(3, 511) for _ in range(rng.randint(1, 20))] for _ in range(6)]
    before = stories_llm.engine.stats().kv.prefix_cache_hits
    with_cache = stories_llm.generate(_ids(prompts), GREEDY, use_tqdm=False)
    assert stories_llm.engine.stats().kv.prefix_cache_hits > before
    plain = LLM(str(stories260k_path), device="cpu", dtype="float32", enable_prefix_caching=False)
    without = plain.generate(_ids(prompts), GREEDY, use_tqdm=False)
    assert plain.engine.stats().kv.prefix_cache_hits == 0
    assert [o.outputs[0].token_ids for o in with_cache] == [o.outputs[0].token_ids for o in without]


def test_seed_is_independent_of_the_batch(stories_llm):
    prompt = _random_prompts(1, seed=4)[0]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=20, ignore_eos=True)
    alone = stories_llm.generate(_ids([prompt]), seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = _random_prompts(5, seed=5)
    noisy = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    outs = stories_llm.generate(
        _ids(others[:2] + [prompt] + others[2:]), [noisy, noisy, seeded, noisy, noisy, noisy], use_tqdm=False
    )
    assert outs[2].outputs[0].token_ids == alone
    again = stories_llm.generate(_ids([prompt]), seeded, use_tqdm=False)[0].outputs[0].token_ids
    assert again == alone


def test_stop_string_cut_from_output(stories_llm, stories_reference):
    text = stories_reference["greedy"]["continuation_text"]
    params = SamplingParams(temperature=0, max_tokens=64, stop=["little girl"])
    out = stories_llm.generate(stories_reference["prompt"], params, use_tqdm=False)[0].outputs[0]
    assert out.text == text[: text.index("little girl")]
    assert out.finish_reason == "stop" and out.stop_reason == "little girl"
    params = SamplingParams(
        temperature=0, max_tokens=64, stop=["little girl"], include_stop_str_in_output=True
    )
    out = stories_llm.generate(stories_reference["prompt"], params, use_tqdm=False)[0].outputs[0]
    assert out.text == text[: text.index("little girl") + len("little girl")]


def test_stop_token_ids(stories_llm, stories_reference):
    ids = stories_reference["greedy"]["new_token_ids"]
    params = SamplingParams(temperature=0, max_tokens=64, stop_token_ids=[ids[5]])
    out = stories_llm.generate(stories_reference["prompt"], params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ids[:6]
    assert out.finish_reason == "stop" and out.stop_reason == ids[5]


def test_min_tokens_delays_eos(stories_llm):
    params = SamplingParams(temperature=0, max_tokens=400, min_tokens=350)
    out = stories_llm.generate("Once upon a time", params, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= 350
    assert 1 not in out.token_ids[:350] and 2 not in out.token_ids[:350]


def test_n_samples_share_prompt_blocks(stories_llm):
    prompt = _random_prompts(1, seed=6, lo=60, hi=60)[0]  # 61 tokens: 3 full blocks
    before = stories_llm.engine.stats().kv.prefix_cache_hits
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=16, ignore_eos=True)
    out = stories_llm.generate(_ids([prompt]), params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert all(len(c.token_ids) == 16 for c in out.outputs)
    # samples 1 and 2 found the 3 full prompt blocks of sample 0 in the prefix cache
    assert stories_llm.engine.stats().kv.prefix_cache_hits - before >= 2 * 48


def test_logprobs(stories_llm):
    params = SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True)
    c = stories_llm.generate("Once upon a time", params, use_tqdm=False)[0].outputs[0]
    assert len(c.logprobs) == 5
    for token_id, entry in zip(c.token_ids, c.logprobs, strict=True):
        assert token_id in entry and len(entry) == 3  # greedy: the sampled token is the top-1
        assert entry[token_id].rank == 1
        assert entry[token_id].logprob == max(lp.logprob for lp in entry.values())
        assert all(lp.logprob <= 0 for lp in entry.values())
    assert c.cumulative_logprob == pytest.approx(
        sum(e[t].logprob for t, e in zip(c.token_ids, c.logprobs, strict=True))
    )


def test_abort_frees_every_block(stories_llm):
    engine = stories_llm.engine
    prompts = _random_prompts(5, seed=8)
    for i, p in enumerate(prompts):
        engine.add_request(f"abort-{i}", p, SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.stats().kv.num_used_blocks > 0
    for i in range(len(prompts)):
        assert engine.abort_request(f"abort-{i}")
    assert not engine.abort_request("abort-0")
    engine.step()  # the runner learns of the aborts
    assert not engine.has_unfinished_requests()
    assert engine.stats().kv.num_used_blocks == 0


def test_bad_requests_leave_nothing_behind(stories_llm):
    engine = stories_llm.engine
    with pytest.raises(ValueError, match="maximum context length is 512"):
        stories_llm.generate(_ids([[1] * 10]), SamplingParams(max_tokens=600), use_tqdm=False)
    with pytest.raises(ValueError, match=r"ints in \[0, 512\)"):
        stories_llm.generate(_ids([[1, 9999]]), use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        stories_llm.generate(_ids([[]]), use_tqdm=False)
    # a batch with one bad prompt queues none of them
    with pytest.raises(ValueError):
        stories_llm.generate(_ids([[1, 5, 6], [1] * 600]), use_tqdm=False)
    assert not engine.has_unfinished_requests()
    assert engine.stats().kv.num_used_blocks == 0


def test_no_block_leaked_after_many_random_requests(stories260k_path):
    from tinyserve import LLM

    llm = LLM(
        str(stories260k_path),
        device="cpu",
        dtype="float32",
        num_kv_blocks=40,
        max_num_seqs=16,
        max_num_batched_tokens=64,
    )
    rng = random.Random(9)
    prompts, params = [], []
    for _ in range(1000):
        prompts.append([1] + [rng.randint(3, 511) for _ in range(rng.randint(0, 40))])
        params.append(
            SamplingParams(
                n=rng.choice([1, 1, 1, 2]),
                temperature=rng.choice([0.0, 0.7, 1.0]),
                top_k=rng.choice([-1, 5, 50]),
                top_p=rng.choice([1.0, 0.8]),
                min_p=rng.choice([0.0, 0.05]),
                repetition_penalty=rng.choice([1.0, 1.2]),
                presence_penalty=rng.choice([0.0, 0.5]),
                seed=rng.choice([None, rng.randint(0, 100)]),
                max_tokens=rng.randint(1, 12),
                stop=rng.choice([None, ["the"]]),
                logprobs=rng.choice([None, 2]),
            )
        )
    outs = llm.generate(_ids(prompts), params, use_tqdm=False)
    assert len(outs) == 1000 and all(o.finished for o in outs)
    for o, p in zip(outs, params, strict=True):
        assert len(o.outputs) == p.n
        assert all(1 <= len(c.token_ids) <= p.max_tokens for c in o.outputs)
    stats = llm.engine.stats()
    assert stats.kv.num_used_blocks == 0 and stats.num_running == 0 and stats.num_waiting == 0


def test_chunked_prefill_gives_same_outputs(stories260k_path, stories_llm):
    from tinyserve import LLM

    # A 20-token step budget: long prompts prefill in chunks, mixed with other requests' decodes.
    prompts = _random_prompts(6, seed=10, lo=30, hi=90)
    expected = [o.outputs[0].token_ids for o in stories_llm.generate(_ids(prompts), GREEDY, use_tqdm=False)]
    small = LLM(
        str(stories260k_path), device="cpu", dtype="float32", max_num_seqs=4, max_num_batched_tokens=20
    )
    got = [o.outputs[0].token_ids for o in small.generate(_ids(prompts), GREEDY, use_tqdm=False)]
    assert got == expected


def test_streaming_outputs_are_cumulative_and_end_with_the_final_text(stories_llm, stories_reference):
    engine = stories_llm.engine
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    engine.add_request("stream-1", stories_reference["prompt_token_ids"], params, stream=True)
    texts, lengths = [], []
    while engine.has_unfinished_requests():
        for out in engine.step():
            texts.append(out.outputs[0].text)
            lengths.append(len(out.outputs[0].token_ids))
    assert lengths == list(range(1, 31))
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))
    full = stories_reference["greedy"]["continuation_text"]
    assert full.startswith(texts[-1]) and len(texts[-1]) > 50


@pytest.mark.parametrize("budget", [None, 24], ids=["whole", "chunked"])
def test_prompt_logprobs_match_transformers(stories260k_path, budget):
    import torch
    import transformers

    from tinyserve import LLM

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(stories260k_path), dtype=torch.float32).eval()
    llm = LLM(
        str(stories260k_path), device="cpu", dtype="float32", max_num_seqs=4, max_num_batched_tokens=budget
    )
    prompts = _random_prompts(3, seed=11, lo=20, hi=60)
    params = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=4, ignore_eos=True, n=1)
    # twice the same prompt: the second must not take the first's cached blocks and skip scoring
    outs = llm.generate(_ids(prompts + prompts[:1]), params, use_tqdm=False)
    for prompt, out in zip(prompts + prompts[:1], outs, strict=True):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0].double().log_softmax(-1)  # [len, vocab]
        plp = out.prompt_logprobs
        assert plp is not None and len(plp) == len(prompt) and plp[0] is None
        for p in range(1, len(prompt)):
            entry = plp[p]
            target = prompt[p]
            assert entry[target].logprob == pytest.approx(ref[p - 1, target].item(), abs=1e-4)
            # rank = 1 + the tokens more likely; near-ties (within float noise) may fall either way
            row, value = ref[p - 1], ref[p - 1, target]
            assert (
                int((row > value + 1e-4).sum()) + 1
                <= entry[target].rank
                <= int((row > value - 1e-4).sum()) + 1
            )
            top = set(ref[p - 1].topk(4).indices.tolist())
            assert top <= set(entry), f"position {p}: top-4 {top} not all in {set(entry)}"
    assert llm.engine.stats().kv.num_used_blocks == 0


def test_prompt_logprobs_bad_value(stories_llm):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        stories_llm.generate("Once", SamplingParams(prompt_logprobs=10_000), use_tqdm=False)
