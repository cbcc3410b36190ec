"""Checkpoints: the Orbax manager (atomic async saves, verified restores onto any mesh) and their report."""

from jaxscale.checkpoint.manager import (
    Checkpointer,
    CheckpointRestoreError,
    CheckpointUnavailableError,
    CheckpointWriteError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    NonFiniteStateError,
    NoUsableCheckpointError,
    Verdict,
    step_directories,
)

__all__ = [
    "CheckpointRestoreError",
    "CheckpointUnavailableError",
    "CheckpointWriteError",
    "Checkpointer",
    "ChecksumMismatchError",
    "CorruptCheckpointError",
    "NoUsableCheckpointError",
    "NonFiniteStateError",
    "Verdict",
    "step_directories",
]
