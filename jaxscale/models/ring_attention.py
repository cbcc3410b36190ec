"""Ring attention: a sequence split over the `context` axis attends without gathering its keys and values.

Each of the C context devices holds 2c = L / C tokens of every row: chunks i and 2C - 1 - i of the row's
2C chunks (the zigzag order of jaxscale.sharding.context_order, which gives every device as many keys to
attend over). Its keys and values travel around the ring of context devices, one device's block per step,
passed on with `lax.ppermute` while the next is attended over; after C steps every query has seen every
block, and no device ever holds more than two blocks: keys and values O(L / C) per device (Liu et al. 2023,
"Ring Attention with Blockwise Transformers"). The softmax is accumulated online (a running maximum and
sum per query, flash-attention style), and each block is attended over in tiles of at most `TILE` queries
by `TILE` keys, so no score matrix larger than a tile exists.

The zigzag order also lets each step skip what the causal mask hides whole (as zigzag ring attention
does): at step s device i holds the block of device j = i - s (mod C). If j < i, both of i's chunks come
after j's first chunk and before its second, so all queries attend to the first half of the block only;
if j > i, i's first chunk comes before all of the block and its second after it, so only the second half
of the queries attends, to all of the block. Every step but the first costs half a block either way.
Within what is computed the mask is the one XLA's attention applies (jaxscale.models.attention): same
document (segment id), not later (by position), and within `window` where the layer is local. The skip
reads the chunks' order in the row, so it assumes what packed data gives: positions increase along a
document.

The backward is a second trip around the ring (a custom VJP): each device recomputes its tiles'
probabilities from the saved log-sum-exp, keeps the gradient of its own queries, and passes the keys'
and values' gradients on with the blocks they belong to, so after C steps they arrive home.

Shape letters: B batch, Q / M query / key tokens of a block on this device, K key/value heads,
G query heads per key/value head, H head dim.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec

from jaxscale.sharding import active_rules, logical_to_spec

AXIS = "context"
TILE = 512  # queries and keys per tile: a [B, K, G, TILE, TILE] float32 score tile at a time
# The name of what the backward keeps of the forward (the output and the log-sum-exp; the inputs are the
# layer's). A remat policy that saves dots must save these too (jaxscale.models.transformer does): else it
# keeps every tile's scores of the forward's loops, to recompute the output from.
RESIDUALS = "ring_attention_residuals"
_MASKED = -1e30  # a finite "minus infinity": a row that sees nothing yet keeps a finite running maximum


def ring_attention(
    q_BLNH: jax.Array,
    k_BLKH: jax.Array,
    v_BLKH: jax.Array,
    segment_ids_BL: jax.Array,
    positions_BL: jax.Array,
    *,
    window: int = 0,
    scale: float | None = None,
    softcap: float = 0.0,
) -> jax.Array:
    """Causal attention [B, L, N, H] of a sequence split over `context` (in its zigzag order), by ring.

    Arguments as jaxscale.models.attention.attend's: queries [B, L, N, H], keys and values [B, L, K, H],
    int segment ids and positions [B, L]. Needs active rules (jaxscale.sharding.use_rules) whose `seq`
    maps to the context axis alone.
    """
    rules, mesh = active_rules()
    q_spec = logical_to_spec(("batch", "seq", "heads", None), q_BLNH.shape, rules, mesh)
    kv_spec = logical_to_spec(("batch", "seq", "kv_heads", None), k_BLKH.shape, rules, mesh)
    if q_spec[1] != AXIS:
        raise ValueError(f"ring attention needs the sequence split over '{AXIS}' alone; the rules give {q_spec[1]}")
    if kv_spec[2] != q_spec[2]:
        # KV heads split otherwise than the query heads (too few to split as far): give every query head
        # its own copy, so each device's query heads find their keys on the same device.
        group = q_BLNH.shape[2] // k_BLKH.shape[2]
        k_BLKH, v_BLKH = (jnp.repeat(x, group, axis=2) for x in (k_BLKH, v_BLKH))
        kv_spec = q_spec
    rows_spec = PartitionSpec(q_spec[0], q_spec[1])
    scale = q_BLNH.shape[-1] ** -0.5 if scale is None else scale
    local = functools.partial(_ring, devices=dict(mesh.shape)[AXIS], window=window, scale=scale, softcap=softcap)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, rows_spec, rows_spec),
        out_specs=q_spec,
        check_vma=False,
    )(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, positions_BL)


@functools.partial(jax.custom_vjp, nondiff_argnames=("devices", "window", "scale", "softcap"))
def _ring(
    q_BLNH: jax.Array,
    k_BLKH: jax.Array,
    v_BLKH: jax.Array,
    segment_ids_BL: jax.Array,
    positions_BL: jax.Array,
    devices: int,
    window: int,
    scale: float,
    softcap: float,
) -> jax.Array:
    """This device's attention output [B, 2c, N, H] (local arrays inside the shard_map)."""
    return _ring_forward(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, positions_BL, devices, window, scale, softcap)[0]


