"""Preemption: SIGTERM (or, on one process, SIGINT) makes the loop finish its step, save and exit.

The process then exits with code 75 (jaxscale.errors); restarting the same command resumes. The watcher is
armed for the whole run, so a notice while restoring, compiling or closing (waiting for the last save
to commit) ends the run as well, never with the default handler's exit 143 and a save lost.

On one process a Python signal handler sets a flag. On many processes JAX's preemption
sync service (started by jax.distributed) catches SIGTERM on any host and agrees on one
step at which every host sees `should_stop(step)` become true, so all save the same step.
"""

from __future__ import annotations

import signal
from types import FrameType

import jax
from jax.experimental import multihost_utils


class PreemptionWatcher:
    """Watches for a preemption notice while training; use as a context manager around the loop."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.multi_process = jax.process_count() > 1
        self.signal_received: int | None = None
        self.stopped_at: int | None = None  # the step the run stopped at for a notice
        self._previous: dict[int, object] = {}

    def __enter__(self) -> PreemptionWatcher:
        # Many processes: SIGTERM belongs to JAX's sync service, which every host must consult.
        if self.enabled and not self.multi_process:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.signal_received = signum

    def should_stop(self, step: int) -> bool:
        """True once every process should save at `step` and exit. Call on every step, on every process."""
        if not self.enabled:
            return False
        stop = multihost_utils.reached_preemption_sync_point(step) if self.multi_process else self.note(step)
        if stop:
            self.stopped_at = step
        return stop

    def note(self, step: int) -> bool:
        """Outside the loop: whether a notice has come, recording `step` as where the run stopped. With many
        processes JAX's sync service holds the notice until the loop's next `should_stop`, where all agree on a step."""
        if not self.enabled or self.multi_process or self.signal_received is None:
            return False
        if self.stopped_at is None:
            self.stopped_at = step
        return True
