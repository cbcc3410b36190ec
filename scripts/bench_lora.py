"""Full fine-tuning vs LoRA, QLoRA, DoRA and QDoRA: per-device memory (XLA's memory analysis of the step) and time.

    .venv/bin/python scripts/bench_lora.py            # both parts
    .venv/bin/python scripts/bench_lora.py --part tpu # a Llama 3.2 1B shape compiled for a v5e:4x4 slice (needs libtpu)
    .venv/bin/python scripts/bench_lora.py --part cpu # a smaller shape on 8 emulated CPU devices, compiled and timed

The TPU part compiles ahead of time (`jaxscale compile --topology`'s path: no TPU is touched, so no
step time). "Base weights" are the seven projections of every block, the arrays QLoRA stores as
codes: their bytes per device as the run stores them (fp32 master weights when fully fine-tuned,
the compute dtype (bf16) frozen under LoRA, NF4 codes and fp32 block scales under QLoRA). "Trained
state" is the trained parameters and their Adam moments per device. "Step" is XLA's peak per device
(arguments + temporaries + outputs not aliased to donated inputs).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

# libtpu (the `tpu` extra) looks for TPU hosts at import; this machine compiles for them only.
for key, value in {"TPU_ACCELERATOR_TYPE": "v5litepod-4", "TPU_WORKER_HOSTNAMES": "localhost"}.items():
    os.environ.setdefault(key, value)
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import jax  # noqa: E402 - after the environment libtpu reads
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

VARIANTS = {
    "full": [],
    "LoRA r16": ["lora.rank=16"],
    "QLoRA nf4 r16": ["lora.rank=16", "lora.base_quant=nf4"],
    # DoRA's norms ||W + s A B|| per output feature cost a pass over every adapted weight in each step.
    "DoRA r16": ["lora.rank=16", "lora.dora=true"],
    "QDoRA nf4 r16": ["lora.rank=16", "lora.base_quant=nf4", "lora.dora=true"],
}
LLAMA_1B = [  # Llama 3.2 1B: 16 layers of width 2048, GQA 32/8 heads of 64, MLP 8192, vocabulary 128256
    "model.preset=llama3.2-1b",
    "model.remat=full",
    "train.global_batch=32",
    "train.seq_len=2048",
    "mesh.data=1",
    "mesh.fsdp=16",
]
SMALL = [  # 8 layers of width 512, 8/4 heads of 64, MLP 1536: about 25 M parameters with the byte vocabulary
    "model.d_model=512",
    "model.n_layers=8",
    "model.n_heads=8",
    "model.n_kv_heads=4",
    "model.head_dim=64",
    "model.d_ff=1536",
    "train.global_batch=8",
    "train.seq_len=128",
    "mesh.data=2",
    "mesh.fsdp=2",
    "mesh.tensor=2",
    "data.packing=concat",
]
PROJECTIONS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def per_device_bytes(structs: nnx.State, keep) -> int:
    """Bytes of one device's shards of the leaves whose path `keep` accepts."""
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(structs):
        if keep(jax.tree_util.keystr(path)):
            total += math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    return total


def is_base_weight(path: str) -> bool:
    return path.startswith("[0]") and any(f"'{p}'" in path for p in PROJECTIONS) and "_lora" not in path


def measure(overrides: list[str], devices: list[jax.Device], steps: int) -> dict[str, float]:
    """Compile one variant's train step on `devices`; with `steps` > 0 also run it and time the steps."""
    from jaxscale.config import load_config
    from jaxscale.training.setup import setup_run

    cfg = load_config(None, overrides)
    setup = setup_run(cfg, devices, tokenizer_vocab=257)
    started = time.perf_counter()
    compiled = setup.lower_train_step().compile()
    memory = compiled.memory_analysis()
    row = {
        "compile_s": time.perf_counter() - started,
        "trainable": setup.trainable_count,
        "parameters": setup.parameter_count,
        "base": per_device_bytes(setup.state_structs, is_base_weight),
        "trained_state": per_device_bytes(
            setup.state_structs, lambda p: p.startswith("[1]") or ("_lora" in p if setup.shape.adapters else True)
        ),
        "step": memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes,
    }
    if steps:
        state = setup.init_state()
        rng = np.random.default_rng(0)
        times = []
        for _ in range(steps + 2):
            tokens = rng.integers(0, 257, (cfg.train.global_batch, cfg.train.seq_len + 1)).astype(np.int32)
            batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
            batch["loss_mask"] = np.ones(batch["inputs"].shape, np.float32)
            batch = jax.device_put(batch, setup.batch_sharding)
            started = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics["loss"])
            times.append(time.perf_counter() - started)
        row["step_s"] = statistics.median(times[2:])  # the first two warm up
    return row


def mib(x: float) -> str:
    return f"{x / 2**20:,.1f}"


def table(title: str, rows: dict[str, dict[str, float]]) -> str:
    """A markdown table; ratios are to full fine-tuning, and QLoRA's base also to bf16 LoRA's."""
    full, lora = rows["full"], rows["LoRA r16"]
    timed = "step_s" in full
    lines = [
        f"### {title}",
        "",
        "| | trainable | base weights MiB/device | trained state MiB/device | step MiB/device (x full)"
        + (" | step s (x full)" if timed else "")
        + " |",
        "|---|---|---|---|---" + ("|---" if timed else "") + "|",
    ]
    for name, r in rows.items():
        base = (
            f"{mib(r['base'])} ({r['base'] / lora['base']:.3f}x bf16)" if name != "full" else mib(r["base"]) + " (fp32)"
        )
        line = (
            f"| {name} | {r['trainable']:,} ({r['trainable'] / r['parameters']:.2%}) | {base} | "
            f"{mib(r['trained_state'])} | {mib(r['step'])} ({r['step'] / full['step']:.2f}x)"
        )
        if timed:
            line += f" | {r['step_s']:.3f} ({r['step_s'] / full['step_s']:.2f}x)"
        lines.append(line + " |")
    return "\n".join(lines)


def tpu_part() -> str:
    from jaxscale.aot import topology_devices

    devices = topology_devices("v5e:4x4")
    rows = {name: measure([*LLAMA_1B, *extra], devices, steps=0) for name, extra in VARIANTS.items()}
    return table("Llama 3.2 1B shape, v5e:4x4 (16 chips, fsdp=16), remat full, 32 x 2048 tokens, AOT", rows)


def cpu_part() -> str:
    rows = {name: measure([*SMALL, *extra], jax.devices()[:8], steps=5) for name, extra in VARIANTS.items()}
    return table("25 M shape, 8 emulated CPU devices (data=2 fsdp=2 tensor=2), 8 x 128 tokens, timed", rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("tpu", "cpu", "all"), default="all")
    args = parser.parse_args()
    jax.config.update("jax_num_cpu_devices", 8)
    if args.part in ("tpu", "all"):
        print(tpu_part() + "\n", flush=True)
    if args.part in ("cpu", "all"):
        print(cpu_part(), flush=True)


if __name__ == "__main__":
    main()