def _ring_forward(
    q_BLNH: jax.Array,
    k_BLKH: jax.Array,
    v_BLKH: jax.Array,
    segment_ids_BL: jax.Array,
    positions_BL: jax.Array,
    devices: int,
    window: int,
    scale: float,
    softcap: float,
) -> tuple[jax.Array, tuple]:
    B, L, N, H = q_BLNH.shape
    K = k_BLKH.shape[2]
    G, c = N // K, L // 2
    mask = functools.partial(_Mask, window=window)
    q_BQKGH = q_BLNH.reshape(B, L, K, G, H)
    rows = mask(segment_ids_BL, positions_BL)
    state = (
        jnp.zeros((B, L, K, G, H), jnp.float32),
        jnp.full((B, K, G, L), _MASKED, jnp.float32),
        jnp.zeros((B, K, G, L), jnp.float32),
    )
    tiles = functools.partial(_attend_block, scale=scale, softcap=softcap)
    me = lax.axis_index(AXIS)

    def attend_to(step: jax.Array, state: tuple, block: tuple) -> tuple:
        """The state after the queries also attend to the block of device me - step (step > 0)."""
        cols = mask(block[2], block[3])

        def earlier_block(state: tuple) -> tuple:  # all queries, the block's first chunk
            return tiles(q_BQKGH, rows, block[0][:, :c], block[1][:, :c], cols.take(0, c), state)

        def later_block(state: tuple) -> tuple:  # the second chunk's queries, all of the block
            second = tiles(q_BQKGH[:, c:], rows.take(c, L), block[0], block[1], cols, _rows(state, c, L))
            return tuple(_set_rows(a, b, c, L) for a, b in zip(state, second, strict=True))

        return lax.cond((me - step) % devices < me, earlier_block, later_block, state)

    block = (k_BLKH, v_BLKH, segment_ids_BL, positions_BL)
    state = _around_the_ring(
        devices,
        lambda state, block: tiles(q_BQKGH, rows, block[0], block[1], mask(block[2], block[3]), state),
        attend_to,
        state,
        block,
    )
    o_BQKGH, max_BKGQ, sum_BKGQ = state
    out_BLNH = (o_BQKGH / _per_row(sum_BKGQ)).reshape(B, L, N, H).astype(q_BLNH.dtype)
    lse_BKGQ = checkpoint_name(max_BKGQ + jnp.log(sum_BKGQ), RESIDUALS)
    out_BLNH = checkpoint_name(out_BLNH, RESIDUALS)
    return out_BLNH, (q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, positions_BL, out_BLNH, lse_BKGQ)


