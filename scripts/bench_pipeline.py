"""Benchmark: pipeline schedules' memory and step time on 8 emulated CPU devices.

Prints:
  1. per-device temporary memory of the compiled train step (XLA memory analysis) for GPipe and
     1F1B at P=4 stages, M=16 microbatches, and their ratio. Both recompute a stage's forward in
     its backward, so what they keep between ticks is stage inputs: GPipe all 16, 1F1B at most 4.
     The rest, the same for both, is one microbatch's working set through one stage;
  2. each schedule's bubble beside the textbook (P - 1) / (V M + P - 1), at P=4, M=16 on a model of
     24 layers (6 a stage, 3 a chunk when interleaved): the idle share of the table's slots, and of
     device time when each lockstep tick lasts as long as its costliest op, with each op's cost from
     XLA's cost analysis of that branch. Once with each backward in one tick, once split into the
     layer groups the schedule chooses (jaxscale.parallel.schedules);
  3. on a smaller model, the median step time of each schedule over that of pipeline=1 on the same
     8 devices (fsdp=8, the same per-device microbatch of one sequence, 4 microbatches).

Emulated devices share the host's cores, so a pipeline's idle stages still cost wall time only
in the ticks' lockstep, and step times here show overheads (recompute, ticks, sends), not the
speedup real chips would see.

Usage: .venv/bin/python scripts/bench_pipeline.py [key=value ...]
"""

from __future__ import annotations

import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxscale import runtime
from jaxscale.config import load_config
from jaxscale.parallel import schedules as sch
from jaxscale.parallel.pipeline import branch_flops
from jaxscale.parallel.schedules import build_schedule
from jaxscale.training.setup import setup_run

# Memory: one layer per stage, short sequences and many of them, so that a stage input (the unit
# GPipe keeps M of and 1F1B about P of) is large beside one microbatch's stage working set.
MEMORY_MODEL = [
    "model.d_model=512",
    "model.n_layers=4",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.head_dim=128",
    "model.d_ff=256",
    "train.global_batch=8192",
    "train.seq_len=16",
]
# Step time: a model small enough to run a few steps of every schedule on emulated devices.
TIME_MODEL = [
    "model.d_model=256",
    "model.n_layers=8",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.head_dim=64",
    "model.d_ff=512",
    "train.global_batch=32",
    "train.seq_len=128",
]
# Bubble: 24 layers, so that a stage (and an interleaved chunk) splits into three layer groups.
BUBBLE_MODEL = [*TIME_MODEL[:1], "model.n_layers=24", *TIME_MODEL[2:]]
COMMON = ["runtime.cpu_devices=8", "model.compute_dtype=float32"]
PIPELINE = ["mesh.pipeline=4", "mesh.data=2", "mesh.fsdp=1", "mesh.tensor=1", "train.grad_accum=16"]
RUNS = {
    "pipeline=1": ["mesh.pipeline=1", "mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1", "train.grad_accum=4"],
    "gpipe": [*PIPELINE, "parallel.pipeline_schedule=gpipe"],
    "1f1b": [*PIPELINE, "parallel.pipeline_schedule=1f1b"],
    "interleaved": [*PIPELINE, "parallel.pipeline_schedule=interleaved", "parallel.virtual_stages=2"],
}
STEPS = 3


def compile_step(overrides: list[str]) -> tuple:
    """The compiled train step of `overrides`, and its run setup."""
    cfg = load_config("configs/tiny.yaml", [*COMMON, *overrides])
    runtime.initialize(cfg.runtime)
    setup = setup_run(cfg, tokenizer_vocab=256)
    return setup.lower_train_step().compile(), setup


def temp_bytes(overrides: list[str]) -> int:
    """Per-device temporary memory of the compiled train step (compiled only, never run)."""
    return compile_step(overrides)[0].memory_analysis().temp_size_in_bytes


