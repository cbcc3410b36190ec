"""Benchmark: per-device memory of the train step with splash attention against XLA's, compiled for a TPU.

Compiles the step of a Llama 3 8B-width model (two layers, to keep the compile short; the attention
of one layer is what differs) at an 8192-token context for a TPU topology through libtpu, no TPU
needed, once per attention implementation, and prints XLA's memory analysis side by side
(target: splash at most 0.5x of xla). The loss runs over 1024 positions at a time
(`model.logits_chunk`), as a long-context run sets it: whole, the 128k-vocabulary float32 logits
and their gradient (4 GiB each per sequence) dominate both implementations' memory.

Usage: .venv/bin/python scripts/bench_attention.py [--topology v5p:2x2x1] [key=value ...]
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
    "train.seq_len=8192",
    "model.remat=full",
    "model.logits_chunk=1024",
    "mesh.fsdp=-1",
    "mesh.tensor=1",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="v5p:2x2x1")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args()
    devices = topology_devices(args.topology)
    shared = [*MODEL, f"train.global_batch={len(devices)}", *args.overrides]
    print(f"llama3-8b width, 2 layers, seq 8192, one sequence per chip, {args.topology} ({len(devices)} chips)")
    print(f"{'attention':>10} {'total/device':>13} {'temporaries':>12} {'compile':>8}")
    totals = {}
    for implementation in ("xla", "splash"):
        cfg = load_config("configs/llama3-8b.yaml", [*shared, f"model.attention={implementation}"])
        started = time.perf_counter()
        step = compile_train_step(cfg, devices)
        totals[implementation] = step.total_bytes
        print(
            f"{implementation:>10} {human_bytes(step.total_bytes):>13} {human_bytes(step.temp_bytes):>12} "
            f"{time.perf_counter() - started:7.1f}s"
        )
    print(f"splash / xla per-device memory: {totals['splash'] / totals['xla']:.3f} (target <= 0.5)")


if __name__ == "__main__":
    main()
