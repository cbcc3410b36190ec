"""Orbax checkpoints that survive faults: atomic async saves, verified restores, any mesh.

A checkpoint holds two items: `state` (every array of the model and optimizer, sharded,
written by Orbax's tensorstore handler) and `meta` (JSON: step, mesh, config, and an exact
checksum of every array). Nothing is ever unpickled.

The data position needs no state of its own: the batch of step s is a pure function of
(seed, s, data config), so the step number is the whole data position.

Faults handled here:
- a save killed mid-write leaves an Orbax temporary directory that is never listed as a step;
  it is reported by name and removed on the next start of a training run;
- a step whose arrays are proven corrupt (checksum mismatch, truncated or undecodable file) is
  set aside as `<step>.unreadable-<time>` (with the reason written inside) by the training run, and
  the restore falls back to the previous step; read-only openers (export, generate) only report it.
  With several processes, each reads its own shards: they exchange verdicts and set a step aside
  only together, with no barrier that a failed process would never reach;
- storage that fails for now (unavailable, a timeout, a 5xx) raises TransientError (exit 69, which
  `jaxscale supervise` retries); any other restore error (out of memory, no permission) stops the
  run and leaves every checkpoint in place;
- checksums are taken of the values as stored, before any cast, so a run that changed a dtype
  (model.param_dtype) restores, cast, instead of calling good checkpoints corrupt;
- a checkpoint of another model is refused before any compute, listing the mismatched arrays;
- a state with NaN or Inf is never committed (its checksums and finite check run in the background write).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from orbax.checkpoint import multihost

from jaxscale.config import CheckpointConfig
from jaxscale.errors import TransientError, UserError
from jaxscale.storage import error_chain, is_transient, run_path

log = logging.getLogger("jaxscale.checkpoint")
TMP_MARKER = ".orbax-checkpoint-tmp"
SET_ASIDE_MARKER = ".unreadable-"  # `<step>.unreadable-<unix time>`: a step set aside as corrupt
SET_ASIDE_REASON = "jaxscale_set_aside.json"  # written inside a set-aside step: why, and when
META_FILE = "metadata"  # the meta item's JSON file (Orbax's JsonCheckpointHandler's name)
_HOST = "pinned_host"  # the memory kind async saves copy the state into (a DMA from accelerators)
_CASTABLE = ("float32", "bfloat16", "float16", "float64")  # stored dtypes a restore may cast between


class CheckpointWriteError(UserError):
    """A save failed (full disk, no permission): earlier checkpoints are untouched."""


class NonFiniteStateError(Exception):
    """The state to save holds NaN or Inf; it is not written."""


class CorruptCheckpointError(Exception):
    """A step's bytes are proven damaged (a checksum mismatch, a truncated or undecodable file)."""


class ChecksumMismatchError(CorruptCheckpointError):
    """A restored array differs from the checksum saved beside it: the checkpoint is corrupt."""


class CheckpointRestoreError(UserError):
    """Reading a checkpoint failed for a reason other than proven corruption; every checkpoint is kept."""


class CheckpointUnavailableError(TransientError):
    """Reading a checkpoint failed because its storage is unavailable for now; every checkpoint is kept."""


class NoUsableCheckpointError(UserError):
    """The run directory holds steps (committed, set aside or half-written) and none of them is usable."""


# Written into each checkpoint's metadata: a checkpoint summed another way is not compared.
CHECKSUM_ALGORITHM = "fmix32(bits ^ fmix32(index_lo + golden) ^ fmix32(index_hi)) summed mod 2**32, 64-bit index"
# The algorithm before the index was 64-bit: the same sums for arrays of at most 2**32 words.
_CHECKSUM_ALGORITHM_32 = "fmix32(bits ^ fmix32(index + golden)) summed mod 2**32"
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


def _mul_wide(a: jax.Array, b: int) -> tuple[jax.Array, jax.Array]:
    """The 64-bit product of uint32 `a` and a constant `b` < 2**32, as (high, low) uint32 words.

    Four 16 x 16-bit products, each exact in uint32, then their carries: JAX without x64 has no
    uint64, and a position past 2**32 must not wrap onto another.
    """
    a0, a1 = a & jnp.uint32(0xFFFF), a >> 16
    b0, b1 = jnp.uint32(b & 0xFFFF), jnp.uint32(b >> 16)
    p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
    middle = p01 + p10
    middle_carry = (middle < p01).astype(jnp.uint32)
    low = p00 + (middle << 16)
    low_carry = (low < p00).astype(jnp.uint32)
    return p11 + (middle >> 16) + (middle_carry << 16) + low_carry, low


