"""Sampling kernels: counter-based exponential noise and a one-pass sampler over the logits.

The noise contract (csrc/philox.h; pure-Python reference in ops/reference.py): row s has a 64-bit key
and a 64-bit counter, and token v gets the Philox4x32-10 word
`r_v = philox4x32_10(key=(key_lo, key_hi), ctr=(v >> 2, 0, counter_lo, counter_hi))[v & 3]`, the
uniform `U_v = ((r_v >> 8) + 0.5) * 2**-24` (in (0, 1), never 0 or 1) and the exponential
`E_v = -log(U_v)`. Keys and counters travel as int64 tensors holding the bits of the uint64 values
(a Python int k in [0, 2**64) is stored as k - 2**64 when k >= 2**63).

Sampling row s at temperature T > 0 picks `argmax_v (x_v / T - log E_v)`: the exponential race
`argmax_v w_v / E_v` with `w = exp(x / T)`, i.e. an exact draw from softmax(x / T) (Gumbel-max), so no
softmax is needed. A row with the same key and counter gets the same token wherever it sits.

NOTE: on CUDA these ops never synchronise or read device tensors on the host, so they can be captured
in CUDA graphs.
"""

from __future__ import annotations

import torch

from tinyserve import _C

from ._tensor import check_dtype, check_tensor, stream_of, view

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The CUDA kernel splits a row over several thread blocks when there are too few rows to fill the
# GPU, each block taking at least one long pass (8192 tokens of bf16, 4096 of float32); the workspace
# holds one partial result per block, at most _MAX_PARTIALS of them.
_MIN_SPLIT_TOKENS = 4096
_MAX_PARTIALS = 8192


def _check_row_param(name: str, t: object, num_seqs: int, dtype: torch.dtype, device: torch.device) -> None:
    t = check_tensor(name, t)
    check_dtype(name, t, (dtype,))
    if t.dim() != 1 or t.shape[0] != num_seqs:
        raise ValueError(f"{name} must be 1-D [num_seqs={num_seqs}], got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(
            f"{name} is on {t.device} but logits are on {device}; all tensors must be on one device"
        )


def _check_noise_rows(keys: object, counters: object) -> tuple[int, torch.device]:
    keys = check_tensor("keys", keys)
    check_dtype("keys", keys, (torch.int64,))
    if keys.dim() != 1:
        raise ValueError(f"keys must be 1-D [num_seqs], got shape {tuple(keys.shape)}")
    num_seqs = keys.shape[0]
    _check_row_param("counters", counters, num_seqs, torch.int64, keys.device)
    return num_seqs, keys.device


def sample_from_logits(
    logits: torch.Tensor,
    temperature: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per row, in one pass over the logits.

    Row s with `T = temperature[s] > 0` takes `argmax_v (x_v / T - log E_v)` with the noise E of
    (keys[s], counters[s]): an exact sample of softmax(x / T). A row with T = 0 (or any value that is
    not > 0) takes `argmax_v x_v` (greedy). Scores are float32, computed as `x_v - T * log(E_v)` (the
    same order, no division); ties go to the lowest index; -inf logits never win, and a row that is
    all -inf gives 0. NaN logits give an unspecified (valid) index.

    Without temperature (and then without keys and counters) every row is greedy: a row-wise argmax
    that, unlike `torch.argmax`, spreads a few long rows over many thread blocks on CUDA.

    Args:
        logits: [num_seqs, vocab_size] float32, float16 or bfloat16, CPU or CUDA; any row stride with a
            unit last stride (e.g. rows of a larger buffer). Not modified.
        temperature: [num_seqs] float32 on the logits' device; any stride. None: every row greedy.
        keys, counters: [num_seqs] int64 on the logits' device (the bits of uint64 values); any stride.
            Given exactly when temperature is.
        out: optional [num_seqs] int64 on the logits' device; any stride.

    Returns:
        `out` (a new tensor when not given): [num_seqs] int64 token ids in [0, vocab_size).
    """
    logits = check_tensor("logits", logits)
    check_dtype("logits", logits, FLOAT_DTYPES)
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [num_seqs, vocab_size], got shape {tuple(logits.shape)}")
    if logits.stride(1) != 1:
        raise ValueError(f"logits must be contiguous in its last dimension (strides {logits.stride()})")
    num_seqs, vocab_size = logits.shape
    if vocab_size < 1 or vocab_size >= 2**31 - 64:
        raise ValueError(f"vocab_size must be in [1, 2**31 - 64), got {vocab_size}")
    device = logits.device
    noise = (keys, counters)
    if temperature is None:
        if noise != (None, None):
            raise ValueError("keys and counters go with temperature: without temperature every row is greedy")
    else:
        if None in noise:
            raise ValueError("temperature needs keys and counters (the rows' noise)")
        _check_row_param("temperature", temperature, num_seqs, torch.float32, device)
        _check_row_param("keys", keys, num_seqs, torch.int64, device)
        _check_row_param("counters", counters, num_seqs, torch.int64, device)
    if out is None:
        out = torch.empty(num_seqs, dtype=torch.int64, device=device)
    else:
        _check_row_param("out", out, num_seqs, torch.int64, device)
    if num_seqs == 0:
        return out
    workspace = None
    if device.type == "cuda":
        per_row = min(-(-vocab_size // _MIN_SPLIT_TOKENS), _MAX_PARTIALS // num_seqs)
        if per_row >= 2:
            workspace = torch.empty(num_seqs * per_row, dtype=torch.int64, device=device)
    _C.sample_from_logits(
        view(logits),
        None if temperature is None else view(temperature),
        None if keys is None else view(keys),
        None if counters is None else view(counters),
        view(out),
        None if workspace is None else view(workspace),
        stream_of(logits),
    )
    return out


def exponential_noise(
    keys: torch.Tensor, counters: torch.Tensor, vocab_size: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The exponential noise `E_v = -log(U_v)` of every (row, token), as the module docstring defines it.

    On the CPU every value is the exact -log(U_v) rounded once to float32 (bit for bit
    `ops.reference.exponential_noise_ref`); on CUDA it is within 1 ulp of that.

    Args:
        keys, counters: [num_seqs] int64 (the bits of uint64 values), CPU or CUDA, one device; any stride.
        vocab_size: tokens per row, >= 1.
        out: optional [num_seqs, vocab_size] float32 on the keys' device with a unit last stride.

    Returns:
        `out` (a new contiguous tensor when not given): [num_seqs, vocab_size] float32, all in
        [2**-25, 17.33].
    """
    num_seqs, device = _check_noise_rows(keys, counters)
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or not 1 <= vocab_size < 2**31 - 64:
        raise ValueError(f"vocab_size must be an int in [1, 2**31 - 64), got {vocab_size!r}")
    if out is None:
        out = torch.empty(num_seqs, vocab_size, dtype=torch.float32, device=device)
    else:
        out = check_tensor("out", out)
        check_dtype("out", out, (torch.float32,))
        if tuple(out.shape) != (num_seqs, vocab_size):
            raise ValueError(
                f"out must be [num_seqs={num_seqs}, vocab_size={vocab_size}], got shape {tuple(out.shape)}"
            )
        if out.stride(1) != 1:
            raise ValueError(f"out must be contiguous in its last dimension (strides {out.stride()})")
        if out.device != device:
            raise ValueError(
                f"out is on {out.device} but keys are on {device}; all tensors must be on one device"
            )
    if num_seqs:
        _C.exponential_noise(view(keys), view(counters), view(out), stream_of(out))
    return out
