"""Elastic restarts: `jaxscale supervise` runs training again after a crash or a preemption.

The supervisor starts `jaxscale train` as child processes and watches them. When an attempt ends
with a crash (any exit but 0, 2, 3 and 4, or death by a signal), a preemption (exit 75, after its
checkpoint is saved), storage unavailable for now (exit 69) or a hang (with train.hang_timeout_s: no
step for that long), it stops every process of the attempt still running, with the processes they
started, and starts the next one, after a backoff that doubles from restart to restart (capped), up
to `max_restarts` times. Exit 2 (a mistake in the config or the run directory), exit 3 (divergence
under train.on_nan=stop, which the same checkpoint and data would repeat) and exit 4 (preempted with
checkpoints off: a restart would begin again at step 0) are final (jaxscale.errors has the table).
The children run with train.elastic=true: each attempt resumes from the newest checkpoint on
whatever devices it finds, with the same global batches, raising train.grad_accum where the layout
needs it (jaxscale.training.layout).

Where the processes of an attempt come from:
- cluster mode (the default): one child on this host. On a pod, run the supervisor where you would
  run `jaxscale train`, on every host; the scheduler decides the world and JAX's cluster detection
  (or runtime.* / JAX_* settings) tells each attempt how many processes it has.
- local mode (`local_processes`): N children on this machine, joined by jax.distributed on a
  loopback port, `devices_per_process` emulated CPU devices each; attempt i runs
  `local_processes[i]` of them (the last entry repeats), to rehearse hosts leaving and returning.

No process outlives the supervisor: the children are stopped when it returns, and on Linux the
kernel kills them if the supervisor itself is killed.
"""

from __future__ import annotations

import ctypes
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from jaxscale.errors import (
    DIVERGED_EXIT_CODE,
    PREEMPTED_EXIT_CODE,
    PREEMPTED_UNSAVED_EXIT_CODE,
    TRANSIENT_EXIT_CODE,
    UserError,
)

FINAL_EXITS = {
    0: "finished",
    2: "a mistake to fix (not retried)",
    DIVERGED_EXIT_CODE: "diverged (not retried: it would again)",
    PREEMPTED_UNSAVED_EXIT_CODE: "preempted with checkpoints off, nothing saved (not retried: it would start over)",
}
_POLL_S = 0.1
_PR_SET_PDEATHSIG = 1
HEARTBEAT_ENV = "JAXSCALE_HEARTBEAT"  # the file a child touches as it makes progress, for the hang watchdog
_HEARTBEAT_EVERY_S = 1.0


@dataclass(frozen=True)
class RestartPolicy:
    """How often and how soon to restart, and how long an attempt's other processes may take to exit."""

    max_restarts: int = 3
    backoff_s: float = 10.0  # before the first restart; doubled for each one after
    max_backoff_s: float = 300.0
    grace_s: float = 60.0  # after one process of an attempt exits, the others' time to follow before SIGKILL
    hang_timeout_s: float = 0.0  # train.hang_timeout_s: a child with no progress for this long is killed; 0: off

    def check(self) -> None:
        """UserError for a setting out of its range."""
        if self.max_restarts < 0:
            raise UserError(f"--max-restarts {self.max_restarts} must be 0 or more (0: never restart).")
        for name, value in (("--backoff-s", self.backoff_s), ("--max-backoff-s", self.max_backoff_s)):
            if not value >= 0:
                raise UserError(f"{name} {value} must be 0 or more seconds.")
        if not self.grace_s > 0:
            raise UserError(f"--grace-s {self.grace_s} must be more than 0 seconds.")

    def backoff(self, restart: int) -> float:
        """Seconds to wait before restart number `restart` (from 1): doubling, capped at max_backoff_s."""
        return min(self.backoff_s * 2.0 ** min(restart - 1, 64), self.max_backoff_s)


def signal_name(number: int) -> str:
    """`SIGKILL` for 9; `signal 40` for a number Python has no name for (the real-time signals)."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def describe_exit(code: int) -> str:
    """A process's exit status in words, with what the supervisor makes of it."""
    if code < 0:
        return f"killed by {signal_name(-code)} (a crash)"
    if code == PREEMPTED_EXIT_CODE:
        return "exit 75 (preempted, checkpoint saved)"
    if code == TRANSIENT_EXIT_CODE:
        return "exit 69 (storage unavailable for now)"
    return f"exit {code} ({FINAL_EXITS.get(code, 'a crash')})"


class Heartbeat:
    """A child's side of the hang watchdog: touches the file $JAXSCALE_HEARTBEAT names (set by the supervisor) as
    the run makes progress, at most once a second; does nothing when the variable is unset."""

    def __init__(self) -> None:
        self.path = os.environ.get(HEARTBEAT_ENV)
        self._last = 0.0

    def beat(self) -> None:
        now = time.monotonic()
        if self.path and now - self._last >= _HEARTBEAT_EVERY_S:
            Path(self.path).touch()
            self._last = now