def _ring_bwd(devices: int, window: int, scale: float, softcap: float, saved: tuple, d_out_BLNH: jax.Array) -> tuple:
    q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, positions_BL, out_BLNH, lse_BKGQ = saved
    B, L, N, H = q_BLNH.shape
    K = k_BLKH.shape[2]
    G, c = N // K, L // 2
    mask = functools.partial(_Mask, window=window)
    q_BQKGH = q_BLNH.reshape(B, L, K, G, H)
    do_BQKGH = d_out_BLNH.reshape(B, L, K, G, H)
    # The softmax's backward needs each query's sum of d_out * out (FlashAttention-2's D).
    delta_BKGQ = jnp.einsum(
        "bqkgh,bqkgh->bkgq", do_BQKGH.astype(jnp.float32), out_BLNH.reshape(B, L, K, G, H).astype(jnp.float32)
    )
    queries = (q_BQKGH, do_BQKGH, lse_BKGQ, delta_BKGQ)
    rows = mask(segment_ids_BL, positions_BL)
    grads = functools.partial(_block_grads, scale=scale, softcap=softcap)
    me = lax.axis_index(AXIS)

    def add_grads(grads_of_block: tuple, carry: tuple) -> tuple:
        """The query gradient and the block's (which travels with it, so that after C passes it is back on
        the device that holds the block) with this block's share added."""
        dq, dk, dv = grads_of_block
        dq_BQKGH, d_block = carry
        return dq_BQKGH + dq, _pass_on((d_block[0] + dk, d_block[1] + dv), devices)

    def diagonal(carry: tuple, block: tuple) -> tuple:
        return add_grads(grads(queries, rows, block[0], block[1], mask(block[2], block[3])), carry)

    def off_diagonal(step: jax.Array, carry: tuple, block: tuple) -> tuple:
        cols = mask(block[2], block[3])

        def earlier_block() -> tuple:  # all queries, the block's first chunk
            dq, dk, dv = grads(queries, rows, block[0][:, :c], block[1][:, :c], cols.take(0, c))
            pad = [(0, 0), (0, L - c), (0, 0), (0, 0)]
            return dq, jnp.pad(dk, pad), jnp.pad(dv, pad)

        def later_block() -> tuple:  # the second chunk's queries, all of the block
            second = tuple(_query_rows(a, c, L) for a in queries)
            dq, dk, dv = grads(second, rows.take(c, L), block[0], block[1], cols)
            return jnp.pad(dq, [(0, 0), (c, 0), (0, 0), (0, 0), (0, 0)]), dk, dv

        return add_grads(lax.cond((me - step) % devices < me, earlier_block, later_block), carry)

    block = (k_BLKH, v_BLKH, segment_ids_BL, positions_BL)
    zero_grads = (jnp.zeros(k_BLKH.shape, jnp.float32), jnp.zeros(v_BLKH.shape, jnp.float32))
    carry = (jnp.zeros((B, L, K, G, H), jnp.float32), zero_grads)
    dq_BQKGH, d_block = _around_the_ring(devices, diagonal, off_diagonal, carry, block)
    dq_BLNH = dq_BQKGH.reshape(B, L, N, H).astype(q_BLNH.dtype)
    dk_BLKH, dv_BLKH = (g.astype(x.dtype) for g, x in zip(d_block, (k_BLKH, v_BLKH), strict=True))
    return dq_BLNH, dk_BLKH, dv_BLKH, None, None


_ring.defvjp(_ring_forward, _ring_bwd)


def _around_the_ring(devices: int, diagonal: Callable, off_diagonal: Callable, carry: Any, block: tuple) -> Any:
    """`carry` after C steps: `diagonal(carry, block)` on this device's own block, then for steps s = 1 .. C - 1
    `off_diagonal(s, carry, block)` on the block of device me - s, each block passed on while the one before
    is worked on (a scan over the middle steps, so that each step's buffers are the same ones)."""
    following = _pass_on(block, devices)
    carry = diagonal(carry, block)

    def middle(state: tuple, step: jax.Array) -> tuple[tuple, None]:
        carry, block = state
        following = _pass_on(block, devices)
        return (off_diagonal(step, carry, block), following), None

    (carry, block), _ = lax.scan(middle, (carry, following), jnp.arange(1, devices - 1))
    return off_diagonal(devices - 1, carry, block)


def _pass_on(arrays: tuple, devices: int) -> tuple:
    """`arrays` sent to the next device of the context ring (received from the previous one)."""
    return lax.ppermute(arrays, AXIS, [(d, (d + 1) % devices) for d in range(devices)])


class _Mask:
    """Segment ids and positions [B, T] of a run of tokens: what decides which keys a query sees."""

    def __init__(self, segment_ids_BT: jax.Array, positions_BT: jax.Array, window: int) -> None:
        self.segment_ids, self.positions, self.window = segment_ids_BT, positions_BT, window

    def take(self, start: int, stop: int) -> _Mask:
        return _Mask(self.segment_ids[:, start:stop], self.positions[:, start:stop], self.window)

    def tiled(self, tile: int) -> tuple[jax.Array, jax.Array]:
        """Segment ids and positions as [T / tile, B, tile], for a scan over tiles."""
        return tuple(_tiles(a, tile, axis=1) for a in (self.segment_ids, self.positions))

    def seen(self, q_ids: jax.Array, q_pos: jax.Array, k_ids: jax.Array, k_pos: jax.Array) -> jax.Array:
        """[B, 1, 1, Q, M]: whether each query of a tile sees each key (same document, not later, in the window)."""
        distance = q_pos[:, :, None] - k_pos[:, None, :]
        seen = (q_ids[:, :, None] == k_ids[:, None, :]) & (distance >= 0)
        if self.window:
            seen = seen & (distance < self.window)
        return seen[:, None, None]


