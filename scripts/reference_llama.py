"""A Llama train step in plain jax.numpy, written apart from jaxscale's model: the benchmark's yardstick.

The math is jaxscale's (pre-norm RMSNorm blocks, rotary embeddings on (first half, second half) feature
pairs, grouped-query causal attention, SwiGLU, a tied or untied head, masked token cross entropy divided
by the token count), but nothing here calls jaxscale's model code: parameters are a plain dict of
arrays, sharded the way a MaxText user would shard them, and the step is value_and_grad + optax under
one `jax.jit`. Layers run either unrolled in Python (`layers`: a list of per-layer dicts) or stacked
under `lax.scan` (`layers`: one dict of arrays with a leading layer dimension).

Shape letters: B batch, L sequence, D model width, N query heads, K key/value heads, G query heads
per key/value head, H head dim, F MLP hidden, V vocabulary, S layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

Params = dict[str, Any]


@dataclass(frozen=True)
class Shape:
    """The model's sizes (the letters above) and dtypes: jaxscale's DecoderShape fields, copied by the caller."""

    vocab: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    rope_theta: float
    norm_eps: float
    tie_embeddings: bool
    compute_dtype: str


def rms_norm(x_BLD: jax.Array, scale_D: jax.Array, eps: float) -> jax.Array:
    """x / rms(x) * scale over the last dimension, computed in float32, returned in x's dtype: [B, L, D]."""
    x = x_BLD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
    return (x * scale_D.astype(jnp.float32)).astype(x_BLD.dtype)


def rope(x_BLNH: jax.Array, theta: float) -> jax.Array:
    """Rotate pairs (i, i + H/2) by the angle position * theta^(-i / (H/2)), in float32."""
    length, half = x_BLNH.shape[1], x_BLNH.shape[-1] // 2
    inv_freq_H = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half)
    angle_LH = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq_H[None, :]
    cos_L1H, sin_L1H = jnp.cos(angle_LH)[:, None, :], jnp.sin(angle_LH)[:, None, :]
    x = x_BLNH.astype(jnp.float32)
    lo, hi = x[..., :half], x[..., half:]
    return jnp.concatenate([lo * cos_L1H - hi * sin_L1H, hi * cos_L1H + lo * sin_L1H], axis=-1).astype(x_BLNH.dtype)


