"""`model.scan_unroll=auto` and `model.remat=auto`: the fastest layer loop whose planned memory fits the device.

Both are the default. For the run's mesh, the planner evaluates every pair of a loop unroll (the
layer loop unrolled whole, or scanned: `unroll_options`) and a remat policy (none, dots_saveable,
dots_with_no_batch_dims_saveable, full) and takes the fastest planned step among those whose
planned memory fits; on equal times the one that recomputes less, then the unrolled loop (XLA
fuses across layers, with no loop between them: 0.94-1.02 of a hand-written unrolled step on CPU
where the scan is 1.10-1.22, README "Benchmarks"). The planner's step time prices what the choice
changes: remat's recomputed FLOPs (and the tensor all-reduces they repeat), and the layer loop's
FSDP gathers (a scan gathers each layer's weights for the forward and again for the backward;
unrolled whole, XLA:CPU gathers once and keeps every layer's). Its memory prices what the unrolled
loop keeps (jaxscale.planning.memory.unrolled_bytes and estimate_memory): without remat less
than the scan (XLA recomputes the elementwise work in the backward), but on XLA:CPU every layer's
gathered weights at once. So the loop is scanned, and the layers rematerialized, only where the
memory needs it.

"Fits" keeps two margins: the planner's 10% of device memory for what it leaves out (XLA's scratch,
fragmentation, the runtime: jaxscale.planning.candidate.HEADROOM), and its own error, which the
tests bound at 15% of XLA's figure (tests/test_plan.py): planned x 1.15 <= 0.9 x device memory, so
planned memory may use 78% of the device.

Device memory is `runtime.device_memory_gib` where set; else the allocator's limit of the device
(`memory_stats()["bytes_limit"]`: on GPU the share of HBM XLA's client takes); else the catalog's
HBM for its kind (jaxscale.hardware; a TPU topology compiled for ahead of time); else, on CPU, the
host's physical memory divided by the CPU devices this process drives (emulated devices share it).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax

from jaxscale.config import AUTO, Config
from jaxscale.hardware import Cluster, accelerator_of
from jaxscale.models.transformer import DecoderShape
from jaxscale.parallel.schedules import Schedule
from jaxscale.planning.candidate import HEADROOM, Candidate, evaluate
from jaxscale.planning.memory import loop_iterations
from jaxscale.planning.shards import StateArray, StepShape
from jaxscale.sharding import Rules
from jaxscale.units import GIB, human_bytes

# Least recomputation first: on equal planned times the earlier policy wins.
REMAT_ORDER = ("none", "dots_saveable", "dots_with_no_batch_dims_saveable", "full")
# The planner's error against XLA's memory analysis that the tests allow (tests/test_plan.py).
PLANNER_ERROR = 0.15


@dataclass(frozen=True)
class Budget:
    """Memory per device the auto choices must fit, and where the figure comes from."""

    bytes: float
    source: str

    @property
    def limit(self) -> float:
        """What planned memory may reach: the budget less the planner's headroom and its error."""
        return self.bytes * (1 - HEADROOM) / (1 + PLANNER_ERROR)


@dataclass(frozen=True)
class LoopChoice:
    """The layer loop's unroll and the remat policy a run uses, and why."""

    scan_unroll: int
    remat: str
    planned_bytes: float  # the planner's per-device memory of the step with them
    step_s: float  # the planner's step time with them
    budget: Budget | None  # None: both were set explicitly, nothing was chosen
    reason: str

    def log_row(self) -> dict[str, Any]:
        """The choice as columns of the run's start event."""
        row = {"scan_unroll": self.scan_unroll, "remat": self.remat, "planned_bytes": self.planned_bytes}
        if self.budget is not None:
            row |= {"budget_bytes": self.budget.bytes, "budget_source": self.budget.source}
        return {f"loop_{k}": v for k, v in (row | {"choice": self.reason}).items()}


def with_loop(cfg: Config, scan_unroll: int, remat: str) -> Config:
    """`cfg` with the layer loop and remat policy set: a compiled step's, to plan it as it was compiled."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scan_unroll=scan_unroll, remat=remat))


def wants_choice(cfg: Config) -> bool:
    """Whether the planner chooses anything for this config."""
    return AUTO in (cfg.model.remat, cfg.model.scan_unroll)


def loop_length(shape: DecoderShape, schedule: Schedule | None = None) -> int:
    """Iterations of the longest layer loop (jaxscale.models.transformer.run_stack): an unroll of this many
    leaves no loop. With a pipeline, its stages' loops."""
    if schedule is not None:
        return shape.n_layers // (schedule.stages * schedule.virtual)
    return loop_iterations(shape.layer_kinds)


