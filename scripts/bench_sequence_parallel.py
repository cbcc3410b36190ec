"""Benchmark: the train step with sequence parallelism on against off, timed here and compiled for a TPU.

1. Timing (this machine's devices): for each cell (mesh x compute dtype) the jaxscale train step with
   `parallel.sequence_parallel` false and true, from the same initial state and batch, timed in
   alternating rounds; prints the median step time of each and their ratio (on / off).
2. `--topology v5e:2x4` (needs the `tpu` extra, libtpu; no TPU): the same steps compiled for that TPU
   topology, with XLA's per-device memory and the activation collectives of each (reduce-scatters as
   XLA:TPU fuses them, `all-reduce-scatter`; XLA:CPU forms none: it all-reduces and slices).

The default model is the issue-15 one (the tiny preset widened: d_model 256, 4 layers, 4 x 64 heads,
MLP 1024) at 16 x 256 packed tokens, on the 8 emulated CPU devices.

Usage: .venv/bin/python scripts/bench_sequence_parallel.py [--quick] [--meshes SUBSTRING,...]
       [--dtypes float32,bfloat16] [--topology v5e:2x4] [key=value ...]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time

import jax
import numpy as np

from jaxscale import runtime
from jaxscale.config import load_config
from jaxscale.training.setup import RunSetup, setup_run

MODEL = [
    "model.d_model=256",
    "model.head_dim=64",
    "model.d_ff=1024",
    "train.seq_len=256",
    "train.global_batch=16",
    "data.packing=segmented",
]
MESHES = {
    "data=2 fsdp=2 tensor=2": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
    "fsdp=4 tensor=2": ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"],
    "fsdp=2 tensor=4": ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=4"],
    "pipeline=2 fsdp=2 tensor=2": [
        "mesh.data=1",
        "mesh.pipeline=2",
        "mesh.fsdp=2",
        "mesh.tensor=2",
        "train.grad_accum=4",
    ],
    "expert=2 fsdp=2 tensor=2, MoE": [
        *("mesh.data=1", "mesh.expert=2", "mesh.fsdp=2", "mesh.tensor=2"),
        *("model.num_experts=4", "model.experts_per_token=2", "model.d_ff=512"),
    ],
}
DTYPES = ("float32", "bfloat16")


def _setup(overrides: list[str], devices: list | None = None) -> RunSetup:
    return setup_run(load_config("configs/tiny.yaml", overrides), devices, 257)


def _batch(setup: RunSetup) -> dict:
    """16 rows of random tokens, each packed with four documents of equal length."""
    rng = np.random.default_rng(0)
    rows, length = setup.cfg.train.global_batch, setup.cfg.train.seq_len
    tokens = rng.integers(0, 257, (rows, length), dtype=np.int32)
    segments = np.repeat(np.arange(4, dtype=np.int32), length // 4)[None].repeat(rows, 0)
    positions = np.tile(np.arange(length // 4, dtype=np.int32), 4)[None].repeat(rows, 0)
    host = {
        "inputs": tokens,
        "targets": np.roll(tokens, -1, 1),
        "loss_mask": np.ones((rows, length), np.float32),
        "segment_ids": segments,
        "positions": positions,
    }
    return jax.device_put(host, setup.batch_sharding)


def time_cell(overrides: list[str], rounds: int, steps: int) -> dict[bool, float]:
    """Median seconds per step of the train step with sequence parallelism off and on, alternating rounds."""
    runs = {}
    for sp in (False, True):
        setup = _setup([*overrides, f"parallel.sequence_parallel={str(sp).lower()}"])
        batch = _batch(setup)
        state = setup.init_state()
        step = setup.train_step().lower(state, batch).compile()
        state, _ = jax.block_until_ready(step(state, batch))  # warm
        runs[sp] = [step, state, batch, []]
    for _ in range(rounds):
        for sp in (False, True):
            step, state, batch, times = runs[sp]
            for _ in range(steps):
                started = time.perf_counter()
                state, _ = jax.block_until_ready(step(state, batch))
                times.append(time.perf_counter() - started)
            runs[sp][1] = state
    return {sp: statistics.median(run[3]) for sp, run in runs.items()}


def activation_collectives(hlo: str) -> dict[str, int]:
    """How many reduce-scatters and all-gathers of [.., L, D]-shaped activations and all-reduces an HLO text
    holds (each once, loops not unrolled): those whose op name is one of the blocks' projections."""
    counts = {"reduce-scatter": 0, "all-reduce": 0, "all-gather": 0}
    for line in hlo.splitlines():
        if "dot_general" not in line:
            continue
        if "calls=%all-reduce-scatter" in line or re.search(r" reduce-scatter\(", line):
            counts["reduce-scatter"] += 1
        elif re.search(r" all-reduce(-start)?\(", line):
            counts["all-reduce"] += 1
        elif re.search(r" all-gather(-start)?\(", line):
            counts["all-gather"] += 1
    return counts


def compile_cell(overrides: list[str], devices: list) -> dict[bool, tuple[int, dict[str, int]]]:
    """Per-device bytes (XLA's memory analysis) and activation collectives of the step compiled for `devices`."""
    out = {}
    for sp in (False, True):
        setup = _setup([*overrides, f"parallel.sequence_parallel={str(sp).lower()}"], devices)
        compiled = setup.lower_train_step().compile()
        m = compiled.memory_analysis()
        total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
        out[sp] = (int(total), activation_collectives(compiled.as_text()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds x 5 steps (default 5 x 10)")
    parser.add_argument("--topology", help="also compile each cell for this TPU topology (libtpu), e.g. v5e:2x4")
    parser.add_argument("--no-timing", action="store_true", help="only the --topology compiles")
    parser.add_argument("--meshes", help="only the meshes whose label holds one of these comma-separated substrings")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="compute dtypes, comma-separated")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args()
    rounds, steps = (3, 5) if args.quick else (5, 10)
    wanted = args.meshes.split(",") if args.meshes else [""]
    meshes = {label: mesh for label, mesh in MESHES.items() if any(w in label for w in wanted)}
    runtime.initialize(load_config("configs/tiny.yaml").runtime)  # its 8 emulated CPU devices
    if not args.no_timing:
        print(f"{'ms/step (8 CPU devices)':<34} {'off':>9} {'on':>9} {'on/off':>7}")
        for dtype in args.dtypes.split(","):
            for label, mesh in meshes.items():
                t = time_cell([*MODEL, *mesh, f"model.compute_dtype={dtype}", *args.overrides], rounds, steps)
                print(
                    f"{dtype + ' ' + label:<34} {t[False] * 1e3:9.1f} {t[True] * 1e3:9.1f} {t[True] / t[False]:7.3f}",
                    flush=True,
                )
    if args.topology:
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        from jaxscale.aot import topology_devices
        from jaxscale.units import human_bytes

        devices = topology_devices(args.topology)
        print(f"\ncompiled for {args.topology}: per-device memory, projections' collectives (off -> on)")
        for label, mesh in meshes.items():
            got = compile_cell([*MODEL, *mesh, "model.compute_dtype=bfloat16", *args.overrides], devices)
            (off, c_off), (on, c_on) = got[False], got[True]
            print(f"  {label:<24} {human_bytes(off):>10} -> {human_bytes(on):>10}  {c_off} -> {c_on}")


if __name__ == "__main__":
    main()