def attention(x_BLD: jax.Array, p: Params, s: Shape) -> jax.Array:
    """Causal GQA self-attention of one layer's weights `p`: [B, L, D] -> [B, L, D]."""
    dt = x_BLD.dtype
    q_BLNH = rope(jnp.einsum("bld,dnh->blnh", x_BLD, p["wq"].astype(dt)), s.rope_theta)
    k_BLKH = rope(jnp.einsum("bld,dkh->blkh", x_BLD, p["wk"].astype(dt)), s.rope_theta)
    v_BLKH = jnp.einsum("bld,dkh->blkh", x_BLD, p["wv"].astype(dt))
    batch, length = x_BLD.shape[:2]
    q_BLKGH = q_BLNH.reshape(batch, length, s.n_kv_heads, s.n_heads // s.n_kv_heads, s.head_dim)
    scores_BKGLL = jnp.einsum("bqkgh,bskh->bkgqs", q_BLKGH, k_BLKH, preferred_element_type=jnp.float32)
    causal_LL = jnp.tril(jnp.ones((length, length), bool))
    scores_BKGLL = jnp.where(causal_LL, scores_BKGLL * s.head_dim**-0.5, -jnp.inf)
    probs_BKGLL = jax.nn.softmax(scores_BKGLL, axis=-1).astype(dt)
    out_BLKGH = jnp.einsum("bkgqs,bskh->bqkgh", probs_BKGLL, v_BLKH)
    out_BLNH = out_BLKGH.reshape(batch, length, s.n_heads, s.head_dim)
    return jnp.einsum("blnh,nhd->bld", out_BLNH, p["wo"].astype(dt))


def block(x_BLD: jax.Array, p: Params, s: Shape, constrain: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """One pre-norm block: x + attn(norm(x)), then + swiglu(norm(x))."""
    dt = x_BLD.dtype
    x_BLD = x_BLD + attention(rms_norm(x_BLD, p["attn_norm"], s.norm_eps), p, s)
    h_BLD = rms_norm(x_BLD, p["mlp_norm"], s.norm_eps)
    gate_BLF = jnp.einsum("bld,df->blf", h_BLD, p["w_gate"].astype(dt))
    up_BLF = jnp.einsum("bld,df->blf", h_BLD, p["w_up"].astype(dt))
    down_BLD = jnp.einsum("blf,fd->bld", jax.nn.silu(gate_BLF) * up_BLF, p["w_down"].astype(dt))
    return constrain(x_BLD + down_BLD)


def loss(
    params: Params, batch: dict[str, jax.Array], s: Shape, constrain: Callable[[jax.Array], jax.Array]
) -> jax.Array:
    """Mean next-token cross entropy over the tokens `batch["loss_mask"]` keeps.

    `batch`: inputs and targets int32 [B, L], loss_mask float32 [B, L]. `params["layers"]`: a list of
    per-layer dicts (unrolled) or one dict of stacked [S, ...] arrays (scanned).
    """
    dt = jnp.dtype(s.compute_dtype)
    x_BLD = constrain(params["embed"].astype(dt)[batch["inputs"]])
    if isinstance(params["layers"], list):
        for layer in params["layers"]:
            x_BLD = block(x_BLD, layer, s, constrain)
    else:
        x_BLD, _ = jax.lax.scan(lambda x, layer: (block(x, layer, s, constrain), None), x_BLD, params["layers"])
    x_BLD = rms_norm(x_BLD, params["final_norm"], s.norm_eps)
    head_DV = params["embed"].T if s.tie_embeddings else params["lm_head"]
    logits_BLV = jnp.einsum("bld,dv->blv", x_BLD, head_DV.astype(dt)).astype(jnp.float32)
    target_BL = jnp.take_along_axis(logits_BLV, batch["targets"][..., None], axis=-1)[..., 0]
    token_loss_BL = jax.nn.logsumexp(logits_BLV, axis=-1) - target_BL
    mask_BL = batch["loss_mask"]
    return jnp.sum(token_loss_BL * mask_BL) / jnp.maximum(jnp.sum(mask_BL), 1.0)


# Each weight's dimensions by role: `embed` is split by FSDP, `heads` / `mlp` / `vocab` by tensor parallelism.
_LAYER_DIMS = {
    "attn_norm": (None,),
    "wq": ("embed", "heads", None),
    "wk": ("embed", "heads", None),
    "wv": ("embed", "heads", None),
    "wo": ("heads", None, "embed"),
    "mlp_norm": (None,),
    "w_gate": ("embed", "mlp"),
    "w_up": ("embed", "mlp"),
    "w_down": ("mlp", "embed"),
}
_TOP_DIMS = {"embed": ("vocab", "embed"), "lm_head": ("embed", "vocab"), "final_norm": (None,)}


def param_shapes(s: Shape) -> dict[str, Any]:
    """The shape of every parameter, layers stacked: {"embed": (V, D), ..., "layers": {"wq": (S, D, N, H), ...}}."""
    S, D, N, K, H, F, V = s.n_layers, s.d_model, s.n_heads, s.n_kv_heads, s.head_dim, s.d_ff, s.vocab
    top = {"embed": (V, D), "final_norm": (D,)} | ({} if s.tie_embeddings else {"lm_head": (D, V)})
    layers = {
        "attn_norm": (S, D),
        "wq": (S, D, N, H),
        "wk": (S, D, K, H),
        "wv": (S, D, K, H),
        "wo": (S, N, H, D),
        "mlp_norm": (S, D),
        "w_gate": (S, D, F),
        "w_up": (S, D, F),
        "w_down": (S, F, D),
    }
    return top | {"layers": layers}


def param_specs(params: Params, mesh: Mesh) -> Params:
    """PartitionSpecs for `params`: `embed` over 'fsdp', heads, MLP and vocabulary over 'tensor'.

    An axis that does not divide its dimension (two KV heads on a larger tensor axis) is left out.
    """
    axis_of = {"embed": "fsdp", "heads": "tensor", "mlp": "tensor", "vocab": "tensor"}

    def spec(shape: tuple[int, ...], dims: tuple[str | None, ...]) -> P:
        axes = [axis_of.get(d) if d else None for d in dims]
        axes = [
            a if a and mesh.shape[a] > 1 and n % mesh.shape[a] == 0 else None
            for a, n in zip(axes, shape[-len(dims) :], strict=True)
        ]
        return P(*[None] * (len(shape) - len(dims)), *axes)  # a stacked layer dimension stays whole

    def layer_specs(layer: Params) -> Params:
        return {k: spec(v.shape, _LAYER_DIMS[k]) for k, v in layer.items()}

    layers = params["layers"]
    out = {k: spec(v.shape, _TOP_DIMS[k]) for k, v in params.items() if k != "layers"}
    out["layers"] = [layer_specs(x) for x in layers] if isinstance(layers, list) else layer_specs(layers)
    return out


def make_step(
    s: Shape, mesh: Mesh, tx: optax.GradientTransformation, params: Params
) -> tuple[Callable, Params, Any, NamedSharding]:
    """The jitted step `(params, opt_state, batch) -> (params, opt_state, loss)`, params and state donated.

    Returns the step, `params` and their optimizer state placed on `mesh`, and the batch sharding
    (rows over 'data' and 'fsdp').
    """
    param_sharding = jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(params, mesh))
    batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
    activations = NamedSharding(mesh, P(("data", "fsdp"), None, None))

    def constrain(x_BLD: jax.Array) -> jax.Array:
        return jax.lax.with_sharding_constraint(x_BLD, activations)

    params = jax.device_put(params, param_sharding)
    replicated = NamedSharding(mesh, P())
    # Moments are sharded like the parameters they mirror, step counts replicated.
    opt_sharding = optax.tree_map_params(
        tx, lambda _, sharding: sharding, jax.eval_shape(tx.init, params), param_sharding,
        transform_non_params=lambda _: replicated,
    )  # fmt: skip
    opt_state = jax.jit(tx.init, out_shardings=opt_sharding)(params)

    def step(params: Params, opt_state: Any, batch: dict[str, jax.Array]) -> tuple[Params, Any, jax.Array]:
        value, grads = jax.value_and_grad(loss)(params, batch, s, constrain)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    state_sharding = (param_sharding, opt_sharding)
    jitted = jax.jit(
        step,
        in_shardings=(*state_sharding, batch_sharding),
        out_shardings=(*state_sharding, replicated),
        donate_argnums=(0, 1),
    )
    return jitted, params, opt_state, batch_sharding


def unstack(params: Params) -> Params:
    """Stacked layers ({name: [S, ...]}) -> a list of S per-layer dicts, for the unrolled variant."""
    layers = params["layers"]
    n = next(iter(layers.values())).shape[0]
    return params | {"layers": [{k: v[i] for k, v in layers.items()} for i in range(n)]}
