"""A jax.profiler trace of a window of training steps, and nothing outside it.

The window is `log.profile_steps=START:END` (steps START..END-1, counted from 0). Before step START
is dispatched the loop waits for the step before it, so no earlier work runs inside the trace; after
step END-1 is dispatched it waits for that step, then stops the trace. Each step in the window is
annotated as `train` with its number (a `jax.profiler.StepTraceAnnotation`), which TensorBoard's
profile plugin and Perfetto show as steps. Outside the window the profiler is never started, so it
costs nothing. A trace meant for a bucket is written locally and copied up when it stops (see
jaxscale.storage.written_locally).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import jax
from etils import epath

from jaxscale.storage import written_locally


class StepTrace:
    """Starts and stops a trace around the steps of `window` (None: never traces)."""

    def __init__(self, window: tuple[int, int] | None, directory: epath.Path, announce: bool) -> None:
        self.window = window
        self.directory = directory
        self.announce = announce
        self.active = False
        self._local = contextlib.ExitStack()  # holds the local directory of a trace meant for a bucket

    @contextlib.contextmanager
    def step(self, step: int, wait_for_previous: Callable[[], None]) -> Iterator[None]:
        """Run the dispatch of `step` inside this block: traced and annotated when `step` is in the window."""
        if self.window is None or not self.window[0] <= step < self.window[1]:
            yield
            return
        if not self.active:
            wait_for_previous()
            jax.profiler.start_trace(str(self._local.enter_context(written_locally(self.directory))))
            self.active = True
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            yield

    def after(self, step: int, wait_for_step: Callable[[], None]) -> None:
        """Call once `step` is dispatched: the trace stops after the window's last step has run."""
        if self.active and step == self.window[1] - 1:
            wait_for_step()
            self.close()

    def close(self) -> None:
        """Stop a trace still running (the run ended inside the window)."""
        if self.active:
            jax.profiler.stop_trace()
            self._local.close()
            self.active = False
            if self.announce:
                print(f"jaxscale: profile trace of steps {self.window[0]}..{self.window[1] - 1} in {self.directory}")
