"""Low-rank adapters (LoRA) beside a frozen base, optionally stored quantized (QLoRA).

A targeted projection y = x W becomes y = x W + (alpha / rank) * dropout(x) A B, A [in, r] and B
[r, out] (B starts at zero, so training starts from the base model). A and B are flax's own
`nnx.LoRA` over the projection's flattened input and output features, with `nnx.LoRAParam`
variables: the optimizer and the gradient see only those (`nnx.Optimizer(..., wrt=nnx.LoRAParam)`),
so the base gets neither gradients nor optimizer state. A carries the logical names of the input
(e.g. `embed`), B those of the output (e.g. `heads`), the rank dimension none: adapters are sharded
by the same rules as the weight beside them.

Dropout (`lora.dropout`, PEFT's lora_dropout) acts in training only, on the adapter's input: each
element zeroed with probability p, the rest scaled by 1 / (1 - p). Its key is no state: the train
step derives it from the seed and the optimizer step (`step_dropout_key`), folds in the microbatch, the
layer scan the layer, and each adapter its projection, so a resumed run and any mesh draw the same
masks (threefry bits do not depend on the sharding). Without a key (eval, generation, export) the
adapter sees x whole.

The frozen base is stored in the compute dtype (it is never updated, so it needs no float32 master
copy) or, with `base_quant`, as NF4 or int8 codes (jaxscale.models.quant).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from jaxscale.config import LORA_TARGETS, LoraConfig
from jaxscale.models.quant import QuantizedWeight, dequantize, quantize, quantized_einsum
from jaxscale.sharding import active_axis_size, context_order


@dataclass(frozen=True)
class AdapterShape:
    """What the layers need of `lora.*`: which projections get adapters, their rank and scale, the base's storage."""

    rank: int
    alpha: float
    targets: tuple[str, ...]  # of q, k, v, o, gate, up, down
    base_quant: str  # none | nf4 | int8
    compute_dtype: str  # the frozen base's storage dtype when base_quant is none
    dropout: float = 0.0  # the share of the adapter's input zeroed in training

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def adapter_shape(cfg: LoraConfig, compute_dtype: str) -> AdapterShape | None:
    """The adapters `lora.*` asks for (validated by jaxscale.config), or None with lora.rank=0."""
    if cfg.rank == 0:
        return None
    return AdapterShape(cfg.rank, cfg.alpha, tuple(cfg.targets), cfg.base_quant, compute_dtype, cfg.dropout)


def trainable(adapters: AdapterShape | None) -> type[nnx.Variable]:
    """The variables a run trains: the adapters with LoRA, else every parameter."""
    return nnx.LoRAParam if adapters is not None else nnx.Param


class Adapter(nnx.Module):
    """The low-rank update of projection `target`: x [..., *in_shape] -> scale * dropout(x) A B [..., *out_shape]."""

    def __init__(
        self,
        target: str,
        in_shape: tuple[int, ...],
        in_name: str,
        out_shape: tuple[int, ...],
        out_name: str,
        a: AdapterShape,
        param_dtype: str,
        rngs: nnx.Rngs,
    ):
        self.in_ndim, self.out_shape, self.scale = len(in_shape), out_shape, a.scale
        # q, k and v read the same x, but each adapter draws its own mask, as PEFT's do.
        self.dropout, self.stream = a.dropout, LORA_TARGETS.index(target)
        # A flattened (heads, head_dim) dimension is split as `heads` alone would be: head-major.
        self.lora = nnx.LoRA(
            math.prod(in_shape),
            a.rank,
            math.prod(out_shape),
            param_dtype=jnp.dtype(param_dtype),
            rngs=rngs,
            a_metadata={"out_sharding": (in_name, None), "eager_sharding": False},
            b_metadata={"out_sharding": (None, out_name), "eager_sharding": False},
        )

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        """The update of x [..., *in_shape]; `dropout_key` (its layer's, in training) drops part of x first."""
        if dropout_key is not None and self.dropout:
            x = adapter_dropout(x, self.dropout, jax.random.fold_in(dropout_key, self.stream))
        flat = x.reshape(*x.shape[: x.ndim - self.in_ndim], -1)
        a_IR, b_RO = self.lora.lora_a[...].astype(x.dtype), self.lora.lora_b[...].astype(x.dtype)
        delta = (flat @ a_IR) @ b_RO * jnp.asarray(self.scale, x.dtype)
        return delta.reshape(*flat.shape[:-1], *self.out_shape)


def adapter(
    target: str,
    adapters: AdapterShape | None,
    in_shape: tuple[int, ...],
    in_name: str,
    out_shape: tuple[int, ...],
    out_name: str,
    param_dtype: str,
    rngs: nnx.Rngs,
) -> Adapter | None:
    """The adapter of projection `target` (q, k, ..., down), or None where LoRA is off or does not target it."""
    if adapters is None or target not in adapters.targets:
        return None
    # A stream of their own (see `adapter_rngs`), so the base draws the same weights with or without adapters.
    own = nnx.Rngs(params=rngs.adapters())
    return Adapter(target, in_shape, in_name, out_shape, out_name, adapters, param_dtype, own)


def adapter_rngs(seed: int) -> nnx.Rngs:
    """The model's random streams: `params` for the base, as without LoRA, and `adapters` for A."""
    return nnx.Rngs(params=seed, adapters=jax.random.fold_in(jax.random.key(seed), 1))


