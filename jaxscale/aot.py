"""Ahead-of-time compile of the real train step for a target: emulated CPU devices or a TPU topology.

Nothing runs and nothing is allocated: the run setup (jaxscale.training.setup) is built for the target's
devices, its step lowered on ShapeDtypeStructs and compiled by XLA, which needs no device to exist here. A TPU
topology ("v5e:4x4") needs the optional libtpu (`pip install 'jaxscale[tpu]'`), not a TPU.
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass

import jax

from jaxscale.config import Config
from jaxscale.errors import UserError
from jaxscale.hardware import ACCELERATORS, Accelerator, Cluster
from jaxscale.planning.auto import with_loop
from jaxscale.planning.candidate import Candidate
from jaxscale.planning.search import evaluate_config, plan
from jaxscale.training.setup import setup_run
from jaxscale.units import GIB, human_bytes

# XLA's TPU compile-time OOM: "... Used 28.65G of 15.75G hbm. Exceeded hbm capacity by 12.90G." or
# "... (28.65G) exceeds available HBM (15.75G)". Either way: the first size is the need, the second the HBM.
_TPU_OOM = re.compile(r"\(?([\d.]+)([KMGT])\)?\s+(?:of|exceeds available HBM)\s+\(?([\d.]+)([KMGT])", re.IGNORECASE)
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


@dataclass(frozen=True)
class CompiledStep:
    """XLA's per-device view of one compiled train step. Bytes and FLOPs are per device."""

    mesh: dict[str, int]
    platform: str
    argument_bytes: int  # state + batch shards the step reads
    output_bytes: int  # new state + metrics
    alias_bytes: int  # outputs written into donated argument buffers (the state)
    temp_bytes: int  # XLA's peak of temporaries: activations, gradients, gathered weights, ...
    flops: float  # XLA cost analysis of the partitioned step, per device
    scan_unroll: int  # the layer loop it was compiled with (as set, or as `auto` chose: jaxscale.planning.auto)
    remat: str

    @property
    def total_bytes(self) -> int:
        """What the step holds at once: arguments, outputs that do not reuse a donated buffer, temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


class HbmOutOfMemory(Exception):
    """XLA refused the step at compile time: it needs more memory per device than the target has (bytes)."""

    def __init__(self, needed_bytes: float, available_bytes: float) -> None:
        super().__init__(f"needs {needed_bytes:.4g} of {available_bytes:.4g} bytes of HBM per device")
        self.needed_bytes = needed_bytes
        self.available_bytes = available_bytes


def first_cpu_devices(count: int) -> list[jax.Device]:
    """The first `count` CPU devices; the backend must have been started with at least that many."""
    devices = jax.devices("cpu")
    if count < 1 or count > len(devices):
        raise UserError(
            f"--cpu-devices {count} is not available: this process has {len(devices)} CPU devices "
            f"(set before JAX starts, e.g. by the CLI flag itself); pick 1 to {len(devices)}."
        )
    return devices[:count]


def topology_accelerator(topology: str) -> Accelerator:
    """The catalog entry of a topology's TPU generation ("v5e:4x4" -> v5e)."""
    generation = topology.split(":")[0].lower()
    if generation not in ACCELERATORS or generation in ("cpu", "a100", "h100", "h200"):
        raise UserError(f"--topology {topology}: unknown TPU generation '{generation}'; use v4, v5e, v5p or v6e.")
    return ACCELERATORS[generation]


def oom_message(cfg: Config, needed: float, available: float, cluster: Cluster, where: str) -> str:
    """ "needs X GiB of Y GiB HBM per device; try ..." with the planner's cheapest fix for these devices."""
    p = plan(
        cfg, dataclasses.replace(cluster, accelerator=dataclasses.replace(cluster.accelerator, hbm_bytes=available))
    )
    if p.ranked:
        best = p.ranked[0]
        fix = " ".join(f"mesh.{a}={n}" for a, n in best.mesh.items())
        hint = f"try {fix} (the planner predicts {human_bytes(best.memory.total)})"
    elif p.suggestion:
        hint = f"try {p.suggestion}"
    else:
        hint = "no mesh, remat policy or microbatch count of these devices fits it: use more devices"
    return (
        f"The train step needs {human_bytes(needed)} of {human_bytes(available)} HBM per device on {where} "
        f"(XLA's memory analysis); {hint}. Nothing was run."
    )


def topology_devices(topology: str) -> list[jax.Device]:
    """Devices of a TPU topology such as "v5e:4x4" or "v5p:2x2x2", compiled for but never touched."""
    if not re.fullmatch(r"v\d+[a-z]*:\d+(x\d+)+", topology):
        raise UserError(
            f"--topology '{topology}' is not of the form GENERATION:SHAPE, e.g. v5e:4x4, v5p:2x2x2 or v6e:8x8."
        )
    try:
        from jax.experimental import topologies

        desc = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    except Exception as e:  # noqa: BLE001 - libtpu's errors carry no common type; its text is the message
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "tpu" in text.lower() and ("unknown backend" in text.lower() or "not found" in text.lower()):
            raise UserError(
                f"--topology {topology} needs libtpu, which is not installed; install it with "
                f"`pip install 'jax[tpu]==0.12.0.1'` (the optional `tpu` extra). No TPU is needed."
            ) from None
        raise UserError(f"--topology {topology}: libtpu could not describe it ({text}).") from None
    return list(desc.devices)