def linear_index_words(coords: list[jax.Array], shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array | None]:
    """The row-major index of each element at `coords` (one uint32 array per axis of `shape`) as (low, high)
    uint32 words, exact below 2**64; high is None when every index fits 32 bits (the common case, no extra work)."""
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    if math.prod(shape) <= 2**32:
        return sum((c * jnp.uint32(s) for c, s in zip(coords, strides, strict=True)), jnp.uint32(0)), None
    low = high = jnp.uint32(0)
    for c, stride in zip(coords, strides, strict=True):
        product_high, product_low = _mul_wide(c, stride % 2**32)
        product_high = product_high + c * jnp.uint32(stride >> 32)  # only its low word reaches the index mod 2**64
        total = low + product_low
        high = high + product_high + (total < low).astype(jnp.uint32)
        low = total
    return low, high


def checksum(x: jax.Array) -> jax.Array:
    """sum over elements i of fmix32(bits_i ^ fmix32(lo(i) + golden) ^ fmix32(hi(i))) mod 2**32, i the global
    row-major index (64-bit: lo, hi its words; fmix32(0) = 0, so below 2**32 this is the older 32-bit sum).

    Each term depends on the element's value and its position, so a flipped bit or two swapped
    elements (or shards restored in each other's place) change the sum. Unsigned addition mod 2**32
    is associative and commutative, so the sum is identical whatever the mesh and reduction order.
    """
    words = _words(x)
    coords = [jax.lax.broadcasted_iota(jnp.uint32, words.shape, d) for d in range(words.ndim)]
    low, high = linear_index_words(coords, words.shape)
    position = _fmix32(low + jnp.uint32(_GOLDEN))
    if high is not None:
        position = position ^ _fmix32(high)
    return jnp.sum(_fmix32(words ^ position), dtype=jnp.uint32)


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
    """Orbax's manager pairs a handler with its restore arguments too; jaxscale reads the JSON itself (`read_meta`)."""


def _stored(step_metadata: Any) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Name -> (shape, dtype) of every array of a step, from Orbax's metadata of its state item."""
    return {
        _name(path): (tuple(m.shape), np.dtype(m.dtype))
        for path, m in jax.tree_util.tree_leaves_with_path(step_metadata.tree)
    }


