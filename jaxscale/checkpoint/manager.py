"""Orbax checkpoints that survive faults: atomic async saves, verified restores, any mesh.

A checkpoint holds two items: `state` (every array of the model and optimizer, sharded,
written by Orbax's tensorstore handler) and `meta` (JSON: step, mesh, config, and an exact
checksum of every array). Nothing is ever unpickled.

The data position needs no state of its own: the batch of step s is a pure function of
(seed, s, data config), so the step number is the whole data position.

Faults handled here:
- a save killed mid-write leaves an Orbax temporary directory that is never listed as a step;
  it is reported by name and removed on the next start;
- a step whose arrays are proven corrupt (checksum mismatch, truncated or undecodable file) is
  set aside and the restore falls back to the previous step, with a warning naming the bad one;
  any other restore error (out of memory, no permission, storage unavailable) stops the run and
  leaves every checkpoint in place; with checkpoints and none usable the run stops too, unless
  checkpoint.allow_fresh_start;
- a checkpoint of another model is refused before any compute, listing the mismatched arrays;
- a state with NaN or Inf is never committed (its checksums and finite check run in the background write).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from orbax.checkpoint import multihost

from jaxscale.config import CheckpointConfig
from jaxscale.errors import UserError
from jaxscale.storage import run_path

log = logging.getLogger("jaxscale.checkpoint")
TMP_MARKER = ".orbax-checkpoint-tmp"
_HOST = "pinned_host"  # the memory kind async saves copy the state into (a DMA from accelerators)


class CheckpointWriteError(UserError):
    """A save failed (full disk, no permission): earlier checkpoints are untouched."""


class NonFiniteStateError(Exception):
    """The state to save holds NaN or Inf; it is not written."""


class ChecksumMismatchError(Exception):
    """A restored array differs from the checksum saved beside it: the checkpoint is corrupt."""


class CheckpointRestoreError(UserError):
    """Reading a checkpoint failed for a reason other than proven corruption; every checkpoint is kept."""


class NoUsableCheckpointError(UserError):
    """The run directory has checkpoints and every one of them is corrupt."""


# Written into each checkpoint's metadata: a checkpoint summed another way is not compared.
CHECKSUM_ALGORITHM = "fmix32(bits ^ fmix32(index + golden)) summed mod 2**32"
_GOLDEN = 0x9E3779B9


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finalizer: a bijection on uint32 in which every input bit moves every output bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The bit patterns of `x` as uint32: one word per element, two (a trailing axis) per 64-bit element."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if x.dtype.itemsize > 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{x.dtype.itemsize * 8}")).astype(jnp.uint32)


def checksum(x: jax.Array) -> jax.Array:
    """sum over elements i of fmix32(bits_i ^ fmix32(i + golden)) mod 2**32, i the global row-major index.

    Each term depends on the element's value and its position, so a flipped bit or two swapped
    elements (or shards restored in each other's place) change the sum. Unsigned addition mod 2**32
    is associative and commutative, so the sum is identical whatever the mesh and reduction order.
    """
    words = _words(x)
    index = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for dim in reversed(range(words.ndim)):  # row-major: the last axis varies fastest
        index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, dim) * jnp.uint32(stride % 2**32)
        stride *= words.shape[dim]
    return jnp.sum(_fmix32(words ^ _fmix32(index + jnp.uint32(_GOLDEN))), dtype=jnp.uint32)


@jax.jit
def fingerprint(state: Any) -> tuple[Any, jax.Array]:
    """Exact per-array checksums (see `checksum`) and an all-finite flag, computed on the devices."""
    # A sum is non-finite iff some element is (or it overflows, which no sane state does): one cheap
    # float reduction per array instead of an elementwise test.
    sums = [jnp.sum(x, dtype=jnp.float32) for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jax.tree.map(checksum, state), jnp.isfinite(jnp.sum(jnp.stack(sums)))


_ROOTS = {"0": "model", "1": "optimizer"}  # the state is the pair (model, optimizer)


def _name(path: tuple) -> str:
    """`model/blocks/mlp/w_up` for a pure-dict path; saved metadata spells integer keys as strings."""
    parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    return "/".join([_ROOTS.get(parts[0], parts[0]), *parts[1:]])


def checksums_json(sums: Any) -> dict[str, int]:
    """Per-array checksums (the first output of `fingerprint`) by array name, as saved in a checkpoint's metadata."""
    return {_name(path): int(value) for path, value in jax.tree_util.tree_leaves_with_path(sums)}


class _FingerprintedMetaHandler(ocp.JsonCheckpointHandler):
    """Writes the meta JSON with the state's checksums, in Orbax's background commit, not in the loop.

    The checksums and finite flag are still computing on the devices when the save starts; this
    handler waits for them in the save's background thread. Orbax commits a step only after every
    item's write finished, so a state found to hold NaN or Inf is never committed: the write raises
    NonFiniteStateError, which surfaces at the next save or wait.
    """

    async def async_save(self, directory: epath.Path, item: Any = None, args: _MetaSave | None = None) -> list:
        return [ocp.future.CommitFutureAwaitingContractedSignals(self._write(args, directory), name="jaxscale_meta")]

    async def _write(self, args: _MetaSave, directory: epath.Path) -> None:
        sums, all_finite = jax.device_get((args.sums, args.all_finite))
        if not bool(all_finite):
            raise NonFiniteStateError(f"the state at step {args.meta['step']} holds NaN or Inf; not saving it")
        meta = args.meta | {"checksum_algorithm": CHECKSUM_ALGORITHM, "checksums": checksums_json(sums)}
        if multihost.is_primary_host(0):
            (directory / self._filename).write_text(json.dumps(meta))


@ocp.args.register_with_handler(_FingerprintedMetaHandler, for_save=True)
@dataclasses.dataclass
class _MetaSave(ocp.args.CheckpointArgs):
    """The meta item, written once the state's fingerprint (`fingerprint`'s outputs, computing) is known."""

    meta: dict[str, Any]
    sums: Any
    all_finite: jax.Array


@ocp.args.register_with_handler(_FingerprintedMetaHandler, for_restore=True)
@dataclasses.dataclass
class _MetaRestore(ocp.args.CheckpointArgs):
    """Read the meta item back (plain JSON, as written by `_MetaSave`)."""


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {_name(path): tuple(x.shape) for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def _verify(restored: Any, step: int) -> None:
    """ChecksumMismatchError unless the arrays of a restored checkpoint match the checksums saved beside them."""
    if restored["meta"].get("checksum_algorithm") != CHECKSUM_ALGORITHM:
        log.warning(
            "checkpoint step %d was summed another way (an older jaxscale); its checksums are not compared", step
        )
        return
    sums, _ = fingerprint(restored["state"])
    expected = restored["meta"].get("checksums", {})
    bad = [k for k, v in checksums_json(sums).items() if expected.get(k) != v]
    if bad:
        raise ChecksumMismatchError(f"step {step}: checksum mismatch in {len(bad)} array(s), first {bad[0]}")


# Tensorstore reports its errors as ValueError("CODE: ..."), CODE an absl status. These name damaged
# bytes: data loss, a file shorter than its index says, bytes a codec or the b-tree cannot decode.
_CORRUPTION_MARKERS = ("DATA_LOSS", "OUT_OF_RANGE", "Error decoding", "Data corruption detected")


def _chain(error: BaseException) -> Iterator[BaseException]:
    """`error` and every error it was raised from, including the members of exception groups."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        e = pending.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        pending += [c for c in (e.__cause__, e.__context__) if c is not None]
        pending += list(getattr(e, "exceptions", ()))  # an ExceptionGroup of a task group's failures


def is_corruption(error: BaseException) -> bool:
    """Whether `error`, or an error it was raised from, proves the checkpoint's bytes are damaged."""
    return any(
        isinstance(e, ChecksumMismatchError)
        or (isinstance(e, ValueError) and any(marker in str(e) for marker in _CORRUPTION_MARKERS))
        for e in _chain(error)
    )


class Checkpointer:
    """Save and restore the train state under `directory`, one subdirectory per step."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig, read_only: bool = False):
        """`read_only`: only read (for `jaxscale generate`, which may run beside the training run that
        writes here): no directory is created, and no half-written save is removed or written."""
        self.directory = run_path(directory)  # a local directory or a bucket URL
        self.allow_fresh_start = cfg.allow_fresh_start
        self.async_save = cfg.async_save
        if not read_only:
            self.directory.mkdir(parents=True, exist_ok=True)
            for partial in sorted(self.directory.glob(f"*{TMP_MARKER}*")):
                log.warning("checkpoint %s was not fully written (the run stopped mid-save); ignoring it", partial)
                if jax.process_index() == 0:
                    partial.rmtree(missing_ok=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else cfg.keep,
            keep_period=None if read_only else cfg.keep_every or None,
            enable_async_checkpointing=cfg.async_save,
            create=not read_only,
            read_only=read_only,
        )
        if jax.process_count() == 1:
            # One process holds every replica of every array, so Orbax's replica-parallel save would
            # only slice arrays (a third of the time an async save blocks, measured on 8 CPU devices)
            # for writers that do not exist. The handler is global to Orbax, as is this process.
            ocp.type_handlers.register_type_handler(
                jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True
            )
        self._writing: int | None = None  # the step of the newest save, for error messages
        # Async saves reach Orbax through one thread, in order: Orbax's own set-up of a save (threads,
        # event loops, write specs) costs tens of milliseconds the loop does not wait for. The lock keeps
        # the loop's own calls to the manager out of a save being started.
        self._saver = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="jaxscale_save")
        self._starting: concurrent.futures.Future | None = None
        self._lock = threading.Lock()
        device = jax.local_devices()[0]
        self._host_memory = _HOST in {m.kind for m in device.addressable_memories()}
        self._on_cpu = device.platform == "cpu"
        # Explicit handlers make item_metadata available, which restore onto a new mesh relies on.
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": _FingerprintedMetaHandler()},
        )

    def steps(self) -> list[int]:
        """Committed steps, oldest first."""
        with self._lock:
            return sorted(self.manager.all_steps())

    def save(self, step: int, state: nnx.State, meta: dict[str, Any], wait: bool = False) -> None:
        """Start saving `state` at `step`; with `wait`, return once it is committed.

        An async save only dispatches, and returns at once: copies of the arrays into host memory
        (a DMA on accelerators; buffers the next step cannot donate) and the state's checksums and
        finite check on the devices. A worker thread hands them to Orbax (with several processes the
        loop's own thread does), which writes in the background and commits the step only if every
        array is finite. Raises NonFiniteStateError (the step is never committed) if this save's state
        (with `wait`) or an earlier one's held NaN or Inf, and CheckpointWriteError if this or an
        earlier async save failed to write.
        """
        arrays = nnx.to_pure_dict(state)
        self._writing = step
        try:
            self._await_start()  # one save at a time in host memory; an earlier failure raises here
            # With several processes Orbax starts a save with a cross-process gather (a JAX computation),
            # which must run in the loop's thread, in the same order as every other process's collectives.
            if self.async_save and self._host_memory and not wait and jax.process_count() == 1:
                on_host = jax.device_put(arrays, jax.tree.map(lambda x: x.sharding.with_memory_kind(_HOST), arrays))
                # XLA:CPU runs a program without loops inline in the calling thread, so on CPU devices
                # the worker computes the checksums, from the host copy; elsewhere the devices do.
                sums_and_finite = None if self._on_cpu else fingerprint(arrays)
                self._starting = self._saver.submit(self._start, step, on_host, meta, sums_and_finite)
                return
            self._start(step, arrays, meta, fingerprint(arrays))
            if wait:
                self.manager.wait_until_finished()
        except Exception as e:  # Orbax surfaces OS errors of async writes here, wrapped in its own types.
            raise self._write_error(step, e) from None

    def _start(
        self, step: int, arrays: Any, meta: dict[str, Any], sums_and_finite: tuple[Any, jax.Array] | None
    ) -> None:
        """Orbax's save of `arrays` (returns once they are copied to numpy, when saving asynchronously).

        `sums_and_finite`: `fingerprint(arrays)`, or None to compute it here from `arrays` in host memory.
        """
        if sums_and_finite is None:
            on_devices = jax.tree.map(lambda x: x.sharding.with_memory_kind("device"), arrays)
            sums_and_finite = fingerprint(jax.device_put(arrays, on_devices))
        with self._lock:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(arrays), meta=_MetaSave(meta | {"step": step}, *sums_and_finite)
                ),
                force=True,
            )

    def _await_start(self) -> None:
        """Wait until the save handed to the worker thread reached Orbax; raise what it raised."""
        starting, self._starting = self._starting, None
        if starting is not None:
            starting.result()

    def _write_error(self, step: int | None, error: Exception) -> Exception:
        non_finite = next((e for e in _chain(error) if isinstance(e, NonFiniteStateError)), None)
        if non_finite is not None:  # its temporary directory is never committed, and removed at the next start
            return non_finite
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
            args=ocp.args.Composite(state=ocp.args.StandardRestore(nnx.to_pure_dict(abstract)), meta=_MetaRestore()),
        )
        _verify(restored, step)
        state = jax.tree.map(lambda x: x, abstract)
        nnx.replace_by_pure_dict(state, restored["state"])
        return state

    def read_meta(self, step: int) -> dict[str, Any]:
        """The metadata saved with `step` (step, mesh, config, checksums, and what the run added)."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=_MetaRestore()))["meta"]

    def verify(self, step: int) -> bool:
        """Whether `step` reads back (in the shardings it was saved with) and matches its checksums."""
        try:
            _verify(
                self.manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=_MetaRestore())
                ),
                step,
            )
        except Exception:  # any read error or mismatch means "not usable"
            return False
        return True

    def restore_latest(self, abstract: Any) -> tuple[int, nnx.State] | None:
        """The newest step that restores and verifies, setting aside corrupt ones; None if there are no steps.

        Only proven corruption (see `is_corruption`) sets a step aside. Any other error raises
        CheckpointRestoreError naming the step, with every checkpoint left in place. When steps exist
        and all are corrupt: NoUsableCheckpointError, or None under checkpoint.allow_fresh_start.
        """
        set_aside = []
        for step in reversed(self.steps()):
            try:
                self.check_compatible(step, abstract)
                return step, self.restore(step, abstract)
            except UserError:
                raise
            except Exception as e:
                if not is_corruption(e):
                    raise CheckpointRestoreError(
                        f"Restoring checkpoint step {step} under {self.directory} failed ({type(e).__name__}: "
                        f"{_first_line(e)}). It is not proven corrupt, so it and every other checkpoint are kept. "
                        f"Fix the cause (memory: more devices or a mesh that shards the state further; "
                        f"permissions or storage: make the directory readable) and run the same command again."
                    ) from e
                self._set_aside(step)
                set_aside.append(f"step {step} ({_first_line(e)})")
                log.warning(
                    "checkpoint step %d under %s is corrupt (%s); set aside as %d.unreadable-*, "
                    "falling back to the one before",
                    step,
                    self.directory,
                    _first_line(e),
                    step,
                )
        if set_aside and not self.allow_fresh_start:
            raise NoUsableCheckpointError(
                f"No checkpoint under {self.directory} is usable; all were corrupt and are set aside as "
                f"<step>.unreadable-*: {'; '.join(set_aside)}. Restore them from a copy, or set "
                f"checkpoint.allow_fresh_start=true to train again from step 0."
            )
        if set_aside:
            log.warning("every checkpoint was corrupt; checkpoint.allow_fresh_start=true: starting from step 0")
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
            self._await_start()
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._write_error(self._writing, e) from None

    def close(self) -> None:
        """Wait for the last save, then release Orbax's threads."""
        try:
            self.wait()
        finally:
            self._saver.shutdown()
            self.manager.close()


def _first_line(error: BaseException) -> str:
    """The head of an error's message: tensorstore appends kilobytes of JSON spec after the reason."""
    text = str(error).split(" [tensorstore_spec=")[0].splitlines()
    return text[0][:400] if text else type(error).__name__
