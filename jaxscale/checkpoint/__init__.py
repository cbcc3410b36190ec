"""Checkpoints: the Orbax manager (atomic async saves, verified restores onto any mesh) and their report."""

from jaxscale.checkpoint.manager import Checkpointer, CheckpointWriteError, NonFiniteStateError

__all__ = ["CheckpointWriteError", "Checkpointer", "NonFiniteStateError"]
