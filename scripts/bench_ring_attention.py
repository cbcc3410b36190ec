"""Benchmark: per-device memory of the train step with ring attention against all-gathered keys and values,
compiled for a TPU.

Compiles the step of a Llama 3 8B-width model (two layers, to keep the compile short; the attention of
one layer is what differs) on one 32768-token sequence split over the `context` axis of a TPU topology
through libtpu, no TPU needed, once per `parallel.context_attention`, and prints XLA's memory analysis side
by side. The all-gather form holds every key and value and a [L / C, L] score matrix per head on each
device; the ring holds two key/value blocks of L / C tokens and one tile of scores. The loss runs over 1024
positions at a time (`model.logits_chunk`), as a long-context run sets it.

Usage: .venv/bin/python scripts/bench_ring_attention.py [--topology v5p:2x2x2] [key=value ...]
Needs the `tpu` extra (libtpu): pip install -e '.[tpu]'.
"""

from __future__ import annotations

import argparse
import time

from jaxscale.aot import compile_train_step, topology_devices
from jaxscale.config import load_config
from jaxscale.units import human_bytes

MODEL = [
    "model.n_layers=2",
    "train.seq_len=32768",
    "train.global_batch=1",
    "model.remat=full",
    "model.logits_chunk=1024",
    "data.packing=segmented",
    "mesh.data=1",
    "mesh.fsdp=1",
    "mesh.tensor=1",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="v5p:2x2x2")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args()
    devices = topology_devices(args.topology)
    shared = [*MODEL, f"mesh.context={len(devices)}", *args.overrides]
    print(f"llama3-8b width, 2 layers, one 32768-token sequence over mesh.context={len(devices)}, {args.topology}")
    print(f"{'attention':>10} {'total/device':>13} {'temporaries':>12} {'compile':>8}")
    totals, temporaries = {}, {}
    for how in ("allgather", "ring"):
        cfg = load_config("configs/llama3-8b.yaml", [*shared, f"parallel.context_attention={how}"])
        started = time.perf_counter()
        step = compile_train_step(cfg, devices)
        totals[how], temporaries[how] = step.total_bytes, step.temp_bytes
        print(
            f"{how:>10} {human_bytes(step.total_bytes):>13} {human_bytes(step.temp_bytes):>12} "
            f"{time.perf_counter() - started:7.1f}s"
        )
    print(
        f"ring / allgather per-device memory: {totals['ring'] / totals['allgather']:.3f} "
        f"(temporaries: {temporaries['ring'] / temporaries['allgather']:.3f})"
    )


if __name__ == "__main__":
    main()
