"""Dropless expert parallelism without padding: exact token counts by `lax.ragged_all_to_all`.

The padded path (jaxscale.models.expert_parallel) gives every expert a buffer of a whole sequence
per sequence under dropless routing, so with experts split each device sends, receives and runs
E / K times the tokens routed. Here each device sorts its G * L * K assignments by expert, sends
each expert shard exactly the rows routed to it, runs its local experts as grouped matmuls
(`lax.ragged_dot`) over what arrived, and sends every row back to where it came from.

The counts travel first: one all-gather of every device's per-expert counts [n, E] (a few
integers), from which every device reads the same matrix and derives all offsets without further
communication. Rows arrive sender by sender, each sender's rows by expert; one stable sort by local
expert groups them for `ragged_dot`.

The receive buffer has static shape. By default it is sized for the worst case, every device
routing all its assignments to one shard (n * A rows), so no token is ever dropped; that is the
padded path's memory when n * K = E, but only the routed rows cross the links. XLA's cost analysis
charges `ragged_dot` per buffer row (2 * rows * D * F), so the worst-case buffer is counted n times
the unsplit layer's expert FLOPs whatever the kernel skips. `model.ragged_buffer=f` sizes it at f
balanced shares (f * A rows, MaxText's ragged buffer factor): rows that do not fit are dropped,
counted in the layer's dropped fraction.

XLA:CPU does not implement `ragged_all_to_all`. `emulated_ragged_all_to_all` gives the same result
with a padded `all_to_all`, so the offsets and sorts above run and are tested on CPU.

Shape letters: G sequences on this device, L sequence, D width, K experts per token, E experts
(E_l on this device), F_l hidden units on this tensor rank, A = G * L * K assignments here,
n expert shards, R rows of the receive buffer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from jaxscale.models.glu import gated

AxisName = str | tuple[str, ...]
Exchange = Callable[..., jax.Array]


def ragged_ffn(
    x_GLD: jax.Array,
    experts_GLK: jax.Array,
    weights_GLK: jax.Array,
    w_gate_EDF: jax.Array,
    w_up_EDF: jax.Array,
    w_down_EFD: jax.Array,
    *,
    num_experts: int,
    expert_axis: AxisName,
    exchange: Exchange,
    buffer_factor: float = 0.0,
    activation: str = "silu",
) -> tuple[jax.Array, jax.Array]:
    """One device's tokens through their k experts on whichever shards hold them.

    Runs inside `shard_map`; the expert weights are this shard's [E_l, D, F_l] / [E_l, F_l, D].
    `exchange` is `lax.ragged_all_to_all` or `emulated_ragged_all_to_all` (same signature).
    `buffer_factor` (`model.ragged_buffer`) sizes a shard's receive buffer in balanced shares (A rows);
    0: the worst case, n * A. Rows past a smaller buffer are dropped: they add nothing. `activation`: the
    experts' gate nonlinearity (jaxscale.models.glu).
    Returns (y [G, L, D], the dropped share of this expert group's assignments, a scalar).
    """
    G, L, D = x_GLD.shape
    K = experts_GLK.shape[-1]
    A = G * L * K
    n = lax.axis_size(expert_axis)
    local_experts = num_experts // n
    me = lax.axis_index(expert_axis)
    buffer_rows = n * A if buffer_factor <= 0 else min(n * A, math.ceil(buffer_factor * A))

    experts_A = experts_GLK.reshape(A)
    order_A = jnp.argsort(experts_A, stable=True)
    x_AD = x_GLD.reshape(G * L, D)[order_A // K]

    counts_nE = lax.all_gather(jnp.bincount(experts_A, length=num_experts).astype(jnp.int32), expert_axis)
    counts_nnE = counts_nE.reshape(n, n, local_experts)  # [sender, receiving shard, its local expert]
    rows_nn = counts_nnE.sum(-1)  # rows each sender has for each shard
    at_receiver_nn = jnp.cumsum(rows_nn, axis=0) - rows_nn  # where a sender's rows start at a shard
    sent_nn = jnp.clip(buffer_rows - at_receiver_nn, 0, rows_nn)  # what fits: a prefix of each block
    at_receiver_nn = jnp.where(sent_nn > 0, at_receiver_nn, 0)  # empty slices point inside the buffer
    at_sender_nn = jnp.cumsum(rows_nn, axis=1) - rows_nn  # where a shard's rows start in its sender
    # A block is sorted by expert, so a cut prefix keeps its first experts' rows.
    before_nnE = jnp.cumsum(counts_nnE, axis=-1) - counts_nnE
    kept_nnE = jnp.clip(sent_nn[..., None] - before_nnE, 0, counts_nnE)

    received_RD = exchange(
        x_AD,
        jnp.zeros((buffer_rows, D), x_AD.dtype),
        at_sender_nn[me],
        sent_nn[me],
        at_receiver_nn[me],
        sent_nn[:, me],
        axis_name=expert_axis,
    )
    mine_nE = kept_nnE[:, me]  # [sender, local expert]
    by_expert_R = jnp.argsort(_local_expert_of_rows(mine_nE, buffer_rows), stable=True)
    sizes_E = mine_nE.sum(0)
    x_RD = received_RD[by_expert_R]
    gate_RF = lax.ragged_dot(x_RD, w_gate_EDF, sizes_E)
    up_RF = lax.ragged_dot(x_RD, w_up_EDF, sizes_E)
    out_RD = lax.ragged_dot(gated(gate_RF, up_RF, activation), w_down_EFD, sizes_E)
    out_RD = jnp.zeros_like(out_RD).at[by_expert_R].set(out_RD)

    # Back the way they came: each sender's block returns to the place it was cut from.
    back_AD = exchange(
        out_RD,
        jnp.zeros((A, D), out_RD.dtype),
        at_receiver_nn[:, me],
        sent_nn[:, me],
        at_sender_nn[:, me],
        sent_nn[me],
        axis_name=expert_axis,
    )
    out_GLKD = jnp.zeros_like(back_AD).at[order_A].set(back_AD).reshape(G, L, K, D)
    dropped = (n * A - jnp.sum(sent_nn)) / (n * A)
    return jnp.einsum("glkd,glk->gld", out_GLKD, weights_GLK), dropped


def _local_expert_of_rows(counts_nE: jax.Array, rows: int) -> jax.Array:
    """The local expert of each received row [rows]; rows past the received ones get E_l (sorted last).

    Rows arrive sender by sender and, within a sender, expert by expert, `counts_nE` [n, E_l] of each.
    """
    local_experts = counts_nE.shape[1]
    block_ends = jnp.cumsum(counts_nE.reshape(-1))
    block_R = jnp.searchsorted(block_ends, jnp.arange(rows), side="right")
    return jnp.where(block_R < block_ends.shape[0], block_R % local_experts, local_experts)


def emulated_ragged_all_to_all(
    operand: jax.Array,
    output: jax.Array,
    input_offsets: jax.Array,
    send_sizes: jax.Array,
    output_offsets: jax.Array,
    recv_sizes: jax.Array,
    *,
    axis_name: AxisName,
) -> jax.Array:
    """`lax.ragged_all_to_all`'s result by a padded `lax.all_to_all`, for backends without it (XLA:CPU).

    Every peer gets a block of min(operand rows, output rows) rows, the slice meant for it and
    zeros after; the receiver writes the first recv_sizes[s] rows of sender s's block at the offset
    the sender chose (output_offsets, as seen by the sender). Moves the padded blocks, not the counts.
    """
    n = send_sizes.shape[0]
    block = min(operand.shape[0], output.shape[0])
    row_B = jnp.arange(block)
    take_nB = jnp.where(row_B < send_sizes[:, None], input_offsets[:, None] + row_B, operand.shape[0])
    blocks_nB = operand.at[take_nB].get(mode="fill", fill_value=0)
    got_nB = lax.all_to_all(blocks_nB, axis_name, 0, 0, tiled=True)
    placed_at_n = lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
    put_nB = jnp.where(row_B < recv_sizes[:, None], placed_at_n[:, None] + row_B, output.shape[0])
    return output.at[put_nB.reshape(n * block)].set(got_nB.reshape(n * block, *operand.shape[1:]), mode="drop")
