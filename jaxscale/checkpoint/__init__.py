"""Checkpoints: the Orbax manager (atomic async saves, verified restores onto any mesh) and their report."""

from jaxscale.checkpoint.manager import (
    Checkpointer,
    CheckpointRestoreError,
    CheckpointWriteError,
    ChecksumMismatchError,
    NonFiniteStateError,
    NoUsableCheckpointError,
)

__all__ = [
    "CheckpointRestoreError",
    "CheckpointWriteError",
    "Checkpointer",
    "ChecksumMismatchError",
    "NoUsableCheckpointError",
    "NonFiniteStateError",
]