def step_time(overrides: list[str]) -> tuple[float, float]:
    """Median step time over STEPS steps after one warm-up, and the last loss."""
    compiled, setup = compile_step(overrides)
    cfg, state = setup.cfg, setup.init_state()
    tokens = np.random.default_rng(0).integers(0, 256, (cfg.train.global_batch, cfg.train.seq_len + 1), np.int32)
    shape = tokens[:, 1:].shape
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones(shape, np.float32)}
    if cfg.data.packing == "segmented":  # one document a row
        positions = np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape)
        batch |= {"segment_ids": np.zeros(shape, np.int32), "positions": positions}
    batch = jax.device_put(batch, setup.batch_sharding)
    times = []
    for _ in range(STEPS + 1):
        started = time.perf_counter()
        state, metrics = jax.block_until_ready(compiled(state, batch))
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:]), float(metrics["loss"])


def bubbles(overrides: list[str]) -> tuple:
    """The schedule of `overrides`, its branches' XLA FLOPs, and the same schedule with whole backwards."""
    cfg = load_config("configs/tiny.yaml", [*COMMON, *overrides])
    runtime.initialize(cfg.runtime)
    setup = setup_run(cfg, tokenizer_vocab=256)
    schedule = setup.layout.schedule
    model, _ = nnx.merge(setup.graphdef, setup.init_state())
    model_def, params, rest = nnx.split(model, nnx.Param, ...)
    b = cfg.train.global_batch // schedule.microbatches
    micro = {
        "inputs": jnp.zeros((b, cfg.train.seq_len), jnp.int32),
        "targets": jnp.zeros((b, cfg.train.seq_len), jnp.int32),
        "loss_mask": jnp.ones((b, cfg.train.seq_len), jnp.float32),
    }
    whole = build_schedule(schedule.name, schedule.stages, schedule.microbatches, schedule.virtual)
    return (
        schedule,
        branch_flops(model_def, params, rest, micro, schedule),
        whole,
        branch_flops(model_def, params, rest, micro, whole),
    )


def main() -> None:
    extra = sys.argv[1:]
    mib = 2**20
    gpipe = temp_bytes([*MEMORY_MODEL, *RUNS["gpipe"], *extra])
    one_f = temp_bytes([*MEMORY_MODEL, *RUNS["1f1b"], *extra])
    print("per-device temporary memory of the train step (XLA memory analysis), P=4, M=16:")
    print(f"  gpipe {gpipe / mib:8.1f} MiB   1f1b {one_f / mib:8.1f} MiB   gpipe / 1f1b = {gpipe / one_f:.2f}")
    print("bubble at P=4, M=16 (24 layers): idle share of slots, and of time with XLA's cost of each op, vs theory:")
    for name in ("gpipe", "1f1b", "interleaved"):
        split, split_flops, whole, whole_flops = bubbles([*BUBBLE_MODEL, *RUNS[name], *extra])
        print(
            f"  {name:12s} theory {split.theory_bubble_fraction:.4f}  slots {split.bubble_fraction:.4f}  "
            f"time: whole backwards {whole.time_bubble_fraction(whole_flops):.4f}, in {split.backward_ticks} ticks "
            f"{split.time_bubble_fraction(split_flops):.4f}  (backward tick / forward "
            f"{split_flops[sch.BRANCHES.index('bwd_mid')] / split_flops[sch.BRANCHES.index('fwd_mid')]:.2f}; "
            f"stage inputs kept {split.stash_slots} x {split.backward_ticks})"
        )
    times = {name: step_time([*TIME_MODEL, *overrides, *extra]) for name, overrides in RUNS.items()}
    base, base_loss = times["pipeline=1"]
    print(f"median step time over pipeline=1 ({base:.3f} s, loss {base_loss:.4f}) on the same 8 devices:")
    for name in ("gpipe", "1f1b", "interleaved"):
        step_s, loss = times[name]
        print(f"  {name:12s} {step_s:.3f} s  ratio {step_s / base:.2f}  (loss {loss:.4f})")


if __name__ == "__main__":
    main()
