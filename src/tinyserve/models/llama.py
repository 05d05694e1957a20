"""The Llama family in one implementation: Llama 2/3/3.x, Mistral, Qwen2/2.5 (q/k/v bias) and Qwen3
(per-head RMSNorm on q and k), switched by `ModelArchConfig`.

Forward contract (flat batch, no padding dims):
    hidden = model(input_ids [num_tokens], positions [num_tokens], attn_metadata)  # [num_tokens, hidden_size]
    logits = model.compute_logits(hidden, logits_indices [n])                       # [n, vocab], model dtype
The forward never reads device values on the host, so it can be captured in a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tinyserve import ops
from tinyserve.layers.activation import SiluAndMul
from tinyserve.layers.attention import Attention, AttentionMetadata
from tinyserve.layers.embedding import LMHead, VocabEmbedding
from tinyserve.layers.linear import Linear, MergedLinear
from tinyserve.layers.norm import FoldedNorm, RMSNorm
from tinyserve.layers.rotary import BoundRope, RotaryEmbedding

from .config import ModelArchConfig


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelArchConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.qkv_proj = MergedLinear(
            cfg.hidden_size, [cfg.q_size, cfg.kv_size, cfg.kv_size], cfg.qkv_bias, dtype
        )
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size, cfg.o_bias, dtype)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.attn = Attention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, scale=cfg.head_dim**-0.5)

    def forward(self, hidden: torch.Tensor, rope: BoundRope, md: AttentionMetadata) -> torch.Tensor:
        """hidden [num_tokens, hidden_size] -> [num_tokens, hidden_size]."""
        return self.o_proj(self.attend(self.qkv_proj(hidden), rope, md))

    def fused_qkv(
        self, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(qkv, new residual) of the input norm and the qkv product as one op (ops.fused_norm_linear):
        with residual, the new residual is x + residual (a new tensor); without, x itself."""
        w, bias = self.qkv_proj.weight, self.qkv_proj.bias
        return ops.fused_norm_linear(x, norm.weight, norm.eps, w, residual, bias)

    def fused_qkv_supported(self, rows: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether fused_qkv takes `rows` token rows (sizes, dtype and device the op takes)."""
        return ops.fused_norm_linear_supported(rows, self.qkv_proj.input_size, dtype, device)

    def attend(
        self, qkv: torch.Tensor, rope: BoundRope, md: AttentionMetadata, folded_norm: FoldedNorm | None = None
    ) -> torch.Tensor:
        """The projected [q | k | v] [num_tokens, q_size + 2 * kv_size] -> attention output
        [num_tokens, q_size], before o_proj. folded_norm: qkv is the product of the un-normalised
        rows with the input norm's weight folded in; the RoPE kernel scales q, k and v first."""
        q, k, v = self.qkv_proj.split(qkv)
        q = q.view(-1, self.num_heads, self.head_dim)  # [num_tokens, num_heads, head_dim], a view of qkv
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # [num_tokens, num_kv_heads, head_dim], a view
        # In place on the views, one kernel that also writes this step's K/V into the paged cache;
        # Qwen3 (q_norm/k_norm set): RMSNorm per head, then RoPE.
        rope(q, k, self.q_norm, self.k_norm, self.attn.cache_write(v, md), folded_norm)
        return self.attn(q, k, v, md, kv_written=True)  # [num_tokens, num_heads * head_dim]


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up fused into one product."""

    def __init__(self, cfg: ModelArchConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(
            cfg.hidden_size, [cfg.intermediate_size, cfg.intermediate_size], cfg.mlp_bias, dtype
        )
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias, dtype)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))  # [num_tokens, hidden_size]

    def fused(
        self,
        attn_out: torch.Tensor,
        residual: torch.Tensor,
        norm: RMSNorm,
        workspace: torch.Tensor,
        o_proj: Linear,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The attention's o projection, the norm, this MLP and the residual adds around them as one
        op (ops.fused_mlp). attn_out: the attention output, before o_proj. With out: residual +=
        o(attn_out) in place and the MLP output is written into out (returned). Without:
        residual += o(attn_out) + MLP(norm(...)) in place, residual returned."""
        gate_up, down = self.gate_up_proj.weight, self.down_proj.weight
        return ops.fused_mlp(
            residual,
            norm.weight,
            norm.eps,
            gate_up,
            down,
            workspace,
            attn_out,
            out if out is not None else residual,
            o_weight=o_proj.weight,
        )

    def fused_supported(self, rows: int, dtype: torch.dtype, device: torch.device, o_proj: Linear) -> bool:
        """Whether `fused` takes `rows` token rows with this o projection (no biases; sizes, dtype and
        device the op takes)."""
        biases = (self.gate_up_proj.bias, self.down_proj.bias, o_proj.bias)
        if any(b is not None for b in biases):
            return False
        h, inter = self.down_proj.output_size, self.down_proj.input_size
        return ops.fused_mlp_supported(rows, h, inter, dtype, device, attn=o_proj.input_size)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelArchConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(cfg, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = LlamaMLP(cfg, dtype)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        rope: BoundRope,
        md: AttentionMetadata,
        mlp_workspace: torch.Tensor | None = None,
        fused_qkv: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, residual) -> (hidden, residual); their sum is the layer's output stream.
        fused_qkv: the input norm and the qkv product run as one op (LlamaAttention.fused_qkv). With
        `mlp_workspace`, o_proj, the post-attention norm and the MLP run as one op (LlamaMLP.fused).
        NOTE: the norms update hidden and residual in place."""
        attn = self.self_attn
        if fused_qkv:
            qkv, residual = attn.fused_qkv(hidden, residual, self.input_layernorm)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
            qkv = attn.qkv_proj(hidden)
        attn_out = attn.attend(qkv, rope, md)
        if mlp_workspace is not None:
            out = torch.empty_like(residual)
            norm = self.post_attention_layernorm
            return self.mlp.fused(attn_out, residual, norm, mlp_workspace, attn.o_proj, out), residual
        hidden, residual = self.post_attention_layernorm(attn.o_proj(attn_out), residual)
        return self.mlp(hidden), residual

    def forward_folded(self, stream: torch.Tensor, rope: BoundRope, md: AttentionMetadata) -> None:
        """The layer with both norms' weights folded into the products after them
        (LlamaForCausalLM.fold_norms), on the residual stream [num_tokens, hidden_size], updated in
        place: qkv and gate/up multiply the un-normalised stream, the RoPE and SiLU-and-mul kernels
        scale each row by its 1 / rms, and o and down add their output into the stream. No norm
        kernel runs. Same values as forward() up to rounding (each product of a normalised row is
        rounded once, after its scaling)."""
        attn, mlp = self.self_attn, self.mlp
        attn_out = attn.attend(attn.qkv_proj(stream), rope, md, FoldedNorm(stream, self.input_layernorm.eps))
        attn.o_proj.add_into(attn_out, stream)
        gate_up = mlp.gate_up_proj(stream)
        act = mlp.act(gate_up, FoldedNorm(stream, self.post_attention_layernorm.eps))
        mlp.down_proj.add_into(act, stream)

    def forward_fused(
        self,
        residual: torch.Tensor,
        rope: BoundRope,
        md: AttentionMetadata,
        mlp_workspace: torch.Tensor | None = None,
        fused_qkv: bool = False,
    ) -> None:
        """The layer at decode sizes as four skinny products and the attention: the norms ride in the
        qkv and gate_up products, SiLU-and-mul in down, and o and down add their output to the
        residual stream [num_tokens, hidden_size], which is updated in place. Same values as
        forward() up to the products' summation order. fused_qkv and mlp_workspace replace the qkv
        product, and o with the MLP, by the ops forward() uses for them."""
        attn, mlp = self.self_attn, self.mlp
        if fused_qkv:
            qkv, _ = attn.fused_qkv(residual, None, self.input_layernorm)
        else:
            qkv = attn.qkv_proj.fused(residual, norm=self.input_layernorm)
        attn_out = attn.attend(qkv, rope, md)
        if mlp_workspace is not None:
            mlp.fused(attn_out, residual, self.post_attention_layernorm, mlp_workspace, attn.o_proj)
            return
        attn.o_proj.fused(attn_out, residual=residual)
        gate_up = mlp.gate_up_proj.fused(residual, norm=self.post_attention_layernorm)
        mlp.down_proj.fused(gate_up, silu_input=True, residual=residual)

    def fused_supported(self, residual: torch.Tensor) -> bool:
        """Whether forward_fused takes a residual stream of this shape, dtype and device."""
        attn, mlp = self.self_attn, self.mlp
        rows, dtype, device = residual.shape[0], residual.dtype, residual.device
        q_out = torch.empty((rows, attn.o_proj.input_size), dtype=dtype, device=device)
        gate_up = torch.empty((rows, mlp.gate_up_proj.output_size), dtype=dtype, device=device)
        return (
            attn.qkv_proj.fused_supported(residual)
            and attn.o_proj.fused_supported(q_out)
            and mlp.gate_up_proj.fused_supported(residual)
            and mlp.down_proj.fused_supported(gate_up, silu_input=True)
        )


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelArchConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.rotary_emb = RotaryEmbedding(
            cfg.head_dim, cfg.rotary_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling, dtype
        )
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, dtype) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        # Token counts whose forward runs the fused decoder layers (LlamaDecoderLayer.forward_fused):
        # chosen per card by the runner where they are measured faster; empty until then.
        self.fused_rows: frozenset[int] = frozenset()
        # Token counts whose decoder layers run o_proj, the post-attention norm and the MLP as one op
        # (LlamaMLP.fused), and its workspace: set by the runner through use_fused_mlp().
        self.mlp_rows: frozenset[int] = frozenset()
        self._mlp_workspace: torch.Tensor | None = None
        # Token counts whose decoder layers run the input norm and the qkv product as one op
        # (LlamaAttention.fused_qkv): set by the runner.
        self.qkv_rows: frozenset[int] = frozenset()
        # The layers' norm weights live in the products after them (LlamaForCausalLM.fold_norms);
        # the plain layer form then runs no norm kernel (LlamaDecoderLayer.forward_folded).
        self.norms_folded = False

    def fused_supported(self, num_tokens: int) -> bool:
        """Whether the fused decoder layers take a step of num_tokens tokens (shapes, dtype, device)."""
        weight = self.norm.weight
        probe = torch.empty((num_tokens, weight.shape[0]), dtype=weight.dtype, device=weight.device)
        return all(layer.fused_supported(probe) for layer in self.layers)

    def fused_mlp_supported(self, num_tokens: int) -> bool:
        """Whether every layer's o_proj and MLP run as one op (LlamaMLP.fused) at num_tokens tokens."""
        dtype, device = self.norm.weight.dtype, self.norm.weight.device
        return all(
            layer.mlp.fused_supported(num_tokens, dtype, device, layer.self_attn.o_proj)
            for layer in self.layers
        )

    def fused_qkv_supported(self, num_tokens: int) -> bool:
        """Whether every layer's input norm and qkv product run as one op at num_tokens tokens."""
        dtype, device = self.norm.weight.dtype, self.norm.weight.device
        return all(layer.self_attn.fused_qkv_supported(num_tokens, dtype, device) for layer in self.layers)

    def use_fused_mlp(self, rows: frozenset[int]) -> None:
        """Run the fused MLP at these token counts (each must be fused_mlp_supported). Allocates its
        workspace: call outside CUDA-graph capture."""
        bad = sorted(r for r in rows if not self.fused_mlp_supported(r))
        if bad:
            raise ValueError(f"the fused MLP does not take {bad} token rows for this model and device")
        if rows:
            weight = self.norm.weight
            h = weight.shape[0]
            inter = max(layer.mlp.down_proj.input_size for layer in self.layers)
            size = ops.fused_mlp_workspace_bytes(max(rows), h, inter, weight.dtype)
            if self._mlp_workspace is None or self._mlp_workspace.numel() < size:
                self._mlp_workspace = ops.fused_mlp_workspace(
                    max(rows), h, inter, weight.dtype, weight.device
                )
        self.mlp_rows = frozenset(rows)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [num_tokens, hidden_size]
        rope = self.rotary_emb.at(positions)  # bound once, used by every layer
        num_tokens = input_ids.shape[0]
        mlp_ws = self._mlp_workspace if num_tokens in self.mlp_rows else None
        fused_qkv = num_tokens in self.qkv_rows
        if num_tokens in self.fused_rows:
            for layer in self.layers:
                # hidden is the residual stream, in place
                layer.forward_fused(hidden, rope, md, mlp_ws, fused_qkv)
            return self.norm.normalize(hidden)
        if self.norms_folded and mlp_ws is None and not fused_qkv:
            for layer in self.layers:
                layer.forward_folded(hidden, rope, md)  # hidden is the residual stream, in place
            return self.norm.normalize(hidden)
        residual: torch.Tensor | None = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, rope, md, mlp_ws, fused_qkv)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """A decoder-only Llama-family LM over a paged KV cache.

    Build it under `torch.device(...)` with the target dtype; the loader fills the weights.
    """

    # Fused parameters and the checkpoint projections they hold, in shard order.
    packed_modules: dict[str, tuple[str, ...]] = {
        "qkv_proj": ("q_proj", "k_proj", "v_proj"),
        "gate_up_proj": ("gate_proj", "up_proj"),
    }

    def __init__(self, arch_config: ModelArchConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.arch_config = arch_config
        self.dtype = dtype
        self.model = LlamaModel(arch_config, dtype)
        tied = self.model.embed_tokens.weight if arch_config.tie_word_embeddings else None
        self.lm_head = LMHead(arch_config.vocab_size, arch_config.hidden_size, dtype, tied_weight=tied)

    # -- KV cache -------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.arch_config.num_layers

    @property
    def num_kv_heads(self) -> int:
        return self.arch_config.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.arch_config.head_dim

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, int, int, int]:
        """Shape of each layer's key (and value) cache: [num_blocks, block_size, num_kv_heads, head_dim]."""
        return (num_blocks, block_size, self.num_kv_heads, self.head_dim)

    def bind_kv_caches(self, kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Give every layer its (key_cache, value_cache) pair; the layers keep references, no copies."""
        if len(kv_caches) != self.num_layers:
            raise ValueError(
                f"need one (key_cache, value_cache) pair per layer: {self.num_layers}, got {len(kv_caches)}"
            )
        device = self.lm_head.weight.device
        for i, (key_cache, value_cache) in enumerate(kv_caches):
            for name, cache in (("key", key_cache), ("value", value_cache)):
                if cache.dtype != self.dtype or cache.device != device:
                    raise ValueError(
                        f"layer {i} {name} cache is {cache.dtype} on {cache.device}; "
                        f"the model runs {self.dtype} on {device}"
                    )
            layer = self.model.layers[i]
            assert isinstance(layer, LlamaDecoderLayer)
            layer.self_attn.attn.bind_kv_cache(key_cache, value_cache)

    # -- weights --------------------------------------------------------------------------------------
    @torch.no_grad()
    def fold_norms(self) -> bool:
        """Fold each layer's input and post-attention RMSNorm weights into the products after them
        (qkv and gate/up: W[:, i] *= g[i], computed in float32 and rounded to the model's dtype) and
        set the norms' weights to one. norm(x) @ W.T == (x @ (W * g).T) / rms(x) row by row, so the
        plain layer form can skip the norm kernels (LlamaDecoderLayer.forward_folded); the other
        forms still normalise, now with weights of one, and give the same values up to the rounding
        of W * g. Models with a qkv or gate/up bias are left as they are (the bias must not be
        scaled). Call once, after the weights are loaded; returns whether
        the norms were folded."""
        inner = self.model
        if inner.norms_folded:
            return True
        layers = [layer for layer in inner.layers if isinstance(layer, LlamaDecoderLayer)]
        biases = [(layer.self_attn.qkv_proj.bias, layer.mlp.gate_up_proj.bias) for layer in layers]
        if any(b is not None for pair in biases for b in pair):
            return False
        for layer in layers:
            for norm, linear in (
                (layer.input_layernorm, layer.self_attn.qkv_proj),
                (layer.post_attention_layernorm, layer.mlp.gate_up_proj),
            ):
                w = linear.weight
                w.copy_((w.float() * norm.weight.float()).to(w.dtype))
                norm.weight.fill_(1.0)
        inner.norms_folded = True
        return True

    # -- forward --------------------------------------------------------------------------------------
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> torch.Tensor:
        """input_ids, positions [num_tokens] (int64 or int32) -> hidden [num_tokens, hidden_size]."""
        return self.model(input_ids, positions, attn_metadata)

    def compute_logits(
        self,
        hidden: torch.Tensor,
        logits_indices: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden [num_tokens, hidden_size], logits_indices [n] -> logits [n, vocab_size] in the
        model's dtype (written into `out` when given).

        Only the rows that need logits (usually each sequence's last token) go through the LM head.
        """
        if logits_indices is not None:
            hidden = hidden.index_select(0, logits_indices)
        return self.lm_head(hidden, out)
