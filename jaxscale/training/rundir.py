"""The run directory, checked before any compute: it can be created, written, and holds a checkpoint.

Without this a bad `run.dir` shows up as a traceback from deep inside the checkpoint manager, or,
on a full disk, as a failed save after the first interval of training.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax

from jaxscale.errors import UserError
from jaxscale.units import human_bytes

# Beside the checkpoints a run writes its config, metrics and TensorBoard events.
LOG_ROOM_BYTES = 16 * 2**20


def state_bytes(state_structs: Any) -> int:
    """Bytes of the whole train state (every array, unsharded): an upper bound on one checkpoint's size."""
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state_structs))


def check_run_dir(run_dir: Path, checkpoint_bytes: int) -> None:
    """UserError, with the fix, unless `run_dir` can be created and written and has room for one checkpoint.

    `checkpoint_bytes` is the size of one checkpoint (0 when the run saves none).
    """
    setting = f"run.dir={run_dir}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"{setting} cannot be created ({e.strerror or e}). Point run.dir at a directory you can create, "
            f"e.g. run.dir=runs/my-run."
        ) from None
    try:
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as e:
        raise UserError(
            f"{setting} is not writable ({e.strerror or e}). Give this user write permission on it "
            f"(chmod u+w {run_dir}) or point run.dir at a writable directory."
        ) from None
    free = shutil.disk_usage(run_dir).free
    needed = checkpoint_bytes + LOG_ROOM_BYTES
    if free < needed:
        raise UserError(
            f"{setting} has {human_bytes(free)} free, but one checkpoint of this model takes up to "
            f"{human_bytes(checkpoint_bytes)} (plus {human_bytes(LOG_ROOM_BYTES)} for logs). Free disk space "
            f"or point run.dir at a larger disk."
        )
