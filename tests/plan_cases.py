"""The planner against XLA: the cases both tests/test_plan.py and scripts/plan_vs_xla.py compare.

Each case compiles the real train step on emulated CPU devices (jaxscale.aot) and sets XLA's
per-device memory (arguments + temporaries + unaliased outputs) beside the planner's estimate for
the same mesh. Tiny models, so that each compiles in seconds; several meshes, every remat policy,
microbatching, dense and MoE (capacity buffers with expert parallelism, and the dropless grouped path),
and pipeline meshes under each schedule.

TPU_MEMORY_CASES compile for TPU topologies through libtpu instead (no TPU is touched) and compare
with the planner run for that TPU generation, at Llama-like widths.

FLOPs are compared on one-layer models: XLA's cost analysis counts a loop body once, not once per
iteration, so only where the layer scan runs once is its count the whole step's.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax

from jaxscale.aot import CompiledStep, compile_train_step, topology_accelerator, topology_devices
from jaxscale.config import load_config
from jaxscale.hardware import ACCELERATORS, Cluster
from jaxscale.planning.auto import with_loop
from jaxscale.planning.candidate import Candidate
from jaxscale.planning.search import evaluate_config

DENSE, MOE = "configs/tiny.yaml", "configs/tiny_moe.yaml"


def scanned(config: str) -> list[str]:
    """Each case runs the layer loop scanned, and the tiny configs without remat, unless it says otherwise:
    model.scan_unroll and model.remat are `auto` by default (the planner's choice, which a comparison of the
    planner with XLA must not move under it); the large configs set their remat policy."""
    return ["model.scan_unroll=1"] + (["model.remat=none"] if config in (DENSE, MOE) else [])


_FSDP8 = ["mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1"]
_FP32 = "model.compute_dtype=float32"  # activations twice the bytes: the planner must follow the dtype

# name -> (config file, overrides); all on 8 devices.
MEMORY_CASES: dict[str, tuple[str, list[str]]] = {
    "dense data2 fsdp2 tensor2, remat none": (DENSE, []),
    "dense data2 fsdp2 tensor2, remat full": (DENSE, ["model.remat=full"]),
    "dense data2 fsdp2 tensor2, dots_saveable": (DENSE, ["model.remat=dots_saveable"]),
    "dense data2 fsdp2 tensor2, dots_no_batch": (DENSE, ["model.remat=dots_with_no_batch_dims_saveable"]),
    "dense fsdp8, remat none": (DENSE, _FSDP8),
    "dense fsdp8, full, 2 microbatches": (DENSE, [*_FSDP8, "model.remat=full", "train.grad_accum=2"]),
    "dense data8, remat none": (DENSE, ["mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1"]),
    "dense fsdp2 tensor4, remat full": (DENSE, ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=4", "model.remat=full"]),
    "dense data2 fsdp4, dots, 4 microbatches": (
        DENSE,
        ["mesh.data=2", "mesh.fsdp=4", "mesh.tensor=1", "model.remat=dots_saveable", "train.grad_accum=4"]
        + ["train.global_batch=32"],
    ),
    "dense data2 fsdp2 tensor2, fp32, remat none": (DENSE, [_FP32]),
    "dense fsdp8, fp32, dots_saveable": (DENSE, [*_FSDP8, _FP32, "model.remat=dots_saveable"]),
    "moe data2 expert4, fp32, remat none": (MOE, [_FP32]),
    "moe data2 expert4, remat none": (MOE, []),
    "moe fsdp2 expert4, remat full": (MOE, ["mesh.data=1", "mesh.fsdp=2", "model.remat=full"]),
    "moe fsdp8 dropless (grouped), none": (MOE, [*_FSDP8, "mesh.expert=1", "model.capacity_factor=0.0"]),
    "moe fsdp2 expert2 tensor2 dropless, full, 2 micro": (
        MOE,
        ["mesh.data=1", "mesh.fsdp=2", "mesh.expert=2", "mesh.tensor=2", "model.capacity_factor=0.0"]
        + ["model.remat=full", "train.grad_accum=2"],
    ),
    # Llama vocabularies: the logits phase (the larger of it and a layer's backward, not their sum).
    "dense data2 fsdp2 tensor2, vocab 32k": (DENSE, ["model.vocab_size=32768"]),
    "dense fsdp8, fp32, vocab 32k, full": (DENSE, [*_FSDP8, _FP32, "model.vocab_size=32768", "model.remat=full"]),
    "dense data2 fsdp2 tensor2, vocab 128k, chunks of 32": (
        DENSE,
        ["model.vocab_size=128256", "model.logits_chunk=32"],
    ),
    # The layer loop unrolled whole (model.scan_unroll=n_layers): no loop between forward and backward.
    "dense fsdp8 unrolled, remat none": (DENSE, [*_FSDP8, "model.scan_unroll=4"]),
    "dense data2 fsdp2 tensor2 unrolled, full": (DENSE, ["model.scan_unroll=4", "model.remat=full"]),
    "dense fsdp8 d512 8 layers unrolled, 32 tokens a device": (
        DENSE,
        [*_FSDP8, "model.d_model=512", "model.n_heads=8", "model.n_kv_heads=8", "model.head_dim=64"]
        + ["model.d_ff=2048", "model.n_layers=8", "train.seq_len=32", "train.global_batch=8", "model.scan_unroll=8"],
    ),
}

# Pipeline meshes: 1f1b (the default schedule), gpipe and interleaved over 4 microbatches. The planner
# models the worst stage (jaxscale.planning.memory.pipeline_stash_bytes and the group a tick differentiates).
_PIPE2 = ["mesh.data=1", "mesh.pipeline=2", "mesh.fsdp=2", "mesh.tensor=2", "train.grad_accum=4"]
PIPELINE_MEMORY_CASES: dict[str, tuple[str, list[str]]] = {
    "dense pipeline2 fsdp2 tensor2, 1f1b, 4 micro": (DENSE, _PIPE2),
    "dense pipeline2 fsdp2 tensor2, gpipe, 4 micro": (DENSE, [*_PIPE2, "parallel.pipeline_schedule=gpipe"]),
    "dense pipeline2 fsdp2 tensor2, interleaved, 4 micro": (
        DENSE,
        [*_PIPE2, "parallel.pipeline_schedule=interleaved"],
    ),
    "dense pipeline4 fsdp2, 1f1b, remat full": (
        DENSE,
        ["mesh.data=1", "mesh.pipeline=4", "mesh.fsdp=2", "mesh.tensor=1", "train.grad_accum=4", "model.remat=full"],
    ),
    "dense L8 data2 pipeline2 fsdp2, 1f1b, k=1": (
        DENSE,
        ["mesh.data=2", "mesh.pipeline=2", "mesh.fsdp=2", "mesh.tensor=1", "train.grad_accum=4"]
        + ["model.n_layers=8", "parallel.pipeline_backward_ticks=1"],
    ),
    "dense L8 pipeline2 fsdp2 tensor2, gpipe, dots": (
        DENSE,
        [*_PIPE2, "model.n_layers=8", "parallel.pipeline_schedule=gpipe", "model.remat=dots_saveable"],
    ),
}
# Two query heads and two sequences per microbatch: tensor <= 2 and the batch splits at most 2 ways, so
# of 8 devices only pipeline meshes use every one; `plan` must rank one first.
PIPELINE_ONLY = ["model.n_heads=2", "model.n_kv_heads=2", "model.head_dim=64", "train.global_batch=8"]
PIPELINE_ONLY += ["train.grad_accum=4"]

# TPU topologies, compiled through libtpu (nothing run) and compared with the planner for that TPU
# generation: (topology, config file, overrides), meshes sized to the topology's chips. Llama-like
# widths (heads of 128, MLP 4x), at which activations, not fixed overheads, dominate: at the `tiny`
# widths XLA:TPU's tiled layouts and fusions make every figure a few MiB whatever the remat policy.
_LLAMA_WIDTH = ["model.d_model=1024", "model.n_heads=8", "model.head_dim=128", "model.d_ff=4096", "train.seq_len=1024"]
_TPU_FSDP4 = [*_LLAMA_WIDTH, "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=1", "train.global_batch=8"]
LLAMA_70B = "configs/llama3-70b.yaml"
QLORA_70B = ["lora.rank=16", "lora.base_quant=nf4", "train.global_batch=16", "train.seq_len=2048"]
QLORA_70B += ["train.grad_accum=1", "model.logits_chunk=256"]
_RAGGED_MOE = [
    *_LLAMA_WIDTH,
    "model.n_kv_heads=4",
    "model.d_ff=2048",
    "model.capacity_factor=0",
    "mesh.data=1",
    "mesh.expert=4",
    "train.global_batch=8",
]
TPU_MEMORY_CASES: list[tuple[str, str, list[str]]] = [
    ("v5e:2x2", DENSE, [*_TPU_FSDP4, "model.n_kv_heads=8", "model.remat=none"]),
    ("v5e:2x2", DENSE, [*_TPU_FSDP4, "model.n_kv_heads=8", "model.remat=full"]),
    ("v5e:2x2", DENSE, [*_TPU_FSDP4, "model.n_kv_heads=8", "model.remat=dots_saveable"]),
    (
        "v5p:2x2x1",
        DENSE,
        [*_LLAMA_WIDTH, "model.n_kv_heads=4", "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2", "train.global_batch=8"],
    ),
    (
        "v6e:2x2",
        DENSE,
        [*_LLAMA_WIDTH, "model.n_kv_heads=4", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=1", "model.remat=full"],
    ),
    (
        "v6e:2x2",
        DENSE,
        [*_LLAMA_WIDTH, "model.n_kv_heads=8", "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2", "train.global_batch=8"]
        + ["model.remat=dots_with_no_batch_dims_saveable"],
    ),
    # Dropless MoE with experts split: the ragged exchange (auto on TPU), worst-case receive buffers.
    ("v5p:2x2x1", MOE, [*_RAGGED_MOE, "model.remat=none"]),
    ("v5p:2x2x1", MOE, [*_RAGGED_MOE, "model.remat=full"]),
    # Llama 2 and Llama 3 vocabularies: the loss's logits and the gathered head, the larger of them and a
    # layer's backward.
    ("v5e:2x2", DENSE, [*_TPU_FSDP4, "model.n_kv_heads=8", "model.remat=full", "model.vocab_size=32768"]),
    ("v5e:2x2", DENSE, [*_TPU_FSDP4, "model.n_kv_heads=8", "model.remat=full", "model.vocab_size=128256"]),
    # The layer loop unrolled whole.
    ("v5e:2x2", DENSE, [*_TPU_FSDP4, "model.n_kv_heads=8", "model.remat=none", "model.scan_unroll=4"]),
    ("v5e:2x2", DENSE, [*_TPU_FSDP4, "model.n_kv_heads=8", "model.remat=dots_saveable", "model.scan_unroll=4"]),
    # QLoRA (r16, NF4) of Llama 3 70B on 16 v5e chips, the loss in chunks of 256 positions.
    ("v5e:4x4", LLAMA_70B, QLORA_70B),
]

# LoRA and QLoRA: a frozen base (compute dtype, NF4 or int8) and adapter-only gradients and optimizer state.
# The planner keeps the full-training activation inventory for them, which XLA trims when the base
# takes no gradient (measured 18-23% over), so they are compared against a looser, one-sided bound.
LORA_MEMORY_CASES: dict[str, tuple[str, list[str]]] = {
    "dense data2 fsdp2 tensor2, LoRA r8, remat none": (DENSE, ["lora.rank=8"]),
    "dense fsdp8, QLoRA nf4 r8, remat full": (
        DENSE,
        [*_FSDP8, "lora.rank=8", "lora.base_quant=nf4", "model.remat=full"],
    ),
    "dense data2 fsdp2 tensor2, QLoRA int8 r8, remat none": (DENSE, ["lora.rank=8", "lora.base_quant=int8"]),
}

# One layer each, so XLA's FLOP count covers the whole step; wider than `tiny` so elementwise work
# (which the planner leaves out) stays a small share.
FLOP_CASES: dict[str, tuple[str, list[str]]] = {
    "dense 1 layer fsdp4 tensor2, remat full": (
        DENSE,
        ["model.n_layers=1", "model.d_model=256", "model.d_ff=768", "model.n_heads=8", "model.remat=full"]
        + ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"],
    ),
    "moe 1 layer data2 expert4, capacity 1.25": (
        MOE,
        ["model.n_layers=1", "model.d_model=256", "model.d_ff=512", "model.n_heads=8", "model.n_kv_heads=4"],
    ),
}


@dataclass(frozen=True)
class Comparison:
    """One config: the planner's per-device estimate beside XLA's compiled figures."""

    name: str
    planned: Candidate
    compiled: CompiledStep
    devices: int

    @property
    def memory_ratio(self) -> float:
        return self.planned.memory.total / self.compiled.total_bytes

    @property
    def flops_ratio(self) -> float:
        """Planned hardware FLOPs over XLA's (per device x devices); meaningful for one-layer cases only."""
        return self.planned.hardware_flops / (self.compiled.flops * self.devices)


