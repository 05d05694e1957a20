"""tinyserve.ops sampling kernels: the Philox noise contract (exponential_noise) and the one-pass
sample_from_logits, against the pure-Python references of ops/reference.py."""

from __future__ import annotations

import math

import pytest
import torch

from tinyserve import ops
from tinyserve.ops.reference import (
    exponential_noise_ref,
    gumbel_scores_ref,
    noise_words_ref,
    philox4x32_10,
    uniform_from_word,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
QWEN_VOCAB = 151_936


def _as_int64(values: list[int]) -> torch.Tensor:
    """uint64 Python ints -> the int64 tensor of their bits (what the ops take)."""
    return torch.tensor([v - 2**64 if v >= 2**63 else v for v in values], dtype=torch.int64)


def _logits(
    num_seqs: int, vocab: int, seed: int, dtype=torch.float32, device="cpu", scale=2.0
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(num_seqs, vocab, generator=g) * scale).to(dtype).to(device)


def _rows(num_seqs: int, seed: int) -> tuple[list[int], list[int]]:
    """Keys and counters that use all 64 bits (so a dropped high half would show)."""
    g = torch.Generator().manual_seed(seed)
    halves = torch.randint(0, 2**32, (2, num_seqs, 2), generator=g).tolist()
    keys = [hi << 32 | lo for lo, hi in halves[0]]
    counters = [(hi % 5) << 32 | lo for lo, hi in halves[1]]  # small and large counters
    return keys, counters


def _assert_picks_a_best(
    ids: torch.Tensor, logits: torch.Tensor, temps: list[float], keys: list[int], counters: list[int]
) -> None:
    """Every chosen id's float64 reference score is the row maximum, up to float32 rounding."""
    scores = gumbel_scores_ref(logits, temps, keys, counters)  # [num_seqs, vocab] float64
    got = ids.cpu()
    best = scores.max(dim=-1).values
    picked = scores.gather(1, got[:, None]).squeeze(1)
    tol = 2e-5 * (1 + best.abs())
    bad = (best - picked > tol).nonzero().flatten().tolist()
    assert not bad, [
        (r, got[r].item(), scores[r].argmax().item(), picked[r].item(), best[r].item()) for r in bad[:5]
    ]


# ---- Philox and the noise contract -----------------------------------------------------------------


def test_philox_known_answers():
    """Random123's known-answer vectors for Philox4x32-10."""
    assert philox4x32_10((0, 0), (0, 0, 0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert philox4x32_10((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF,) * 4) == (
        0x408F276D,
        0x41C83B0E,
        0xA20BC7C6,
        0x6D5451FD,
    )
    assert philox4x32_10((0xA4093822, 0x299F31D0), (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)) == (
        0xD16CFE09,
        0x94FDCCEB,
        0x5001E420,
        0x24126EA1,
    )


def test_noise_words_follow_the_counter_layout():
    """Token v uses word v & 3 of philox(key, (v >> 2, 0, counter_lo, counter_hi))."""
    key, counter = 0x0123456789ABCDEF, 0xFEDCBA9876543210
    words = noise_words_ref(key, counter, 11)
    for v in range(11):
        block = philox4x32_10((key & 0xFFFFFFFF, key >> 32), (v >> 2, 0, counter & 0xFFFFFFFF, counter >> 32))
        assert words[v] == block[v & 3]
    assert uniform_from_word(0) == 2.0**-25 and uniform_from_word(2**32 - 1) == 1 - 2.0**-25


@pytest.mark.parametrize("vocab", [1, 3, 4, 97, 1001])
def test_exponential_noise_is_the_reference_bit_for_bit_on_cpu(vocab):
    keys, counters = _rows(5, seed=vocab)
    keys[0], counters[0] = 0, 0
    keys[1], counters[1] = 2**64 - 1, 2**64 - 1
    got = ops.exponential_noise(_as_int64(keys), _as_int64(counters), vocab)
    assert got.shape == (5, vocab) and got.dtype == torch.float32
    assert torch.equal(got, exponential_noise_ref(keys, counters, vocab))


def test_exponential_noise_strided_rows_and_out():
    keys, counters = _rows(4, seed=1)
    packed = torch.stack([_as_int64(keys), _as_int64(counters)])  # [2, num_seqs]
    buf = torch.full((4, 40), float("nan"))
    out = ops.exponential_noise(packed[0], packed[1], 33, out=buf[:, 3:36])
    assert torch.equal(out, exponential_noise_ref(keys, counters, 33))
    assert buf[:, :3].isnan().all() and buf[:, 36:].isnan().all(), "wrote outside out"
    # strided keys (every other element)
    doubled = _as_int64([k for k in keys for _ in range(2)])
    again = ops.exponential_noise(doubled[::2], _as_int64(counters), 33)
    assert torch.equal(again, out)


def test_exponential_noise_is_exponential():
    """Mean 1, P(E > 1) = 1/e, P(E > 5) = e^-5, across counters: a transform or layout error shows."""
    num_rows, vocab = 64, 4096
    e = ops.exponential_noise(torch.full((num_rows,), 99, dtype=torch.int64), torch.arange(num_rows), vocab)
    n = e.numel()
    assert e.min() >= 2.0**-25 * 0.99 and e.max() <= 17.34
    assert abs(e.double().mean().item() - 1.0) < 5 * (1 / math.sqrt(n))
    for t in (1.0, 5.0):
        frac = (e > t).double().mean().item()
        p = math.exp(-t)
        assert abs(frac - p) < 6 * math.sqrt(p * (1 - p) / n), (t, frac, p)
    # different counters, different streams; neighbouring tokens uncorrelated
    assert not torch.equal(e[0], e[1])
    corr = torch.corrcoef(torch.stack([e[:, :-1].flatten(), e[:, 1:].flatten()]))[0, 1].item()
    assert abs(corr) < 0.01


@pytest.mark.cuda
@pytest.mark.parametrize("vocab", [1, 3, 97, 1001, QWEN_VOCAB])
def test_exponential_noise_cuda_within_one_ulp(vocab):
    keys, counters = _rows(3, seed=vocab)
    kt, ct = _as_int64(keys), _as_int64(counters)
    want = ops.exponential_noise(kt, ct, vocab)  # CPU: the reference bit for bit (tested above)
    if vocab <= 1001:
        assert torch.equal(want, exponential_noise_ref(keys, counters, vocab))
    got = ops.exponential_noise(kt.cuda(), ct.cuda(), vocab).cpu()
    # Positive floats: the distance in units in the last place is the distance of their bit patterns.
    ulps = (got.view(torch.int32).long() - want.view(torch.int32).long()).abs()
    assert ulps.max().item() <= 1, f"max {ulps.max().item()} ulp at {ulps.argmax().item()}"
    assert (ulps == 0).float().mean() > 0.5, "mostly the correctly rounded value itself"


# ---- sample_from_logits ----------------------------------------------------------------------------

SHAPES = [(1, 1), (1, 3), (2, 4), (3, 97), (7, 1001), (33, 2053)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "s{}-v{}".format(*s))
def test_sample_from_logits_matches_reference(device, dtype, shape):
    num_seqs, vocab = shape
    logits = _logits(num_seqs, vocab, seed=num_seqs * 1000 + vocab, dtype=dtype, device=device)
    temps = [[0.0, 0.6, 1.0, 1.7, 0.05][i % 5] for i in range(num_seqs)]
    keys, counters = _rows(num_seqs, seed=vocab)
    out = torch.full((num_seqs,), -1, dtype=torch.int64, device=device)
    got = ops.sample_from_logits(
        logits,
        torch.tensor(temps, device=device),
        _as_int64(keys).to(device),
        _as_int64(counters).to(device),
        out=out,
    )
    assert got is out and got.dtype == torch.int64 and got.device.type == device
    assert ((got >= 0) & (got < vocab)).all(), "every row written, in range"
    _assert_picks_a_best(got, logits, temps, keys, counters)
    for i, t in enumerate(temps):
        if t == 0:
            assert got[i].item() == logits[i].float().argmax().item(), f"greedy row {i}"


def _argmax_ref(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax in float64 with ties to the lowest index (all -inf rows give 0)."""
    x = logits.double().cpu()
    best = x.max(dim=-1, keepdim=True).values
    hits = (x == best).double()
    return (hits * torch.arange(x.shape[1], 0, -1, dtype=torch.float64)).argmax(dim=-1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "s{}-v{}".format(*s))
def test_sample_from_logits_without_temperature_is_the_argmax(device, dtype, shape):
    """No temperature, keys or counters: every row greedy. Coarse logits give ties (lowest index)."""
    num_seqs, vocab = shape
    logits = _logits(num_seqs, vocab, seed=vocab + 7, dtype=dtype, device=device).round()
    out = torch.full((num_seqs,), -1, dtype=torch.int64, device=device)
    got = ops.sample_from_logits(logits, out=out)
    assert got is out
    assert torch.equal(got.cpu(), _argmax_ref(logits))
    zero = torch.zeros(num_seqs, device=device)
    k = torch.zeros(num_seqs, dtype=torch.int64, device=device)
    assert torch.equal(got, ops.sample_from_logits(logits, zero, k, k)), "the same as temperature 0"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0, 1, 8], ids=["aligned", "unaligned", "offset8"])
def test_sample_from_logits_strided_rows(device, dtype, offset):
    """Rows of a wider buffer (16-byte aligned rows, misaligned rows) and a vocab that is not a multiple
    of the vector width: the CUDA kernel's vector, scalar and tail paths."""
    num_seqs, vocab, width = 9, 1001, 1024 + 16
    buf = _logits(num_seqs, width, seed=offset, dtype=dtype, device=device)
    logits = buf[:, offset : offset + vocab]
    temps = [0.8] * (num_seqs - 1) + [0.0]
    keys, counters = _rows(num_seqs, seed=3)
    rows = torch.stack([_as_int64(keys), _as_int64(counters)], dim=1).to(device)  # [num_seqs, 2]
    temps_strided = torch.tensor(temps, device=device).repeat_interleave(2)[::2]
    got = ops.sample_from_logits(logits, temps_strided, rows[:, 0], rows[:, 1])  # strided row params
    _assert_picks_a_best(got, logits, temps, keys, counters)
    contiguous = ops.sample_from_logits(
        logits.contiguous(),
        torch.tensor(temps, device=device),
        rows[:, 0].contiguous(),
        rows[:, 1].contiguous(),
    )
    assert torch.equal(got, contiguous), "the row stride must not change the result"


@pytest.mark.parametrize("device", DEVICES)
def test_sample_from_logits_depends_only_on_the_row(device):
    """A row's token depends on its logits, temperature, key and counter, not on the other rows."""
    logits = _logits(12, 500, seed=5, device=device, scale=0.5)
    temps = torch.tensor([1.0] * 12, device=device)
    keys, counters = _rows(12, seed=5)
    kt, ct = _as_int64(keys).to(device), _as_int64(counters).to(device)
    together = ops.sample_from_logits(logits, temps, kt, ct)
    for i in (0, 5, 11):
        alone = ops.sample_from_logits(logits[i : i + 1], temps[i : i + 1], kt[i : i + 1], ct[i : i + 1])
        assert alone.item() == together[i].item()
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0)).to(device)
    shuffled = ops.sample_from_logits(logits[perm], temps[perm], kt[perm], ct[perm])
    assert torch.equal(shuffled, together[perm])
    other = ops.sample_from_logits(logits, temps, kt, ct + 1)
    assert not torch.equal(other, together), "another counter, another draw"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_from_logits_infinities_and_ties(device, dtype):
    vocab = 37
    logits = torch.full((5, vocab), float("-inf"), dtype=dtype, device=device)
    logits[1, 20] = 3.0  # one finite token: always it
    logits[2] = 1.0  # all equal
    logits[3, 5:] = -1e4  # -inf prefix, then a flat tail
    logits[4, 30] = float("inf")
    keys, counters = _rows(5, seed=7)
    kt, ct = _as_int64(keys).to(device), _as_int64(counters).to(device)
    greedy = ops.sample_from_logits(logits, torch.zeros(5, device=device), kt, ct).tolist()
    assert greedy == [0, 20, 0, 5, 30], "all -inf gives 0; ties go to the lowest index"
    assert ops.sample_from_logits(logits).tolist() == greedy, "no temperature: the same argmax"
    sampled = ops.sample_from_logits(logits, torch.full((5,), 0.7, device=device), kt, ct).tolist()
    assert sampled[0] == 0 and sampled[1] == 20 and sampled[4] == 30
    assert sampled[3] >= 5, "-inf logits never win"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_from_logits_distribution(device, dtype):
    """Frequencies over many counters (one key) and over many keys (one counter) follow softmax(x / T)."""
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, 1.5]).to(dtype)
    num_rows, temperature = 20_000, 0.7
    probs = (base.double() / temperature).softmax(-1)
    logits = base.to(device).expand(num_rows, -1)  # row stride 0: every row reads the same logits
    temps = torch.full((num_rows,), temperature, device=device)
    draws = [
        (torch.full((num_rows,), 1234, dtype=torch.int64), torch.arange(num_rows)),
        (torch.arange(num_rows) * 7919 - 2**62, torch.full((num_rows,), 3, dtype=torch.int64)),
    ]
    for keys, counters in draws:
        ids = ops.sample_from_logits(logits, temps, keys.to(device), counters.to(device)).cpu()
        counts = torch.bincount(ids, minlength=base.numel()).double()
        expected = probs * num_rows
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 35.0, (counts / num_rows, probs)  # 7 degrees of freedom: P(chi2 > 35) ~ 1e-5