def unroll_options(shape: DecoderShape, schedule: Schedule | None = None) -> tuple[int, ...]:
    """The unrolls `auto` considers: the loop unrolled whole, and scanned. A pipeline keeps its stages' loops
    scanned (the planner models pipeline ticks scanned).

    Not a divisor in between: an iteration of u layers gathers each layer's weights twice as the scan
    does, and holds u layers' backward at once (v5e: 1.32x the scan's memory at u = 2 of 4 layers without
    remat; XLA:CPU 1.19x), so the planner sees no time it could save for that memory. It is modelled, and
    taken where set.
    """
    n = loop_length(shape, schedule)
    return (1,) if schedule is not None or n == 1 else (n, 1)


def host_memory_bytes() -> float:
    """Physical memory of this host."""
    return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def device_budget(configured_gib: float, devices: Sequence[jax.Device]) -> Budget:
    """Memory per device of `devices` (see the module docstring for the order the sources are read in)."""
    if configured_gib > 0:
        return Budget(configured_gib * GIB, "runtime.device_memory_gib")
    device = devices[0]
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - devices of a topology compiled for have no allocator to ask
        stats = None
    if stats and stats.get("bytes_limit"):
        return Budget(float(stats["bytes_limit"]), f"the {device.device_kind} allocator's limit")
    accelerator = accelerator_of(device.device_kind)
    if accelerator is not None:
        return Budget(accelerator.hbm_bytes, f"{accelerator.name} HBM")
    local = sum(d.process_index == device.process_index for d in devices)
    return Budget(host_memory_bytes() / local, f"host memory / {local} CPU devices")


def cluster_budget(configured_gib: float, cluster: Cluster) -> Budget:
    """`device_budget` for a cluster named rather than present (`jaxscale plan`): the catalog's HBM, or for
    emulated CPU devices this host's memory shared by them."""
    if configured_gib > 0:
        return Budget(configured_gib * GIB, "runtime.device_memory_gib")
    if cluster.accelerator.platform == "cpu":
        return Budget(host_memory_bytes() / cluster.devices, f"host memory / {cluster.devices} CPU devices")
    return Budget(cluster.accelerator.hbm_bytes, f"{cluster.accelerator.name} HBM")


def choose_loop(
    step: StepShape,
    shape: DecoderShape,
    arrays: list[StateArray],
    sizes: dict[str, int],
    rules: Rules,
    cluster: Cluster,
    schedule: Schedule | None,
    unroll: int | str,
    budget: Budget | None,
) -> tuple[Candidate, LoopChoice]:
    """The evaluated step with the unroll and remat `auto` picks on this mesh for `budget` (see the module
    docstring), and the choice. `step.remat` and `unroll` are the config's (`auto` or a value, which is kept);
    with neither `auto`, `budget` may be None."""
    remats = REMAT_ORDER if step.remat == AUTO else (step.remat,)
    unrolls = unroll_options(shape, schedule) if unroll == AUTO else (unroll,)
    whole = loop_length(shape, schedule)
    if len(remats) == len(unrolls) == 1:
        c = evaluate(step, dataclasses.replace(shape, scan_unroll=unrolls[0]), arrays, sizes, rules, cluster, schedule)
        return c, LoopChoice(c.scan_unroll, c.remat, c.memory.total, c.time.step_s, None, "set in the config")
    if budget is None:
        raise ValueError("model.remat or model.scan_unroll is auto: the choice needs the device's memory budget")
    tried = [
        evaluate(
            dataclasses.replace(step, remat=r),
            dataclasses.replace(shape, scan_unroll=u),
            arrays,
            sizes,
            rules,
            cluster,
            schedule,
        )
        for r in remats
        for u in unrolls
    ]
    fitting = [c for c in tried if c.memory.total <= budget.limit]
    if fitting:
        best = min(fitting, key=lambda c: (c.time.step_s, REMAT_ORDER.index(c.remat), -min(c.scan_unroll, whole)))
        why = f"the fastest planned step ({best.time.step_s:.3g} s) whose memory fits"
    else:
        best = min(tried, key=lambda c: c.memory.total)
        why = "none fits; the least memory"
    unrolled = min(tried, key=lambda c: (-min(c.scan_unroll, whole), c.memory.total))
    detail = ""
    if best.scan_unroll < whole and unrolled.memory.total > budget.limit:
        detail = (
            f"; unrolled whole ({unrolled.remat}) it needs {human_bytes(unrolled.memory.total)}, every layer's "
            f"gathered weights alive at once"
        )
    loop = "unrolled whole" if best.scan_unroll >= whole else f"{whole // best.scan_unroll} iterations"
    reason = (
        f"model.scan_unroll={best.scan_unroll} ({loop}), model.remat={best.remat}: {why}, "
        f"{human_bytes(best.memory.total)} planned of {human_bytes(budget.limit)} allowed "
        f"({human_bytes(budget.bytes)} from {budget.source}, less {HEADROOM:.0%} headroom and the planner's "
        f"{PLANNER_ERROR:.0%} error){detail}"
    )
    return best, LoopChoice(best.scan_unroll, best.remat, best.memory.total, best.time.step_s, budget, reason)