def _verify(arrays: Any, meta: dict[str, Any], step: int) -> None:
    """ChecksumMismatchError unless `arrays` (as stored: before any cast) match the checksums saved beside them."""
    algorithm = meta.get("checksum_algorithm")
    if algorithm not in (CHECKSUM_ALGORITHM, _CHECKSUM_ALGORITHM_32):
        log.warning(
            "checkpoint step %d was summed another way (an older jaxscale); its checksums are not compared", step
        )
        return
    words = {_name(p): x.size * max(1, x.dtype.itemsize // 4) for p, x in jax.tree_util.tree_leaves_with_path(arrays)}
    # Sums of the 32-bit index agree with ours below 2**32 words; above it they aliased, and are not compared.
    compared = {k for k, n in words.items() if algorithm == CHECKSUM_ALGORITHM or n <= 2**32}
    sums, _ = fingerprint(arrays)
    expected = meta.get("checksums", {})
    bad = [k for k, v in checksums_json(sums).items() if k in compared and expected.get(k) != v]
    if bad:
        raise ChecksumMismatchError(f"step {step}: checksum mismatch in {len(bad)} array(s), first {bad[0]}")


# Tensorstore reports its errors as ValueError("CODE: ..."), CODE an absl status. These name damaged
# bytes: data loss, a file shorter than its index says, bytes a codec or the b-tree cannot decode
# (zstd says e.g. "FAILED_PRECONDITION: ... ZSTD_decompressStream() failed: Unknown frame descriptor").
_CORRUPTION_MARKERS = ("DATA_LOSS", "OUT_OF_RANGE", "Error decoding", "Data corruption detected", "decompress")


def _names_damage(error: BaseException) -> bool:
    return isinstance(error, ValueError) and any(marker in str(error) for marker in _CORRUPTION_MARKERS)


def is_corruption(error: BaseException) -> bool:
    """Whether `error`, or an error it was raised from, proves the checkpoint's bytes are damaged."""
    return any(
        isinstance(e, CorruptCheckpointError | json.JSONDecodeError) or _names_damage(e) for e in error_chain(error)
    )


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What reading a step found: `ok`; `corrupt` (proven damaged); `transient` (its storage is unavailable for now);
    `unreadable` (another error, not proof of damage: no permission, out of memory); `reason` says why when not ok."""

    status: str
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _proof(error: BaseException) -> BaseException:
    """The error in `error`'s chain that names the damage (tensorstore's, under Orbax's "error while reading")."""
    return next((e for e in error_chain(error) if _names_damage(e)), error)


def _verdict_of(error: BaseException | None) -> Verdict:
    if error is None:
        return Verdict("ok")
    if is_corruption(error):
        return Verdict("corrupt", first_line(_proof(error)))
    kind = "transient" if is_transient(error) else "unreadable"
    return Verdict(kind, f"{type(error).__name__}: {first_line(error)}")


def _agreed(local: Verdict) -> Verdict:
    """Every process's verdict on the same read, combined the same way on each (a collective every process calls,
    whatever its own read did): proven corruption on any process is corruption, unless some process failed for
    another reason, which keeps the step; a process's reason is named with its index."""
    if jax.process_count() == 1:
        return local
    statuses = ("ok", "corrupt", "transient", "unreadable")
    text = np.frombuffer(local.reason.encode()[:400].ljust(400, b" "), np.uint8)
    gathered = multihost_utils.process_allgather(np.concatenate([[statuses.index(local.status)], text]))
    verdicts = [
        Verdict(statuses[int(row[0])], bytes(row[1:].astype(np.uint8)).decode(errors="replace").strip())
        for row in np.asarray(gathered)
    ]
    for status in ("unreadable", "transient", "corrupt"):
        found = [(i, v.reason) for i, v in enumerate(verdicts) if v.status == status]
        if found:
            return Verdict(status, "; ".join(f"process {i}: {reason}" for i, reason in found))
    return Verdict("ok")


def step_directories(directory: epath.Path) -> list[str]:
    """The name of every step directory under `directory` (a run's checkpoints/), committed (`20`), set aside as
    corrupt (`20.unreadable-*`) or half-written (`20.orbax-checkpoint-tmp-*`), by step; read without Orbax."""
    if not directory.is_dir():
        return []
    names = [p.name for p in directory.iterdir() if p.is_dir() and p.name.split(".")[0].isdigit()]
    return sorted(names, key=lambda name: (int(name.split(".")[0]), name))


class Checkpointer:
    """Save and restore the train state under `directory`, one subdirectory per step."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig, read_only: bool = False):
        """`read_only`: only read (export, generate, any opener but the training run, which may be writing here
        at the same time): no directory is created, nothing is saved, renamed or removed."""
        self.directory = run_path(directory)  # a local directory or a bucket URL
        self.read_only = read_only
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
        # Restores call this handler directly (see `_read`); saves go through the manager.
        self.state_handler = ocp.StandardCheckpointHandler()
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
        non_finite = next((e for e in error_chain(error) if isinstance(e, NonFiniteStateError)), None)
        if non_finite is not None:  # its temporary directory is never committed, and removed at the next start
            return non_finite
        previous = [s for s in self.steps() if s != step]
        last = f"step {previous[-1]}" if previous else "none"
        if is_transient(error):
            return TransientError(
                f"Saving a checkpoint (step {step}) under {self.directory} failed for now ({type(error).__name__}: "
                f"{first_line(error)}): its storage is unavailable. The last complete checkpoint is {last}; run the "
                f"same command again to resume from it (jaxscale supervise does, backing off)."
            )
        return CheckpointWriteError(
            f"Saving a checkpoint (step {step}) under {self.directory} failed "
            f"({type(error).__name__}: {error}). The last complete checkpoint is "
            f"{last}; free disk space or fix the directory's "
            f"permissions, then restart to resume from it."
        )

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def stored_arrays(self, step: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Name -> (shape, dtype) of every array saved at `step`; CorruptCheckpointError if its metadata is damaged."""
        try:
            return _stored(self.state_handler.metadata(self.step_dir(step) / "state"))
        except Exception as e:
            if is_corruption(e):
                raise CorruptCheckpointError(f"step {step}: its array metadata is damaged ({first_line(e)})") from e
            raise

    def check_compatible(self, step: int, abstract: Any) -> list[str]:
        """The dtype changes between checkpoint `step` and `abstract` (`name: float32 -> bfloat16`, cast on restore);
        UserError listing every array whose name or shape differs, or whose dtype cannot be cast (not a float)."""
        saved = self.stored_arrays(step)
        wanted = {_name(p): (tuple(x.shape), np.dtype(x.dtype)) for p, x in _leaves(abstract)}
        problems = [
            f"{k}: checkpoint has {saved[k][0]}, model wants {wanted[k][0]}"
            for k in sorted(saved.keys() & wanted.keys())
            if saved[k][0] != wanted[k][0]
        ]
        casts = [
            (k, saved[k][1], wanted[k][1]) for k in sorted(saved.keys() & wanted.keys()) if saved[k][1] != wanted[k][1]
        ]
        problems += [
            f"{k}: checkpoint has {a}, model wants {b} (only float dtypes are cast)"
            for k, a, b in casts
            if not {a.name, b.name} <= set(_CASTABLE)
        ]
        problems += [f"{k}: only in the checkpoint" for k in sorted(saved.keys() - wanted.keys())]
        problems += [f"{k}: missing from the checkpoint" for k in sorted(wanted.keys() - saved.keys())]
        if problems:
            shown = "; ".join(problems[:12]) + (f"; and {len(problems) - 12} more" if len(problems) > 12 else "")
            raise UserError(
                f"The checkpoint at {self.step_dir(step)} was written by a different model: {shown}. "
                f"Use the model config it was trained with (see `jaxscale checkpoints {self.directory.parent}`), "
                f"or point run.dir at a new directory to start fresh."
            )
        return [f"{k}: {a.name} -> {b.name}" for k, a, b in casts]

    def restore(self, step: int, abstract: Any) -> nnx.State:
        """Load `step` into the shardings carried by `abstract` (ShapeDtypeStructs) and verify its checksums.

        The arrays are read in the dtypes they were saved in and verified as stored; only then are they cast
        to `abstract`'s dtypes. Raises CorruptCheckpointError (proven damage, agreed by every process),
        CheckpointUnavailableError (storage failing for now) or CheckpointRestoreError (anything else).
        """
        self.check_compatible(step, abstract)
        stored = self.stored_arrays(step)
        wanted = nnx.to_pure_dict(abstract)
        read_as = jax.tree_util.tree_map_with_path(
            lambda p, x: jax.ShapeDtypeStruct(x.shape, stored[_name(p)][1], sharding=x.sharding), wanted
        )
        arrays = self._read(step, read_as)
        cast = jax.tree.map(lambda x, want: x if x.dtype == want.dtype else x.astype(want.dtype), arrays, wanted)
        state = jax.tree.map(lambda x: x, abstract)
        nnx.replace_by_pure_dict(state, cast)
        return state

    def _read(self, step: int, read_as: Any) -> Any:
        """The arrays of `step` as `read_as` says, verified. Orbax's handler is called directly, not through its
        manager: the manager waits at a barrier after reading, which a process whose read failed never reaches."""
        arrays = error = None
        try:
            arrays = self.state_handler.restore(self.step_dir(step) / "state", args=ocp.args.StandardRestore(read_as))
            meta = self.read_meta(step)
        except Exception as e:  # Orbax and tensorstore raise their own types; the verdict sorts them
            error = e
        verdict = _agreed(_verdict_of(error))
        if verdict.status == "corrupt":
            raise CorruptCheckpointError(f"step {step}: {verdict.reason}") from error
        if verdict.status == "transient":
            raise CheckpointUnavailableError(
                f"Reading checkpoint step {step} under {self.directory} failed for now ({verdict.reason}). Its storage "
                f"is unavailable; every checkpoint is kept. Run the same command again (jaxscale supervise does, "
                f"backing off)."
            ) from error
        if verdict.status == "unreadable":
            raise CheckpointRestoreError(
                f"Restoring checkpoint step {step} under {self.directory} failed ({verdict.reason}). It is not proven "
                f"corrupt, so it and every other checkpoint are kept. Fix the cause (memory: more devices or a mesh "
                f"that shards the state further; permissions or storage: make the directory readable) and run the "
                f"same command again."
            ) from error
        _verify(arrays, meta, step)  # every process computes the same global sums: the verdict is shared
        return arrays

    def read_meta(self, step: int) -> dict[str, Any]:
        """The metadata saved with `step` (step, mesh, config, checksums, and what the run added)."""
        return json.loads((self.step_dir(step) / "meta" / META_FILE).read_text())

    def verify(self, step: int) -> Verdict:
        """Whether `step` reads back and matches its checksums, read as stored onto this host's devices (each array
        split over them along its first axis that divides, so no device holds a whole model)."""
        try:
            stored = self.stored_arrays(step)
            mesh = jax.sharding.Mesh(np.array(jax.devices()), ("all",))

            def struct(path: tuple, m: Any) -> jax.ShapeDtypeStruct:
                shape, dtype = stored[_name(path)]
                axis = next((d for d, n in enumerate(shape) if n % mesh.size == 0), None)
                spec = PartitionSpec(*[("all" if d == axis else None) for d in range(len(shape))])
                return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

            metadata = self.state_handler.metadata(self.step_dir(step) / "state").tree
            self._read(step, jax.tree_util.tree_map_with_path(struct, metadata))
        except (CorruptCheckpointError, CheckpointUnavailableError, CheckpointRestoreError) as e:
            status = {CheckpointUnavailableError: "unreadable", CheckpointRestoreError: "unreadable"}.get(
                type(e), "corrupt"
            )
            return Verdict(status, first_line(e))
        except Exception as e:  # metadata that cannot be read: damaged, or storage not answering
            return _verdict_of(e) if is_corruption(e) else Verdict("unreadable", f"{type(e).__name__}: {first_line(e)}")
        return Verdict("ok")

    def set_aside_steps(self) -> list[tuple[str, str]]:
        """(directory name, reason) of every step set aside as corrupt, oldest step first."""
        found = []
        for path in self.directory.glob(f"*{SET_ASIDE_MARKER}*"):
            note = path / SET_ASIDE_REASON
            try:
                reason = json.loads(note.read_text())["reason"]
            except (OSError, ValueError, KeyError):
                reason = "set aside as corrupt; no reason recorded"
            found.append((path.name, reason))
        return sorted(found, key=lambda item: (int(item[0].split(".")[0]), item[0]))

    def partial_steps(self) -> list[str]:
        """Names of the saves that never committed (a run stopped mid-write)."""
        return sorted(p.name for p in self.directory.glob(f"*{TMP_MARKER}*"))

    def restore_latest(self, abstract: Any) -> tuple[int, nnx.State] | None:
        """The newest step that restores and verifies, falling back past corrupt ones; None if there are no steps.

        A training run sets each corrupt step aside (`<step>.unreadable-*`, its reason inside); a read-only
        Checkpointer leaves it where it is and only warns. Other errors raise (CheckpointRestoreError,
        CheckpointUnavailableError) with every checkpoint left in place. When the directory holds steps, or steps
        set aside before, and none is usable: NoUsableCheckpointError listing each and why, or None under
        checkpoint.allow_fresh_start (never for a read-only opener).
        """
        corrupt = []
        for step in reversed(self.steps()):
            try:
                return step, self.restore(step, abstract)
            except CorruptCheckpointError as e:
                reason = first_line(e)
                corrupt.append(f"step {step} ({reason})")
                if self.read_only:
                    log.warning(
                        "checkpoint step %d under %s is corrupt (%s); left in place (read-only), trying the one before",
                        step,
                        self.directory,
                        reason,
                    )
                else:
                    self._set_aside(step, reason)
                    log.warning(
                        "checkpoint step %d under %s is corrupt (%s); set aside as %d%s*, falling back to the "
                        "one before",
                        step,
                        self.directory,
                        reason,
                        step,
                        SET_ASIDE_MARKER,
                    )
        earlier = [
            f"{name} (set aside earlier: {reason})"
            for name, reason in self.set_aside_steps()
            if not any(name.startswith(f"{entry.split()[1]}{SET_ASIDE_MARKER}") for entry in corrupt)
        ]
        unusable = corrupt + earlier
        if not unusable:
            return None
        if self.read_only or not self.allow_fresh_start:
            fix = (
                "Restore them from a copy, or set checkpoint.allow_fresh_start=true to train again from step 0 "
                "(the set-aside steps stay where they are)."
                if not self.read_only
                else "Restore them from a copy; nothing was renamed or deleted."
            )
            raise NoUsableCheckpointError(
                f"No checkpoint under {self.directory} is usable: {'; '.join(unusable)}. {fix}"
            )
        log.warning(
            "no checkpoint is usable (%s); checkpoint.allow_fresh_start=true: starting from step 0", "; ".join(unusable)
        )
        return None

    def _set_aside(self, step: int, reason: str) -> None:
        """Rename a corrupt step to `<step>.unreadable-<time>`, its reason inside, so the resumed run can save that
        step anew. Every process calls this (the verdict was agreed); one renames."""
        if jax.process_index() == 0:
            bad = self.step_dir(step)
            aside = bad.with_name(f"{step}{SET_ASIDE_MARKER}{int(time.time())}")
            bad.rename(aside)
            (aside / SET_ASIDE_REASON).write_text(json.dumps({"step": step, "reason": reason, "time": time.time()}))
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


def _leaves(tree: Any) -> list[tuple[tuple, Any]]:
    return jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree)


def first_line(error: BaseException) -> str:
    """The head of an error's message: tensorstore appends kilobytes of JSON spec after the reason."""
    text = str(error).split(" [tensorstore_spec=")[0].splitlines()
    return text[0][:400] if text else type(error).__name__