def test_sample_from_logits_matches_an_exponential_race_on_the_noise():
    """Gumbel-max over the logits equals the exponential race argmax(softmax / E) over the same noise."""
    logits = _logits(16, 300, seed=9)
    temps = torch.linspace(0.3, 2.0, 16)
    keys, counters = _rows(16, seed=9)
    kt, ct = _as_int64(keys), _as_int64(counters)
    race = (
        (logits.double() / temps[:, None].double()).softmax(-1) / ops.exponential_noise(kt, ct, 300)
    ).argmax(-1)
    assert torch.equal(ops.sample_from_logits(logits, temps, kt, ct), race)


def test_sample_from_logits_bad_input():
    x = _logits(4, 16, seed=10)
    t = torch.ones(4)
    k = torch.zeros(4, dtype=torch.int64)
    cases = [
        (lambda: ops.sample_from_logits(x.long(), t, k, k), TypeError, "logits has dtype int64"),
        (lambda: ops.sample_from_logits(x[0], t, k, k), ValueError, "logits must be 2-D"),
        (lambda: ops.sample_from_logits(x.t(), t, k, k), ValueError, "contiguous in its last dimension"),
        (lambda: ops.sample_from_logits(x[:, :0], t, k, k), ValueError, "vocab_size must be in"),
        (lambda: ops.sample_from_logits(x, t.double(), k, k), TypeError, "temperature has dtype float64"),
        (
            lambda: ops.sample_from_logits(x, t[:3], k, k),
            ValueError,
            r"temperature must be 1-D \[num_seqs=4\]",
        ),
        (lambda: ops.sample_from_logits(x, t, k.int(), k), TypeError, "keys has dtype int32"),
        (lambda: ops.sample_from_logits(x, t, k, k[:2]), ValueError, r"counters must be 1-D \[num_seqs=4\]"),
        (lambda: ops.sample_from_logits(x, t, k, k, out=k.float()), TypeError, "out has dtype float32"),
        (lambda: ops.sample_from_logits(x, t, k, k, out=k[:3]), ValueError, r"out must be 1-D"),
        (lambda: ops.sample_from_logits(x, None, k, k), ValueError, "keys and counters go with temperature"),
        (lambda: ops.sample_from_logits(x, None, None, k), ValueError, "go with temperature"),
        (lambda: ops.sample_from_logits(x, t), ValueError, "temperature needs keys and counters"),
        (lambda: ops.sample_from_logits(x, t, k), ValueError, "temperature needs keys and counters"),
        (lambda: ops.sample_from_logits(x.tolist(), t, k, k), TypeError, "logits must be a torch.Tensor"),
        (lambda: ops.exponential_noise(k, k, 0), ValueError, "vocab_size must be an int"),
        (lambda: ops.exponential_noise(k, k, 3.0), ValueError, "vocab_size must be an int"),
        (lambda: ops.exponential_noise(k.float(), k, 3), TypeError, "keys has dtype float32"),
        (lambda: ops.exponential_noise(k[None], k, 3), ValueError, "keys must be 1-D"),
        (lambda: ops.exponential_noise(k, k[:1], 3), ValueError, r"counters must be 1-D \[num_seqs=4\]"),
        (
            lambda: ops.exponential_noise(k, k, 3, out=torch.empty(4, 4)),
            ValueError,
            r"out must be \[num_seqs=4",
        ),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
    empty = ops.sample_from_logits(x[:0], t[:0], k[:0], k[:0])
    assert empty.shape == (0,)


# ---- CUDA only: large vocabularies, the split path, devices, graphs ---------------------------------


def _assert_cuda_agrees_with_cpu(
    logits_cuda: torch.Tensor, temps: list[float], keys: list[int], counters: list[int]
) -> None:
    """sample_from_logits on CUDA picks a best token of every row by the float64 scores built from the
    CPU kernel's noise (bit for bit the contract), and the CPU kernel's own token almost always."""
    kt, ct, tt = _as_int64(keys), _as_int64(counters), torch.tensor(temps)
    got = ops.sample_from_logits(logits_cuda, tt.cuda(), kt.cuda(), ct.cuda()).cpu()
    logits = logits_cuda.cpu()
    noise = ops.exponential_noise(kt, ct, logits.shape[1]).double()
    x, t = logits.double(), tt.double()[:, None]
    scores = torch.where(t > 0, x / t.clamp_min(1e-30) - noise.log(), x)  # [num_seqs, vocab]
    best = scores.max(-1).values
    picked = scores.gather(1, got[:, None]).squeeze(1)
    bad = ((best - picked) > 2e-5 * (1 + best.abs())).nonzero().flatten().tolist()
    assert not bad, [(r, got[r].item(), scores[r].argmax().item()) for r in bad[:5]]
    cpu = ops.sample_from_logits(logits, tt, kt, ct)
    differ = (cpu != got).sum().item()
    assert differ <= max(1, len(temps) // 50), f"{differ} rows differ from the CPU twin (only near-ties may)"


@pytest.mark.cuda
@pytest.mark.parametrize("num_seqs", [1, 4, 64, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sample_from_logits_qwen_vocab_on_cuda(num_seqs, dtype):
    """151,936 tokens: one row split over many blocks (S = 1) up to one block per row (S = 256)."""
    logits = _logits(num_seqs, QWEN_VOCAB, seed=num_seqs, dtype=dtype, scale=3.0)
    temps = [[0.6, 1.0, 0.0, 0.3][i % 4] for i in range(num_seqs)]
    keys, counters = _rows(num_seqs, seed=num_seqs)
    _assert_cuda_agrees_with_cpu(logits.cuda(), temps, keys, counters)


@pytest.mark.cuda
@pytest.mark.parametrize("vocab", [8191, 8192, 8193, 20011, 65536 + 12])
@pytest.mark.parametrize("num_seqs", [1, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_sample_from_logits_split_rows_on_cuda(vocab, num_seqs, dtype):
    """Few rows: each is split over several thread blocks (partials + the combine kernel), with the
    vector path, its tail, or the scalar path (odd vocab sizes leave rows unaligned)."""
    logits = _logits(num_seqs, vocab, seed=vocab, dtype=dtype, scale=1.0)
    temps = [[0.9, 0.0, 2.0][i % 3] for i in range(num_seqs)]
    keys, counters = _rows(num_seqs, seed=vocab + num_seqs)
    _assert_cuda_agrees_with_cpu(logits.cuda(), temps, keys, counters)


@pytest.mark.cuda
@pytest.mark.parametrize("vocab", [QWEN_VOCAB, 128_256, 20011])
@pytest.mark.parametrize("num_seqs", [1, 2, 5, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_greedy_rows_split_over_blocks_on_cuda(vocab, num_seqs, dtype):
    """Without temperature, few long rows are split over many thread blocks: the argmax of each row,
    with the maximum planted in different blocks' ranges and a tie across two of them."""
    logits = _logits(num_seqs, vocab, seed=vocab + num_seqs, dtype=dtype, scale=3.0)
    g = torch.Generator().manual_seed(num_seqs)
    at = torch.randint(0, vocab, (num_seqs,), generator=g)
    logits[torch.arange(num_seqs), at] = 40.0
    logits[0, [vocab // 3, vocab - 1]] = 50.0  # a tie in two far-apart splits: the lower index wins
    got = ops.sample_from_logits(logits.cuda()).cpu()
    want = _argmax_ref(logits)
    assert want[0].item() == vocab // 3
    assert torch.equal(got, want)
    assert torch.equal(got, ops.sample_from_logits(logits)), "the CPU twin agrees"
    unaligned = torch.cat([logits[:, :1], logits], dim=1).cuda()[:, 1:]  # the scalar path
    assert torch.equal(ops.sample_from_logits(unaligned).cpu(), want)


@pytest.mark.cuda
@pytest.mark.parametrize("num_seqs", [2, 32, 300])
def test_sample_from_logits_peaked_rows_on_cuda(num_seqs):
    """Rows with a few dominant tokens (the kernel then skips the noise of almost every other token),
    a row of equal logits, and an unaligned view (the scalar path)."""
    logits = _logits(num_seqs, QWEN_VOCAB, seed=11, dtype=torch.bfloat16, scale=2.0)
    g = torch.Generator().manual_seed(11)
    top = torch.randint(0, QWEN_VOCAB, (num_seqs, 3), generator=g)
    logits.scatter_(1, top, torch.tensor([22.0, 20.5, 19.0]).to(torch.bfloat16).expand(num_seqs, 3))
    logits[-1] = 0.5
    temps = [[0.6, 1.0, 0.2][i % 3] for i in range(num_seqs)]
    keys, counters = _rows(num_seqs, seed=11)
    _assert_cuda_agrees_with_cpu(logits.cuda(), temps, keys, counters)
    unaligned = torch.cat([logits[:, :1], logits], dim=1).cuda()[:, 1:]  # rows start 2 bytes past 16
    assert unaligned.data_ptr() % 16 == 2
    _assert_cuda_agrees_with_cpu(unaligned, temps, keys, counters)


@pytest.mark.cuda
def test_sampling_ops_mixed_devices():
    x = _logits(2, 8, seed=12, device="cuda")
    t = torch.ones(2, device="cuda")
    k = torch.zeros(2, dtype=torch.int64, device="cuda")
    with pytest.raises(ValueError, match="keys is on cpu"):
        ops.sample_from_logits(x, t, k.cpu(), k)
    with pytest.raises(ValueError, match="temperature is on cpu"):
        ops.sample_from_logits(x, t.cpu(), k, k)
    with pytest.raises(ValueError, match="counters is on cpu"):
        ops.exponential_noise(k, k.cpu(), 8)


@pytest.mark.cuda
def test_sample_from_logits_in_a_cuda_graph_without_host_syncs():
    """No host sync and no allocation that breaks capture: captured once, replayed on new logits."""
    num_seqs, vocab = 3, 20011  # few rows: the split path with its workspace and combine kernel
    logits = _logits(num_seqs, vocab, seed=13, dtype=torch.bfloat16, device="cuda")
    temps = torch.tensor([0.7, 0.0, 1.3], device="cuda")
    keys, counters = _rows(num_seqs, seed=13)
    kt, ct = _as_int64(keys).cuda(), _as_int64(counters).cuda()
    out = torch.empty(num_seqs, dtype=torch.int64, device="cuda")
    out_greedy = torch.empty_like(out)  # and every row greedy (no temperature)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.sample_from_logits(logits, temps, kt, ct, out=out)
        ops.sample_from_logits(logits, out=out_greedy)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            ops.sample_from_logits(logits, temps, kt, ct, out=out)
            ops.sample_from_logits(logits, out=out_greedy)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for seed in (14, 15):
        logits.copy_(_logits(num_seqs, vocab, seed=seed, dtype=torch.bfloat16, device="cuda"))
        ct.add_(1)
        graph.replay()
        torch.cuda.synchronize()
        want = ops.sample_from_logits(logits, temps, kt, ct)
        assert torch.equal(out, want)
        assert torch.equal(out_greedy.cpu(), _argmax_ref(logits))
