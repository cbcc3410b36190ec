"""Host rows -> global `jax.Array` batches, prepared ahead of the training step by a background thread.

Each process reads only the rows that its own devices hold, so data loading cost does not grow with the
number of hosts, and the global batch is identical whatever the host count (rows are a pure function of step).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import jax
import numpy as np

# inputs, targets: int32 [global_batch, seq_len]; loss_mask: float32 [global_batch, seq_len]; with
# document-aware packing also segment_ids and positions, int32 [global_batch, seq_len].
Batch = dict[str, jax.Array]


class StepRows(Protocol):
    """Rows of the batch of any step (jaxscale.data.ExampleBatches and what wraps it)."""

    seq_len: int
    global_batch: int

    def rows(self, step: int, row_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Rows `row_ids` of the batch of `step`, [n, seq_len] per array."""
        ...

    def describe(self) -> dict[str, int]:
        """Figures about the data worth a line in the run's log (e.g. examples truncated)."""
        ...

    def tokens_by_source(self, step: int) -> dict[str, int]:
        """Tokens the batch of `step` takes from each source of a mixture; empty for one source."""
        ...


def process_row_ids(sharding: jax.sharding.Sharding, global_shape: tuple[int, int]) -> np.ndarray:
    """Sorted global row ids [n_local_rows] held by this process's devices under `sharding`."""
    all_rows = np.arange(global_shape[0])
    per_device = [all_rows[index[0]] for index in sharding.addressable_devices_indices_map(global_shape).values()]
    return np.unique(np.concatenate(per_device))


def to_global_batch(
    host_rows: dict[str, np.ndarray],
    row_ids: np.ndarray,
    sharding: jax.sharding.Sharding,
    global_shape: tuple[int, int],
) -> Batch:
    """Global arrays [global_batch, seq_len] from this process's rows (`host_rows[k][i]` is global row `row_ids[i]`).

    make_array_from_callback asks for each addressable device's slice by its global index, so any sharding
    works: batch split over several mesh axes, replicated over model axes, or split along the sequence too.
    make_array_from_process_local_data would instead need this process's rows to form one block laid out in
    the order JAX expects, which is not true of every mesh.
    """

    def assemble(values: np.ndarray) -> jax.Array:
        def device_slice(index: tuple[slice, ...]) -> np.ndarray:
            rows = np.searchsorted(row_ids, np.arange(global_shape[0])[index[0]])
            return values[rows][:, index[1]]

        return jax.make_array_from_callback(global_shape, sharding, device_slice)

    return {name: assemble(values) for name, values in host_rows.items()}


def eval_batches(batches: StepRows, sharding: jax.sharding.Sharding, num_batches: int) -> list[Batch]:
    """A fixed held-out set: the global batches of steps 0..num_batches-1 of `batches` (the eval split)."""
    shape = (batches.global_batch, batches.seq_len)
    row_ids = process_row_ids(sharding, shape)
    return [to_global_batch(batches.rows(step, row_ids), row_ids, sharding, shape) for step in range(num_batches)]


@dataclass
class _Failure:
    error: BaseException


@dataclass(frozen=True)
class _Prepared:
    step: int
    batch: Batch
    transfer_s: float  # placing this process's rows on the devices


class GlobalBatchLoader:
    """Yields `(step, batch)` for step = start_step, start_step + 1, ... forever; batch values [global_batch, seq_len].

    A daemon thread reads this process's rows and places them on devices, keeping up to `prefetch` batches
    ready. It does the host-to-device copy too, so that copy overlaps the running step; the device memory
    this costs (prefetch int32 batches) is small next to activations. An error in the thread is raised by the
    next `next()`. `last_wait_s` is how long the last `next()` waited for data: near 0 when input keeps up;
    `last_transfer_s` how long that batch's host-to-device copy took (in the thread, mostly overlapped).
    """

    def __init__(
        self, batches: StepRows, sharding: jax.sharding.Sharding, start_step: int = 0, prefetch: int = 2
    ) -> None:
        self._batches = batches
        self._sharding = sharding
        self._shape = (batches.global_batch, batches.seq_len)
        self._row_ids = process_row_ids(sharding, self._shape)
        self._queue: queue.Queue[_Prepared | _Failure] = queue.Queue(maxsize=max(prefetch, 1))
        self._stop = threading.Event()
        self._failure: _Failure | None = None
        self.last_wait_s = 0.0
        self.last_transfer_s = 0.0
        self._thread = threading.Thread(target=self._produce, args=(start_step,), name="jaxscale-data", daemon=True)
        self._thread.start()

    def _produce(self, step: int) -> None:
        try:
            while not self._stop.is_set():
                host_rows = self._batches.rows(step, self._row_ids)
                started = time.perf_counter()
                batch = jax.block_until_ready(to_global_batch(host_rows, self._row_ids, self._sharding, self._shape))
                self._put(_Prepared(step, batch, time.perf_counter() - started))
                step += 1
        except BaseException as e:  # handed to the consumer, which re-raises it with its traceback
            self._put(_Failure(e))

    def _put(self, item: _Prepared | _Failure) -> None:
        # A timeout, so that a full queue cannot keep the thread alive after close().
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> GlobalBatchLoader:
        return self

    def __next__(self) -> tuple[int, Batch]:
        if self._failure is not None:
            raise self._failure.error
        if self._stop.is_set():
            raise StopIteration
        start = time.perf_counter()
        item = self._queue.get()
        self.last_wait_s = time.perf_counter() - start
        if isinstance(item, _Failure):
            self._failure = item
            raise item.error
        self.last_transfer_s = item.transfer_s
        return item.step, item.batch

    def close(self) -> None:
        """Stop the thread and drop prepared batches. Safe to call more than once."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join()

    def __enter__(self) -> GlobalBatchLoader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
