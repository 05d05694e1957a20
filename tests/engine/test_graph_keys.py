"""Which decode graphs a runner captures: bucketed batch sizes and context-length bounds, and how a
measured batch size picks its layer form (CPU)."""

from __future__ import annotations

import pytest

from tinyserve.runner.cuda_graphs import (
    FUSED_MARGIN,
    FusedChoice,
    LayerForm,
    graph_batch_sizes,
    graph_len_bounds,
)


@pytest.mark.parametrize(
    "max_model_len,bounds",
    [
        (512, [512]),
        (1024, [1024]),
        (1500, [1024, 1500]),
        (4096, [1024, 2048, 4096]),
        (40960, [1024, 2048, 4096, 8192, 40960]),
    ],
)
def test_len_bounds(max_model_len, bounds):
    assert graph_len_bounds(max_model_len) == bounds


def test_batch_sizes():
    assert graph_batch_sizes(256) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64] + list(range(80, 257, 16))
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]


def test_layer_form_choice():
    """The fastest measured form wins only by more than FUSED_MARGIN over the plain layers; without
    a plain measurement (a forced choice narrowed the options) the fastest wins outright."""
    plain, fused = LayerForm(), LayerForm(fused=True)
    plain_mlp, fused_mlp = LayerForm(fused_mlp=True), LayerForm(fused=True, fused_mlp=True)
    qkv_mlp = LayerForm(fused_mlp=True, fused_qkv=True)
    just_under = 1.0 - FUSED_MARGIN * 0.5
    choice = FusedChoice(1, {plain: 1.0, fused: just_under, plain_mlp: 1.2, fused_mlp: 1.1})
    assert choice.form == plain and not choice.fused and not choice.fused_mlp
    choice = FusedChoice(1, {plain: 1.0, fused: 0.99, plain_mlp: 0.9, fused_mlp: 0.92})
    assert choice.form == plain_mlp and choice.fused_mlp and not choice.fused and not choice.fused_qkv
    assert choice.unfused_s == 1.0 and choice.fused_s == 0.99
    choice = FusedChoice(1, {plain: 1.0, plain_mlp: 0.9, qkv_mlp: 0.85})
    assert choice.form == qkv_mlp and choice.fused_qkv and choice.fused_mlp and choice.fused_s is None
    choice = FusedChoice(2, {fused: 1.0, fused_mlp: 0.999})
    assert choice.form == fused_mlp and choice.unfused_s is None


def test_layer_form_names():
    assert LayerForm().name == "unfused"
    assert LayerForm(fused=True, fused_qkv=True).name == "fused + fused qkv"
    assert LayerForm(fused_mlp=True, fused_qkv=True).name == "unfused + fused MLP + fused qkv"