def _in_step(carry: Any, ids: jax.Array, positions: jax.Array) -> tuple[Any, jax.Array, jax.Array]:
    """`carry`, `ids` and `positions` as they are, tied to the loop's step: the tile's mask depends only on
    the ids and positions, and XLA would otherwise compute the masks of every tile at once before the loop,
    a [Q, M] array per key/value head and query head (the score matrix's size, that tiling avoids)."""
    return lax.optimization_barrier((carry, ids, positions))


def _tile_size(length: int) -> int:
    """The largest tile of at most TILE tokens that divides `length`."""
    return max(t for t in range(1, min(length, TILE) + 1) if length % t == 0)


def _tiles(a: jax.Array, tile: int, axis: int) -> jax.Array:
    """`a` with its `axis` cut into tiles: [T / tile, ..., tile, ...] (the tile index first)."""
    shape = a.shape[:axis] + (a.shape[axis] // tile, tile) + a.shape[axis + 1 :]
    return jnp.moveaxis(a.reshape(shape), axis, 0)


def _untiled(a: jax.Array, axis: int) -> jax.Array:
    """The inverse of `_tiles`: [T / tile, ..., tile, ...] -> [..., T, ...]."""
    a = jnp.moveaxis(a, 0, axis)
    return a.reshape(a.shape[:axis] + (a.shape[axis] * a.shape[axis + 1],) + a.shape[axis + 2 :])


def _per_row(stat_BKGQ: jax.Array) -> jax.Array:
    """A per-query statistic [B, K, G, Q] laid out to scale outputs [B, Q, K, G, 1]."""
    return jnp.moveaxis(stat_BKGQ, 3, 1)[..., None]


def _rows(state: tuple, start: int, stop: int) -> tuple:
    o, running_max, running_sum = state
    return o[:, start:stop], running_max[..., start:stop], running_sum[..., start:stop]


def _set_rows(full: jax.Array, part: jax.Array, start: int, stop: int) -> jax.Array:
    """`full` with queries start..stop replaced by `part` (the query axis is 1 for outputs, 3 for statistics)."""
    axis = 1 if full.ndim == 5 else 3
    return lax.dynamic_update_slice_in_dim(full, part, start, axis)


def _query_rows(a: jax.Array, start: int, stop: int) -> jax.Array:
    """Queries start..stop of a [B, Q, K, G, H] array or a [B, K, G, Q] statistic."""
    return a[:, start:stop] if a.ndim == 5 else a[..., start:stop]


def _logits(q_BQKGH: jax.Array, k_BMKH: jax.Array, scale: float, softcap: float) -> tuple[jax.Array, jax.Array | None]:
    """Float32 logits [B, K, G, Q, M], soft-capped where `softcap`; and their tanh (for the backward) or None."""
    logits = jnp.einsum("bqkgh,bmkh->bkgqm", q_BQKGH, k_BMKH, preferred_element_type=jnp.float32) * scale
    if not softcap:
        return logits, None
    capped = jnp.tanh(logits / softcap)
    return softcap * capped, capped


def _attend_block(
    q_BQKGH: jax.Array,
    rows: _Mask,
    k_BMKH: jax.Array,
    v_BMKH: jax.Array,
    cols: _Mask,
    state: tuple,
    scale: float,
    softcap: float,
) -> tuple:
    """The online-softmax state (output sum [B, Q, K, G, H], running max and sum [B, K, G, Q], float32) of
    queries `q` after also attending to the block's keys and values, a tile of each at a time."""
    tq, tk = _tile_size(q_BQKGH.shape[1]), _tile_size(k_BMKH.shape[1])
    key_tiles = (_tiles(k_BMKH, tk, 1), _tiles(v_BMKH, tk, 1), *cols.tiled(tk))

    def one_query_tile(xs: tuple) -> tuple:
        q, q_ids, q_pos, o, running_max, running_sum = xs

        def one_key_tile(carry: tuple, key_tile: tuple) -> tuple[tuple, None]:
            k, v, k_ids, k_pos = key_tile
            carry, k_ids, k_pos = _in_step(carry, k_ids, k_pos)
            o, running_max, running_sum = carry
            seen = rows.seen(q_ids, q_pos, k_ids, k_pos)
            logits, _ = _logits(q, k, scale, softcap)
            new_max = jnp.maximum(running_max, jnp.max(jnp.where(seen, logits, _MASKED), axis=-1))
            probs = jnp.where(seen, jnp.exp(logits - new_max[..., None]), 0.0)
            kept = jnp.exp(running_max - new_max)
            running_sum = running_sum * kept + jnp.sum(probs, axis=-1)
            update = jnp.einsum("bkgqm,bmkh->bqkgh", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
            return (o * _per_row(kept) + update, new_max, running_sum), None

        state, _ = lax.scan(one_key_tile, (o, running_max, running_sum), key_tiles)
        return state

    o, running_max, running_sum = state
    query_tiles = (
        _tiles(q_BQKGH, tq, 1),
        *rows.tiled(tq),
        _tiles(o, tq, 1),
        _tiles(running_max, tq, 3),
        _tiles(running_sum, tq, 3),
    )
    o, running_max, running_sum = lax.map(one_query_tile, query_tiles)
    return _untiled(o, 1), _untiled(running_max, 3), _untiled(running_sum, 3)


def _block_grads(
    queries: tuple, rows: _Mask, k_BMKH: jax.Array, v_BMKH: jax.Array, cols: _Mask, scale: float, softcap: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Float32 gradients (queries [B, Q, K, G, H], the block's keys and values [B, M, K, H]) of the loss through
    the queries' attention to this block, from the forward's log-sum-exp; a tile of each at a time.

    `queries`: (q [B, Q, K, G, H], d_out [B, Q, K, G, H], log-sum-exp [B, K, G, Q], sum(d_out * out) [B, K, G, Q]).
    """
    q_BQKGH, do_BQKGH, lse_BKGQ, delta_BKGQ = queries
    tq, tk = _tile_size(q_BQKGH.shape[1]), _tile_size(k_BMKH.shape[1])
    query_tiles = (
        _tiles(q_BQKGH, tq, 1),
        _tiles(do_BQKGH, tq, 1),
        _tiles(lse_BKGQ, tq, 3),
        _tiles(delta_BKGQ, tq, 3),
        *rows.tiled(tq),
    )

    def one_key_tile(dq_BQKGH: jax.Array, key_tile: tuple) -> tuple[jax.Array, tuple]:
        k, v, k_ids, k_pos = key_tile

        def one_query_tile(carry: tuple, query_tile: tuple) -> tuple[tuple, jax.Array]:
            q, do, lse, delta, q_ids, q_pos = query_tile
            (dk, dv), q_ids, q_pos = _in_step(carry, q_ids, q_pos)
            seen = rows.seen(q_ids, q_pos, k_ids, k_pos)
            logits, capped = _logits(q, k, scale, softcap)
            probs = jnp.where(seen, jnp.exp(logits - lse[..., None]), 0.0)
            dv = dv + jnp.einsum("bkgqm,bqkgh->bmkh", probs.astype(do.dtype), do, preferred_element_type=jnp.float32)
            d_probs = jnp.einsum("bqkgh,bmkh->bkgqm", do, v, preferred_element_type=jnp.float32)
            d_logits = probs * (d_probs - delta[..., None])
            if softcap:
                d_logits = d_logits * (1.0 - capped * capped)
            d_logits = (d_logits * scale).astype(q.dtype)
            dk = dk + jnp.einsum("bkgqm,bqkgh->bmkh", d_logits, q, preferred_element_type=jnp.float32)
            dq = jnp.einsum("bkgqm,bmkh->bqkgh", d_logits, k, preferred_element_type=jnp.float32)
            return (dk, dv), dq

        zeros = jnp.zeros(k.shape, jnp.float32)
        (dk, dv), dq_tiles = lax.scan(one_query_tile, (zeros, zeros), query_tiles)
        return dq_BQKGH + _untiled(dq_tiles, 1), (dk, dv)

    key_tiles = (_tiles(k_BMKH, tk, 1), _tiles(v_BMKH, tk, 1), *cols.tiled(tk))
    dq_BQKGH, (dk_tiles, dv_tiles) = lax.scan(one_key_tile, jnp.zeros(q_BQKGH.shape, jnp.float32), key_tiles)
    return dq_BQKGH, _untiled(dk_tiles, 1), _untiled(dv_tiles, 1)
