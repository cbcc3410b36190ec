"""Print the planner's per-device memory and FLOPs beside XLA's for every case tests/test_plan.py checks.

    .venv/bin/python scripts/plan_vs_xla.py            # emulated CPU devices (8)
    .venv/bin/python scripts/plan_vs_xla.py --tpu      # TPU topologies instead (needs the optional libtpu)

Memory: planned / compiled (arguments + temporaries + outputs not aliased to donated arguments);
the tests require every ratio within +-15%. FLOPs: planned hardware FLOPs / XLA's cost analysis on
the one-layer cases (XLA counts a loop body once); the tests require +-5%. The TPU rows compile the
same step for a TPU topology through libtpu (no TPU touched) and compare it with the planner run for
that TPU generation, whose grouped matmuls are not lowered densely as on XLA:CPU.
"""

from __future__ import annotations

import argparse

import jax

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 8)

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from jaxscale.aot import compile_train_step, topology_accelerator, topology_devices  # noqa: E402
from jaxscale.config import load_config  # noqa: E402
from jaxscale.hardware import Cluster  # noqa: E402
from jaxscale.planning.search import evaluate_config  # noqa: E402
from jaxscale.units import human_bytes  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from plan_cases import DENSE, FLOP_CASES, MEMORY_CASES, MOE, compare  # noqa: E402

# Llama-like widths at which activations, not fixed overheads, dominate: at the `tiny` widths
# XLA:TPU's tiled layouts and fusions make every figure a few MiB whatever the remat policy.
_WIDE = ["model.d_model=1024", "model.d_ff=4096", "model.n_heads=8", "model.n_kv_heads=8", "train.seq_len=1024"]
_WIDE_MOE = ["model.d_model=1024", "model.d_ff=2048", "model.n_heads=8", "model.n_kv_heads=8", "train.seq_len=1024"]
_FSDP4 = ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=1", "train.global_batch=8"]

# (topology, config, overrides): meshes sized to the topology's chips.
TPU_CASES = [
    ("v5e:2x2", DENSE, [*_WIDE, *_FSDP4, "model.remat=none"]),
    ("v5e:2x2", DENSE, [*_WIDE, *_FSDP4, "model.remat=full"]),
    ("v5e:2x2", DENSE, [*_WIDE, *_FSDP4, "model.remat=dots_saveable"]),
    ("v5p:2x2x1", DENSE, [*_WIDE, "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2", "train.global_batch=8"]),
    ("v6e:2x4", DENSE, [*_WIDE, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "model.remat=full"]),
    ("v6e:2x4", MOE, [*_WIDE_MOE, "mesh.data=2", "mesh.fsdp=1", "mesh.expert=4", "model.remat=full"]),
]


def _row(name: str, planned: float, compiled: float) -> str:
    return f"{name:52s} {human_bytes(planned):>11} {human_bytes(compiled):>11} {planned / compiled:7.3f}"


def compare_on_tpu() -> None:
    """The TPU_CASES: planner vs XLA:TPU per-device memory."""
    print("per-device memory on TPU topologies (compiled through libtpu, nothing run)")
    print(f"{'topology and config':52s} {'planned':>11} {'XLA':>11} {'ratio':>7}")
    ratios = []
    for topology, config, overrides in TPU_CASES:
        cfg = load_config(config, overrides)
        tpu_devices = topology_devices(topology)
        step = compile_train_step(cfg, tpu_devices)
        cluster = Cluster(topology, topology_accelerator(topology), len(tpu_devices))
        planned = evaluate_config(cfg, step.mesh, cluster)
        ratios.append(planned.memory.total / step.total_bytes)
        mesh = " ".join(f"{a}={n}" for a, n in step.mesh.items() if n > 1)
        print(
            _row(
                f"{topology} {config.split('/')[-1]} {mesh} remat={cfg.model.remat}",
                planned.memory.total,
                step.total_bytes,
            )
        )
    print(f"worst memory ratio: {max(ratios, key=lambda r: abs(r - 1)):.3f} over {len(ratios)} TPU configs")


def compare_on_cpu() -> None:
    """The test cases: planner vs XLA:CPU memory on 8 emulated devices, and FLOPs."""
    devices = jax.devices()
    print(f"per-device memory, {len(devices)} emulated CPU devices")
    print(f"{'config':52s} {'planned':>11} {'XLA':>11} {'ratio':>7}")
    ratios = []
    for name, case in MEMORY_CASES.items():
        c = compare(name, *case, devices)
        ratios.append(c.memory_ratio)
        print(_row(name, c.planned.memory.total, c.compiled.total_bytes))
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
