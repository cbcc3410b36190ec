"""Benchmark for one accelerator: a 1B-class Llama's train step, bf16, with each attention implementation.

Prints, per implementation that runs on the device: step time (median of timed steps after a
warm-up), tokens/s, MFU (the model's training FLOPs per token against the chip's bf16 peak) and
peak memory of the step by XLA's memory analysis of the compiled step (arguments, outputs and
temporaries; the device's own high-water mark covers every step run so far in the process, so it
cannot tell one implementation's from another's). Synthetic random tokens, so the figures are the
step's alone.

    .venv/bin/python scripts/bench_gpu.py                # Llama 3.2 1B shape, seq 4096, batch 4
    .venv/bin/python scripts/bench_gpu.py --small        # a tiny shape: checks the script on a CPU
    .venv/bin/python scripts/bench_gpu.py model.remat=full train.global_batch=8
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from jaxscale import runtime
from jaxscale.config import RuntimeConfig, load_config
from jaxscale.hardware import peak_flops
from jaxscale.models.flops import train_flops_per_token
from jaxscale.training.setup import setup_run
from jaxscale.units import human_bytes

# Llama 3.2 1B, one device.
ONE_B = [
    "model.preset=llama3.2-1b",
    "model.remat=dots_saveable",
    "train.seq_len=4096",
    "train.global_batch=4",
]
SMALL = ["model.vocab_size=512", "train.seq_len=256", "train.global_batch=2", "model.remat=none"]
COMMON = ["data.packing=concat", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", "model.compute_dtype=bfloat16"]
WARMUP, TIMED = 3, 10
# The attention implementations each platform runs (model.attention); the first is the reference.
IMPLEMENTATIONS = {"gpu": ("xla", "cudnn"), "tpu": ("xla", "splash")}


def implementations(platform: str) -> tuple[str, ...]:
    """model.attention values a device of `platform` ('cpu', 'gpu', 'tpu') runs."""
    return IMPLEMENTATIONS.get(platform, ("xla",))


def bench(overrides: list[str], attention: str, warmup: int = WARMUP, timed: int = TIMED) -> dict[str, float]:
    """Median step seconds (of `timed` steps after `warmup`), tokens/s, MFU (None: peak unknown) and peak bytes of
    one implementation."""
    cfg = load_config("configs/tiny.yaml", [*COMMON, *overrides, f"model.attention={attention}"])
    device = jax.devices()[0]
    setup = setup_run(cfg, [device])
    compiled = setup.lower_train_step().compile()
    batch_shape = (cfg.train.global_batch, cfg.train.seq_len)
    tokens = np.random.default_rng(0).integers(0, setup.shape.vocab_size, size=batch_shape, dtype=np.int32)
    host = {
        "inputs": tokens,
        "targets": np.roll(tokens, -1, axis=1),
        "loss_mask": np.ones(batch_shape, np.float32),
    }
    batch = {k: jax.device_put(v, setup.batch_sharding) for k, v in host.items() if k in setup.batch_structs()}
    state = setup.init_state()
    times = []
    for i in range(warmup + timed):
        started = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        if i >= warmup:
            times.append(time.perf_counter() - started)
    step_s = statistics.median(times)
    tokens_per_s = cfg.train.global_batch * cfg.train.seq_len / step_s
    peak = peak_flops(device.device_kind, cfg.model.compute_dtype)
    flops = train_flops_per_token(setup.shape, cfg.train.seq_len) * tokens_per_s
    memory = compiled.memory_analysis()
    analysed = memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
    return {
        "step_s": step_s,
        "tokens_per_s": tokens_per_s,
        "mfu": flops / peak if peak else None,
        "peak_bytes": analysed + memory.temp_size_in_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a tiny shape, to check the script on a CPU")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args()
    overrides = [*(SMALL if args.small else ONE_B), *args.overrides]
    runtime.initialize(RuntimeConfig())  # the performance flags, as a training run sets them, before the backend starts
    device = jax.devices()[0]
    implemented = implementations(device.platform)
    print(f"{device.device_kind} ({device.platform}), {' '.join(overrides)}")
    print(f"{'attention':>10} {'step':>9} {'tokens/s':>10} {'MFU':>6} {'peak memory':>12}")
    results = {}
    for attention in implemented:
        r = results[attention] = bench(overrides, attention)
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "?"
        print(
            f"{attention:>10} {r['step_s'] * 1e3:8.1f}ms {r['tokens_per_s']:10.0f} {mfu:>6} "
            f"{human_bytes(r['peak_bytes']):>12}"
        )
    fused = [a for a in implemented if a != "xla"]
    for attention in fused:
        speed = results[attention]["tokens_per_s"] / results["xla"]["tokens_per_s"]
        memory = results[attention]["peak_bytes"] / results["xla"]["peak_bytes"]
        print(f"{attention} / xla: tokens/s {speed:.2f}x, peak memory {memory:.2f}x")


if __name__ == "__main__":
    main()
