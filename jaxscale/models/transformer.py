"""Llama-style decoder in flax NNX: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Parameters and activations carry logical dimension names only (see jaxscale.sharding).
The blocks are created stacked (a leading `layers` dimension) and applied with
`lax.scan`, so compile time does not grow with depth. With mixture-of-experts layers every
`moe_every`-th (jaxscale.models.moe), dense and MoE blocks are two stacks, scanned together in
groups of `moe_every` layers: (moe_every - 1) dense, then one MoE.

Shape letters: B batch, L sequence, D model width, N query heads, K key/value
heads, H head dim, F MLP hidden, V vocabulary, S layers.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from jaxscale.config import ModelConfig
from jaxscale.models.attention import attend
from jaxscale.models.gathers import token_cross_entropy
from jaxscale.models.lora import AdapterShape, adapted_weight, adapter, base_weight, embedding_rows, project
from jaxscale.models.moe import MoE, MoEShape
from jaxscale.models.params import normal_param
from jaxscale.sharding import constrain

# Keyed by jaxscale.config.REMAT_POLICIES, the names `model.remat` accepts.
CHECKPOINT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclass(frozen=True)
class Documents:
    """Where the documents packed into each row lie: each token's document and its position in it.

    Attention stays within a document and rotary positions restart at each one. Built from a batch by
    `Documents.of`: None where the batch carries no `segment_ids` (each row is one sequence).
    """

    segment_ids_BL: jax.Array  # int32: tokens of one document share an id
    positions_BL: jax.Array  # int32: 0 at each document's first token

    @classmethod
    def of(cls, batch: dict[str, jax.Array]) -> Documents | None:
        if "segment_ids" not in batch:
            return None
        return cls(batch["segment_ids"], batch["positions"])


@dataclass(frozen=True)
class DecoderShape:
    """The numbers a decoder needs, and nothing of the run around it: built from the model config by
    `decoder_shape`, whose fields (jaxscale.config.ModelConfig) document them."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    rope_theta: float
    norm_eps: float
    tie_embeddings: bool
    init_std: float
    param_dtype: str
    compute_dtype: str
    num_experts: int  # 0: dense
    experts_per_token: int
    num_shared_experts: int
    capacity_factor: float
    moe_every: int
    aux_loss_weight: float
    z_loss_weight: float
    attention: str = "auto"  # auto | xla | cudnn | splash (jaxscale.models.attention)
    expert_exchange: str = "auto"  # auto | padded | ragged (jaxscale.models.expert_parallel)
    ragged_buffer: float = 0.0  # ragged receive buffer in balanced shares; 0: worst case
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    logits_chunk: int = 0  # positions per row whose logits exist at once in the loss; 0: all (`token_loss`)
    scan_unroll: int = 1  # layers per iteration of the layer scan (`run_layers`); n_layers or more: no loop
    adapters: AdapterShape | None = None  # LoRA (jaxscale.models.lora): None trains every parameter

    @property
    def rope_scaling(self) -> RopeScaling | None:
        if self.rope_scaling_factor == 1.0:
            return None
        return RopeScaling(
            self.rope_scaling_factor, self.rope_low_freq_factor, self.rope_high_freq_factor, self.rope_original_context
        )

    @property
    def out_std(self) -> float:
        """Init scale of the projections that write into the residual stream (GPT-2 style)."""
        return self.init_std / (2 * self.n_layers) ** 0.5

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers // self.moe_every if self.num_experts else 0

    def moe_shape(self) -> MoEShape:
        return MoEShape(
            d_model=self.d_model,
            d_ff=self.d_ff,
            num_experts=self.num_experts,
            experts_per_token=self.experts_per_token,
            capacity_factor=self.capacity_factor,
            expert_exchange=self.expert_exchange,
            ragged_buffer=self.ragged_buffer,
            init_std=self.init_std,
            out_std=self.out_std,
            param_dtype=self.param_dtype,
        )


