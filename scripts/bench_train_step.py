"""Benchmark: jaxscale's train step against a minimal hand-written jax.jit step, and the data share.

Prints, from one run on the same devices and mesh:
  1. median step time of jaxscale's compiled train step / that of a minimal `jax.jit` step of the
     same model (value_and_grad + optax, nothing else), timed in alternating rounds (target <= 1.05);
  2. the data pipeline's share of step time in the default run: time the loop waited on input over
     step time, from the run's own metrics.jsonl (target < 2%).

Usage: .venv/bin/python scripts/bench_train_step.py [configs/tiny.yaml] [key=value ...]
"""

from __future__ import annotations

import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx

from jaxscale import runtime
from jaxscale.config import load_config
from jaxscale.sharding import use_rules
from jaxscale.training.loop import train
from jaxscale.training.setup import setup_run
from jaxscale.training.state import make_optimizer

ROUNDS, STEPS_PER_ROUND = 5, 20


def timed_steps(step, carry, batch, n: int) -> tuple[float, object]:
    """Median wall time of `carry = step(carry, batch)` over `n` steps, each waited on."""
    times = []
    for _ in range(n):
        started = time.perf_counter()
        carry = jax.block_until_ready(step(carry, batch))
        times.append(time.perf_counter() - started)
    return statistics.median(times), carry


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else "configs/tiny.yaml"
    cfg = load_config(path, sys.argv[2:])
    runtime.initialize(cfg.runtime)
    setup = setup_run(cfg)
    mesh, rules, batch_sharding = setup.mesh, setup.rules, setup.batch_sharding
    tokens = np.random.default_rng(0).integers(0, 256, (cfg.train.global_batch, cfg.train.seq_len + 1), np.int32)
    batch = jax.device_put(
        {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones(tokens[:, 1:].shape, np.float32)},
        batch_sharding,
    )

    # jaxscale: the step the training loop runs.
    framework_step = setup.train_step()

    # Minimal: the same model and optimizer, written the shortest way a user would with jax.jit.
    model, _ = nnx.merge(setup.graphdef, setup.init_state())
    model_def, params = nnx.split(model, nnx.Param)
    tx = make_optimizer(cfg.optim, cfg.train.steps)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def minimal_step(params, opt_state, batch):
        def loss_fn(p):
            with use_rules(rules, mesh):
                model = nnx.merge(model_def, p)
                loss_sum, count = model.loss(model(batch["inputs"]), batch)
            return loss_sum / count

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    candidates = {
        "jaxscale": (lambda state, b: framework_step(state, b)[0], setup.init_state()),
        "minimal": (lambda carry, b: minimal_step(*carry, b), (params, jax.jit(tx.init)(params))),
    }
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for round_index in range(ROUNDS + 1):
        for name, (step, carry) in candidates.items():
            seconds, carry = timed_steps(step, carry, batch, STEPS_PER_ROUND)
            candidates[name] = (step, carry)
            if round_index:  # round 0 compiles and warms up
                times[name].append(seconds)
    ours_s, minimal_s = statistics.median(times["jaxscale"]), statistics.median(times["minimal"])
    print(f"mesh {dict(mesh.shape)}, batch {cfg.train.global_batch}x{cfg.train.seq_len}")
    print(f"jaxscale train step:      {ours_s * 1e3:8.2f} ms (median of {ROUNDS} rounds x {STEPS_PER_ROUND} steps)")
    print(f"minimal jax.jit step:     {minimal_s * 1e3:8.2f} ms")
    print(f"ratio jaxscale / minimal: {ours_s / minimal_s:8.3f}   (target <= 1.05)")

    with tempfile.TemporaryDirectory() as run_dir:
        steps = 60
        overrides = [
            f"run.dir={run_dir}",
            f"train.steps={steps}",
            "checkpoint.every=0",
            "log.progress=false",
            "log.every=10",
            f"train.eval_every={steps}",
            "train.eval_batches=1",
            "log.tensorboard=false",
        ]
        train(load_config(path, [*sys.argv[2:], *overrides]))
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        steady = [r for r in rows if "data_wait_s" in r][1:]  # the first interval holds the first dispatch
        wait = sum(r["data_wait_s"] for r in steady)
        step = sum(r["step_time_s"] for r in steady)
    print(f"data pipeline share of step time (default run, steps 11-{steps}): {100 * wait / step:.3f}%   (target < 2%)")


if __name__ == "__main__":
    main()
