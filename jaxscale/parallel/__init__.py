"""Parallelism that schedules its own communication inside `jax.shard_map` (expert dispatch, pipeline)."""
