"""Low-rank adapters (LoRA) beside a frozen base, optionally stored quantized (QLoRA).

A targeted projection y = x W becomes y = x W + (alpha / rank) * dropout(x) A B, A [in, r] and B
[r, out], initialized as PEFT does: A uniform in +-1/sqrt(in) (torch's kaiming_uniform_ with
a=sqrt(5), as nn.Linear's own weights), B zero, so training starts from the base model. A and B are flax's own
`nnx.LoRA` over the projection's flattened input and output features, with `nnx.LoRAParam`
variables: the optimizer and the gradient see only those (`nnx.Optimizer(..., wrt=nnx.LoRAParam)`),
so the base gets neither gradients nor optimizer state. A carries the logical names of the input
(e.g. `embed`), B those of the output (e.g. `heads`), the rank dimension none: adapters are sharded
by the same rules as the weight beside them.

`lora.rslora` scales the update by alpha / sqrt(rank) instead (PEFT's use_rslora). `lora.dora` makes it
weight-decomposed (DoRA, PEFT's use_dora): y = m / ||W + s A B||_c * (x W + s x A B), where ||.||_c is each
output feature's norm over the input features, taken in float32 and detached from the gradient, as PEFT
does (the DoRA paper's section 4.3), and m, one trainable magnitude per output feature, starts at the
base's own norms ||W||_c. The adapter holds m - ||W||_c (`magnitude_shift`, zero at the start), so m
needs no initialization pass once the base is read (from model.init_from, lora.base or the seed); as
||W||_c is a constant, the gradient and every AdamW step of the shift are those of m itself. A quantized
base (QLoRA) enters the norms dequantized, as PEFT's bitsandbytes 4-bit DoRA does.

The embedding (`embed_tokens`) and the output head (`lm_head`) may be adapted too. The embedding is a
lookup of rows, i.e. x W with x one-hot over the vocabulary: A [V, r] and B [r, D] (PEFT's
lora_embedding_A and lora_embedding_B, transposed), A zero and B standard normal as PEFT starts them,
and, as in PEFT, no dropout; its DoRA magnitudes are per embedding feature. The head's adapter is folded
into the head for the logits (W + s A B, [D, V]); its input is never dropped, so lm_head is refused with
lora.dropout > 0.

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
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxscale.config import LORA_TARGETS, LoraConfig
from jaxscale.models.gathers import lookup_rows
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
    rslora: bool = False  # scale alpha / sqrt(rank) (rank-stabilized LoRA) instead of alpha / rank
    dora: bool = False  # weight-decomposed: a trainable magnitude per output feature

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.rank) if self.rslora else self.alpha / self.rank


def adapter_shape(cfg: LoraConfig, compute_dtype: str) -> AdapterShape | None:
    """The adapters `lora.*` asks for (validated by jaxscale.config), or None with lora.rank=0."""
    if cfg.rank == 0:
        return None
    targets = tuple(cfg.targets)
    return AdapterShape(cfg.rank, cfg.alpha, targets, cfg.base_quant, compute_dtype, cfg.dropout, cfg.rslora, cfg.dora)


def trainable(adapters: AdapterShape | None) -> type[nnx.Variable]:
    """The variables a run trains: the adapters with LoRA, else every parameter."""
    return nnx.LoRAParam if adapters is not None else nnx.Param


# PEFT's A: kaiming_uniform_(a=sqrt(5)), gain sqrt(2 / (1 + 5)), bound gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in);
# variance 1/3 of fan_in's "uniform" scaling is that bound (flax's default, he_uniform, is sqrt(6) times wider).
PEFT_A_INIT = jax.nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class Adapter(nnx.Module):
    """The low-rank update of weight `target`, W [*in_shape, *out_shape] seen as [I, O]: A [I, r], B [r, O], and
    with DoRA the shift of each output feature's magnitude [O]."""

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
        # q, k and v read the same x, but each adapter draws its own mask, as PEFT's do; the embedding none.
        self.dropout, self.stream = (0.0 if target == "embed_tokens" else a.dropout), LORA_TARGETS.index(target)
        embedding = target == "embed_tokens"
        # A flattened (heads, head_dim) dimension is split as `heads` alone would be: head-major.
        self.lora = nnx.LoRA(
            math.prod(in_shape),
            a.rank,
            math.prod(out_shape),
            param_dtype=jnp.dtype(param_dtype),
            a_initializer=jax.nn.initializers.zeros if embedding else PEFT_A_INIT,
            b_initializer=jax.nn.initializers.normal(1.0) if embedding else jax.nn.initializers.zeros,
            rngs=rngs,
            a_metadata={"out_sharding": (in_name, None), "eager_sharding": False},
            b_metadata={"out_sharding": (None, out_name), "eager_sharding": False},
        )
        self.dora = a.dora
        if a.dora:
            shift = jnp.zeros((math.prod(out_shape),), jnp.float32)
            self.magnitude_shift = nnx.LoRAParam(shift, out_sharding=(out_name,), eager_sharding=False)

    def dropped(self, x: jax.Array, dropout_key: jax.Array | None) -> jax.Array:
        """x, or in training (`dropout_key` given, lora.dropout > 0) x with part of it zeroed."""
        if dropout_key is not None and self.dropout:
            return adapter_dropout(x, self.dropout, jax.random.fold_in(dropout_key, self.stream))
        return x

    def low_rank(self, x: jax.Array) -> jax.Array:
        """scale * x A B: [..., *in_shape] -> [..., *out_shape], in x's dtype."""
        flat = x.reshape(*x.shape[: x.ndim - self.in_ndim], -1)
        a_IR, b_RO = self.lora.lora_a[...].astype(x.dtype), self.lora.lora_b[...].astype(x.dtype)
        delta = (flat @ a_IR) @ b_RO * jnp.asarray(self.scale, x.dtype)
        return delta.reshape(*flat.shape[:-1], *self.out_shape)

    def delta_IO(self) -> jax.Array:
        """scale * A B [I, O] in float32: the update of the weight."""
        a_IR, b_RO = self.lora.lora_a[...].astype(jnp.float32), self.lora.lora_b[...].astype(jnp.float32)
        return jnp.matmul(a_IR, b_RO, precision=jax.lax.Precision.HIGHEST) * self.scale

    def dora_factor(self, w: jax.Array) -> jax.Array:
        """DoRA's m / ||W + scale A B||_c [*out_shape], float32, for the base weight w [*in_shape, *out_shape]
        (dequantized); no gradient reaches the norms, only the magnitude."""
        w_IO = jax.lax.stop_gradient(w).astype(jnp.float32).reshape(-1, math.prod(self.out_shape))
        norm_O = jnp.linalg.norm(w_IO + jax.lax.stop_gradient(self.delta_IO()), axis=0)
        factor_O = (jnp.linalg.norm(w_IO, axis=0) + self.magnitude_shift[...]) / norm_O
        return factor_O.reshape(self.out_shape)


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
    dropped out with `dropout_key`, in training); with DoRA, as PEFT computes it:
    y + (k - 1) * x' W + k * scale * x' A B, k = m / ||W + scale A B||_c and x' the dropped x (x' W is y itself
    where nothing is dropped)."""

    def base(x: jax.Array) -> jax.Array:
        if isinstance(weight, QuantizedWeight):
            return quantized_einsum(spec, x, weight)
        return jnp.einsum(spec, x, weight[...].astype(x.dtype))

    y = base(x)
    if lora is None:
        return y
    dropped = lora.dropped(x, dropout_key)
    if not lora.dora:
        return y + lora.low_rank(dropped)
    w = weight.dequantized(jnp.float32) if isinstance(weight, QuantizedWeight) else weight[...]
    k = lora.dora_factor(w).astype(x.dtype)
    base_dropped = y if dropped is x else base(dropped)
    return y + ((k - 1) * base_dropped + k * lora.low_rank(dropped))


def embedding_rows(table_VD: jax.Array, tokens_BL: jax.Array, dtype: Any, lora: Adapter | None) -> jax.Array:
    """table[tokens] [B, L, D] in `dtype`, plus the embedding adapter's update where there is one, as PEFT's
    lora.Embedding computes it: + scale * A[tokens] B, and with DoRA k * table[tokens] + k * scale * A[tokens] B,
    k = m / ||table + scale A B||_c per embedding feature."""
    x_BLD = lookup_rows(table_VD, tokens_BL, dtype)
    if lora is None:
        return x_BLD
    a_BLR = jnp.take(lora.lora.lora_a[...], tokens_BL, axis=0).astype(dtype)
    update_BLD = (a_BLR @ lora.lora.lora_b[...].astype(dtype)) * jnp.asarray(lora.scale, dtype)
    if not lora.dora:
        return x_BLD + update_BLD
    k_D = lora.dora_factor(table_VD).astype(dtype)
    return k_D * x_BLD + k_D * update_BLD


def adapted_weight(w_IO: jax.Array, lora: Adapter | None) -> jax.Array:
    """w [I, O] with its adapter folded in: w + scale A B, with DoRA times k = m / ||w + scale A B||_c; float32
    where adapted, else w as it is."""
    if lora is None:
        return w_IO
    merged = w_IO.astype(jnp.float32) + lora.delta_IO()
    return merged * lora.dora_factor(w_IO) if lora.dora else merged


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


# Each adaptable weight's adapter attribute: in Attention and SwiGLU, and the Decoder's embedding and head
# (jaxscale.models.transformer).
ADAPTER_OF = (
    {"wq": "q_lora", "wk": "k_lora", "wv": "v_lora", "wo": "o_lora"}
    | {f"w_{t}": f"{t}_lora" for t in ("gate", "up", "down")}
    | {"embed": "embed_lora", "lm_head": "head_lora"}
)


def _stacked(weight: QuantizedWeight) -> int:
    """1 when the weight carries a leading `layers` dimension (stacked blocks), else 0."""
    return int(weight.codes.get_metadata()["out_sharding"][0] == "layers")


def stored_base(model: nnx.Module) -> dict[tuple[str, ...], nnx.Param | QuantizedWeight]:
    """The base weights as the run stores them, by path (read them with `stored_value`)."""
    base = {}
    for path, module in nnx.iter_modules(model):
        for name, value in vars(module).items():
            if isinstance(value, QuantizedWeight) or (
                isinstance(value, nnx.Param) and not isinstance(value, nnx.LoRAParam)
            ):
                base[(*path, name)] = value
    return base


def stored_value(weight: nnx.Param | QuantizedWeight, index: tuple[int, ...] = ()) -> jax.Array:
    """The weight the run computes with at stack `index` (e.g. (layer,); (): all of it): as stored, or dequantized
    to float32, one layer at a time where `index` picks one."""
    if not isinstance(weight, QuantizedWeight):
        return weight[index] if index else weight[...]
    codes, scales = weight.codes[...], weight.scales[...]
    if index:
        codes, scales = codes[index], scales[index]
    axis = weight.block_axis + _stacked(weight) - len(index)
    return dequantize(codes, scales, axis, weight.kind, jnp.float32)


def adapters_of(model: nnx.Module) -> dict[tuple[str, ...], Adapter]:
    """Each adapted weight's path (as `stored_base` names it) and its adapter."""
    found = {}
    for path, module in nnx.iter_modules(model):
        for weight, attribute in ADAPTER_OF.items():
            lora = getattr(module, attribute, None)
            if isinstance(lora, Adapter):
                found[(*path, weight)] = lora
    return found


def magnitudes(model: nnx.Module) -> dict[tuple[str, ...], jax.Array]:
    """DoRA's magnitudes m [*stack, O] (float32) of each adapted weight, by path: the base's norms plus the trained
    shift; empty without DoRA."""
    base = stored_base(model)
    found = {}
    for path, lora in adapters_of(model).items():
        if lora.dora:
            shift = lora.magnitude_shift[...]
            w = stored_value(base[path]).astype(jnp.float32).reshape(*shift.shape[:-1], -1, shift.shape[-1])
            found[path] = jnp.linalg.norm(w, axis=-2) + shift
    return found