def padded_vocab(tokenizer_vocab: int, multiple: int = 128) -> int:
    """Vocabulary rounded up so the embedding splits evenly over tensor-parallel devices."""
    return -(-tokenizer_vocab // multiple) * multiple


def decoder_shape(cfg: ModelConfig, tokenizer_vocab: int) -> DecoderShape:
    """The decoder a model config describes; model.vocab_size=0 takes the tokenizer's, padded."""
    same = {
        f.name: getattr(cfg, f.name)
        for f in dataclasses.fields(DecoderShape)
        if f.name not in ("vocab_size", "adapters")
    }
    return DecoderShape(vocab_size=cfg.vocab_size or padded_vocab(tokenizer_vocab), **same)


def rms_norm(x_BLD: jax.Array, scale_D: jax.Array, eps: float) -> jax.Array:
    """x [..., D] over its root mean square (in float32), times `scale` [D]; in x's dtype."""
    x = x_BLD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return (x * scale_D.astype(jnp.float32)).astype(x_BLD.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype: str):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), jnp.dtype(param_dtype)), out_sharding=("norm",), eager_sharding=False)

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        return rms_norm(x_BLD, self.scale[...], self.eps)


def head_logits(x_BLD: jax.Array, norm_scale_D: jax.Array, head_DV: jax.Array, eps: float) -> jax.Array:
    """Final norm and output head: the last block's output [B, L, D] -> float32 logits [B, L, V]."""
    x_BLD = rms_norm(x_BLD, norm_scale_D, eps)
    logits_BLV = jnp.einsum("bld,dv->blv", x_BLD, head_DV.astype(x_BLD.dtype))
    return constrain(logits_BLV.astype(jnp.float32), ("batch", "seq", "vocab"))


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3's rope scaling (Hugging Face rope_type "llama3"); the fields of jaxscale.config.ModelConfig.rope_*."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_context: int

    def apply(self, freqs: jax.Array) -> jax.Array:
        """Stretch long wavelengths by `factor`, keep short ones, blend those between (as transformers does)."""
        wavelengths = 2 * jnp.pi / freqs
        stretched = jnp.where(wavelengths > self.original_context / self.low_freq_factor, freqs / self.factor, freqs)
        blend = (self.original_context / wavelengths - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        smoothed = (1 - blend) * stretched / self.factor + blend * stretched
        medium = (wavelengths >= self.original_context / self.high_freq_factor) & (
            wavelengths <= self.original_context / self.low_freq_factor
        )
        return jnp.where(medium, smoothed, stretched)


def rotary(x_BLNH: jax.Array, positions_BL: jax.Array, theta: float, scaling: RopeScaling | None = None) -> jax.Array:
    """Rotate feature pairs (first half, second half) by position-dependent angles."""
    half = x_BLNH.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    if scaling is not None:
        freqs = scaling.apply(freqs)
    angles_BLH = positions_BL[..., None].astype(jnp.float32) * freqs
    sin, cos = jnp.sin(angles_BLH)[:, :, None, :], jnp.cos(angles_BLH)[:, :, None, :]
    x1, x2 = jnp.split(x_BLNH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BLNH.dtype)


class Attention(nnx.Module):
    def __init__(self, s: DecoderShape, rngs: nnx.Rngs):
        self.s = s
        std, out_std = s.init_std, s.out_std
        self.wq = normal_param(
            rngs, (s.d_model, s.n_heads, s.head_dim), ("embed", "heads", "head_dim"), std, s.param_dtype
        )
        kv_names = ("embed", "kv_heads", "head_dim")
        self.wk = normal_param(rngs, (s.d_model, s.n_kv_heads, s.head_dim), kv_names, std, s.param_dtype)
        self.wv = normal_param(rngs, (s.d_model, s.n_kv_heads, s.head_dim), kv_names, std, s.param_dtype)
        self.wo = normal_param(
            rngs, (s.n_heads, s.head_dim, s.d_model), ("heads", "head_dim", "embed"), out_std, s.param_dtype
        )
        # LoRA: the base frozen (quantized in blocks along `embed`), adapters beside the projections targeted.
        a, d, q, kv, dt = s.adapters, (s.d_model,), (s.n_heads, s.head_dim), (s.n_kv_heads, s.head_dim), s.param_dtype
        self.wq, self.wk, self.wv = (base_weight(w, 0, a) for w in (self.wq, self.wk, self.wv))
        self.wo = base_weight(self.wo, 2, a)
        self.q_lora = adapter("q", a, d, "embed", q, "heads", dt, rngs)
        self.k_lora = adapter("k", a, d, "embed", kv, "kv_heads", dt, rngs)
        self.v_lora = adapter("v", a, d, "embed", kv, "kv_heads", dt, rngs)
        self.o_lora = adapter("o", a, q, "heads", d, "embed", dt, rngs)

    def __call__(
        self,
        x_BLD: jax.Array,
        positions_BL: jax.Array,
        segment_ids_BL: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """Causal self-attention; with `segment_ids_BL`, a token attends only within its own document.

        `dropout_key`: the layer's key of the adapters' dropout in training (jaxscale.models.lora); None: none.
        """
        q_BLNH, k_BLKH, v_BLKH = self.qkv(x_BLD, positions_BL, dropout_key)
        out_BLNH = attend(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, positions_BL, self.s.attention, self.s.compute_dtype)
        return self.output(out_BLNH, dropout_key)

    def qkv(
        self, x_BLD: jax.Array, positions_BL: jax.Array, dropout_key: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries [B, L, N, H], keys and values [B, L, K, H] of `x_BLD`, queries and keys rotated to their
        positions. Shared with cached decoding (jaxscale.models.decode), which attends to keys of earlier steps."""
        s, key, kv_names = self.s, dropout_key, ("batch", "seq", "kv_heads", None)
        q_BLNH = constrain(project("bld,dnh->blnh", x_BLD, self.wq, self.q_lora, key), ("batch", "seq", "heads", None))
        k_BLKH = constrain(project("bld,dkh->blkh", x_BLD, self.wk, self.k_lora, key), kv_names)
        v_BLKH = constrain(project("bld,dkh->blkh", x_BLD, self.wv, self.v_lora, key), kv_names)
        q_BLNH = rotary(q_BLNH, positions_BL, s.rope_theta, s.rope_scaling)
        k_BLKH = rotary(k_BLKH, positions_BL, s.rope_theta, s.rope_scaling)
        return q_BLNH, k_BLKH, v_BLKH

    def output(self, out_BLNH: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        """The heads' attention outputs [B, L, N, H] projected back to the model width [B, L, D]."""
        out_BLNH = constrain(out_BLNH, ("batch", "seq", "heads", None))
        return project("blnh,nhd->bld", out_BLNH, self.wo, self.o_lora, dropout_key)


class SwiGLU(nnx.Module):
    def __init__(self, s: DecoderShape, rngs: nnx.Rngs, d_ff: int | None = None):
        std, out_std, d_ff = s.init_std, s.out_std, d_ff or s.d_ff
        self.w_gate = normal_param(rngs, (s.d_model, d_ff), ("embed", "mlp"), std, s.param_dtype)
        self.w_up = normal_param(rngs, (s.d_model, d_ff), ("embed", "mlp"), std, s.param_dtype)
        self.w_down = normal_param(rngs, (d_ff, s.d_model), ("mlp", "embed"), out_std, s.param_dtype)
        # LoRA: the base frozen (quantized in blocks along its input width), adapters beside the projections targeted.
        a, dt = s.adapters, s.param_dtype
        self.w_gate, self.w_up, self.w_down = (base_weight(w, 0, a) for w in (self.w_gate, self.w_up, self.w_down))
        self.gate_lora = adapter("gate", a, (s.d_model,), "embed", (d_ff,), "mlp", dt, rngs)
        self.up_lora = adapter("up", a, (s.d_model,), "embed", (d_ff,), "mlp", dt, rngs)
        self.down_lora = adapter("down", a, (d_ff,), "mlp", (s.d_model,), "embed", dt, rngs)

    def __call__(self, x_BLD: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        """[B, L, D] -> [B, L, D]; `dropout_key` as Attention's."""
        gate_BLF = project("bld,df->blf", x_BLD, self.w_gate, self.gate_lora, dropout_key)
        up_BLF = project("bld,df->blf", x_BLD, self.w_up, self.up_lora, dropout_key)
        h_BLF = constrain(jax.nn.silu(gate_BLF) * up_BLF, ("batch", "seq", "mlp"))
        return project("blf,fd->bld", h_BLF, self.w_down, self.down_lora, dropout_key)


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x)); the mlp dense or MoE."""

    def __init__(self, s: DecoderShape, rngs: nnx.Rngs, moe: bool = False):
        self.attn_norm = RMSNorm(s.d_model, s.norm_eps, s.param_dtype)
        self.attn = Attention(s, rngs)
        self.mlp_norm = RMSNorm(s.d_model, s.norm_eps, s.param_dtype)
        self.mlp = MoE(s.moe_shape(), rngs) if moe else SwiGLU(s, rngs)
        if moe and s.num_shared_experts:
            self.shared_mlp = SwiGLU(s, rngs, d_ff=s.num_shared_experts * s.d_ff)

    def __call__(
        self,
        x_BLD: jax.Array,
        positions_BL: jax.Array,
        segment_ids_BL: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x [B, L, D] -> (x [B, L, D], routing statistics: empty for a dense block); `dropout_key` as Attention's."""
        x_BLD = x_BLD + self.attn(self.attn_norm(x_BLD), positions_BL, segment_ids_BL, dropout_key)
        x_BLD = constrain(x_BLD, ("batch", "seq", "act_embed"))
        h_BLD = self.mlp_norm(x_BLD)
        if isinstance(self.mlp, MoE):
            y_BLD, stats = self.mlp(h_BLD)
            if hasattr(self, "shared_mlp"):
                y_BLD = y_BLD + self.shared_mlp(h_BLD, dropout_key)
        else:
            y_BLD, stats = self.mlp(h_BLD, dropout_key), {}
        return constrain(x_BLD + y_BLD, ("batch", "seq", "act_embed")), stats


class Decoder(nnx.Module):
    """Token ids [B, L] -> float32 logits [B, L, V].

    The pipeline (jaxscale.parallel.pipeline) runs it piece by piece through its hooks:
    `embed_tokens`, `run_layers` on a stage's slice of the stacked layers (with `documents` of the
    microbatch), `logits` and `loss`.
    """

    def __init__(self, s: DecoderShape, rngs: nnx.Rngs, remat: str = "none"):
        self.s = s
        self.remat = remat  # a key of CHECKPOINT_POLICIES: what the backward recomputes
        self.embed = normal_param(rngs, (s.vocab_size, s.d_model), ("vocab", "embed"), s.init_std, s.param_dtype)

        def stack(n: int, moe: bool) -> Block:
            @nnx.split_rngs(splits=n)
            @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def stacked_blocks(rngs: nnx.Rngs) -> Block:
                return Block(s, rngs, moe)

            return stacked_blocks(rngs)

        n_dense = s.n_layers - s.n_moe_layers
        if n_dense:
            self.blocks = stack(n_dense, moe=False)
        if s.n_moe_layers:
            self.moe_blocks = stack(s.n_moe_layers, moe=True)
        self.final_norm = RMSNorm(s.d_model, s.norm_eps, s.param_dtype)
        if not s.tie_embeddings:
            self.lm_head = normal_param(rngs, (s.d_model, s.vocab_size), ("embed", "vocab"), s.init_std, s.param_dtype)
        # LoRA on the embedding and the head, where lora.targets names them (untied only: jaxscale.config).
        v, d, dt = (s.vocab_size,), (s.d_model,), s.param_dtype
        self.embed_lora = adapter("embed_tokens", s.adapters, v, "vocab", d, "embed", dt, rngs)
        self.head_lora = adapter("lm_head", s.adapters, d, "embed", v, "vocab", dt, rngs)

    def __call__(self, tokens_BL: jax.Array, documents: Documents | None = None) -> jax.Array:
        return self.forward(tokens_BL, documents)[0]

    def forward(
        self, tokens_BL: jax.Array, documents: Documents | None = None, dropout_key: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Token ids [B, L] -> (float32 logits [B, L, V], MoE scalars; empty for a dense model).

        `documents`: where packed documents begin and end (see `Documents`); None: one per row.
        `dropout_key`: the microbatch's key of the adapters' dropout, in training only; None: no dropout.

        The MoE scalars: `moe_loss`, the weighted load-balancing and z losses to add to the mean
        token loss, and each term and routing statistic averaged over MoE layers (`moe_aux_loss`,
        `moe_z_loss`, `moe_imbalance`: max over mean tokens per expert, `moe_dropped_fraction`),
        plus `moe_imbalance_worst`, the most imbalanced layer's figure.
        """
        x_BLD, aux = self.hidden(tokens_BL, documents, dropout_key)
        return self.logits(x_BLD), aux

    def hidden(
        self, tokens_BL: jax.Array, documents: Documents | None = None, dropout_key: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """What `forward` returns, with the last block's output [B, L, D] in place of the logits."""
        s = self.s
        x_BLD, stats = self.run_layers(self.embed_tokens(tokens_BL), documents, dropout_key)
        if not stats:
            return x_BLD, {}
        aux = {f"moe_{k}": jnp.mean(v) for k, v in stats.items()}
        aux["moe_imbalance_worst"] = jnp.max(stats["imbalance"])
        aux["moe_loss"] = s.aux_loss_weight * aux["moe_aux_loss"] + s.z_loss_weight * aux["moe_z_loss"]
        return x_BLD, aux

    def documents(self, batch: dict[str, jax.Array]) -> Documents | None:
        """What of a batch the layers need beside its activations: the documents packed in each row."""
        return Documents.of(batch)

    def embed_tokens(self, tokens_BL: jax.Array) -> jax.Array:
        """Token ids [B, L] -> embeddings [B, L, D] in the compute dtype."""
        return embedding_rows(self.embed[...], tokens_BL, self.s.compute_dtype, self.embed_lora)

    def logits(self, x_BLD: jax.Array) -> jax.Array:
        """Final norm and output head: the last block's output [B, L, D] -> float32 logits [B, L, V]."""
        return head_logits(x_BLD, self.final_norm.scale[...], self.head_DV(), self.s.norm_eps)

    def head_DV(self) -> jax.Array:
        """The output head [D, V]: the embedding's transpose when tied; with its LoRA adapter folded in."""
        return self.embed[...].T if self.s.tie_embeddings else adapted_weight(self.lm_head[...], self.head_lora)

    def token_loss(self, x_BLD: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """`loss(logits(x), batch)` from the last block's output [B, L, D]: (summed token loss, count).

        With `logits_chunk` = c > 0 the head and loss run over c positions of every row at a time,
        and the backward recomputes each chunk's logits: the float32 logits [B, L, V], their softmax
        and gradient (the largest activations of a model with a big vocabulary at long context)
        exist one [B, c, V] chunk at a time. A chunk takes every (L / c)-th position (positions i,
        i + L/c, ...), so it spans the whole row: split over `context` as the row is.
        """
        c, length = self.s.logits_chunk, x_BLD.shape[1]
        if c in (0, length):
            return self.loss(self.logits(x_BLD), batch)
        n = length // c
        norm_D, head_DV, eps = self.final_norm.scale[...], self.head_DV(), self.s.norm_eps

        def strided(a: jax.Array) -> jax.Array:  # [B, L, ...] -> [n, B, c, ...]: chunk i holds i, n + i, ...
            return jnp.moveaxis(a.reshape(a.shape[0], c, n, *a.shape[2:]), 2, 0)

        @jax.checkpoint  # keep only each chunk's input; its logits are recomputed in the backward
        def chunk_loss(x_BcD: jax.Array, targets_Bc: jax.Array, mask_Bc: jax.Array) -> tuple[jax.Array, jax.Array]:
            logits_BcV = head_logits(x_BcD, norm_D, head_DV, eps)
            return self.loss(logits_BcV, {"targets": targets_Bc, "loss_mask": mask_Bc})

        def add_chunk(total: tuple, chunk: tuple) -> tuple[tuple, None]:
            loss, count = chunk_loss(*chunk)
            return (total[0] + loss, total[1] + count), None

        chunks = (strided(x_BLD), strided(batch["targets"]), strided(batch["loss_mask"]))
        zero = jnp.zeros((), jnp.float32)
        (loss_sum, count), _ = jax.lax.scan(add_chunk, (zero, zero), chunks)
        return loss_sum, count

    def loss(self, logits_BLV: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """Summed next-token cross entropy over the positions `batch["loss_mask"]` keeps, and their count.

        `batch`: targets int32 [B, L], loss_mask float32 [B, L].
        """
        losses_BL = token_cross_entropy(logits_BLV, batch["targets"])
        mask_BL = batch["loss_mask"]
        return jnp.sum(losses_BL * mask_BL), jnp.sum(mask_BL)

    def run_layers(
        self, x_BLD: jax.Array, documents: Documents | None = None, dropout_key: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """All blocks by `lax.scan`: [B, L, D] -> [B, L, D]; statistics stacked over MoE layers ([n_moe_layers] each).

        The depth is that of the stacked parameters this module holds, so a pipeline stage runs its
        own slice of the layers by holding only those. `dropout_key` (adapter dropout in training) is
        folded with each layer's number, which the scan carries beside the layer's parameters.
        """
        if documents is None:
            positions_BL, segment_ids_BL = jnp.broadcast_to(jnp.arange(x_BLD.shape[1]), x_BLD.shape[:2]), None
        else:
            positions_BL, segment_ids_BL = documents.positions_BL, documents.segment_ids_BL
        policy = CHECKPOINT_POLICIES[self.remat]

        def layer_fn(stack: Block):
            graphdef, stacked_state = nnx.split(stack)

            def one_layer(x_BLD: jax.Array, layer: tuple) -> tuple[jax.Array, dict[str, jax.Array]]:
                layer_state, number = layer
                # Derived inside the (rematerialized) layer, so the backward recomputes the very same masks.
                key = None if number is None else jax.random.fold_in(dropout_key, number)
                return nnx.merge(graphdef, layer_state)(x_BLD, positions_BL, segment_ids_BL, key)

            if policy is not None:
                one_layer = jax.checkpoint(one_layer, policy=policy, prevent_cse=False)
            return one_layer, stacked_state

        def numbers(layers: Sequence[int]) -> jax.Array | None:
            """The layers' numbers as a scan input; None (no input) without dropout."""
            return None if dropout_key is None else jnp.asarray(layers, jnp.int32)

        # Numbered over the whole model: a pipeline stage's slice would need its offset (pipelines take no LoRA).
        n = self.s.n_layers
        # Unrolled, XLA sees every layer at once and fuses across them, with no loop bookkeeping between
        # layers (fp32, fsdp=8 on CPU: 544 fusions a step against 760 scanned), for a longer compile.
        scan = functools.partial(jax.lax.scan, unroll=self.s.scan_unroll)
        if not hasattr(self, "moe_blocks"):
            dense_layer, dense_state = layer_fn(self.blocks)
            return scan(dense_layer, x_BLD, (dense_state, numbers(range(n))))
        moe_layer, moe_state = layer_fn(self.moe_blocks)
        if not hasattr(self, "blocks"):
            return scan(moe_layer, x_BLD, (moe_state, numbers(range(n))))
        dense_layer, dense_state = layer_fn(self.blocks)
        groups, every = self.s.n_moe_layers, self.s.moe_every
        dense_grouped = jax.tree.map(lambda a: a.reshape(groups, every - 1, *a.shape[1:]), dense_state)
        # Group g holds layers g * every ... g * every + every - 2 (dense), then g * every + every - 1 (MoE).
        dense_numbers = numbers([[g * every + i for i in range(every - 1)] for g in range(groups)])
        moe_numbers = numbers([g * every + every - 1 for g in range(groups)])

        def one_group(x_BLD: jax.Array, group: tuple) -> tuple[jax.Array, dict[str, jax.Array]]:
            dense_group, moe_layer_state = group
            x_BLD, _ = scan(dense_layer, x_BLD, dense_group)
            return moe_layer(x_BLD, moe_layer_state)

        return scan(one_group, x_BLD, ((dense_grouped, dense_numbers), (moe_state, moe_numbers)))
