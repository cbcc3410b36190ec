"""The two gathers of a language model (embedding lookup, target logit), partitioned where XLA cannot.

Inside a `shard_map` that leaves some mesh axes manual (the pipeline's stages), XLA's SPMD
partitioner (XLA of jax 0.12) aborts with a CHECK in spmd_partitioner_util.cc when it splits a
gather, or its scatter-add gradient, over a vocabulary split by `tensor` while the batch is split
too; and relaying out the embedding table there becomes a collective-permute over all devices that
only the first stage reaches (a deadlock on XLA:CPU). So under a manual axis both gathers take a
form that partitions like any matmul or local lookup:

- the embedding lookup is vocabulary-parallel: each shard looks the tokens up among its own rows
  (zeros for the rest) and a psum over the vocab axes adds the shards up (Megatron's embedding).
  The table must come in laid out already: rows split over the vocab axes, the width whole;
- the target logit is picked by a one-hot product instead of a gather.

Everywhere else the plain forms run. Both forms give the same numbers.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import PartitionSpec

from jaxscale.sharding import active_rules, constrain, logical_to_spec


def _inside_manual_axes() -> bool:
    return bool(jax.sharding.get_abstract_mesh().manual_axes)


def lookup_rows(table_VD: jax.Array, tokens_BL: jax.Array, dtype: Any) -> jax.Array:
    """table[tokens] in `dtype`: [V, D] and int [B, L] -> [B, L, D], split as the residual stream's logical
    (batch, act_seq, act_embed)."""
    if _inside_manual_axes():
        x_BLD = _vocab_parallel_lookup(table_VD, tokens_BL, dtype)
    else:
        # Gather the table's FSDP shards before the lookup (as FSDP does for every weight): a lookup
        # from a width-sharded table yields width-sharded rows that the partitioner cannot reshard cheaply.
        x_BLD = constrain(table_VD.astype(dtype), ("vocab", "act_embed"))[tokens_BL]
    return constrain(x_BLD, ("batch", "act_seq", "act_embed"))


def token_cross_entropy(logits_BLV: jax.Array, targets_BL: jax.Array) -> jax.Array:
    """Cross entropy of each position's target token: [B, L, V] logits, int [B, L] targets -> [B, L]."""
    if not _inside_manual_axes():
        return optax.softmax_cross_entropy_with_integer_labels(logits_BLV, targets_BL)
    one_hot_BLV = jax.nn.one_hot(targets_BL, logits_BLV.shape[-1], dtype=logits_BLV.dtype)
    return optax.softmax_cross_entropy(logits_BLV, one_hot_BLV)


def _vocab_parallel_lookup(table_VD: jax.Array, tokens_BL: jax.Array, dtype: Any) -> jax.Array:
    """table[tokens] with the table's rows split over the `vocab` mesh axes, in a shard_map over the automatic axes."""
    rules, _ = active_rules()
    mesh = jax.sharding.get_abstract_mesh()
    table_spec = logical_to_spec(("vocab", None), table_VD.shape, rules, mesh)
    token_spec = logical_to_spec(("batch", "seq"), tokens_BL.shape, rules, mesh)
    vocab_axes = table_spec[0]

    def lookup(table_local: jax.Array, tokens_local: jax.Array) -> jax.Array:
        rows = table_local.shape[0]
        ids = tokens_local - (lax.axis_index(vocab_axes) * rows if vocab_axes else 0)
        mine = (ids >= 0) & (ids < rows)
        found = jnp.where(mine[..., None], table_local.astype(dtype)[jnp.clip(ids, 0, rows - 1)], 0)
        return lax.psum(found, vocab_axes) if vocab_axes else found

    automatic = set(mesh.axis_names) - set(mesh.manual_axes)
    return jax.shard_map(
        lookup,
        mesh=mesh,
        in_specs=(table_spec, token_spec),
        out_specs=PartitionSpec(*token_spec, None),
        axis_names=automatic,
        check_vma=False,
    )(table_VD, tokens_BL)
