"""Where each step's numbers go: stdout lines, <run.dir>/metrics.jsonl, TensorBoard, W&B, a progress bar.

Only the main process writes them; run.dir may be a bucket (see jaxscale.storage).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from etils import epath
from tqdm import tqdm

from jaxscale.config import LogConfig
from jaxscale.storage import is_remote

# Where the wall time of a step goes. compute: dispatching the step and waiting for its result;
# data_wait: waiting for the input pipeline's rows; transfer: the part of that wait spent copying the
# batch to the devices; checkpoint: the loop blocked by a save; eval: held-out evaluation; other: the rest
# (logging, Python). They add up to the wall time by construction.
COMPONENTS = ("compute", "data_wait", "transfer", "checkpoint", "eval", "other")


class IntervalMeter:
    """Sums per-step figures over one logging interval and turns them into rates and a time breakdown."""

    def __init__(self, flops_per_token: float, num_devices: int, peak_flops: float | None):
        self.flops_per_token = flops_per_token
        self.num_devices = num_devices
        self.peak_flops = peak_flops
        self.reset()

    def reset(self) -> None:
        self.started = time.perf_counter()
        self.steps = 0
        self.tokens = 0.0
        self.step_time = 0.0
        self.data_wait = 0.0
        self.spent = dict.fromkeys(COMPONENTS[:-1], 0.0)

    def add(self, tokens: float, step_time_s: float, data_wait_s: float) -> None:
        self.steps += 1
        self.tokens += tokens
        self.step_time += step_time_s
        self.data_wait += data_wait_s

    def spend(self, component: str, seconds: float) -> None:
        """Count `seconds` of the interval's wall time as `component` (one of COMPONENTS but `other`)."""
        self.spent[component] += seconds

    def summary(self) -> dict[str, float | None]:
        """Per-step means and throughput over the interval; mfu is None where the device's peak is unknown.

        `time_<component>_s` are per-step means of the breakdown; with `time_other_s` they sum to the
        interval's wall time per step.
        """
        steps = max(self.steps, 1)
        seconds = max(self.step_time, 1e-9)
        tokens_per_sec = self.tokens / seconds
        tflops = tokens_per_sec * self.flops_per_token / self.num_devices / 1e12
        wall = time.perf_counter() - self.started
        breakdown = {f"time_{k}_s": v / steps for k, v in self.spent.items()}
        breakdown["time_other_s"] = max(wall - sum(self.spent.values()), 0.0) / steps
        return {
            "tokens_per_sec": tokens_per_sec,
            "step_time_s": self.step_time / steps,
            "data_wait_s": self.data_wait / steps,
            "tflops_per_device": tflops,
            "mfu": tflops * 1e12 / self.peak_flops if self.peak_flops else None,
            "interval_steps": self.steps,
            "wall_s": wall,
        } | breakdown


class RowSink(Protocol):
    """A destination of the logged rows beside metrics.jsonl and TensorBoard."""

    def write(self, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class MetricsWriter:
    """Writes rows, and hands them to the callbacks, on the main process only; elsewhere it does nothing."""

    def __init__(
        self,
        run_dir: epath.Path,
        total_steps: int,
        start_step: int,
        enabled: bool,
        cfg: LogConfig,
        callbacks: Sequence[Callable[[dict[str, Any]], None]] = (),
        sinks: Sequence[RowSink] = (),
    ):
        self.enabled = enabled
        self.callbacks = list(callbacks)
        self.sinks = list(sinks)  # further destinations of every row, closed with the writer (W&B)
        self.jsonl = _open_rows(run_dir / "metrics.jsonl") if enabled else None
        self.tb = None
        if enabled and cfg.tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        self.bar = (
            tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
            if (enabled and cfg.progress)
            else None
        )

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def write(self, row: dict[str, Any]) -> None:
        """Hand a row (it must hold `step`) to the callbacks, append it to metrics.jsonl and TensorBoard, print it."""
        if not self.enabled:
            return
        for callback in self.callbacks:
            callback(dict(row))
        for sink in self.sinks:
            sink.write(row)
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        step = row["step"]
        if self.tb is not None:
            for key, value in row.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key, value, step)
        # Unknown figures (None: MFU on a device of unknown peak) stay in the file, not on the line.
        line = " ".join(f"{k}={_short(v)}" for k, v in row.items() if v is not None and k not in _FILE_ONLY)
        (self.bar.write if self.bar is not None else print)(line)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _open_rows(path: epath.Path) -> Any:
    """`path` for appending rows; a last row cut short by a killed process is ended first, so the next one
    starts on a line of its own."""
    if is_remote(path):
        return ObjectRows(path)
    path = Path(path)
    cut_short = path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
    rows = path.open("a")
    if cut_short:
        rows.write("\n")
    return rows


class ObjectRows:
    """Rows appended to an object in a bucket, which cannot be appended to: the object is written again whole.

    It is written at most every `upload_every_s` seconds (a kill loses at most that much of the log,
    where a local file loses nothing) and when closed. The rows of earlier attempts are read first
    and kept, as appending to a local file keeps them.
    """

    def __init__(self, path: epath.Path, upload_every_s: float = 30.0) -> None:
        self.path = path
        self.upload_every_s = upload_every_s
        earlier = path.read_text() if path.exists() else ""
        self.parts = [earlier + "\n"] if earlier and not earlier.endswith("\n") else [earlier]
        self.uploaded_at: float | None = None

    def write(self, text: str) -> None:
        self.parts.append(text)

    def flush(self) -> None:
        if self.uploaded_at is None or time.monotonic() - self.uploaded_at >= self.upload_every_s:
            self._upload()

    def close(self) -> None:
        self._upload()

    def _upload(self) -> None:
        self.parts = ["".join(self.parts)]
        self.path.write_text(self.parts[0])
        self.uploaded_at = time.monotonic()


# Too detailed for the line a person reads; kept in metrics.jsonl and TensorBoard.
_FILE_ONLY = {
    "time",
    "wall_s",
    "interval_steps",
    "memory_source",
    "batch_fingerprint",
    *(f"time_{k}_s" for k in COMPONENTS),
}


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
