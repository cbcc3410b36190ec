"""Print the planner's per-device memory and FLOPs beside XLA's for every case tests/test_plan.py checks.

    .venv/bin/python scripts/plan_vs_xla.py            # emulated CPU devices (8)
    .venv/bin/python scripts/plan_vs_xla.py --tpu      # TPU topologies instead (needs the optional libtpu)

Memory: planned / compiled (arguments + temporaries + outputs not aliased to donated arguments),
pipeline meshes included (the planner's figure is the worst stage's); the tests require every
ratio within +-15%. FLOPs: planned hardware FLOPs / XLA's cost analysis on the one-layer cases (XLA
counts a loop body once); the tests require +-5%. The TPU rows compile the same step for a TPU
topology through libtpu (no TPU touched) and compare it with the planner run for that TPU
generation, whose grouped matmuls are not lowered densely as on XLA:CPU.
"""

from __future__ import annotations

import argparse

import jax

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 8)

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from jaxscale.units import human_bytes  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from plan_cases import (  # noqa: E402
    FLOP_CASES,
    MEMORY_CASES,
    PIPELINE_MEMORY_CASES,
    TPU_MEMORY_CASES,
    compare,
    compare_on_topology,
)


def _row(name: str, planned: float, compiled: float) -> str:
    return f"{name:52s} {human_bytes(planned):>11} {human_bytes(compiled):>11} {planned / compiled:7.3f}"


def compare_on_tpu() -> None:
    """The TPU_MEMORY_CASES: planner vs XLA:TPU per-device memory."""
    print("per-device memory on TPU topologies (compiled through libtpu, nothing run)")
    print(f"{'topology and config':52s} {'planned':>11} {'XLA':>11} {'ratio':>7}")
    ratios = []
    for case in TPU_MEMORY_CASES:
        c = compare_on_topology(*case)
        ratios.append(c.memory_ratio)
        print(_row(c.name, c.planned.memory.total, c.compiled.total_bytes), flush=True)
    worst = max(ratios, key=lambda r: abs(r - 1))
    print(f"worst memory ratio: {worst:.3f} over {len(ratios)} TPU configs (tests allow 0.85 to 1.15)")


def compare_on_cpu() -> None:
    """The test cases: planner vs XLA:CPU memory on 8 emulated devices, and FLOPs."""
    devices = jax.devices()
    print(f"per-device memory, {len(devices)} emulated CPU devices")
    print(f"{'config':52s} {'planned':>11} {'XLA':>11} {'ratio':>7}")
    ratios = []
    for name, case in (MEMORY_CASES | PIPELINE_MEMORY_CASES).items():
        c = compare(name, *case, devices)
        ratios.append(c.memory_ratio)
        print(_row(name, c.planned.memory.total, c.compiled.total_bytes), flush=True)
    worst = max(ratios, key=lambda r: abs(r - 1))
    print(f"worst memory ratio: {worst:.3f} over {len(ratios)} configs (tests allow 0.85 to 1.15)\n")

    print("FLOPs per step, all devices (one-layer models)")
    for name, case in FLOP_CASES.items():
        c = compare(name, *case, devices)
        print(f"{name:52s} {c.planned.hardware_flops:11.4g} {c.compiled.flops * c.devices:11.4g} {c.flops_ratio:7.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tpu", action="store_true", help="compare on TPU topologies instead (needs libtpu)")
    compare_on_tpu() if parser.parse_args().tpu else compare_on_cpu()
