"""Orbax checkpoints: async save of the whole train state, keep the last K, resume onto any mesh.

The data position needs no state of its own: the batch of step s is a pure function of
(seed, s, data config), so the step number is the whole data position.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jaxscale.config import CheckpointConfig


class Checkpointer:
    """A CheckpointManager holding two items: `state` (sharded arrays) and `meta` (JSON)."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig):
        self.cfg = cfg
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            enable_async_checkpointing=cfg.async_save,
            create=True,
        )
        # Explicit handlers make item_metadata available, which restore onto a new mesh relies on.
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(),
            options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: nnx.State, meta: dict[str, Any], force: bool = False) -> bool:
        """Start saving `state` at `step` (returns at once when async); True if a save was started."""
        return self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(nnx.to_pure_dict(state)), meta=ocp.args.JsonSave(meta)),
            force=force,
        )

    def restore(self, step: int, abstract: Any) -> nnx.State:
        """Load `step` into the shardings carried by `abstract` (ShapeDtypeStructs), whatever mesh saved it."""
        target = nnx.to_pure_dict(abstract)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        )
        state = jax.tree.map(lambda x: x, abstract)
        nnx.replace_by_pure_dict(state, restored["state"])
        return state

    def wait(self) -> None:
        """Block until any async save has committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
