"""CUDA graphs for decode-only steps, captured once per (bucketed batch size, context-length bound).

Each graph reads its inputs from fixed addresses in the runner's packed device buffer (InputBatch)
and writes logits [batch_size, vocab] into one logits buffer that every graph shares; a step copies
its inputs in (one host->device copy, as in eager mode) and replays the graph of the next larger
batch size and the smallest length bound that holds its longest sequence.

Why length bounds: the attention kernel sizes its split-KV launch (how many thread blocks share a
sequence's keys) from a host-side bound of the context length, and a graph fixes the launch. One
bound of max_model_len would split a short context as if it were long; a few bounds keep the split
close to what an eager step would pick, at the price of capturing each batch size a few times.

Fused decoder layers: at a few tokens a step, each decoder layer can run as four skinny products
carrying its norms, SiLU and residual adds (LlamaDecoderLayer.forward_fused) instead of cuBLAS
products between small kernels. Which is faster depends on the card and the shapes, so before the
capture both forms of each small batch size are captured once and timed (their replays interleaved),
and the fused form is kept where it is faster by more than FUSED_MARGIN (TINYSERVE_FUSED_LAYERS=0
never fuses, =1 always fuses where supported).
Likewise two ops that stream the weights on CUDA cores at one or two tokens can replace parts of
either form: o_proj, the post-attention norm and the MLP as one kernel (LlamaMLP.fused,
ops.fused_mlp; TINYSERVE_FUSED_MLP), and the input norm with the qkv product (LlamaAttention.fused_qkv,
ops.fused_norm_linear; TINYSERVE_FUSED_QKV). Each variable is 0, 1 or auto as above; every open
combination is measured and the fastest kept.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import logging
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

from tinyserve import ops
from tinyserve.layers.attention import AttentionMetadata
from tinyserve.models.llama import LlamaForCausalLM

from .input_batch import InputBatch
from .linear_tuning import time_graphs

logger = logging.getLogger(__name__)

# A fused form must be this much faster than the plain layers to be kept: the forms' replays are
# timed interleaved (linear_tuning.time_graphs), so a drifting clock does not favour one of them.
FUSED_MARGIN = 0.01


class LayerForm(NamedTuple):
    """How a batch size's decoder layers run (module docstring)."""

    fused: bool = False  # the skinny fused decoder layers (LlamaDecoderLayer.forward_fused)
    fused_mlp: bool = False  # o_proj, the post-attention norm and the MLP as one op
    fused_qkv: bool = False  # the input norm and the qkv product as one op

    @property
    def name(self) -> str:
        parts = ["fused" if self.fused else "unfused"]
        parts += ["fused MLP"] if self.fused_mlp else []
        parts += ["fused qkv"] if self.fused_qkv else []
        return " + ".join(parts)


PLAIN = LayerForm()

# The environment variable of each LayerForm field, in field order.
FORM_VARIABLES = ("TINYSERVE_FUSED_LAYERS", "TINYSERVE_FUSED_MLP", "TINYSERVE_FUSED_QKV")


@dataclass(frozen=True)
class FusedChoice:
    """One measured batch size: seconds per decode-graph replay of each layer form measured. The
    fastest form is kept where it beats the plain layers by FUSED_MARGIN (or, when the plain layers
    were not measured, outright)."""

    batch_size: int
    times: dict[LayerForm, float]

    @property
    def form(self) -> LayerForm:
        best = min(self.times, key=self.times.__getitem__)
        plain = self.times.get(PLAIN)
        if plain is not None and self.times[best] >= (1.0 - FUSED_MARGIN) * plain:
            return PLAIN
        return best

    @property
    def fused(self) -> bool:
        return self.form.fused

    @property
    def fused_mlp(self) -> bool:
        return self.form.fused_mlp

    @property
    def fused_qkv(self) -> bool:
        return self.form.fused_qkv

    @property
    def unfused_s(self) -> float | None:
        return self.times.get(PLAIN)

    @property
    def fused_s(self) -> float | None:
        return self.times.get(LayerForm(fused=True))


