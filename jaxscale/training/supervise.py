"""Elastic restarts: `jaxscale supervise` runs training again after a crash or a preemption.

The supervisor starts `jaxscale train` as child processes and watches them. When an attempt ends
with a crash (any exit but 0, 2 and 3, or death by a signal) or a preemption (exit 75, after its
checkpoint is saved), it stops every process of the attempt still running and starts the next one,
after a backoff that doubles from restart to restart, up to `max_restarts` times. Exit 2 (a mistake
in the config or the run directory) and exit 3 (divergence under train.on_nan=stop, which the same
checkpoint and data would repeat) are final. The children run with train.elastic=true: each
attempt resumes from the newest checkpoint on whatever devices it finds, with the same global
batches, raising train.grad_accum where the layout needs it (jaxscale.training.layout).

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
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

from jaxscale.errors import UserError

PREEMPTED = 75  # jaxscale.training.preemption.PREEMPTED_EXIT_CODE, without importing JAX here
FINAL_EXITS = {0: "finished", 2: "a mistake to fix (not retried)", 3: "diverged (not retried: it would again)"}
_POLL_S = 0.1
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class RestartPolicy:
    """How often and how soon to restart, and how long an attempt's other processes may take to exit."""

    max_restarts: int = 3
    backoff_s: float = 10.0  # before the first restart; doubled for each one after
    max_backoff_s: float = 300.0
    grace_s: float = 60.0  # after one process of an attempt exits, the others' time to follow before SIGKILL

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
        """Seconds to wait before restart number `restart` (from 1)."""
        return min(self.backoff_s * 2 ** (restart - 1), self.max_backoff_s)


def describe_exit(code: int) -> str:
    """A process's exit status in words, with what the supervisor makes of it."""
    if code < 0:
        return f"killed by {signal.Signals(-code).name} (a crash)"
    if code == PREEMPTED:
        return "exit 75 (preempted, checkpoint saved)"
    return f"exit {code} ({FINAL_EXITS.get(code, 'a crash')})"


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


def describe_layout_change(step: int, change: dict[str, int], per_device_batch: int) -> str:
    """The log line of a `layout_change` row."""
    return (
        f"jaxscale: layout change at step {step}: {change['devices_before']} -> {change['devices']} devices "
        f"({change['processes_before']} -> {change['processes']} processes), train.grad_accum "
        f"{change['grad_accum_before']} -> {change['grad_accum']} (configured {change['grad_accum_configured']}); "
        f"the global batch is unchanged, {per_device_batch} sequences per device per microbatch"
    )


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

    def run(self) -> int:
        """Supervise to the end; the exit code: 0 done, else that of the attempt that ended it."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._attempts()
        finally:
            self._stop_children()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._stop_signal = signum

    def _attempts(self) -> int:
        for attempt in range(self.policy.max_restarts + 1):
            commands = self.commands(attempt)
            self._children = [
                subprocess.Popen(
                    command,
                    # Its own process group: a terminal's Ctrl-C reaches the supervisor only, which passes it on
                    # as the SIGTERM that makes training save and exit.
                    process_group=0,
                    preexec_fn=_die_with_parent if _prctl is not None else None,
                )
                for command in commands
            ]
            pids = " ".join(str(p.pid) for p in self._children)
            self.log(f"attempt {attempt + 1}: {len(commands)} process(es), pids {pids}")
            failed, code = self._wait()
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
                return PREEMPTED if code == PREEMPTED else 1
        self.log(f"attempt {attempt + 1} ended: {cause}; no restarts left (--max-restarts {self.policy.max_restarts})")
        return PREEMPTED if code == PREEMPTED else 1

    def _wait(self) -> tuple[int | None, int]:
        """Wait for every child; (index, exit status) of the first to fail, or (None, 0).

        Once one has exited, the others get `grace_s` to follow (a preempted attempt saves and exits
        on every process; after a crash the others may be stuck in a collective) and are then killed.
        A signal to the supervisor is passed on as SIGTERM: the children save and exit 75.
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

    def _sleep(self, seconds: float) -> bool:
        """Sleep, returning early (True) when the supervisor is told to stop."""
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            if self._stop_signal is not None:
                return True
            time.sleep(min(_POLL_S, max(until - time.monotonic(), 0)))
        return self._stop_signal is not None

    def _stop_children(self) -> None:
        for p in self._children:
            if p.poll() is None:
                p.kill()
            p.wait()