def compare(name: str, config: str, overrides: list[str], devices: list[jax.Device]) -> Comparison:
    """Compile the case's step on `devices` and evaluate the planner on the same mesh (CPU lowering)."""
    cfg = load_config(config, [*scanned(config), *overrides])
    compiled = compile_train_step(cfg, devices)
    cluster = Cluster(f"cpu-{len(devices)}", ACCELERATORS["cpu"], len(devices))
    planned = evaluate_config(with_loop(cfg, compiled.scan_unroll, compiled.remat), compiled.mesh, cluster)
    return Comparison(name, planned, compiled, len(devices))


def compare_on_topology(topology: str, config: str, overrides: list[str]) -> Comparison:
    """Compile the case's step for a TPU topology (needs libtpu; no TPU) and evaluate the planner for that TPU."""
    cfg = load_config(config, [*scanned(config), *overrides])
    devices = topology_devices(topology)
    compiled = compile_train_step(cfg, devices)
    cluster = Cluster(topology, topology_accelerator(topology), len(devices))
    planned = evaluate_config(with_loop(cfg, compiled.scan_unroll, compiled.remat), compiled.mesh, cluster)
    mesh = " ".join(f"{a}={n}" for a, n in compiled.mesh.items() if n > 1)
    return Comparison(
        f"{topology} {config.split('/')[-1]} {mesh} remat={compiled.remat} unroll={compiled.scan_unroll}",
        planned,
        compiled,
        len(devices),
    )
