"""Evaluate a mesh on a cluster, and search every factorization of the devices for the fastest that fits."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

from jaxscale.config import Config
from jaxscale.errors import UserError
from jaxscale.hardware import Cluster
from jaxscale.mesh import AXES, abstract_mesh, resolve_axis_sizes
from jaxscale.models.transformer import DecoderShape
from jaxscale.planning.cost import AxisTraffic, StepTime, mfu, step_flops, step_time, traffic
from jaxscale.planning.memory import MemoryEstimate, estimate_memory
from jaxscale.planning.shards import Placement, StateArray, StepShape, local_sizes, state_arrays
from jaxscale.sharding import Rules, make_rules
from jaxscale.training.layout import check_layout
from jaxscale.training.setup import run_shape, state_builder
from jaxscale.training.state import abstract_state
from jaxscale.units import human_bytes

# Share of HBM left for what the model leaves out: XLA's scratch, fragmentation, the runtime.
HEADROOM = 0.10
SEARCHED_AXES = ("data", "fsdp", "expert", "tensor")  # pipeline: its bubble and stash are not modelled yet
# Splitting sequences costs a gather of keys and values every layer; it is searched only when no mesh
# without it fits (a sequence too long for one device, or fewer sequences than devices).
WITH_CONTEXT = ("data", "fsdp", "expert", "context", "tensor")


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

    def label(self) -> str:
        return " ".join(f"{a}={n}" for a, n in self.mesh.items() if n > 1) or "one device"


@dataclass(frozen=True)
class Suggestion:
    """A config change with which some mesh fits, and the best mesh then."""

    key: str
    value: object
    best: Candidate

    def __str__(self) -> str:
        then = f"{human_bytes(self.best.memory.total)} with {self.best.label()}"
        return f"{self.key}={self.value} (the planner then predicts {then})"


@dataclass
class Plan:
    """The ranked meshes for a config on a cluster, and the config's own mesh when it resolves there."""

    cfg: Config
    shape: DecoderShape
    cluster: Cluster
    parameters: int
    ranked: list[Candidate]  # fitting meshes, fastest first
    too_big: list[Candidate]  # meshes that do not fit, smallest memory first
    rejected: dict[str, str] = field(default_factory=dict)  # mesh label -> why it is not a valid layout
    configured: Candidate | None = None
    suggestion: Suggestion | None = None  # when nothing fits: the first change that makes a mesh fit


def evaluate(
    step: StepShape,
    shape: DecoderShape,
    arrays: list[StateArray],
    sizes: dict[str, int],
    rules: Rules,
    cluster: Cluster,
) -> Candidate:
    """Memory, traffic and time of the step on the mesh with these axis sizes (which must be a valid layout)."""
    mesh = abstract_mesh(sizes)
    s = local_sizes(step, shape, rules, mesh, cluster.accelerator.platform)
    dense_ragged = cluster.accelerator.platform == "cpu"
    placement = Placement(step, shape, arrays, rules, mesh, s)
    memory = estimate_memory(placement, dense_ragged)
    model_flops, hardware_flops = step_flops(step, shape, s, dense_ragged)
    axes = traffic(placement, cluster)
    t = step_time(model_flops, hardware_flops, axes, cluster)
    fits = memory.total <= cluster.accelerator.hbm_bytes * (1 - HEADROOM)
    return Candidate({a: sizes[a] for a in AXES}, memory, fits, axes, t, mfu(t, cluster), hardware_flops)


def evaluate_config(cfg: Config, sizes: dict[str, int], cluster: Cluster) -> Candidate:
    """`evaluate` for the run of `cfg` on the mesh with these axis sizes (which must be a valid layout)."""
    shape = run_shape(cfg)
    arrays = state_arrays(abstract_state(state_builder(cfg, shape))[1])
    return evaluate(StepShape.of(cfg), shape, arrays, sizes, make_rules(cfg.mesh.strategy, cfg.mesh.rules), cluster)


def invalid_reason(cfg: Config, shape: DecoderShape, sizes: dict[str, int], rules: Rules) -> str | None:
    """Why `jaxscale train` would refuse this mesh (its own message: jaxscale.training.layout), or None."""
    try:
        check_layout(cfg, shape, rules, axis_sizes=sizes)
    except UserError as refusal:
        return str(refusal)
    return None


def factorizations(n: int, k: int) -> list[tuple[int, ...]]:
    """Every ordered k-tuple of positive integers whose product is n."""
    if k == 1:
        return [(n,)]
    return [(d, *rest) for d in range(1, n + 1) if n % d == 0 for rest in factorizations(n // d, k - 1)]


def plan(cfg: Config, cluster: Cluster, search_fixes: bool = True) -> Plan:
    """Rank every valid mesh of `cluster.devices` over data / fsdp / expert / tensor for the step of `cfg`,
    and over the context axis too where none of those fits.

    With nothing fitting and `search_fixes`, also finds the smallest config change that makes one fit.
    """
    if cfg.mesh.pipeline != 1 or cfg.mesh.dcn_pipeline != 1:
        raise UserError(
            "mesh.pipeline must be 1 for plan: the planner does not model pipeline stages (bubble, stashed "
            "activations) yet. Check a pipeline mesh with `jaxscale compile`, which compiles the real step."
        )
    shape = run_shape(cfg)
    rules = make_rules(cfg.mesh.strategy, cfg.mesh.rules)
    arrays = state_arrays(abstract_state(state_builder(cfg, shape))[1])
    step = StepShape.of(cfg)
    parameters = sum(math.prod(a.shape) * a.entries_per_element for a in arrays if a.is_param)
    result = Plan(cfg, shape, cluster, parameters, [], [])
    for axes in (SEARCHED_AXES, WITH_CONTEXT):
        for degrees in factorizations(cluster.devices, len(axes)):
            sizes = dict.fromkeys(AXES, 1) | dict(zip(axes, degrees, strict=True))
            if axes is WITH_CONTEXT and sizes["context"] == 1:
                continue  # searched without context already
            label = " ".join(f"{a}={n}" for a, n in sizes.items() if n > 1) or "one device"
            if reason := invalid_reason(cfg, shape, sizes, rules):
                result.rejected[label] = reason
                continue
            c = evaluate(step, shape, arrays, sizes, rules, cluster)
            (result.ranked if c.fits else result.too_big).append(c)
        if result.ranked:
            break
    result.ranked.sort(key=lambda c: (c.time.step_s, c.memory.total))
    result.too_big.sort(key=lambda c: c.memory.total)
    try:
        sizes = resolve_axis_sizes(cfg.mesh, cluster.devices)
    except UserError:
        sizes = None  # the config's mesh is for another device count; the search stands alone
    if sizes is not None and invalid_reason(cfg, shape, sizes, rules) is None:
        result.configured = evaluate(step, shape, arrays, sizes, rules, cluster)
    if not result.ranked and search_fixes:
        result.suggestion = _suggest(cfg, cluster)
    return result


def _suggest(cfg: Config, cluster: Cluster) -> Suggestion | None:
    """The first of: full remat, then more microbatches (doubling), with which some mesh fits."""
    tries = [] if cfg.model.remat == "full" else [("model.remat", "full")]
    accum = cfg.train.grad_accum * 2
    while cfg.train.global_batch % accum == 0:
        tries.append(("train.grad_accum", accum))
        accum *= 2
    for key, value in tries:
        changed = copy.deepcopy(cfg)
        section, name = key.split(".")
        setattr(getattr(changed, section), name, value)
        p = plan(changed, cluster, search_fixes=False)
        if p.ranked:
            return Suggestion(key, value, p.ranked[0])
    return None


def explain(p: Plan) -> str:
    """One sentence on why the top mesh wins, against the runner-up; or what to change when nothing fits."""
    hbm = human_bytes(p.cluster.accelerator.hbm_bytes)
    if not p.ranked:
        if not p.too_big:
            return "No mesh of these devices is a valid layout for this config (see the rejected meshes)."
        best = p.too_big[0]
        fix = f"try {p.suggestion}" if p.suggestion else "no remat or microbatching fixes it: use more devices"
        need = human_bytes(best.memory.total)
        return f"Nothing fits: the smallest, {best.label()}, needs {need} of {hbm} per device; {fix}."
    top = p.ranked[0]
    t = top.time
    bound = "compute" if t.compute_s >= t.hidden_comm_s else "overlapped collectives"
    why = (
        f"{top.label()} wins: it fits ({human_bytes(top.memory.total)} of {hbm} per device) and its "
        f"step is {t.step_s:.3g} s ({bound} {max(t.compute_s, t.hidden_comm_s):.3g} s"
        f" + {t.exposed_comm_s:.3g} s of exposed tensor/expert collectives), MFU {top.mfu:.0%}"
    )
    if len(p.ranked) > 1:
        second = p.ranked[1]
        slower = second.time.step_s / t.step_s - 1
        if slower < 0.005:
            extra = human_bytes(second.memory.total - top.memory.total)
            why += f"; the runner-up {second.label()} is as fast but holds {extra} more per device"
        else:
            why += f"; the runner-up {second.label()} is {slower:.1%} slower" + _difference(top, second)
    return why + "."


def _difference(top: Candidate, other: Candidate) -> str:
    """What makes `other` slower than `top`, in a clause."""
    d_exposed = other.time.exposed_comm_s - top.time.exposed_comm_s
    d_hidden = max(other.time.compute_s, other.time.hidden_comm_s) - max(top.time.compute_s, top.time.hidden_comm_s)
    if d_exposed >= d_hidden and d_exposed > 0:
        return f" ({d_exposed:.3g} s more of activation collectives on the critical path)"
    if other.time.hidden_comm_s > other.time.compute_s:
        return f" (its weight and gradient collectives, {other.time.hidden_comm_s:.3g} s, outlast the compute)"
    if other.hardware_flops > top.hardware_flops:
        return " (it computes more: padded expert buffers)"
    return ""
