"""Run the `jaxscale` command in a fresh process, as a user would."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _command(args: tuple[str, ...]) -> list[str]:
    return [sys.executable, "-m", "jaxscale.cli", *args]


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    # CPU only, as conftest sets for the tests' own process: with the optional libtpu installed, a
    # command would otherwise look for a TPU first (TPU topologies compile without the platform).
    env = os.environ | {"PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu"} | (extra or {})
    env.pop("XLA_FLAGS", None)  # each command sets its own device count
    return env


def run_cli(*args: str, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m jaxscale.cli ARGS` from the repository root; stdout and stderr captured as text."""
    return subprocess.run(_command(args), cwd=REPO, capture_output=True, text=True, timeout=timeout, env=cli_env(env))


def start_cli(*args: str) -> subprocess.Popen:
    """Start `python -m jaxscale.cli ARGS` without waiting; stdout and stderr are pipes of text."""
    return subprocess.Popen(
        _command(args), cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@contextlib.contextmanager
def stopped_at_exit(*procs: subprocess.Popen) -> Iterator[None]:
    """Kill whatever of `procs` still runs when the block exits, so no test leaves a process behind."""
    try:
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
