"""Run the `jaxscale` command in a fresh process, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m jaxscale.cli ARGS` from the repository root; stdout and stderr captured as text."""
    full_env = os.environ | {"PYTHONUNBUFFERED": "1"} | (env or {})
    full_env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-m", "jaxscale.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )
