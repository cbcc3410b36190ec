"""One mesh on one cluster, evaluated: what each device holds, what it moves, how long a step takes.

Below the mesh search (jaxscale.planning.search) and the run setup's auto choices
(jaxscale.planning.auto), both of which evaluate many of them; it reads no config, only the
step's shapes, the state's arrays and the rule table.
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxscale.hardware import Cluster
from jaxscale.mesh import AXES, abstract_mesh
from jaxscale.models.transformer import DecoderShape
from jaxscale.parallel.schedules import Schedule
from jaxscale.planning.cost import AxisTraffic, StepTime, mfu, step_flops, step_time, traffic
from jaxscale.planning.memory import MemoryEstimate, estimate_memory
from jaxscale.planning.shards import Placement, StateArray, StepShape, local_sizes
from jaxscale.sharding import Rules

# Share of HBM left for what the model leaves out: XLA's scratch, fragmentation, the runtime.
HEADROOM = 0.10


@dataclass(frozen=True)
class Candidate:
    """One mesh on one cluster: what each device holds, what it moves, how long a step takes."""

    mesh: dict[str, int]
    memory: MemoryEstimate
    fits: bool
    traffic: list[AxisTraffic]
    time: StepTime
    mfu: float
    hardware_flops: float  # per step, all devices
    schedule: Schedule | None = None  # the pipeline schedule on a pipeline mesh
    scan_unroll: int = 1  # the layer loop's unroll this candidate was evaluated with
    remat: str = "none"  # and its remat policy

    def label(self) -> str:
        return " ".join(f"{a}={n}" for a, n in self.mesh.items() if n > 1) or "one device"


def evaluate(
    step: StepShape,
    shape: DecoderShape,
    arrays: list[StateArray],
    sizes: dict[str, int],
    rules: Rules,
    cluster: Cluster,
    schedule: Schedule | None = None,
) -> Candidate:
    """Memory, traffic and time of the step on the mesh with these axis sizes (which must be a valid layout,
    whose pipeline `schedule` is the layout's: jaxscale.training.layout.Layout.schedule), with the remat
    policy of `step` and the loop unroll of `shape` (both chosen: not `auto`)."""
    mesh = abstract_mesh(sizes)
    s = local_sizes(step, shape, rules, mesh, cluster.accelerator.platform)
    dense_ragged = cluster.accelerator.platform == "cpu"
    placement = Placement(step, shape, arrays, rules, mesh, s, schedule)
    memory = estimate_memory(placement, dense_ragged)
    model_flops, hardware_flops = step_flops(step, shape, s, dense_ragged, schedule is not None)
    axes = traffic(placement, cluster)
    t = step_time(model_flops, hardware_flops, axes, cluster, schedule)
    fits = memory.total <= cluster.accelerator.hbm_bytes * (1 - HEADROOM)
    mesh_sizes = {a: sizes[a] for a in AXES}
    return Candidate(
        mesh_sizes, memory, fits, axes, t, mfu(t, cluster), hardware_flops, schedule, shape.scan_unroll, step.remat
    )
