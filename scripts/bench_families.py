"""QLoRA beside bf16 LoRA on the qwen3-8b and gemma3-12b presets: per-device memory of the compiled step and the
planner's prediction of it.

    .venv/bin/python scripts/bench_families.py [--topology v5e:2x2] [--seq-len 2048]

Each variant is what `jaxscale compile --topology v5e:2x2` compiles (ahead of time, for the topology's
devices; no TPU is touched, so nothing is timed): the presets need no weights. The step trains LoRA
adapters of rank 16 on all seven projections, the frozen base in bf16 or as NF4 codes, remat full,
one sequence per device, the devices splitting the model by FSDP. Printed per variant: XLA's memory
analysis (arguments, temporaries, and what is held at once: arguments + temporaries + outputs not
aliased to donated inputs; for a step over the chip's memory, what XLA's out-of-memory error says it
needs), the planner's estimate of the same mesh with its parts, and their ratio.
Needs the `tpu` extra (libtpu).
"""

from __future__ import annotations

import argparse
import os

# libtpu (the `tpu` extra) looks for TPU hosts at import; this machine compiles for them only.
for key, value in {"TPU_ACCELERATOR_TYPE": "v5litepod-4", "TPU_WORKER_HOSTNAMES": "localhost"}.items():
    os.environ.setdefault(key, value)
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import time  # noqa: E402

from jaxscale.aot import HbmOutOfMemory, compile_train_step, topology_accelerator, topology_devices  # noqa: E402
from jaxscale.config import load_config  # noqa: E402
from jaxscale.hardware import Cluster  # noqa: E402
from jaxscale.mesh import AXES  # noqa: E402
from jaxscale.planning.search import evaluate_config  # noqa: E402
from jaxscale.units import GIB  # noqa: E402

PRESETS = ("qwen3-8b", "gemma3-12b")
VARIANTS = {"LoRA r16, bf16 base": ["lora.rank=16"], "QLoRA r16, NF4 base": ["lora.rank=16", "lora.base_quant=nf4"]}


def run(preset: str, variant: list[str], topology: str, seq_len: int) -> dict:
    """XLA's and the planner's per-device bytes of one variant; XLA's need from its out-of-memory error where the
    step does not fit the chip."""
    devices = topology_devices(topology)
    overrides = [
        f"model.preset={preset}",
        "model.remat=full",
        "model.scan_unroll=1",  # the scanned layer loop (auto may unroll it: another step, far longer to compile)
        f"train.seq_len={seq_len}",
        f"train.global_batch={len(devices)}",
        "mesh.data=1",
        f"mesh.fsdp={len(devices)}",
        "mesh.tensor=1",
        "data.tokenizer=byte",
        *variant,
    ]
    cfg = load_config("configs/tiny.yaml", overrides)
    started = time.perf_counter()
    try:
        step = compile_train_step(cfg, devices)
        held, fits, xla = step.total_bytes, True, f"arguments {step.argument_bytes / GIB:.2f}, temporaries "
        xla += f"{step.temp_bytes / GIB:.2f}, held {step.total_bytes / GIB:.2f} GiB"
    except HbmOutOfMemory as oom:
        held, fits, xla = oom.needed_bytes, False, f"needs {oom.needed_bytes / GIB:.2f} GiB: does not fit"
    seconds = time.perf_counter() - started
    sizes = {axis: 1 for axis in AXES} | {"fsdp": len(devices)}
    memory = evaluate_config(cfg, sizes, Cluster(topology, topology_accelerator(topology), len(devices))).memory
    parts = ("params", "optimizer", "gradients", "activations", "working", "logits")
    return {"xla": xla, "held": held, "fits": fits, "planned": memory.total, "seconds": seconds} | {
        "parts": {k: getattr(memory, k) for k in parts}
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="v5e:2x2")
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()
    print(f"per device, {args.topology}, seq_len {args.seq_len}, one sequence per device, remat full, FSDP")
    for preset in PRESETS:
        for name, variant in VARIANTS.items():
            r = run(preset, variant, args.topology, args.seq_len)
            parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in r["parts"].items())
            print(
                f"{preset:11s} {name:20s} XLA: {r['xla']} | planner {r['planned'] / GIB:.2f} GiB ({parts}) | "
                f"planner / XLA {r['planned'] / r['held']:.3f} | compiled in {r['seconds']:.0f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
