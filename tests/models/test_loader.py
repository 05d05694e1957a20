"""Weight loading: fusing, sharded checkpoints, dummy weights, and errors for checkpoints that don't fit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tinyserve.models.checkpoint import CheckpointError
from tinyserve.models.loader import load_model, resolve_dtype, resolve_model_path
from tinyserve.models.registry import UnsupportedArchitectureError

from .tiny_models import save_tiny_checkpoint


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("llama")
    save_tiny_checkpoint("llama", path)
    return path


def _variant(src: Path, dst: Path, edit) -> Path:  # edit(state_dict) -> state_dict
    shutil.copytree(src, dst)
    state = load_file(src / "model.safetensors")
    save_file(edit(dict(state)), dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_fused_weights_equal_checkpoint_tensors(llama_dir: Path) -> None:
    model, arch = load_model(llama_dir, fold_norms=False)
    state = load_file(llama_dir / "model.safetensors")
    attn = model.model.layers[1].self_attn
    q, k, v = attn.qkv_proj.split(attn.qkv_proj.weight.T)
    assert torch.equal(k.T, state["model.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(v.T, state["model.layers.1.self_attn.v_proj.weight"])
    gate, up = model.model.layers[0].mlp.gate_up_proj.weight.split(arch.intermediate_size)
    assert torch.equal(gate, state["model.layers.0.mlp.gate_proj.weight"])
    assert torch.equal(up, state["model.layers.0.mlp.up_proj.weight"])
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_norm_weights_fold_into_the_next_products(llama_dir: Path) -> None:
    """By default each layer's input and post-attention norm weights are folded into the qkv and
    gate/up weights (column i times g[i]) and the norms' weights become ones; the final norm is left."""
    model, arch = load_model(llama_dir)
    state = load_file(llama_dir / "model.safetensors")
    assert model.model.norms_folded
    for i, layer in enumerate(model.model.layers):
        g_in = state[f"model.layers.{i}.input_layernorm.weight"]
        g_post = state[f"model.layers.{i}.post_attention_layernorm.weight"]
        assert not torch.equal(g_in, torch.ones_like(g_in))  # the fixture's norms are random
        q = state[f"model.layers.{i}.self_attn.q_proj.weight"]
        gate = state[f"model.layers.{i}.mlp.gate_proj.weight"]
        attn = layer.self_attn
        assert torch.equal(attn.qkv_proj.weight[: q.shape[0]], q * g_in)
        assert torch.equal(layer.mlp.gate_up_proj.weight[: arch.intermediate_size], gate * g_post)
        assert torch.equal(layer.input_layernorm.weight, torch.ones_like(g_in))
        assert torch.equal(layer.post_attention_layernorm.weight, torch.ones_like(g_post))
    assert torch.equal(model.model.norm.weight, state["model.norm.weight"])
    assert model.fold_norms()  # a second call changes nothing
    assert torch.equal(model.model.layers[-1].self_attn.qkv_proj.weight[: q.shape[0]], q * g_in)


def test_norms_stay_where_a_bias_would_be_scaled(tmp_path: Path) -> None:
    """qkv (Qwen2) or gate/up (llama3 here) biases: folding the norm would scale the bias with the row, so
    those models keep their norms."""
    for family in ("qwen2", "llama3"):
        save_tiny_checkpoint(family, tmp_path / family)
        model, _ = load_model(tmp_path / family)
        state = load_file(tmp_path / family / "model.safetensors")
        assert not model.model.norms_folded and not model.fold_norms()
        g = state["model.layers.0.input_layernorm.weight"]
        assert torch.equal(model.model.layers[0].input_layernorm.weight, g)


def test_missing_tensor_is_named(llama_dir: Path, tmp_path: Path) -> None:
    path = _variant(
        llama_dir,
        tmp_path / "m",
        lambda s: {k: v for k, v in s.items() if k != "model.layers.1.self_attn.k_proj.weight"},
    )
    with pytest.raises(
        CheckpointError, match=r"missing tensor.*'model\.layers\.1\.self_attn\.k_proj\.weight'"
    ):
        load_model(path)


def test_unexpected_tensor_is_named(llama_dir: Path, tmp_path: Path) -> None:
    path = _variant(
        llama_dir, tmp_path / "m", lambda s: {**s, "model.layers.0.mlp.extra.weight": torch.zeros(2)}
    )
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.extra\.weight'"):
        load_model(path)


def test_wrong_shape_is_named(llama_dir: Path, tmp_path: Path) -> None:
    def edit(s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        s["model.layers.0.mlp.up_proj.weight"] = torch.zeros(87, 64)
        return s

    with pytest.raises(
        CheckpointError,
        match=r"'model\.layers\.0\.mlp\.up_proj\.weight' in model\.safetensors has shape \(87, 64\), "
        r"the model expects \(88, 64\)",
    ):
        load_model(_variant(llama_dir, tmp_path / "m", edit))


def test_ignored_tensors(llama_dir: Path, tmp_path: Path) -> None:
    path = _variant(
        llama_dir,
        tmp_path / "m",
        lambda s: {**s, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)},
    )
    load_model(path)