MIN_LEN_BOUND = 1024  # contexts up to this share the smallest graphs
MAX_LEN_BOUNDS = 5  # powers of two from MIN_LEN_BOUND; max_model_len is always the last bound


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, then every 16 up to max_num_seqs (inclusive)."""
    sizes = [1, 2, 4, 8] + list(range(16, 65, 8)) + list(range(80, max_num_seqs + 16, 16))
    sizes = sorted({min(s, max_num_seqs) for s in sizes})
    return sizes


def graph_len_bounds(max_model_len: int) -> list[int]:
    """Context-length bounds to capture: 1024, 2048, ... below max_model_len (the smallest
    MAX_LEN_BOUNDS - 1 of them), then max_model_len."""
    bounds = []
    bound = MIN_LEN_BOUND
    while bound < max_model_len and len(bounds) < MAX_LEN_BOUNDS - 1:
        bounds.append(bound)
        bound *= 2
    return bounds + [max_model_len]


class DecodeGraphs:
    """The decode graphs of one runner.

    Args:
        model: the model, with its KV cache bound.
        inputs: the runner's persistent input buffers (the graphs read their fixed addresses).
        sizes: batch sizes to capture (ascending).
        max_model_len: the longest context; the last length bound.
    """

    def __init__(
        self, model: LlamaForCausalLM, inputs: InputBatch, sizes: list[int], max_model_len: int
    ) -> None:
        self.model = model
        self.inputs = inputs
        self.sizes = sizes
        self.len_bounds = graph_len_bounds(max_model_len)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.fused_choices: list[FusedChoice] = []  # measured by capture()
        self.pool = None
        device = inputs.device
        big = max(sizes)
        self._arange = torch.arange(big + 1, dtype=torch.int32, device=device)
        self._block_tables = torch.zeros((big, inputs.width), dtype=torch.int32, device=device)
        vocab = model.lm_head.weight.shape[0]
        self.logits = torch.empty((big, vocab), dtype=model.dtype, device=device)

    def key_for(self, num_seqs: int, max_seq_len: int) -> tuple[int, int] | None:
        """(batch size, length bound) of the graph for a decode step, or None if none fits."""
        i = bisect.bisect_left(self.sizes, num_seqs)
        j = bisect.bisect_left(self.len_bounds, max_seq_len)
        if i == len(self.sizes) or j == len(self.len_bounds):
            return None
        return self.sizes[i], self.len_bounds[j]

    def _forward(self, bs: int, max_len: int) -> torch.Tensor:
        v = self.inputs.graph_views(bs)
        block_tables = self._block_tables[:bs]
        torch.index_select(self.inputs.block_table, 0, v["block_table_rows"], out=block_tables)
        md = AttentionMetadata(
            slot_mapping=v["slot_mapping"],
            block_tables=block_tables,
            query_start_loc=self._arange[: bs + 1],
            seq_lens=v["seq_lens"],
            context_lens=v["seq_lens"],
            max_query_len=1,
            max_seq_len=max_len,
            is_decode_only=True,
        )
        hidden = self.model(v["input_ids"], v["positions"], md)
        return self.model.compute_logits(hidden, None, out=self.logits[:bs])

    @torch.inference_mode()
    def capture(self) -> None:
        # Padding inputs for the warm-up and capture runs: slot -1 (nothing written), length 0.
        inputs = self.inputs
        big = max(self.sizes)
        inputs.np[inputs.off_slots : inputs.off_slots + big] = -1
        inputs.np[inputs.off_seq_lens : inputs.off_seq_lens + big] = 0
        inputs.np[inputs.off_rows : inputs.off_rows + big] = inputs.pad_row
        inputs.np[inputs.off_ids : inputs.off_ids + big] = 0
        inputs.np[inputs.off_pos : inputs.off_pos + big] = 0
        if inputs.dev is not inputs.host:
            inputs.dev.copy_(inputs.host)
        stream = torch.cuda.Stream(device=inputs.device)
        stream.wait_stream(torch.cuda.current_stream(inputs.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside capture: lazy inits, workspace sizing
                self._forward(big, self.len_bounds[-1])
        torch.cuda.current_stream(inputs.device).wait_stream(stream)
        torch.cuda.synchronize(inputs.device)
        self._choose_layer_forms()
        # Largest first: later graphs reuse its pool.
        for bs in sorted(self.sizes, reverse=True):
            for max_len in reversed(self.len_bounds):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    self._forward(bs, max_len)
                if self.pool is None:
                    self.pool = graph.pool()
                self.graphs[bs, max_len] = graph
        torch.cuda.synchronize(inputs.device)

    def _choose_layer_forms(self) -> None:
        """Which layer form each batch size's graphs run (see the module docstring); sets the model's
        fused_rows, mlp_rows and qkv_rows."""
        modes = []
        for var in FORM_VARIABLES:
            mode = os.environ.get(var, "auto").strip().lower()
            if mode not in ("auto", "0", "1"):
                raise ValueError(f"{var} must be auto, 0 or 1, got {mode!r}")
            modes.append(mode)
        model = self.model.model
        small = [bs for bs in self.sizes if bs <= ops.FUSED_MLP_MAX_ROWS]
        supported = (  # batch sizes each field of LayerForm may be set at
            {bs for bs in self.sizes if bs <= ops.SKINNY_MAX_ROWS and model.fused_supported(bs)},
            {bs for bs in small if modes[1] != "0" and model.fused_mlp_supported(bs)},
            {bs for bs in small if modes[2] != "0" and model.fused_qkv_supported(bs)},
        )
        model.use_fused_mlp(frozenset(supported[1]))  # its workspace, before any capture
        chosen: dict[int, LayerForm] = {}
        for bs in sorted(set().union(*supported)):
            # Each choice open at this size (a forced one only where supported), in all combinations.
            options = [
                [False, True] if mode == "auto" and bs in ok else [mode == "1" and bs in ok]
                for mode, ok in zip(modes, supported, strict=True)
            ]
            forms = [LayerForm(*c) for c in itertools.product(*options)]
            if len(forms) == 1:
                chosen[bs] = forms[0]
                continue
            steps = {form: functools.partial(self._forward_as, bs, form) for form in forms}
            times = time_graphs(steps, rounds=3, repeats=3)
            choice = FusedChoice(bs, times)
            self.fused_choices.append(choice)
            chosen[bs] = choice.form
        self._set_forms(chosen)  # the fused MLP's workspace was sized for every supported size above
        if any(chosen.values()):
            logger.info(
                "decoder layer forms: %s",
                ", ".join(f"{bs} seqs: {form.name}" for bs, form in chosen.items() if form != PLAIN),
            )

    def _forward_as(self, bs: int, form: LayerForm) -> None:
        """A decode forward of `bs` rows in `form`, for timing the forms (the form is host state,
        read while the forward is captured)."""
        self._set_forms({bs: form})
        self._forward(bs, self.len_bounds[0])

    def _set_forms(self, forms: dict[int, LayerForm]) -> None:
        """Point the model's row sets at these forms (batch sizes not given run the plain layers)."""
        model = self.model.model
        model.fused_rows = frozenset(bs for bs, f in forms.items() if f.fused)
        model.mlp_rows = frozenset(bs for bs, f in forms.items() if f.fused_mlp)
        model.qkv_rows = frozenset(bs for bs, f in forms.items() if f.fused_qkv)

    def replay(self, key: tuple[int, int]) -> torch.Tensor:
        """Run the graph of `key` (from key_for); returns the shared logits [batch size, vocab]."""
        self.graphs[key].replay()
        return self.logits[: key[0]]