DROPOUT_STREAM = 0x6C6F7261  # "lora" in ASCII: any tag the init streams' counters never reach


def step_dropout_key(seed: int, step: jax.Array) -> jax.Array:
    """The adapters' dropout key of optimizer step `step` (an int32 or uint32 scalar) of a run of `train.seed`.

    A pure function of the two, so nothing is stored and a resumed run draws the masks the uninterrupted
    one would. Its own tag keeps it apart from the model's init streams (`adapter_rngs`).
    """
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), DROPOUT_STREAM), step)


def adapter_dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Inverted dropout, as torch's (and so PEFT's) in training: x [B, L, ...] with each element zeroed with
    probability `rate` (0 <= rate < 1), the others scaled by 1 / (1 - rate), in x's dtype.

    Each token's mask is drawn from `key` folded with its place in the row as the data had it, before a
    context split reordered the row (jaxscale.sharding.context_order); threefry with
    jax_threefry_partitionable (JAX's default) draws the same bits on any sharding. So every mesh drops
    the same elements.
    """
    row_L = context_order(x.shape[1], active_axis_size("context"))
    keys_L = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, row_L)
    keep_LB = jax.vmap(lambda k: jax.random.bernoulli(k, 1.0 - rate, (x.shape[0], *x.shape[2:])))(keys_L)
    keep = jnp.moveaxis(keep_LB, 0, 1)
    # Times the rounded inverse, as torch computes it (XLA turns a division by a constant into this anyway).
    return jnp.where(keep, x * jnp.asarray(1 / (1 - rate), x.dtype), jnp.zeros((), x.dtype))


def base_weight(param: nnx.Param, block_axis: int, adapters: AdapterShape | None) -> nnx.Param | QuantizedWeight:
    """A projection's weight as the run stores it: trained (as is), frozen in the compute dtype, or quantized.

    `block_axis`: the axis quantization blocks run along (a model width: `embed` or `mlp`).
    """
    if adapters is None:
        return param
    if adapters.base_quant != "none":
        return QuantizedWeight(param, block_axis, adapters.base_quant)
    names = param.get_metadata()["out_sharding"]
    return nnx.Param(param[...].astype(adapters.compute_dtype), out_sharding=names, eager_sharding=False)


def project(
    spec: str,
    x: jax.Array,
    weight: nnx.Param | QuantizedWeight,
    lora: Adapter | None,
    dropout_key: jax.Array | None = None,
) -> jax.Array:
    """`jnp.einsum(spec, x, weight)` in x's dtype, plus the adapter's update where there is one (its input
    dropped out with `dropout_key`, in training)."""
    if isinstance(weight, QuantizedWeight):
        y = quantized_einsum(spec, x, weight)
    else:
        y = jnp.einsum(spec, x, weight[...].astype(x.dtype))
    return y if lora is None else y + lora(x, dropout_key)


def set_base(model: nnx.Module, params: nnx.State) -> None:
    """Make `params` (a model's full-precision nnx.Param state, as the unadapted model has it) `model`'s base.

    Each weight is stored as `model` stores it: cast to its dtype, or quantized like its QuantizedWeight.
    """
    for path, value in nnx.to_flat_state(params):
        parent = model
        for key in path[:-1]:
            parent = getattr(parent, key)
        target = getattr(parent, path[-1])
        if isinstance(target, QuantizedWeight):
            # Stacked layers carry a leading `layers` dimension before the per-layer block axis.
            codes, scales = quantize(value[...], target.block_axis + _stacked(target), target.kind)
            target.codes[...], target.scales[...] = codes, scales
        else:
            target[...] = value[...].astype(target.dtype)


# Each adaptable weight's adapter attribute, in Attention and SwiGLU (jaxscale.models.transformer).
ADAPTER_OF = {"wq": "q_lora", "wk": "k_lora", "wv": "v_lora", "wo": "o_lora"} | {
    f"w_{t}": f"{t}_lora" for t in ("gate", "up", "down")
}


def _stacked(weight: QuantizedWeight) -> int:
    """1 when the weight carries a leading `layers` dimension (stacked blocks), else 0."""
    return int(weight.codes.get_metadata()["out_sharding"][0] == "layers")


def merged_params(model: nnx.Module) -> dict[tuple[str, ...], jax.Array]:
    """The parameters of the same model without adapters, by path: each adapted weight W + alpha/rank * A @ B.

    A quantized base is dequantized; merged weights are float32, the others as stored.
    """
    merged = {}
    for path, module in nnx.iter_modules(model):
        for name, value in vars(module).items():
            if isinstance(value, QuantizedWeight):
                axis = value.block_axis + _stacked(value)
                w = dequantize(value.codes[...], value.scales[...], axis, value.kind, jnp.float32)
            elif isinstance(value, nnx.Param) and not isinstance(value, nnx.LoRAParam):
                w = value[...]
            else:
                continue
            lora = getattr(module, ADAPTER_OF.get(name, ""), None)
            if isinstance(lora, Adapter):
                a_IR, b_RO = lora.lora.lora_a[...], lora.lora.lora_b[...]
                delta = jnp.einsum("...ir,...ro->...io", a_IR, b_RO) * lora.scale
                w = w.astype(jnp.float32) + delta.reshape(w.shape)
            merged[(*path, name)] = w
    return merged
