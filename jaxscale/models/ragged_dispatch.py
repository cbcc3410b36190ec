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
balanced shares (f * A rows, MaxText's ragged buffer factor), and stays dropless: where the counts
say some shard is sent more rows than that, the expert group (every device of it reads the same
counts) runs its dispatch again with the worst-case buffer, forward and backward, inside the layer.
A step that fits pays for the sized buffer only; one that overflows pays for both, in that layer,
and the layer reports it (the `ragged_fallback` statistic). Exact, and on the hot path one branch
(`lax.cond`) on a few integers already at hand: no second compiled step, and no state kept aside to
run a step again (the state is donated), as a loop-level retry would need.

XLA:CPU does not implement `ragged_all_to_all`. `emulated_ragged_all_to_all` gives the same result
with a padded `all_to_all`, so the offsets and sorts above run and are tested on CPU.

Shape letters: G sequences on this device, L sequence, D width, K experts per token, E experts
(E_l on this device), F_l hidden units on this tensor rank, A = G * L * K assignments here,
n expert shards, R rows of the receive buffer.
"""

from __future__ import annotations

import functools
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
    """One device's tokens through their k experts on whichever shards hold them; nothing is ever dropped.

    Runs inside `shard_map`; the expert weights are this shard's [E_l, D, F_l] / [E_l, F_l, D].
    `exchange` is `lax.ragged_all_to_all` or `emulated_ragged_all_to_all` (same signature).
    `buffer_factor` (`model.ragged_buffer`) sizes a shard's receive buffer in balanced shares (A rows);
    0: the worst case, n * A. Where routing sends some shard more rows than a sized buffer holds, this
    expert group's dispatch runs again with the worst-case buffer (`_sized_or_worst`). `activation`: the
    experts' gate nonlinearity (jaxscale.models.glu).
    Returns (y [G, L, D], 1.0 where this expert group fell back to the worst-case buffer, else 0.0).
    """
    G, L, D = x_GLD.shape
    K = experts_GLK.shape[-1]
    A = G * L * K
    n = lax.axis_size(expert_axis)
    worst_rows = n * A
    rows = worst_rows if buffer_factor <= 0 else min(worst_rows, math.ceil(buffer_factor * A))
    experts_A = experts_GLK.reshape(A)
    # Every device of the expert group reads the same counts, so all of them take the same branch below.
    counts_nE = lax.all_gather(jnp.bincount(experts_A, length=num_experts).astype(jnp.int32), expert_axis)
    routed = (experts_A, counts_nE)
    weights = (x_GLD, weights_GLK, w_gate_EDF, w_up_EDF, w_down_EFD)
    through = functools.partial(_through_experts, expert_axis=expert_axis, exchange=exchange, activation=activation)
    if rows == worst_rows:
        return through(worst_rows, routed, weights), jnp.zeros((), jnp.float32)
    received_n = counts_nE.reshape(n, n, num_experts // n).sum(axis=(0, 2))  # rows each shard is sent
    overflow = jnp.any(received_n > rows)
    sized, worst = functools.partial(through, rows), functools.partial(through, worst_rows)
    return _sized_or_worst(sized, worst, overflow, routed, weights), overflow.astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _sized_or_worst(sized: Callable, worst: Callable, overflow: jax.Array, routed: tuple, weights: tuple) -> jax.Array:
    """`worst(routed, weights)` where `overflow`, else `sized(routed, weights)`: the same numbers either way,
    as neither drops a row then.

    Differentiated by hand so that the worst-case buffer costs nothing where it is not taken: a
    `lax.cond` under autodiff would keep the residuals of both branches (the untaken one as zeros),
    the worst case's included. Here the forward keeps only the sized dispatch's residuals, and a
    backward that overflowed differentiates the worst-case dispatch from the inputs again: a working
    set of one layer, only then.
    """
    return lax.cond(overflow, worst, sized, routed, weights)


def _sized_or_worst_fwd(sized: Callable, worst: Callable, overflow: jax.Array, routed: tuple, weights: tuple) -> tuple:
    y, pullback = jax.vjp(lambda w: sized(routed, w), weights)
    y = lax.cond(overflow, lambda: worst(routed, weights), lambda: y)
    return y, (pullback, overflow, routed, weights)


def _sized_or_worst_bwd(sized: Callable, worst: Callable, residuals: tuple, g_GLD: jax.Array) -> tuple:
    pullback, overflow, routed, weights = residuals

    def again() -> tuple:
        return jax.vjp(lambda w: worst(routed, w), weights)[1](g_GLD)

    (grads,) = lax.cond(overflow, again, lambda: pullback(g_GLD))
    return None, None, grads


_sized_or_worst.defvjp(_sized_or_worst_fwd, _sized_or_worst_bwd)


def _through_experts(
    buffer_rows: int,
    routed: tuple[jax.Array, jax.Array],
    weights: tuple[jax.Array, ...],
    *,
    expert_axis: AxisName,
    exchange: Exchange,
    activation: str,
) -> jax.Array:
    """The exchange with a receive buffer of `buffer_rows` rows: `routed` = (each assignment's expert [A], every
    device's per-expert counts [n, E]), `weights` = (x [G, L, D], combine weights [G, L, K], the local experts'
    gate, up and down weights). Rows past the buffer are dropped: they add nothing. Returns y [G, L, D]."""
    experts_A, counts_nE = routed
    x_GLD, weights_GLK, w_gate_EDF, w_up_EDF, w_down_EFD = weights
    G, L, D = x_GLD.shape
    K = weights_GLK.shape[-1]
    A = G * L * K
    n, local_experts = counts_nE.shape[0], w_gate_EDF.shape[0]
    me = lax.axis_index(expert_axis)
    order_A = jnp.argsort(experts_A, stable=True)
    x_AD = x_GLD.reshape(G * L, D)[order_A // K]

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
    return jnp.einsum("glkd,glk->gld", out_GLKD, weights_GLK)


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
