"""Expert parallelism: tokens travel to the devices that hold their experts and back, by all-to-all.

Inside `jax.shard_map` every device takes its own sequences and packs each routed token into the
buffer slot routing gave it: [E, G, C, D] (experts x local sequences x capacity x width). One
all-to-all over the expert axis hands each device the slots of its E/n experts from all n peers;
the experts run as one batched matmul; a second all-to-all brings the results home, where each
token sums its k results, weighted, in its original place. Buffers are capacity-padded so the
collective has static shapes, and the path runs on every backend.

Under dropless routing a padded buffer holds a whole sequence per expert: E / K times the routed
tokens. `model.expert_exchange=ragged` (the `auto` choice on TPU and GPU) sends the exact counts
instead (jaxscale.models.ragged_dispatch); on XLA:CPU, which lacks `lax.ragged_all_to_all`, it
runs with an emulated exchange, so its bookkeeping is tested here.

With experts unsplit (expert axis of size 1) and dropless routing, tokens never leave their
device: they are sorted by expert and run through a grouped matmul (`lax.ragged_dot`), padding
nothing.

Tensor parallelism splits each expert's hidden units: every tensor rank computes a partial output
and one psum over its axis completes it. FSDP gathers expert weights over `fsdp` on the way in,
as for dense layers; they are never gathered over the expert axis.

Shape letters: G sequences on this device, L sequence, D width, K experts per token, E experts
(E_l on this device), C capacity, F hidden (F_l on this tensor rank), A assignments (G * L * K).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from jaxscale.errors import UserError
from jaxscale.models.glu import gated
from jaxscale.models.ragged_dispatch import emulated_ragged_all_to_all, ragged_ffn
from jaxscale.sharding import active_platform, active_rules, logical_to_spec

log = logging.getLogger("jaxscale.moe")

AxisName = str | tuple[str, ...] | None
EXCHANGES = ("auto", "padded", "ragged")
_NATIVE_RAGGED = ("tpu", "gpu")  # backends that implement lax.ragged_all_to_all


def resolve_exchange(exchange: str, platform: str, dropless: bool) -> str:
    """'padded' or 'ragged': how `model.expert_exchange=exchange` moves tokens to split experts on `platform`.

    `auto` is ragged for dropless routing on TPU and GPU, padded otherwise (capacity routing fills
    fixed buffers anyway, and XLA:CPU can only emulate the ragged exchange).
    """
    if exchange not in EXCHANGES:
        raise UserError(f"model.expert_exchange={exchange!r} is not one of {', '.join(EXCHANGES)}.")
    if exchange == "auto":
        return "ragged" if dropless and platform in _NATIVE_RAGGED else "padded"
    return exchange


def check_exchange(exchange: str, platform: str, dropless: bool) -> str:
    """The resolved exchange, or a UserError (before any compute) for a setting it cannot run."""
    chosen = resolve_exchange(exchange, platform, dropless)
    if chosen == "ragged" and not dropless:
        raise UserError(
            "model.expert_exchange=ragged sends exactly the routed tokens, which is dropless routing; with "
            "model.capacity_factor > 0 experts take fixed-size buffers. Set model.capacity_factor=0 (dropless) "
            "or model.expert_exchange=padded (or auto)."
        )
    if chosen == "ragged" and platform not in _NATIVE_RAGGED:
        log.warning(
            "model.expert_exchange=ragged on %s: lax.ragged_all_to_all is emulated by a padded all_to_all "
            "(same numbers, padded traffic)",
            platform,
        )
    return chosen


def expert_ffn(
    x_BLD: jax.Array,
    experts_BLK: jax.Array,
    weights_BLK: jax.Array,
    slots_BLK: jax.Array,
    w_gate_EDF: jax.Array,
    w_up_EDF: jax.Array,
    w_down_EFD: jax.Array,
    *,
    capacity: int,
    dropless: bool,
    exchange: str = "auto",
    ragged_buffer: float = 0.0,
    activation: str = "silu",
) -> tuple[jax.Array, jax.Array]:
    """Sum over each token's k experts of weight x GLU_expert(token) [B, L, D], and the share of expert
    groups whose ragged exchange overflowed its sized receive buffer and ran again with the worst-case one
    (a scalar; 0 by default).

    `slots_BLK` >= `capacity` marks a dropped assignment (it contributes nothing). Under active
    sharding rules (jaxscale.sharding.use_rules) this runs in `shard_map` with experts split over
    the mesh axes the `experts` rule names (whose degrees must divide E: jaxscale.training.layout checks
    it before any compute); with none it runs on the whole arrays. `exchange`: `model.expert_exchange`;
    `ragged_buffer`: `model.ragged_buffer` (jaxscale.models.ragged_dispatch); `activation`: the experts' gate
    nonlinearity (jaxscale.models.glu).
    """
    E = w_gate_EDF.shape[0]
    platform = active_platform()
    ragged = None
    if resolve_exchange(exchange, platform, dropless) == "ragged":
        ragged = lax.ragged_all_to_all if platform in _NATIVE_RAGGED else emulated_ragged_all_to_all
    local = functools.partial(
        _local_ffn,
        num_experts=E,
        capacity=capacity,
        dropless=dropless,
        ragged=ragged,
        ragged_buffer=ragged_buffer,
        activation=activation,
    )
    active = active_rules()
    if active is None:
        return local(x_BLD, experts_BLK, weights_BLK, slots_BLK, w_gate_EDF, w_up_EDF, w_down_EFD)
    rules, mesh = active
    # Weights enter whole along `embed` (FSDP gathers them, as for dense layers), split by experts and mlp.
    w_in = logical_to_spec(("experts", None, "mlp"), w_gate_EDF.shape, rules, mesh)
    w_out = logical_to_spec(("experts", "mlp", None), w_down_EFD.shape, rules, mesh)
    tokens = logical_to_spec(("batch", None, None), x_BLD.shape, rules, mesh)
    routes = PartitionSpec(tokens[0], None, None)
    # Each expert group says whether it fell back; one entry per device, averaged below: the share of groups.
    every_split = tuple(dict.fromkeys(a for part in (tokens[0], *w_in) for a in _names(part)))

    def body(*args: jax.Array) -> tuple[jax.Array, jax.Array]:
        y_GLD, fallback = local(*args, expert_axis=w_in[0], tensor_axis=w_in[2])
        return y_GLD, fallback[None]

    y_BLD, fallback_per_device = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(tokens, routes, routes, routes, w_in, w_in, w_out),
        out_specs=(tokens, PartitionSpec(every_split or None)),
    )(x_BLD, experts_BLK, weights_BLK, slots_BLK, w_gate_EDF, w_up_EDF, w_down_EFD)
    return y_BLD, jnp.mean(fallback_per_device)


def _names(part: AxisName) -> tuple[str, ...]:
    """The mesh axis names one entry of a PartitionSpec holds."""
    return () if part is None else (part,) if isinstance(part, str) else tuple(part)


def _local_ffn(
    x_GLD: jax.Array,
    experts_GLK: jax.Array,
    weights_GLK: jax.Array,
    slots_GLK: jax.Array,
    w_gate_EDF: jax.Array,
    w_up_EDF: jax.Array,
    w_down_EFD: jax.Array,
    *,
    num_experts: int,
    capacity: int,
    dropless: bool,
    ragged: Callable[..., jax.Array] | None = None,
    ragged_buffer: float = 0.0,
    activation: str = "silu",
    expert_axis: AxisName = None,
    tensor_axis: AxisName = None,
) -> tuple[jax.Array, jax.Array]:
    """One device's share: its tokens through all their experts, wherever those live [G, L, D], and
    1.0 where its expert group's ragged exchange fell back to the worst-case buffer (else 0.0).

    `ragged`: the ragged all-to-all to send exact counts with, when experts are split; None: padded buffers.
    """
    fallback = jnp.zeros((), jnp.float32)
    if dropless and expert_axis is None:
        y_GLD = _grouped_ffn(x_GLD, experts_GLK, weights_GLK, w_gate_EDF, w_up_EDF, w_down_EFD, activation)
    elif ragged is not None and expert_axis is not None:
        y_GLD, fallback = ragged_ffn(
            x_GLD,
            experts_GLK,
            weights_GLK,
            w_gate_EDF,
            w_up_EDF,
            w_down_EFD,
            num_experts=num_experts,
            expert_axis=expert_axis,
            exchange=ragged,
            buffer_factor=ragged_buffer,
            activation=activation,
        )
    else:
        buf_EGCD = _dispatch(x_GLD, experts_GLK, slots_GLK, num_experts, capacity)
        if expert_axis is not None:
            # Send expert block j to expert rank j; receive every rank's slots for the local experts.
            buf_EGCD = lax.all_to_all(buf_EGCD, expert_axis, split_axis=0, concat_axis=1, tiled=True)
        out_EGCD = _experts_glu(buf_EGCD, w_gate_EDF, w_up_EDF, w_down_EFD, activation)
        if expert_axis is not None:
            out_EGCD = lax.all_to_all(out_EGCD, expert_axis, split_axis=1, concat_axis=0, tiled=True)
        y_GLD = _combine(out_EGCD, experts_GLK, slots_GLK, weights_GLK)
    # Summing after the combine moves K x capacity-factor times fewer bytes than summing the buffers.
    return (y_GLD if tensor_axis is None else lax.psum(y_GLD, tensor_axis)), fallback


def _dispatch(
    x_GLD: jax.Array, experts_GLK: jax.Array, slots_GLK: jax.Array, num_experts: int, capacity: int
) -> jax.Array:
    """Tokens into per-expert, per-sequence buffers [E, G, C, D]; assignments past capacity are dropped."""
    G, L, D = x_GLD.shape
    K = experts_GLK.shape[-1]
    seq_GLK = jnp.broadcast_to(jnp.arange(G)[:, None, None], experts_GLK.shape)
    x_GLKD = jnp.broadcast_to(x_GLD[:, :, None, :], (G, L, K, D))
    buf_EGCD = jnp.zeros((num_experts, G, capacity, D), x_GLD.dtype)
    return buf_EGCD.at[experts_GLK, seq_GLK, slots_GLK].set(x_GLKD, mode="drop")


def _combine(out_EGCD: jax.Array, experts_GLK: jax.Array, slots_GLK: jax.Array, weights_GLK: jax.Array) -> jax.Array:
    """Each token's weighted sum of its experts' outputs, read back from the buffers; dropped ones read 0."""
    seq_GLK = jnp.broadcast_to(jnp.arange(experts_GLK.shape[0])[:, None, None], experts_GLK.shape)
    out_GLKD = out_EGCD.at[experts_GLK, seq_GLK, slots_GLK].get(mode="fill", fill_value=0)
    return jnp.einsum("glkd,glk->gld", out_GLKD, weights_GLK)


def _experts_glu(
    x_EGCD: jax.Array, w_gate_EDF: jax.Array, w_up_EDF: jax.Array, w_down_EFD: jax.Array, activation: str
) -> jax.Array:
    """Every expert's gated MLP on its own buffer, as one batched matmul per weight."""
    gate_EGCF = jnp.einsum("egcd,edf->egcf", x_EGCD, w_gate_EDF)
    up_EGCF = jnp.einsum("egcd,edf->egcf", x_EGCD, w_up_EDF)
    return jnp.einsum("egcf,efd->egcd", gated(gate_EGCF, up_EGCF, activation), w_down_EFD)


def _grouped_ffn(
    x_GLD: jax.Array,
    experts_GLK: jax.Array,
    weights_GLK: jax.Array,
    w_gate_EDF: jax.Array,
    w_up_EDF: jax.Array,
    w_down_EFD: jax.Array,
    activation: str,
) -> jax.Array:
    """Dropless with every expert at hand: sort assignments by expert, grouped matmuls, unsort."""
    G, L, D = x_GLD.shape
    K = experts_GLK.shape[-1]
    experts_A = experts_GLK.reshape(-1)
    order_A = jnp.argsort(experts_A, stable=True)
    x_AD = x_GLD.reshape(G * L, D)[order_A // K]
    sizes_E = jnp.bincount(experts_A, length=w_gate_EDF.shape[0])
    gate_AF = lax.ragged_dot(x_AD, w_gate_EDF, sizes_E)
    up_AF = lax.ragged_dot(x_AD, w_up_EDF, sizes_E)
    out_AD = lax.ragged_dot(gated(gate_AF, up_AF, activation), w_down_EFD, sizes_E)
    out_GLKD = jnp.zeros_like(out_AD).at[order_A].set(out_AD).reshape(G, L, K, D)
    return jnp.einsum("glkd,glk->gld", out_GLKD, weights_GLK)
