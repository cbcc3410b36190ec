"""The run directory, checked before any compute: it can be created, written, and holds a checkpoint.

Without this a bad `run.dir` shows up as a traceback from deep inside the checkpoint manager, or,
on a full disk, as a failed save after the first interval of training. A bucket (gs://) is checked
by writing and deleting a small object: that proves the bucket exists, is reached and takes writes
with this host's credentials; a bucket has no free space to check. With several processes, all of
them must see the same run directory (process 0 writes a token there, every process reads it back).
"""

from __future__ import annotations

import math
import secrets
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from jaxscale.errors import TransientError, UserError
from jaxscale.storage import is_remote, is_transient
from jaxscale.units import human_bytes

# Beside the checkpoints a run writes its config, metrics and TensorBoard events.
LOG_ROOM_BYTES = 16 * 2**20


def state_bytes(state_structs: Any) -> int:
    """Bytes of the whole train state (every array, unsharded): an upper bound on one checkpoint's size."""
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state_structs))


def check_run_dir(run_dir: epath.Path, checkpoint_bytes: int) -> None:
    """UserError, with the fix, unless `run_dir` can be created and written and has room for one checkpoint.

    `run_dir` is a local directory or a bucket URL (see jaxscale.storage.run_path); `checkpoint_bytes`
    is the size of one checkpoint (0 when the run saves none). With several processes, every one stops
    when any one finds a problem (the others would wait for it at the next collective forever).
    """
    try:
        if is_remote(run_dir):
            _check_bucket(run_dir)
        else:
            _check_local(Path(run_dir), checkpoint_bytes)
    except (UserError, TransientError):
        if jax.process_count() > 1:
            _gather_failures(True)  # the others learn of it and stop too
        raise
    if jax.process_count() > 1:
        failed = _gather_failures(False)
        if failed:
            raise UserError(
                f"run.dir={run_dir} cannot be used by process(es) {', '.join(map(str, failed))} of "
                f"{jax.process_count()}; their own error says why and what to change."
            )
        _check_shared(run_dir)


def _gather_failures(failed_here: bool) -> list[int]:
    """The indices of the processes whose own run.dir check failed (every process calls this once)."""
    failed = multihost_utils.process_allgather(np.bool_(failed_here))
    return [i for i, f in enumerate(np.ravel(failed)) if f]


def _check_local(run_dir: Path, checkpoint_bytes: int) -> None:
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


def _check_bucket(run_dir: epath.Path) -> None:
    """UserError unless an object can be written under `run_dir` and deleted again."""
    probe = run_dir / f".jaxscale-write-check-{uuid.uuid4().hex}"  # unique: every host writes its own
    try:
        probe.write_text("")
        probe.unlink()
    except Exception as e:  # the storage client's own types: missing bucket, no credentials, no connection
        reason = str(e).splitlines()[0][:300] if str(e) else ""
        if is_transient(e):
            raise TransientError(
                f"run.dir={run_dir} cannot be reached for now ({type(e).__name__}: {reason}). Run the same command "
                f"again once the storage answers (jaxscale supervise does, backing off)."
            ) from None
        raise UserError(
            f"run.dir={run_dir} cannot be written ({type(e).__name__}: {reason}). Check that the bucket exists "
            f"and that this host's credentials may write to it (`gcloud storage ls {run_dir}`; on a Cloud TPU VM "
            f"the VM's service account needs a storage role such as Storage Object User on the bucket), or point "
            f"run.dir at another bucket or a local directory."
        ) from None


def _check_shared(run_dir: epath.Path) -> None:
    """UserError on every process unless all of them see the same `run_dir`: process 0 writes a token there
    and every process reads it back. Each process writes its part of every checkpoint into run.dir, so
    directories on each host's own disk would leave every host with a partial checkpoint."""
    token = str(int(multihost_utils.broadcast_one_to_all(np.int32(secrets.randbits(31)))))
    marker = run_dir / f".jaxscale-shared-check-{token}"  # a new name: no host has a stale lookup of it cached
    if jax.process_index() == 0:
        marker.write_text(token)
    multihost_utils.sync_global_devices("jaxscale_run_dir_shared_check_written")
    sees = marker.exists() and marker.read_text() == token
    seen = multihost_utils.process_allgather(np.bool_(sees))
    if jax.process_index() == 0:
        marker.unlink(missing_ok=True)
    blind = [i for i, ok in enumerate(np.ravel(seen)) if not ok]
    if blind:
        raise UserError(
            f"run.dir={run_dir} is not shared: process(es) {', '.join(map(str, blind))} of {jax.process_count()} "
            f"do not see the file process 0 wrote there. Every process writes its part of each checkpoint into "
            f"run.dir, so with several hosts it must be storage all of them see: a bucket (run.dir=gs://BUCKET/PATH) "
            f"or a filesystem every host mounts at the same path."
        )
