"""Orbax checkpoints that survive faults: atomic async saves, verified restores, any mesh.

A checkpoint holds two items: `state` (every array of the model and optimizer, sharded,
written by Orbax's tensorstore handler) and `meta` (JSON: step, mesh, config, and an exact
checksum of every array). Nothing is ever unpickled.

The data position needs no state of its own: the batch of step s is a pure function of
(seed, s, data config), so the step number is the whole data position.

Faults handled here:
- a save killed mid-write leaves an Orbax temporary directory that is never listed as a step;
  it is reported by name and removed on the next start;
- a step whose arrays are truncated or corrupted fails its checksum (or its read) and the
  restore falls back to the previous step, with a warning naming the bad one;
- a checkpoint of another model is refused before any compute, listing the mismatched arrays;
- a state with NaN or Inf is never written.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import multihost

from jaxscale.config import CheckpointConfig
from jaxscale.errors import UserError

log = logging.getLogger("jaxscale.checkpoint")
TMP_MARKER = ".orbax-checkpoint-tmp"


class CheckpointWriteError(UserError):
    """A save failed (full disk, no permission): earlier checkpoints are untouched."""


class NonFiniteStateError(Exception):
    """The state to save holds NaN or Inf; it is not written."""


@jax.jit
def fingerprint(state: Any) -> tuple[Any, jax.Array]:
    """Exact per-array checksums and an all-finite flag, computed on the devices.

    The checksum is the sum of each element's bit pattern modulo 2**32: integer addition is
    associative, so it is identical whatever the mesh and reduction order, and any flipped
    bit changes it.
    """

    def checksum(x: jax.Array) -> jax.Array:
        bits = x.dtype.itemsize * 8
        as_uint = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}"))
        return jnp.sum(as_uint.astype(jnp.uint32), dtype=jnp.uint32)

    # A sum is non-finite iff some element is (or it overflows, which no sane state does): one cheap
    # float reduction per array instead of an elementwise test.
    sums = [jnp.sum(x, dtype=jnp.float32) for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jax.tree.map(checksum, state), jnp.isfinite(jnp.sum(jnp.stack(sums)))


_ROOTS = {"0": "model", "1": "optimizer"}  # the state is the pair (model, optimizer)


def _name(path: tuple) -> str:
    """`model/blocks/mlp/w_up` for a pure-dict path; saved metadata spells integer keys as strings."""
    parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    return "/".join([_ROOTS.get(parts[0], parts[0]), *parts[1:]])


def _checksums_json(sums: Any) -> dict[str, int]:
    return {_name(path): int(value) for path, value in jax.tree_util.tree_leaves_with_path(sums)}


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {_name(path): tuple(x.shape) for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def _verify(restored: Any, step: int) -> None:
    """Raise ValueError unless the arrays of a restored checkpoint match the checksums saved beside them."""
    sums, _ = fingerprint(restored["state"])
    expected = restored["meta"].get("checksums", {})
    bad = [k for k, v in _checksums_json(sums).items() if expected.get(k) != v]
    if bad:
        raise ValueError(f"step {step}: checksum mismatch in {len(bad)} array(s), first {bad[0]}")


class Checkpointer:
    """Save and restore the train state under `directory`, one subdirectory per step."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig):
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        for partial in sorted(self.directory.glob(f"*{TMP_MARKER}*")):
            log.warning("checkpoint %s was not fully written (the run stopped mid-save); ignoring it", partial)
            if jax.process_index() == 0:
                shutil.rmtree(partial, ignore_errors=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            keep_period=cfg.keep_every or None,
            enable_async_checkpointing=cfg.async_save,
            create=True,
        )
        if jax.process_count() == 1:
            # One process holds every replica of every array, so Orbax's replica-parallel save would
            # only slice arrays (a third of the time an async save blocks, measured on 8 CPU devices)
            # for writers that do not exist. The handler is global to Orbax, as is this process.
            ocp.type_handlers.register_type_handler(
                jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True
            )
        self._writing: int | None = None  # the step of the newest save, for error messages
        # Explicit handlers make item_metadata available, which restore onto a new mesh relies on.
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
        )

    def steps(self) -> list[int]:
        """Committed steps, oldest first."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: nnx.State, meta: dict[str, Any], wait: bool = False) -> None:
        """Start saving `state` at `step` (returns once the arrays are copied off the devices, unless `wait`).

        Raises NonFiniteStateError (nothing written) if any array holds NaN or Inf, and
        CheckpointWriteError if this or an earlier async save failed to write.
        """
        arrays = nnx.to_pure_dict(state)
        sums, all_finite = fingerprint(arrays)
        if not bool(all_finite):
            raise NonFiniteStateError(f"the state at step {step} holds NaN or Inf; not saving it")
        meta = meta | {"step": step, "checksums": _checksums_json(sums)}
        self._writing = step
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)),
                force=True,
            )
            if wait:
                self.manager.wait_until_finished()
        except Exception as e:  # Orbax surfaces OS errors of async writes here, wrapped in its own types.
            raise self._write_error(step, e) from None

    def _write_error(self, step: int | None, error: Exception) -> CheckpointWriteError:
        previous = [s for s in self.steps() if s != step]
        return CheckpointWriteError(
            f"Saving a checkpoint (step {step}) under {self.directory} failed "
            f"({type(error).__name__}: {error}). The last complete checkpoint is "
            f"{'step ' + str(previous[-1]) if previous else 'none'}; free disk space or fix the directory's "
            f"permissions, then restart to resume from it."
        )

    def check_compatible(self, step: int, abstract: Any) -> None:
        """UserError listing every array whose name or shape differs between checkpoint `step` and `abstract`."""
        saved = _shapes(self.manager.item_metadata(step)["state"])
        wanted = _shapes(nnx.to_pure_dict(abstract))
        problems = [
            f"{k}: checkpoint has {saved[k]}, model wants {wanted[k]}"
            for k in sorted(saved.keys() & wanted.keys())
            if saved[k] != wanted[k]
        ]
        problems += [f"{k}: only in the checkpoint" for k in sorted(saved.keys() - wanted.keys())]
        problems += [f"{k}: missing from the checkpoint" for k in sorted(wanted.keys() - saved.keys())]
        if problems:
            shown = "; ".join(problems[:12]) + (f"; and {len(problems) - 12} more" if len(problems) > 12 else "")
            raise UserError(
                f"The checkpoint at {self.directory / str(step)} was written by a different model: {shown}. "
                f"Use the model config it was trained with (see `jaxscale checkpoints {self.directory.parent}`), "
                f"or point run.dir at a new directory to start fresh."
            )

    def restore(self, step: int, abstract: Any) -> nnx.State:
        """Load `step` into the shardings carried by `abstract` (ShapeDtypeStructs) and verify its checksums."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(nnx.to_pure_dict(abstract)), meta=ocp.args.JsonRestore()
            ),
        )
        _verify(restored, step)
        state = jax.tree.map(lambda x: x, abstract)
        nnx.replace_by_pure_dict(state, restored["state"])
        return state

    def verify(self, step: int) -> bool:
        """Whether `step` reads back (in the shardings it was saved with) and matches its checksums."""
        try:
            _verify(
                self.manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
                ),
                step,
            )
        except Exception:  # any read error or mismatch means "not usable"
            return False
        return True

    def restore_latest(self, abstract: Any) -> tuple[int, nnx.State] | None:
        """The newest step that restores and verifies, falling back past bad ones; None if there is none."""
        for step in reversed(self.steps()):
            try:
                self.check_compatible(step, abstract)
                return step, self.restore(step, abstract)
            except UserError:
                raise
            except Exception as e:  # a truncated or corrupted step: any read error means "do not use"
                self._set_aside(step)
                log.warning(
                    "checkpoint step %d under %s is unreadable (%s); set aside as %d.unreadable-*, "
                    "falling back to the one before",
                    step,
                    self.directory,
                    e,
                    step,
                )
        return None

    def _set_aside(self, step: int) -> None:
        """Rename an unreadable step to `<step>.unreadable` so the resumed run can save that step anew."""
        if jax.process_index() == 0:
            bad = self.directory / str(step)
            bad.rename(bad.with_name(f"{step}.unreadable-{int(time.time())}"))
        multihost.sync_global_processes(f"jaxscale_set_aside_{step}")  # the same name on every host
        self.manager.reload()

    def wait(self) -> None:
        """Block until any async save has committed; CheckpointWriteError if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._write_error(self._writing, e) from None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()