def compile_train_step(cfg: Config, devices: list[jax.Device]) -> CompiledStep:
    """Lower and compile the train step `jaxscale train` would run on `devices`; raise HbmOutOfMemory on a TPU OOM.

    The run setup is the training loop's own (a UserError where `train` would refuse the layout).
    """
    setup = setup_run(cfg, devices)
    try:
        compiled = setup.lower_train_step().compile()
    except Exception as e:  # noqa: BLE001 - XlaRuntimeError is not importable under a stable name
        oom = _parse_oom(str(e))
        if oom is None:
            raise
        raise oom from None
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return CompiledStep(
        mesh={a: int(s) for a, s in setup.mesh.shape.items()},
        platform=devices[0].platform,
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        flops=float(cost.get("flops", 0.0)),
        scan_unroll=setup.loop.scan_unroll,
        remat=setup.loop.remat,
    )


def _parse_oom(text: str) -> HbmOutOfMemory | None:
    if "RESOURCE_EXHAUSTED" not in text and "HbmOom" not in text:
        return None
    match = _TPU_OOM.search(text)
    if match is None:
        return HbmOutOfMemory(float("nan"), float("nan"))
    need, need_unit, have, have_unit = match.groups()
    return HbmOutOfMemory(float(need) * _UNITS[need_unit.upper()], float(have) * _UNITS[have_unit.upper()])


@dataclass(frozen=True)
class CompileReport:
    """A compiled step on its target, beside the planner's estimate of the same mesh."""

    step: CompiledStep
    where: str  # the target, in words
    devices: int
    compile_s: float
    capacity: float | None  # memory per device checked against, bytes; None: not checked
    estimate: Candidate  # the planner's, for the same mesh

    def as_dict(self) -> dict:
        return dataclasses.asdict(self.step) | {
            "total_bytes": self.step.total_bytes,
            "compile_s": self.compile_s,
            "planned_bytes": self.estimate.memory.total,
            "planned_hardware_flops": self.estimate.hardware_flops,
        }


def compile_for_target(
    cfg: Config, topology: str | None = None, cpu_devices: int | None = None, hbm_gib: float | None = None
) -> CompileReport:
    """Compile the train step of `cfg` for a TPU topology or `cpu_devices` CPU devices; a UserError if it cannot fit.

    `hbm_gib` overrides the memory per device checked against (default: the TPU's HBM; none on CPU), and the one
    `auto` loop choices fit (runtime.device_memory_gib).
    """
    if (topology is None) == (cpu_devices is None):
        raise UserError("Name one compile target: a TPU topology (e.g. v5e:4x4) or a number of CPU devices.")
    if hbm_gib:  # model.remat / model.scan_unroll=auto fit what is checked against
        cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, device_memory_gib=hbm_gib))
    if cpu_devices is not None:
        if cpu_devices < 1:
            raise UserError(f"--cpu-devices {cpu_devices} must be at least 1.")
        try:
            jax.config.update("jax_platforms", "cpu")
            jax.config.update("jax_num_cpu_devices", cpu_devices)
        except RuntimeError:
            pass  # the backend has started (compile called from Python): first_cpu_devices() checks what it has
        devices, accelerator, where = first_cpu_devices(cpu_devices), ACCELERATORS["cpu"], f"{cpu_devices} CPU devices"
    else:
        accelerator = topology_accelerator(topology)
        devices, where = topology_devices(topology), f"TPU topology {topology}"
    capacity = hbm_gib * GIB if hbm_gib else (None if cpu_devices is not None else accelerator.hbm_bytes)
    cluster = Cluster(where, accelerator, len(devices))
    started = time.perf_counter()
    try:
        step = compile_train_step(cfg, devices)
    except HbmOutOfMemory as oom:
        available = oom.available_bytes if oom.available_bytes == oom.available_bytes else accelerator.hbm_bytes
        raise UserError(oom_message(cfg, oom.needed_bytes, available, cluster, where)) from None
    seconds = time.perf_counter() - started
    if capacity is not None and step.total_bytes > capacity:
        raise UserError(oom_message(cfg, step.total_bytes, capacity, cluster, where))
    estimate = evaluate_config(with_loop(cfg, step.scan_unroll, step.remat), step.mesh, cluster)
    return CompileReport(step, where, len(devices), seconds, capacity, estimate)


def format_compile(report: CompileReport) -> str:
    """XLA's memory and FLOPs of the compiled step, beside the planner's, for people."""
    step, estimate = report.step, report.estimate
    mesh = " ".join(f"{a}={n}" for a, n in step.mesh.items() if n > 1) or "one device"
    limit = f" of {human_bytes(report.capacity)}" if report.capacity else ""
    ratio = estimate.memory.total / step.total_bytes
    planned = f"  the planner's estimate: {human_bytes(estimate.memory.total)} (ratio {ratio:.2f})\n"
    planned_flops = f" The planner's full step: {estimate.hardware_flops / report.devices:.4g} FLOPs per device."
    return (
        f"jaxscale compile: the train step for {report.where}, mesh {mesh}, model.scan_unroll={step.scan_unroll}, "
        f"model.remat={step.remat}, compiled in {report.compile_s:.1f} s (nothing run)\n"
        f"XLA memory analysis, per device: arguments {human_bytes(step.argument_bytes)}, outputs "
        f"{human_bytes(step.output_bytes)} (aliased to donated arguments {human_bytes(step.alias_bytes)}), "
        f"temporaries {human_bytes(step.temp_bytes)}\n"
        f"  held at once (arguments + temporaries + outputs not aliased): {human_bytes(step.total_bytes)}{limit}\n"
        f"{planned}"
        f"XLA cost analysis: {step.flops:.4g} FLOPs per device; it counts a loop body once, so the layer scan "
        f"(and the microbatch loop) count one iteration.{planned_flops}"
    )
