"""Sampler against naive references: greedy, masks, penalties, min_tokens, seeds, distribution, logprobs."""

from __future__ import annotations

import random

import pytest
import torch

from tests.sampling import reference
from tinyserve.sampling import (
    RequestSamplingState,
    Sampler,
    SamplerOutput,
    SamplingMetadata,
    ops,
)
from tinyserve.sampling_params import SamplingParams

VOCAB = 97  # awkward size on purpose
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def run(
    logits: torch.Tensor,
    params: list[SamplingParams],
    states: list[RequestSamplingState] | None = None,
    eos: tuple[int, ...] = (),
) -> SamplerOutput:
    states = states if states is not None else [RequestSamplingState() for _ in params]
    md = SamplingMetadata.build(
        params, states, vocab_size=logits.shape[1], device=logits.device, eos_token_ids=eos
    )
    return Sampler()(logits, md)


def capture_probs(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Record the distribution the sampler draws from (in vocabulary order), on either draw path."""
    seen: list[torch.Tensor] = []
    draw, draw_sorted = ops.draw, ops.draw_sorted

    def spy(
        logits: torch.Tensor, temperature: torch.Tensor, keys: torch.Tensor, counters: torch.Tensor
    ) -> torch.Tensor:
        t = torch.where(temperature > 0, temperature, 1.0)  # greedy rows: unused
        seen.append((logits.float() / t.unsqueeze(1)).softmax(dim=-1))
        return draw(logits, temperature, keys, counters)

    def spy_sorted(
        sorted_logits: torch.Tensor, sorted_ids: torch.Tensor, keys: torch.Tensor, counters: torch.Tensor
    ) -> torch.Tensor:
        seen.append(torch.zeros_like(sorted_logits).scatter_(1, sorted_ids, sorted_logits.softmax(dim=-1)))
        return draw_sorted(sorted_logits, sorted_ids, keys, counters)

    monkeypatch.setattr(ops, "draw", spy)
    monkeypatch.setattr(ops, "draw_sorted", spy_sorted)
    return seen


def random_state(rng: random.Random) -> RequestSamplingState:
    prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(0, 12))]
    output = [rng.randrange(VOCAB) for _ in range(rng.randrange(0, 12))]
    return RequestSamplingState(prompt, output)


# --- greedy -------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_greedy_is_argmax(dtype: torch.dtype, device: str) -> None:
    logits = torch.randn(17, VOCAB, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    before = logits.clone()
    out = run(logits, [SamplingParams(temperature=0.0)] * 17)
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))
    assert out.sampled_token_ids.dtype == torch.int64
    assert out.logprobs is None
    assert torch.equal(logits, before)


def test_greedy_rows_in_a_mixed_batch_take_the_argmax(monkeypatch: pytest.MonkeyPatch) -> None:
    logits = torch.randn(7, VOCAB, generator=torch.Generator().manual_seed(1))
    before = logits.clone()
    params = [SamplingParams(temperature=0.0 if i % 2 else 0.9, top_k=5, top_p=0.8) for i in range(7)]
    out = run(logits, params)
    for i in range(1, 7, 2):
        assert out.sampled_token_ids[i] == logits[i].argmax()
    assert torch.equal(logits, before), "the sampler must not modify the caller's logits"


def test_greedy_with_penalties_takes_argmax_of_penalised_logits() -> None:
    rng = random.Random(2)
    logits = torch.randn(9, VOCAB, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.8, presence_penalty=1.5) for _ in range(9)]
    states = [random_state(rng) for _ in range(9)]
    out = run(logits, params, states)
    for i, (p, s) in enumerate(zip(params, states, strict=True)):
        expected = reference.penalties(logits[i].double(), p, s.prompt_token_ids, s.output_token_ids).argmax()
        assert out.sampled_token_ids[i] == expected


# --- masks against the naive references ---------------------------------------------------------


def test_top_k_top_p_min_p_ops_match_reference() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(13, VOCAB, generator=gen) * 3
    ks = [1, 2, 5, 17, VOCAB, VOCAB, 40, 96, 3, VOCAB, 7, 11, 1]
    ps = [1.0, 0.5, 0.9, 0.3, 0.95, 1.0, 0.01, 0.7, 0.99, 0.6, 0.8, 1.0, 0.2]
    mins = [0.0, 0.1, 0.5, 0.05, 0.0, 0.9, 0.2, 0.01, 0.3, 1.0, 0.0, 0.15, 0.4]
    top_k = torch.tensor(ks)
    top_p = torch.tensor(ps)
    min_p = torch.tensor(mins)

    # top-k alone, both code paths (full sort and torch.topk)
    sorted_path = ops.apply_top_k_top_p(logits.clone(), top_k, None)
    topk_path = ops.apply_top_k(logits.clone(), top_k, max_top_k=96)
    both = ops.apply_top_k_top_p(logits.clone(), top_k, top_p)
    ones = torch.ones(13)
    minp = ops.apply_min_p(logits.clone(), min_p, ones)
    minp_scaled = ops.apply_min_p(logits * 2.0, min_p, ones * 2.0)  # x / T decides, not x
    assert torch.equal(torch.isinf(minp), torch.isinf(minp_scaled))
    masked, order = ops.sorted_masked_logits(logits, None, ones, top_k, top_p, min_p)
    sorted_support = torch.zeros_like(masked).scatter_(1, order, masked.isfinite().float()) > 0
    for i in range(13):
        row = logits[i].double()
        want_k = reference.top_k(row, ks[i])
        assert torch.equal(torch.isinf(sorted_path[i]), torch.isinf(want_k)), f"top-k row {i}"
        assert torch.equal(torch.isinf(topk_path[i]), torch.isinf(want_k)), f"topk path row {i}"
        want_kp = reference.top_p(want_k, ps[i])
        assert torch.equal(torch.isinf(both[i]), torch.isinf(want_kp)), f"top-k+top-p row {i}"
        assert torch.equal(torch.isinf(minp[i]), torch.isinf(reference.min_p(row, mins[i]))), f"min-p row {i}"
        want_all = ~torch.isinf(reference.min_p(want_kp, mins[i]))
        assert torch.equal(sorted_support[i], want_all), f"sorted path row {i}"
        kept = ~torch.isinf(both[i])
        assert torch.equal(both[i][kept], logits[i][kept]), "kept logits must be unchanged"


@pytest.mark.parametrize("device", DEVICES)
def test_full_pipeline_matches_reference(monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    """Random params per row: the distribution sampled from equals the naive per-row pipeline."""
    rng = random.Random(4)
    seen = capture_probs(monkeypatch)
    num_seqs = 23
    logits = torch.randn(num_seqs, VOCAB, generator=torch.Generator().manual_seed(4)) * 2
    params = [
        SamplingParams(
            temperature=rng.choice([0.5, 1.0, 1.7]),
            top_k=rng.choice([-1, 1, 4, 30]),
            top_p=rng.choice([1.0, 0.9, 0.5]),
            min_p=rng.choice([0.0, 0.05, 0.2]),
            presence_penalty=rng.choice([0.0, 0.7, -0.5]),
            frequency_penalty=rng.choice([0.0, 0.4, -1.0]),
            repetition_penalty=rng.choice([1.0, 1.3, 0.8]),
            min_tokens=rng.choice([0, 5]),
            stop_token_ids=rng.choice([[], [3, 4]]),
            ignore_eos=rng.choice([False, True]),
        )
        for _ in range(num_seqs)
    ]
    states = [random_state(rng) for _ in range(num_seqs)]
    out = run(logits.to(device), params, states, eos=(2,))
    probs = seen[0].cpu()
    assert out.sampled_token_ids.device.type == device
    for i, (p, s) in enumerate(zip(params, states, strict=True)):
        want = reference.final_probs(logits[i], p, s.prompt_token_ids, s.output_token_ids, eos_ids=(2,))
        torch.testing.assert_close(probs[i].double(), want, atol=1e-5, rtol=1e-4, msg=f"row {i}: {p}")
        assert want[out.sampled_token_ids[i].item()] > 0, f"row {i} sampled a masked token"


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_logits_sorted_path_matches_reference(monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    """No penalties and bf16 logits: the sampler sorts the bf16 logits themselves (the fast path)."""
    rng = random.Random(14)
    seen = capture_probs(monkeypatch)
    logits = (torch.randn(19, VOCAB, generator=torch.Generator().manual_seed(14)) * 3).to(torch.bfloat16)
    params = [
        SamplingParams(
            temperature=rng.choice([0.0, 0.6, 1.0, 1.5]),
            top_k=rng.choice([-1, 2, 10]),
            top_p=rng.choice([0.3, 0.8, 1.0]),
            min_p=rng.choice([0.0, 0.1]),
        )
        for _ in range(19)
    ]
    params[0] = SamplingParams(top_p=0.5)  # at least one top-p row: the sorted path
    out = run(logits.to(device), params)
    probs = seen[0].cpu()
    for i, p in enumerate(params):
        if p.is_greedy:
            assert out.sampled_token_ids[i].item() == logits[i].float().argmax().item()
            continue
        want = reference.final_probs(logits[i].float(), p)
        torch.testing.assert_close(probs[i].double(), want, atol=1e-5, rtol=1e-4, msg=f"row {i}: {p}")
        assert want[out.sampled_token_ids[i].item()] > 0


def test_penalties_match_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(5)
    seen = capture_probs(monkeypatch)
    logits = torch.randn(11, VOCAB, generator=torch.Generator().manual_seed(5)) * 4
    params = [
        SamplingParams(
            presence_penalty=rng.uniform(-2, 2),
            frequency_penalty=rng.uniform(-2, 2),
            repetition_penalty=rng.uniform(0.5, 2.0),
        )
        for _ in range(11)
    ]
    params[0] = SamplingParams()  # a row without penalties in a batch that has them
    states = [random_state(rng) for _ in range(11)]
    states[1] = RequestSamplingState([], [])  # nothing seen yet
    run(logits, params, states)
    for i, (p, s) in enumerate(zip(params, states, strict=True)):
        want = reference.penalties(logits[i].double(), p, s.prompt_token_ids, s.output_token_ids).softmax(-1)
        torch.testing.assert_close(seen[0][i].double(), want, atol=1e-6, rtol=1e-5)


def test_min_tokens_masks_eos_and_stop_ids_until_reached() -> None:
    logits = torch.zeros(4, VOCAB)
    logits[:, 2] = 50.0  # EOS is overwhelmingly likely
    logits[:, 9] = 40.0  # then stop token 9
    params = [
        SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[9]),  # 2 generated: masked
        SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[9]),  # 3 generated: free
        SamplingParams(temperature=1.0, min_tokens=3, stop_token_ids=[9]),
        SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[9], ignore_eos=True),
    ]
    states = [RequestSamplingState([], [5, 6]), RequestSamplingState([], [5, 6, 7])]
    states += [RequestSamplingState([], []), RequestSamplingState([], [1])]
    for _ in range(20):
        ids = run(logits, params, states, eos=(2,)).sampled_token_ids.tolist()
        assert ids[0] not in (2, 9) and ids[2] not in (2, 9)
        assert ids[1] == 2
        assert ids[3] == 2  # ignore_eos: EOS is not a stop, so it is not masked; 9 is


def test_top_k_rows_sample_only_inside_top_k() -> None:
    torch.manual_seed(6)
    logits = torch.randn(64, VOCAB, generator=torch.Generator().manual_seed(6))
    ks = [1 + i % 5 for i in range(64)]
    out = run(logits, [SamplingParams(temperature=2.0, top_k=k) for k in ks])
    for i, k in enumerate(ks):
        allowed = set(logits[i].topk(k).indices.tolist())
        assert out.sampled_token_ids[i].item() in allowed


# --- seeds and distribution ---------------------------------------------------------------------


def seeded_run(
    batch: list[tuple[SamplingParams, torch.Tensor, int | None]], device: str, step: int = 0
) -> list[int]:
    """One step of a batch of (params, logits row, seed): every row has generated `step` tokens."""
    params = [p for p, _, _ in batch]
    logits = torch.stack([row for _, row, _ in batch]).to(device)
    states = [RequestSamplingState([], [7] * step, seed) for _, _, seed in batch]
    return run(logits, params, states).sampled_token_ids.tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_request_is_reproducible_across_batches(device: str) -> None:
    gen = torch.Generator().manual_seed(7)
    rows = {name: torch.randn(VOCAB, generator=gen) * 0.5 for name in "ABCD"}  # flat: samples vary
    a = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    c = SamplingParams(temperature=0.8, top_k=20, seed=99)
    others = [SamplingParams(temperature=1.3), SamplingParams(temperature=0.0), SamplingParams(min_p=0.1)]

    def a_samples(layout: str, steps: int = 8, seed: int = 1234) -> list[int]:
        seeds = {"A": seed, "C": 99}
        p = {"A": a, "B": others[0], "C": c, "D": others[1], "E": others[2]}
        got = []
        for step in range(steps):
            batch = [(p[n], rows.get(n, rows["B"]), seeds.get(n)) for n in layout]
            got.append(seeded_run(batch, device, step)[layout.index("A")])
        return got

    alone = a_samples("A")
    assert len(set(alone)) > 2, "the test needs a flat distribution"
    for layout in ["BAC", "CDA", "EBDCA", "AE"]:
        assert a_samples(layout) == alone, layout
    assert a_samples("A", seed=4321) != alone, "another seed gives another stream"


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_row_same_on_sorted_and_unsorted_paths(device: str) -> None:
    """A top-k row alone takes the top-k path; next to a top-p row it takes the sorted path."""
    row = torch.randn(VOCAB, generator=torch.Generator().manual_seed(15)) * 0.3
    x = SamplingParams(temperature=1.2, top_k=40, min_p=0.01, seed=5)
    nucleus = SamplingParams(top_p=0.7)
    alone = [seeded_run([(x, row, 5)], device, step)[0] for step in range(10)]
    mixed = [seeded_run([(nucleus, row, None), (x, row, 5)], device, step)[1] for step in range(10)]
    assert alone == mixed and len(set(alone)) > 2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_seeded_row_same_on_the_plain_and_every_other_path(device: str, dtype: torch.dtype) -> None:
    """A temperature-only row alone is one kernel pass over the model's logits; next to a penalised row
    it reads a float32 copy, next to a top-k row the masked copy, next to a top-p row the sorted path.
    Same seed and step, same token on every path."""
    row = (torch.randn(VOCAB, generator=torch.Generator().manual_seed(16)) * 0.4).to(dtype)
    x = SamplingParams(temperature=0.9, seed=77)
    neighbours = [
        SamplingParams(presence_penalty=1.0),
        SamplingParams(top_k=5),
        SamplingParams(top_p=0.5),
        SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[1]),
    ]
    alone = [seeded_run([(x, row, 77)], device, step)[0] for step in range(12)]
    assert len(set(alone)) > 3
    for other in neighbours:
        with_other = [seeded_run([(other, row, None), (x, row, 77)], device, step)[1] for step in range(12)]
        assert with_other == alone, other


def test_plain_path_reads_the_model_logits_without_a_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[torch.Tensor] = []
    draw = ops.draw

    def spy(logits: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        seen.append(logits)
        return draw(logits, *rest)

    monkeypatch.setattr(ops, "draw", spy)
    logits = torch.randn(4, VOCAB).to(torch.bfloat16)
    run(logits, [SamplingParams(temperature=0.6), SamplingParams(temperature=0.0)] * 2)
    assert seen[-1] is logits, "no float32 copy, no division, no softmax"
    run(logits, [SamplingParams(temperature=0.6), SamplingParams(frequency_penalty=0.5)] * 2, eos=(2,))
    assert seen[-1] is not logits and seen[-1].dtype == torch.float32, "penalties need the copy"


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("seeded", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_temperature_sampling_distribution(seeded: bool, dtype: torch.dtype) -> None:
    torch.manual_seed(8)
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    num_rows, temperature = 4000, 0.7
    logits = base.expand(num_rows, -1).to(dtype)
    params = [
        SamplingParams(temperature=temperature, seed=10_000 + i if seeded else None) for i in range(num_rows)
    ]
    states = [RequestSamplingState([], [], p.seed) for p in params]
    ids = run(logits, params, states).sampled_token_ids
    counts = torch.bincount(ids, minlength=base.numel()).double()
    probs = (base.double() / temperature).softmax(-1)
    # 6 degrees of freedom: P(chi2 > 35) ~ 4e-6
    assert chi_square(counts, probs) < 35.0, (counts / num_rows, probs)


def test_seeded_distribution_over_steps() -> None:
    """One seeded request over many steps (counter = position) samples softmax(x / T) too (each step
    as its own row here: the state says how many tokens it has generated)."""
    base = torch.tensor([1.0, 0.0, 0.7, -1.0, 2.0])
    p = SamplingParams(temperature=1.3, seed=2**64 - 3)
    num_steps = 3000
    logits = base.expand(num_steps, -1)
    states = [RequestSamplingState([], [0] * step, p.seed) for step in range(num_steps)]
    ids = run(logits, [p] * num_steps, states).sampled_token_ids
    counts = torch.bincount(ids, minlength=5).double()
    assert chi_square(counts, (base.double() / 1.3).softmax(-1)) < 30.0


def test_top_p_distribution_is_renormalised() -> None:
    torch.manual_seed(9)
    base = torch.tensor([1.5, 1.0, 0.2, -0.3, -2.0])
    probs = base.double().softmax(-1)  # [0.46, 0.28, 0.13, 0.08, 0.01]
    logits = base.expand(4000, -1).contiguous()
    ids = run(logits, [SamplingParams(top_p=0.8)] * 4000).sampled_token_ids
    counts = torch.bincount(ids, minlength=5).double()
    assert counts[3:].sum() == 0
    kept = probs[:3] / probs[:3].sum()
    assert chi_square(counts[:3], kept) < 30.0


# --- logprobs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_are_raw_log_softmax_with_rank(device: str) -> None:
    gen = torch.Generator().manual_seed(10)
    logits = torch.randn(6, VOCAB, generator=gen) * 3
    params = [
        SamplingParams(temperature=0.0, logprobs=5),
        SamplingParams(temperature=0.5, top_k=3, logprobs=2, repetition_penalty=2.0),
        SamplingParams(logprobs=0),
        SamplingParams(),  # no logprobs, still gets the batch's columns
        SamplingParams(temperature=2.0, logprobs=5),
        SamplingParams(temperature=0.0, logprobs=1, presence_penalty=2.0),
    ]
    states = [RequestSamplingState([1, 2, 3], [4, 4]) for _ in params]
    out = run(logits.to(device), params, states).to_host()
    assert out.logprobs is not None
    raw = logits.double().log_softmax(-1)
    for i, token in enumerate(out.sampled_token_ids):
        ids, lps = out.logprobs.token_ids[i], out.logprobs.logprobs[i]
        assert len(ids) == 1 + 5 and ids[0] == token
        assert lps[0] == pytest.approx(raw[i, token].item(), abs=1e-5)
        assert ids[1:] == raw[i].topk(5).indices.tolist()
        assert lps[1:] == pytest.approx(raw[i].topk(5).values.tolist(), abs=1e-5)
        assert out.logprobs.ranks[i] == int((raw[i] > raw[i, token]).sum()) + 1
    assert out.logprobs.ranks[0] == 1  # greedy on raw logits: the top token


def test_logprobs_zero_gives_only_the_sampled_token() -> None:
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(11))
    out = run(logits, [SamplingParams(temperature=0.0, logprobs=0)] * 3)
    assert out.logprobs is not None and out.logprobs.token_ids.shape == (3, 1)


def test_gather_logprobs_for_prompt_tokens() -> None:
    logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(12))
    logprobs = logits.log_softmax(-1)
    targets = torch.tensor([3, 0, 96, 50, 7])
    lp = ops.gather_logprobs(logprobs, 2, targets)
    assert lp.token_ids[:, 0].tolist() == targets.tolist()
    torch.testing.assert_close(lp.logprobs[:, 0], logprobs[torch.arange(5), targets])


# --- stage skipping and metadata ----------------------------------------------------------------


def test_stages_are_skipped_when_no_row_needs_them(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("stage should have been skipped")

    for name in [
        "sorted_masked_logits",
        "apply_top_k",
        "apply_min_p",
        "apply_penalties",
        "draw",
        "draw_sorted",
    ]:
        monkeypatch.setattr(ops, name, forbidden)
    logits = torch.randn(4, VOCAB)
    run(logits, [SamplingParams(temperature=0.0)] * 4)
    md = SamplingMetadata.build(
        [SamplingParams(temperature=0.0)] * 2, [RequestSamplingState()] * 2, vocab_size=VOCAB, device="cpu"
    )
    assert md.all_greedy and md.temperature is None and md.top_k is None and not md.has_penalties


def test_metadata_packs_rows() -> None:
    params = [SamplingParams(top_k=5), SamplingParams(temperature=0.0, top_k=50), SamplingParams(top_k=500)]
    states = [
        RequestSamplingState([1], [2, 2], seed=3),
        RequestSamplingState(),
        RequestSamplingState([4], [5]),
    ]
    md = SamplingMetadata.build(params, states, vocab_size=VOCAB, device="cpu")
    assert md.top_k is not None and md.top_k.tolist() == [5, VOCAB, VOCAB]  # greedy / too large = off
    assert md.max_top_k == 5 and md.top_p is None and md.min_p is None
    assert md.is_greedy is not None and md.is_greedy.tolist() == [False, True, False]
    assert md.temperature is not None and md.temperature.tolist() == [1.0, 0.0, 1.0]  # greedy: 0
    assert md.noise_keys is not None and md.noise_counters is not None
    keys, counters = md.noise_keys.tolist(), md.noise_counters.tolist()
    assert keys[0] == 3 and counters[0] == 2, "a seeded row: (seed, tokens generated so far)"
    assert keys[1] == keys[2] and counters[1:] == [1, 2], "unseeded rows: (the step's key, row index)"
    with pytest.raises(ValueError, match="SamplingParams"):
        SamplingMetadata.build(params, states[:2], vocab_size=VOCAB, device="cpu")


def test_metadata_noise_keys() -> None:
    """Unseeded rows draw one step key from torch's default generator (torch.manual_seed makes it
    reproducible); seeds wrap to 64 bits (int64 bits of the uint64 key); all greedy draws nothing."""
    params = [SamplingParams(), SamplingParams(seed=1)]

    def build(seeds: list[int | None]) -> SamplingMetadata:
        states = [RequestSamplingState([], [9] * i, seed) for i, seed in enumerate(seeds)]
        return SamplingMetadata.build(params, states, vocab_size=VOCAB, device="cpu")

    torch.manual_seed(123)
    first, second = build([None, 2**64 - 1]), build([None, 2**63])
    torch.manual_seed(123)
    again = build([None, 5])
    assert first.noise_keys is not None and second.noise_keys is not None and again.noise_keys is not None
    assert first.noise_keys[0] == again.noise_keys[0], "torch.manual_seed fixes the step key"
    assert first.noise_keys[0] != second.noise_keys[0], "a new key every step"
    assert first.noise_keys[1] == -1 and second.noise_keys[1] == -(2**63) and again.noise_keys[1] == 5
    assert first.noise_counters is not None and first.noise_counters.tolist() == [0, 1]
    state = torch.get_rng_state()
    greedy = SamplingMetadata.build(
        [SamplingParams(temperature=0.0)], [RequestSamplingState()], vocab_size=VOCAB, device="cpu"
    )
    assert greedy.noise_keys is None and greedy.noise_counters is None
    seeded_only = SamplingMetadata.build(
        [SamplingParams(seed=4)], [RequestSamplingState(seed=4)], vocab_size=VOCAB, device="cpu"
    )
    assert seeded_only.noise_keys is not None and seeded_only.noise_keys.tolist() == [4]
    assert torch.equal(torch.get_rng_state(), state), "no draw from the default generator when not needed"


def test_bad_logits_shape() -> None:
    md = SamplingMetadata.build([SamplingParams()], [RequestSamplingState()], vocab_size=VOCAB, device="cpu")
    with pytest.raises(ValueError, match="num_seqs=1"):
        Sampler()(torch.randn(2, VOCAB), md)


def test_tiny_top_p_keeps_the_top_token() -> None:
    logits = torch.randn(8, VOCAB, generator=torch.Generator().manual_seed(13))
    out = run(logits, [SamplingParams(top_p=1e-9)] * 8)
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))
