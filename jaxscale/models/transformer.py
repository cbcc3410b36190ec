"""Llama-style decoder in flax NNX: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Parameters and activations carry logical dimension names only (see jaxscale.sharding).
The blocks are created stacked (a leading `layers` dimension) and applied with
`lax.scan`, so compile time does not grow with depth.

Shape letters: B batch, L sequence, D model width, N query heads, K key/value
heads, H head dim, F MLP hidden, V vocabulary, S layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from jaxscale.sharding import constrain

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclass(frozen=True)
class DecoderShape:
    """The numbers a decoder needs, and nothing of the run around it."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    param_dtype: str = "float32"
    compute_dtype: str = "bfloat16"
    remat: str = "none"


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str, ...], std: float, dtype: str) -> nnx.Param:
    value = jax.random.normal(rngs.params(), shape, jnp.dtype(dtype)) * std
    # eager_sharding=False: names stay logical here; jaxscale.sharding maps them to the mesh.
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype: str):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), jnp.dtype(param_dtype)), out_sharding=("norm",), eager_sharding=False)

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        x = x_BLD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * self.scale[...].astype(jnp.float32)).astype(x_BLD.dtype)


def rotary(x_BLNH: jax.Array, positions_BL: jax.Array, theta: float) -> jax.Array:
    """Rotate feature pairs (first half, second half) by position-dependent angles."""
    half = x_BLNH.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles_BLH = positions_BL[..., None].astype(jnp.float32) * freqs
    sin, cos = jnp.sin(angles_BLH)[:, :, None, :], jnp.cos(angles_BLH)[:, :, None, :]
    x1, x2 = jnp.split(x_BLNH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BLNH.dtype)


class Attention(nnx.Module):
    def __init__(self, s: DecoderShape, rngs: nnx.Rngs):
        self.s = s
        std, out_std = s.init_std, s.init_std / (2 * s.n_layers) ** 0.5
        self.wq = _param(rngs, (s.d_model, s.n_heads, s.head_dim), ("embed", "heads", "head_dim"), std, s.param_dtype)
        kv_names = ("embed", "kv_heads", "head_dim")
        self.wk = _param(rngs, (s.d_model, s.n_kv_heads, s.head_dim), kv_names, std, s.param_dtype)
        self.wv = _param(rngs, (s.d_model, s.n_kv_heads, s.head_dim), kv_names, std, s.param_dtype)
        self.wo = _param(
            rngs, (s.n_heads, s.head_dim, s.d_model), ("heads", "head_dim", "embed"), out_std, s.param_dtype
        )

    def __call__(self, x_BLD: jax.Array, positions_BL: jax.Array) -> jax.Array:
        s, dt = self.s, x_BLD.dtype
        q_BLNH = constrain(jnp.einsum("bld,dnh->blnh", x_BLD, self.wq[...].astype(dt)), ("batch", "seq", "heads", None))
        k_BLKH = constrain(
            jnp.einsum("bld,dkh->blkh", x_BLD, self.wk[...].astype(dt)), ("batch", "seq", "kv_heads", None)
        )
        v_BLKH = constrain(
            jnp.einsum("bld,dkh->blkh", x_BLD, self.wv[...].astype(dt)), ("batch", "seq", "kv_heads", None)
        )
        q_BLNH = rotary(q_BLNH, positions_BL, s.rope_theta)
        k_BLKH = rotary(k_BLKH, positions_BL, s.rope_theta)
        out_BLNH = jax.nn.dot_product_attention(q_BLNH, k_BLKH, v_BLKH, is_causal=True)
        out_BLNH = constrain(out_BLNH, ("batch", "seq", "heads", None))
        return jnp.einsum("blnh,nhd->bld", out_BLNH, self.wo[...].astype(dt))


class SwiGLU(nnx.Module):
    def __init__(self, s: DecoderShape, rngs: nnx.Rngs):
        std, out_std = s.init_std, s.init_std / (2 * s.n_layers) ** 0.5
        self.w_gate = _param(rngs, (s.d_model, s.d_ff), ("embed", "mlp"), std, s.param_dtype)
        self.w_up = _param(rngs, (s.d_model, s.d_ff), ("embed", "mlp"), std, s.param_dtype)
        self.w_down = _param(rngs, (s.d_ff, s.d_model), ("mlp", "embed"), out_std, s.param_dtype)

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        dt = x_BLD.dtype
        gate_BLF = jnp.einsum("bld,df->blf", x_BLD, self.w_gate[...].astype(dt))
        up_BLF = jnp.einsum("bld,df->blf", x_BLD, self.w_up[...].astype(dt))
        h_BLF = constrain(jax.nn.silu(gate_BLF) * up_BLF, ("batch", "seq", "mlp"))
        return jnp.einsum("blf,fd->bld", h_BLF, self.w_down[...].astype(dt))


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, s: DecoderShape, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(s.d_model, s.norm_eps, s.param_dtype)
        self.attn = Attention(s, rngs)
        self.mlp_norm = RMSNorm(s.d_model, s.norm_eps, s.param_dtype)
        self.mlp = SwiGLU(s, rngs)

    def __call__(self, x_BLD: jax.Array, positions_BL: jax.Array) -> jax.Array:
        x_BLD = x_BLD + self.attn(self.attn_norm(x_BLD), positions_BL)
        x_BLD = constrain(x_BLD, ("batch", "seq", "act_embed"))
        x_BLD = x_BLD + self.mlp(self.mlp_norm(x_BLD))
        return constrain(x_BLD, ("batch", "seq", "act_embed"))


class Decoder(nnx.Module):
    """Token ids [B, L] -> float32 logits [B, L, V]."""

    def __init__(self, s: DecoderShape, rngs: nnx.Rngs):
        self.s = s
        self.embed = _param(rngs, (s.vocab_size, s.d_model), ("vocab", "embed"), s.init_std, s.param_dtype)

        @nnx.split_rngs(splits=s.n_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def stacked_blocks(rngs: nnx.Rngs) -> Block:
            return Block(s, rngs)

        self.blocks = stacked_blocks(rngs)
        self.final_norm = RMSNorm(s.d_model, s.norm_eps, s.param_dtype)
        if not s.tie_embeddings:
            self.lm_head = _param(rngs, (s.d_model, s.vocab_size), ("embed", "vocab"), s.init_std, s.param_dtype)

    def __call__(self, tokens_BL: jax.Array) -> jax.Array:
        s, dt = self.s, jnp.dtype(self.s.compute_dtype)
        positions_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
        x_BLD = constrain(self.embed[...].astype(dt)[tokens_BL], ("batch", "seq", "act_embed"))

        graphdef, stacked_state = nnx.split(self.blocks)

        def one_layer(x_BLD: jax.Array, layer_state: nnx.State) -> tuple[jax.Array, None]:
            return nnx.merge(graphdef, layer_state)(x_BLD, positions_BL), None

        if REMAT_POLICIES.get(s.remat) is not None:
            one_layer = jax.checkpoint(one_layer, policy=REMAT_POLICIES[s.remat], prevent_cse=False)
        x_BLD, _ = jax.lax.scan(one_layer, x_BLD, stacked_state)

        x_BLD = self.final_norm(x_BLD)
        head_DV = self.embed[...].T if s.tie_embeddings else self.lm_head[...]
        logits_BLV = jnp.einsum("bld,dv->blv", x_BLD, head_DV.astype(dt))
        return constrain(logits_BLV.astype(jnp.float32), ("batch", "seq", "vocab"))