def train_command(config: str, overrides: Sequence[str]) -> list[str]:
    """`jaxscale train CONFIG` with train.elastic on (an override of the user's own wins) and `overrides`."""
    return [sys.executable, "-m", "jaxscale.cli", "train", config, "train.elastic=true", *overrides]


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_commands(
    config: str, overrides: Sequence[str], processes: Sequence[int], devices_per_process: int
) -> Callable[[int], list[list[str]]]:
    """The commands of attempt i in local mode: `processes[i]` (the last repeats) processes joined on 127.0.0.1."""

    def commands(attempt: int) -> list[list[str]]:
        count = processes[min(attempt, len(processes) - 1)]
        devices = [f"runtime.cpu_devices={devices_per_process}"] if devices_per_process else []
        if count == 1:
            return [train_command(config, [*overrides, *devices])]
        cluster = [
            *devices,
            f"runtime.coordinator_address=127.0.0.1:{free_loopback_port()}",
            f"runtime.num_processes={count}",
        ]
        return [train_command(config, [*overrides, *cluster, f"runtime.process_id={i}"]) for i in range(count)]

    return commands


def layout_change(configured_grad_accum: int, now: dict[str, int], saved: dict[str, Any] | None) -> dict | None:
    """How a start's `now` (devices, processes, grad_accum) differs from the checkpoint it resumes (`saved`: the
    checkpoint's metadata), or on a fresh start from the configured grad_accum; None where nothing differs.
    The run logs it as a `layout_change` row."""
    before = dict(now, grad_accum=configured_grad_accum)
    if saved is not None:
        before = {
            "devices": math.prod(saved["mesh"].values()),
            "processes": saved["process_count"],
            "grad_accum": saved.get("grad_accum", saved["config"]["train"]["grad_accum"]),
        }
    if before == now:
        return None
    return {f"{k}_before": v for k, v in before.items()} | now | {"grad_accum_configured": configured_grad_accum}


def describe_layout_change(step: int, change: dict[str, Any], per_device_batch: int) -> str:
    """The log line of a `layout_change` row: devices and grad_accum, and the arrays cast to a new dtype."""
    parts = []
    if "devices_before" in change:
        parts.append(
            f"{change['devices_before']} -> {change['devices']} devices ({change['processes_before']} -> "
            f"{change['processes']} processes), train.grad_accum {change['grad_accum_before']} -> "
            f"{change['grad_accum']} (configured {change['grad_accum_configured']}); the global batch is unchanged, "
            f"{per_device_batch} sequences per device per microbatch"
        )
    casts = change.get("dtype_changes", [])
    if casts:
        more = f" and {len(casts) - 3} more" if len(casts) > 3 else ""
        parts.append(f"{len(casts)} arrays restored cast to a new dtype ({', '.join(casts[:3])}{more})")
    return f"jaxscale: layout change at step {step}: " + "; ".join(parts)


