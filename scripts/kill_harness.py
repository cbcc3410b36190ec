"""Fault injection: SIGKILL a training run at random moments, restart it each time, let it finish.

Then compare with an uninterrupted run of the same config: final parameters must be bitwise
equal, and every checkpoint directory left behind must restore and verify.

Usage: .venv/bin/python scripts/kill_harness.py [--kills 30] [--seed 0] [--workdir DIR]
Prints kills survived, steps of work lost per kill (steps done but not yet saved when killed),
and whether the final parameters match.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxscale.checkpoint import Checkpointer
from jaxscale.config import CheckpointConfig

REPO = Path(__file__).resolve().parents[1]
# Small and quick: a save every 2 steps, so many kills land during an async write.
OVERRIDES = [
    "train.steps=24",
    "optim.decay_steps=24",
    "train.seq_len=32",
    "checkpoint.every=2",
    "checkpoint.keep=3",
    "log.every=1",
    "log.progress=false",
    "log.tensorboard=false",
    "train.eval_every=1000",
    "train.eval_batches=1",
]


@dataclass
class KillStats:
    kills: int = 0
    finished_early: int = 0  # runs that completed before their kill landed
    lost_steps: list[int] = field(default_factory=list)  # logged steps beyond the newest checkpoint at each kill


def _command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "jaxscale.cli", "train", "configs/tiny.yaml", f"run.dir={run_dir}", *OVERRIDES]


def _env() -> dict[str, str]:
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    env.pop("XLA_FLAGS", None)
    return env


def _logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def _newest_checkpoint(run_dir: Path) -> int:
    root = run_dir / "checkpoints"
    steps = [int(p.name) for p in root.iterdir() if p.name.isdigit()] if root.exists() else []
    return max(steps, default=0)


def run_to_completion(run_dir: Path) -> None:
    """Run (or resume) the harness config until it finishes; raise if it fails."""
    result = subprocess.run(_command(run_dir), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"training failed (exit {result.returncode}):\n{result.stderr[-3000:]}")


def kill_repeatedly(run_dir: Path, kills: int, rng: random.Random, max_delay_s: float = 2.5) -> KillStats:
    """Start the run `kills` times and SIGKILL it at a random moment after training starts."""
    stats = KillStats()
    for _ in range(kills):
        proc = subprocess.Popen(
            _command(run_dir), cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        try:
            for line in proc.stdout:  # the loop announces its start once compiled
                if "starting at step" in line:
                    break
            time.sleep(rng.uniform(0.0, max_delay_s))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                stats.kills += 1
                proc.wait()
                stats.lost_steps.append(max(_logged_steps(run_dir) - _newest_checkpoint(run_dir), 0))
            else:
                stats.finished_early += 1
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()
    return stats


def final_state_equal(dir_a: Path, dir_b: Path, step: int) -> bool:
    """Whether the checkpoints of `step` in two runs hold bitwise-equal arrays."""
    with ocp.StandardCheckpointer() as reader:
        a = reader.restore(dir_a / "checkpoints" / str(step) / "state")
        b = reader.restore(dir_b / "checkpoints" / str(step) / "state")
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(leaves_a) == len(leaves_b) and all(np.array_equal(x, y) for x, y in zip(leaves_a, leaves_b, strict=True))


def unusable_checkpoints(run_dir: Path) -> list[int]:
    """Steps under RUN_DIR/checkpoints that do not read back or fail their checksums."""
    ckpt = Checkpointer(run_dir / "checkpoints", CheckpointConfig())
    try:
        return [step for step in ckpt.steps() if not ckpt.verify(step).ok]
    finally:
        ckpt.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    jax.config.update("jax_num_cpu_devices", 8)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="jaxscale-kills-"))
    started = time.perf_counter()
    run_to_completion(work / "straight")
    stats = kill_repeatedly(work / "killed", args.kills, random.Random(args.seed))
    run_to_completion(work / "killed")
    equal = final_state_equal(work / "straight", work / "killed", 24)
    unusable = unusable_checkpoints(work / "killed")
    lost = stats.lost_steps
    print(f"kills survived: {stats.kills} (plus {stats.finished_early} runs that finished before their kill)")
    if lost:
        print(f"work lost per kill: mean {sum(lost) / len(lost):.2f} steps, max {max(lost)} (saves every 2 steps)")
    print(f"final parameters bitwise equal to the uninterrupted run: {equal}")
    print(f"checkpoints that do not restore and verify: {unusable or 'none'}")
    print(f"wall time {time.perf_counter() - started:.0f} s, runs under {work}")
    sys.exit(0 if equal and not unusable else 1)


if __name__ == "__main__":
    main()