def test_pickle_only_needs_explicit_flag(llama_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "bin"
    path.mkdir()
    shutil.copy(llama_dir / "config.json", path)
    torch.save(load_file(llama_dir / "model.safetensors"), path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only pickle checkpoints.*allow_pickle=True"):
        load_model(path)
    with pytest.raises(CheckpointError, match="only pickle"):
        load_model(path, load_format="pt")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        load_model(path, load_format="safetensors", allow_pickle=True)
    model, _ = load_model(path, allow_pickle=True)
    reference, _ = load_model(llama_dir)
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_no_weights_at_all(llama_dir: Path, tmp_path: Path) -> None:
    shutil.copy(llama_dir / "config.json", tmp_path)
    with pytest.raises(CheckpointError, match="no weight files.*load_format='dummy'"):
        load_model(tmp_path)


def test_sharded_checkpoint_with_index(tmp_path: Path) -> None:
    hf = save_tiny_checkpoint("qwen2", tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    files = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(files) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    sharded, _ = load_model(tmp_path / "sharded")
    single, _ = load_model(tmp_path / "one")
    for (name, a), (_, b) in zip(sharded.state_dict().items(), single.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    # An index naming a file that is gone.
    (tmp_path / "sharded" / files[0]).unlink()
    with pytest.raises(CheckpointError, match=files[0]):
        load_model(tmp_path / "sharded")


def test_tied_checkpoint_may_carry_lm_head(tmp_path: Path) -> None:
    save_tiny_checkpoint("qwen3", tmp_path / "a")
    state = load_file(tmp_path / "a" / "model.safetensors")
    assert "lm_head.weight" not in state
    path = _variant(
        tmp_path / "a",
        tmp_path / "b",
        lambda s: {**s, "lm_head.weight": s["model.embed_tokens.weight"].clone()},
    )
    model, arch = load_model(path)
    assert arch.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight


def test_unsupported_architecture(llama_dir: Path, tmp_path: Path) -> None:
    config = json.loads((llama_dir / "config.json").read_text())
    config["architectures"] = ["MambaForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="MambaForCausalLM.*supported: LlamaForCausalLM"):
        load_model(tmp_path, load_format="dummy")


def test_dummy_weights_from_config_only(llama_dir: Path, tmp_path: Path) -> None:
    shutil.copy(llama_dir / "config.json", tmp_path)
    model, arch = load_model(tmp_path, dtype="bfloat16", load_format="dummy", seed=3)
    again, _ = load_model(tmp_path, dtype="bfloat16", load_format="dummy", seed=3)
    w = model.model.layers[0].self_attn.qkv_proj.weight
    assert w.dtype == torch.bfloat16 and w.shape == (arch.q_size + 2 * arch.kv_size, arch.hidden_size)
    assert 0.015 < float(w.float().std()) < 0.025 and torch.equal(
        w, again.model.layers[0].self_attn.qkv_proj.weight
    )
    norm = model.model.norm.weight.float()  # the layers' norm weights are folded into the products
    assert abs(float(norm.mean()) - 1.0) < 0.01 and float(norm.std()) > 0
    assert model.model.norms_folded


def test_dtype_resolution() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_dtype("auto", torch.float32, cpu) == torch.float32
    assert resolve_dtype("auto", torch.float16, cpu) == torch.bfloat16
    assert resolve_dtype("auto", None, cpu) == torch.float32
    assert resolve_dtype("auto", torch.float32, cuda) == torch.bfloat16
    assert resolve_dtype("auto", torch.float16, cuda) == torch.float16
    assert resolve_dtype(torch.float16, None, cuda) == torch.float16
    with pytest.raises(ValueError, match="not supported on cpu"):
        resolve_dtype("float16", None, cpu)
    with pytest.raises(ValueError, match="'int8' is not supported"):
        resolve_dtype("int8", None, cpu)


def test_model_path_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_model_path(tmp_path) == tmp_path
    with pytest.raises(FileNotFoundError, match="not a directory"):
        resolve_model_path(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        resolve_model_path("./a/b/c")
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    def fake_snapshot_download(repo_id: str, revision: str | None, allow_patterns: list[str]) -> str:
        calls.append((repo_id, revision, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_model_path("Qwen/Qwen3-0.6B", revision="main") == tmp_path
    repo_id, revision, patterns = calls[0]
    assert (repo_id, revision) == ("Qwen/Qwen3-0.6B", "main")
    assert "*.safetensors" in patterns and "*.bin" not in patterns
