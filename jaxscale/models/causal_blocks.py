"""XLA's causal attention over blocks of queries, each attending only to the keys at or before its last one.

`jax.nn.dot_product_attention`'s XLA lowering scores every query against every key and then masks the
upper triangle away, so about half of its score and weighted-value work, forward and backward, is
thrown away. Cut the queries into n blocks and give block i only the keys up to its last position, and
the blocks above the diagonal are never computed: (n - 1) / 2n of the square (a quarter at n = 2). The
math is the same: the keys left out are exactly those the causal mask hides, so each query's float32
softmax runs over the same keys (the sums in another order: equal within float32 rounding). A sliding
window also leaves out the keys before the window of the block's first query.

Blocks are at least MIN_BLOCK queries, so short sequences (the tests' 128 and below) run as one call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MIN_BLOCK = 128  # below this the per-block overhead outweighs the scores it saves
MAX_BLOCKS = 8  # (n - 1) / 2n saved: 7/16 at 8, beyond that little more for more ops to compile and run


def query_blocks(length: int) -> list[tuple[int, int]]:
    """[(start, end)] of the query blocks of a sequence of `length`: as many as MIN_BLOCK allows, up to MAX_BLOCKS."""
    n = max(1, min(MAX_BLOCKS, length // MIN_BLOCK))
    edges = [length * i // n for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def causal_attention(
    q_BLNH: jax.Array,
    k_BLKH: jax.Array,
    v_BLKH: jax.Array,
    segment_ids_BL: jax.Array | None = None,
    window: int = 0,
    scale: float | None = None,
) -> jax.Array:
    """Causal attention [B, L, N, H] by XLA, tokens in order (index = position); the arguments as
    jaxscale.models.attention.attend's: documents by `segment_ids_BL` (None: one per row), `window` > 0 a
    sliding window of that many keys, `scale` of the logits (None: 1/sqrt(H))."""
    blocks = query_blocks(q_BLNH.shape[1])
    if len(blocks) == 1:
        return fused_causal_attention(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, window, scale, "xla")
    outs = []
    for start, end in blocks:
        first = max(0, start - window + 1) if window else 0  # the first key any query of the block sees
        query_Q1, key_1K = jnp.arange(start, end)[:, None], jnp.arange(first, end)[None, :]
        mask_11QK = (key_1K <= query_Q1)[None, None]
        if window:
            mask_11QK = mask_11QK & (query_Q1 - key_1K < window)[None, None]
        mask = mask_11QK
        if segment_ids_BL is not None:
            mask = mask & (segment_ids_BL[:, None, start:end, None] == segment_ids_BL[:, None, None, first:end])
        out_BQNH = jax.nn.dot_product_attention(
            q_BLNH[:, start:end],
            k_BLKH[:, first:end],
            v_BLKH[:, first:end],
            mask=mask,
            scale=scale,
            implementation="xla",
        )
        outs.append(out_BQNH)
    return jnp.concatenate(outs, axis=1)


def fused_causal_attention(
    q_BLNH: jax.Array,
    k_BLKH: jax.Array,
    v_BLKH: jax.Array,
    segment_ids_BL: jax.Array | None,
    window: int,
    scale: float | None,
    implementation: str,
) -> jax.Array:
    """Causal attention [B, L, N, H] as one `jax.nn.dot_product_attention` call of `implementation` ('xla',
    'cudnn'), tokens in order; the other arguments as `causal_attention`'s."""
    same_document_B1LL = None
    if segment_ids_BL is not None:
        same_document_B1LL = segment_ids_BL[:, None, :, None] == segment_ids_BL[:, None, None, :]
    return jax.nn.dot_product_attention(
        q_BLNH,
        k_BLKH,
        v_BLKH,
        mask=same_document_B1LL,
        scale=scale,
        is_causal=True,
        local_window_size=(window - 1, 0) if window else None,
        implementation=implementation,
    )
