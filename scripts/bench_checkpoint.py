"""Benchmark: how long checkpointing holds up training.

Prints, from one run on the same devices:
  1. the time the loop is blocked by an async save (it dispatches a host copy and the checksums) over
     the time of a synchronous save of the same state (target <= 0.1), for the default tiny model
     and a larger one;
  2. the step-time overhead of the training loop with a checkpoint every 10 steps vs never.

Usage: .venv/bin/python scripts/bench_checkpoint.py [configs/tiny.yaml] [key=value ...]
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax

from jaxscale import runtime
from jaxscale.checkpoint import Checkpointer
from jaxscale.config import CheckpointConfig, load_config
from jaxscale.training.loop import DataSource, train
from jaxscale.training.setup import setup_run

LARGER = [
    "model.d_model=512",
    "model.n_layers=8",
    "model.n_heads=8",
    "model.n_kv_heads=4",
    "model.head_dim=64",
    "model.d_ff=1536",
]
REPEATS = 3


def save_times(overrides: list[str], path: str) -> tuple[float, float, int]:
    """Median seconds blocked by an async save, median seconds of a sync save, and the state's bytes."""
    cfg = load_config(path, overrides)
    state = setup_run(cfg, tokenizer_vocab=257).init_state()
    size = sum(x.nbytes for x in jax.tree.leaves(state))
    results = {}
    for async_save in (True, False):
        with tempfile.TemporaryDirectory() as directory:
            ckpt = Checkpointer(directory, CheckpointConfig(keep=2, async_save=async_save))
            ckpt.save(0, state, {})  # warm-up: handlers, thread pools, the checksum's compile
            ckpt.wait()
            times = []
            for step in range(1, REPEATS + 1):
                started = time.perf_counter()
                ckpt.save(step, state, {})
                times.append(time.perf_counter() - started)
                ckpt.wait()
            ckpt.close()
        results[async_save] = statistics.median(times)
    return results[True], results[False], size


def step_time(path: str, overrides: list[str], every: int, steps: int = 60, source: DataSource | None = None) -> float:
    """Mean step time of a `steps`-step run of the loop, from its metrics (first 10-step interval left out).

    `source`: the examples to train on (then nothing is evaluated), default the config's corpus.
    """
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(
            path,
            [
                *overrides,
                f"run.dir={run_dir}",
                f"train.steps={steps}",
                f"checkpoint.every={every}",
                "log.every=10",
                "log.progress=false",
                "log.tensorboard=false",
                "train.eval_every=1000",
                "train.eval_batches=1",
            ],
        )
        train(cfg, source)
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return statistics.mean(r["step_time_s"] for r in rows if "step_time_s" in r and r["step"] > 10)


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else "configs/tiny.yaml"
    overrides = sys.argv[2:]
    runtime.initialize(load_config(path, overrides).runtime)
    for name, extra in (("tiny", []), ("larger", LARGER)):
        blocked, sync, size = save_times([*overrides, *extra], path)
        print(
            f"{name:>6} state {size / 2**20:7.1f} MiB: async save blocks {blocked * 1e3:7.1f} ms, "
            f"sync save {sync * 1e3:7.1f} ms, ratio {blocked / sync:.3f} (target <= 0.1)"
        )
    never = step_time(path, overrides, every=0)
    every10 = step_time(path, overrides, every=10)
    print(
        f"loop step time: never {never * 1e3:.1f} ms, every 10 steps {every10 * 1e3:.1f} ms, "
        f"overhead {100 * (every10 / never - 1):+.1f}%"
    )


if __name__ == "__main__":
    main()