# Looked up here, not in the forked child, where only the call itself should run.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def _die_with_parent() -> None:
    """In the child, before exec: the kernel sends it SIGKILL if the supervisor dies (Linux)."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Supervisor:
    """Runs the attempts `commands(i)` names (one argv per process) until one finishes or restarts run out."""

    def __init__(
        self, commands: Callable[[int], list[list[str]]], policy: RestartPolicy, log: Callable[[str], None]
    ) -> None:
        policy.check()
        self.commands, self.policy, self.log = commands, policy, log
        self._stop_signal: int | None = None
        self._children: list[subprocess.Popen] = []
        self._heartbeats: list[Path] = []

    def run(self) -> int:
        """Supervise to the end; the exit code: 0 done, else that of the attempt that ended it."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            with tempfile.TemporaryDirectory(prefix="jaxscale-heartbeats-") as heartbeats:
                return self._attempts(Path(heartbeats))
        finally:
            self._stop_children()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._stop_signal = signum

    def _start(self, commands: list[list[str]], heartbeats: Path) -> None:
        """Start one attempt's processes, each in a process group of its own with a fresh heartbeat file."""
        self._heartbeats = [heartbeats / f"process-{i}" for i in range(len(commands))]
        self._children = []
        for command, heartbeat in zip(commands, self._heartbeats, strict=True):
            heartbeat.touch()
            self._children.append(
                subprocess.Popen(
                    command,
                    # Its own process group: a terminal's Ctrl-C reaches the supervisor only, which passes it on
                    # as the SIGTERM that makes training save and exit; and a kill reaches what the child started.
                    process_group=0,
                    preexec_fn=_die_with_parent if _prctl is not None else None,
                    env=os.environ | {HEARTBEAT_ENV: str(heartbeat)},
                )
            )

    def _attempts(self, heartbeats: Path) -> int:
        for attempt in range(self.policy.max_restarts + 1):
            commands = self.commands(attempt)
            self._start(commands, heartbeats)
            pids = " ".join(str(p.pid) for p in self._children)
            self.log(f"attempt {attempt + 1}: {len(commands)} process(es), pids {pids}")
            failed, code = self._wait()
            self._stop_children()  # what the attempt's processes started, e.g. tokenizer workers, goes with them
            if self._stop_signal is not None:
                self.log(
                    f"stopped by {signal.Signals(self._stop_signal).name}; training ended with {describe_exit(code)}"
                )
                return code if code >= 0 else 128 - code
            if code == 0:
                self.log(f"attempt {attempt + 1}: finished")
                return 0
            cause = f"process {failed} {describe_exit(code)}"
            if code in FINAL_EXITS:
                self.log(f"attempt {attempt + 1} ended: {cause}; not restarting")
                return code
            if attempt == self.policy.max_restarts:
                break
            delay = self.policy.backoff(attempt + 1)
            self.log(
                f"attempt {attempt + 1} ended: {cause}; restart {attempt + 1} of {self.policy.max_restarts} "
                f"in {delay:g} s, from the newest checkpoint"
            )
            if self._sleep(delay):
                self.log(f"stopped by {signal.Signals(self._stop_signal).name} before restarting")
                return code if code in (PREEMPTED_EXIT_CODE, TRANSIENT_EXIT_CODE) else 1
        self.log(f"attempt {attempt + 1} ended: {cause}; no restarts left (--max-restarts {self.policy.max_restarts})")
        return code if code in (PREEMPTED_EXIT_CODE, TRANSIENT_EXIT_CODE) else 1

    def _wait(self) -> tuple[int | None, int]:
        """Wait for every child; (index, exit status) of the first to fail, or (None, 0).

        Once one has exited, the others get `grace_s` to follow (a preempted attempt saves and exits
        on every process; after a crash the others may be stuck in a collective) and are then killed.
        A signal to the supervisor is passed on as SIGTERM: the children save and exit 75. A child whose
        heartbeat is older than hang_timeout_s is hung: the attempt is killed, as a crash.
        """
        failure: tuple[int | None, int] = (None, 0)
        deadline = forwarded = None
        while [p for p in self._children if p.poll() is None]:  # a list, not any(): every child polled
            if self._stop_signal is not None and forwarded is None:
                forwarded = True
                deadline = deadline or time.monotonic() + self.policy.grace_s
                for p in self._children:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
            hung = self._hung()
            if hung is not None and failure[0] is None:
                self.log(
                    f"process {hung} made no progress for {self.policy.hang_timeout_s:g} s (train.hang_timeout_s): "
                    f"hung, killed"
                )
                self._stop_children()
                failure = (hung, -signal.SIGKILL)
            for i, p in enumerate(self._children):
                if p.returncode is not None and deadline is None:
                    deadline = time.monotonic() + self.policy.grace_s
                if p.returncode and failure[0] is None:
                    failure = (i, p.returncode)
            if deadline is not None and time.monotonic() > deadline:
                late = [i for i, p in enumerate(self._children) if p.poll() is None]
                self.log(f"process(es) {late} still running {self.policy.grace_s:g} s after another exited: killed")
                self._stop_children()
            time.sleep(_POLL_S)
        for i, p in enumerate(self._children):  # a failure in the last poll
            if p.returncode and failure[0] is None:
                failure = (i, p.returncode)
        return failure

    def _hung(self) -> int | None:
        """The index of a running child whose heartbeat is older than hang_timeout_s, if the watchdog is on."""
        if not self.policy.hang_timeout_s:
            return None
        now = time.time()
        for i, (p, heartbeat) in enumerate(zip(self._children, self._heartbeats, strict=True)):
            if p.poll() is None and now - heartbeat.stat().st_mtime > self.policy.hang_timeout_s:
                return i
        return None

    def _sleep(self, seconds: float) -> bool:
        """Sleep, returning early (True) when the supervisor is told to stop."""
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            if self._stop_signal is not None:
                return True
            time.sleep(min(_POLL_S, max(until - time.monotonic(), 0)))
        return self._stop_signal is not None

    def _stop_children(self) -> None:
        """SIGKILL every child's process group (the child and what it started, e.g. tokenizer workers), then reap."""
        for p in self._children:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the group outlives its leader while a member lives
            except ProcessLookupError:
                pass
            p.wait()
