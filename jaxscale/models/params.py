"""How every layer creates its weights: normal init, logical dimension names, no mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def normal_param(
    rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str | None, ...], std: float, dtype: str
) -> nnx.Param:
    """A parameter of `shape` drawn from N(0, std^2), its dimensions named `names` (see jaxscale.sharding)."""
    value = jax.random.normal(rngs.params(), shape, jnp.dtype(dtype)) * std
    # eager_sharding=False: names stay logical here; jaxscale.sharding maps them to the mesh.
    return nnx.Param(value, out_sharding=names, eager_sharding=False)
