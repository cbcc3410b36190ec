"""Evaluate a mesh on a cluster, and search every factorization of the devices for the fastest that fits."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

from jaxscale.config import AUTO, Config
from jaxscale.errors import UserError
from jaxscale.hardware import Cluster
from jaxscale.mesh import AXES, resolve_axis_sizes
from jaxscale.models.transformer import DecoderShape
from jaxscale.parallel.schedules import Schedule
from jaxscale.planning.auto import choose_loop, cluster_budget, wants_choice
from jaxscale.planning.candidate import Candidate
from jaxscale.planning.shards import StateArray, StepShape, state_arrays
from jaxscale.sharding import Rules
from jaxscale.training.layout import Layout, check_layout
from jaxscale.training.setup import run_rules, run_shape, state_builder
from jaxscale.training.state import abstract_state
from jaxscale.units import human_bytes

SEARCHED_AXES = ("data", "pipeline", "fsdp", "expert", "tensor")
# Splitting sequences costs a gather of keys and values every layer; it is searched only when no mesh
# without it fits (a sequence too long for one device, or fewer sequences than devices).
WITH_CONTEXT = ("data", "fsdp", "expert", "context", "tensor")


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


def evaluate_config(cfg: Config, sizes: dict[str, int], cluster: Cluster) -> Candidate:
    """`evaluate` for the run of `cfg` on the mesh with these axis sizes (which must be a valid layout), with
    the loop unroll and remat policy `auto` picks there for the cluster's memory where the config asks."""
    shape = run_shape(cfg)
    arrays = state_arrays(abstract_state(state_builder(cfg, shape))[1])
    layout = check_layout(cfg, shape, run_rules(cfg), axis_sizes=sizes)
    return _evaluate(cfg, StepShape.of(cfg), shape, arrays, sizes, run_rules(cfg, layout), cluster, layout.schedule)


def _evaluate(
    cfg: Config,
    step: StepShape,
    shape: DecoderShape,
    arrays: list[StateArray],
    sizes: dict[str, int],
    rules: Rules,
    cluster: Cluster,
    schedule: Schedule | None,
) -> Candidate:
    """One mesh evaluated with the config's loop and remat, chosen as the run setup would where `auto`."""
    budget = cluster_budget(cfg.runtime.device_memory_gib, cluster) if wants_choice(cfg) else None
    return choose_loop(step, shape, arrays, sizes, rules, cluster, schedule, cfg.model.scan_unroll, budget)[0]


def checked_layout(cfg: Config, shape: DecoderShape, sizes: dict[str, int], rules: Rules) -> Layout | str:
    """The layout `jaxscale train` would run on this mesh, or why it would refuse it (its own message:
    jaxscale.training.layout)."""
    try:
        return check_layout(cfg, shape, rules, axis_sizes=sizes)
    except UserError as refusal:
        return str(refusal)


def factorizations(n: int, k: int) -> list[tuple[int, ...]]:
    """Every ordered k-tuple of positive integers whose product is n."""
    if k == 1:
        return [(n,)]
    return [(d, *rest) for d in range(1, n + 1) if n % d == 0 for rest in factorizations(n // d, k - 1)]


def plan(cfg: Config, cluster: Cluster, search_fixes: bool = True) -> Plan:
    """Rank every valid mesh of `cluster.devices` over data / pipeline / fsdp / expert / tensor for the step
    of `cfg` (pipeline meshes with the config's parallel.* schedule and train.grad_accum microbatches), and
    over the context axis too where none of those fits.

    With nothing fitting and `search_fixes`, also finds the smallest config change that makes one fit.
    """
    shape = run_shape(cfg)
    rules = run_rules(cfg)
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
            layout = checked_layout(cfg, shape, sizes, rules)
            if isinstance(layout, str):
                result.rejected[label] = layout
                continue
            c = _evaluate(cfg, step, shape, arrays, sizes, run_rules(cfg, layout), cluster, layout.schedule)
            (result.ranked if c.fits else result.too_big).append(c)
        if result.ranked:
            break
    result.ranked.sort(key=lambda c: (c.time.step_s, c.memory.total))
    result.too_big.sort(key=lambda c: c.memory.total)
    try:
        sizes = resolve_axis_sizes(cfg.mesh, cluster.devices)
    except UserError:
        sizes = None  # the config's mesh is for another device count; the search stands alone
    layout = None if sizes is None else checked_layout(cfg, shape, sizes, rules)
    if isinstance(layout, Layout):
        configured_rules = run_rules(cfg, layout)
        result.configured = _evaluate(cfg, step, shape, arrays, sizes, configured_rules, cluster, layout.schedule)
    if not result.ranked and search_fixes:
        result.suggestion = _suggest(cfg, cluster)
    return result


def _suggest(cfg: Config, cluster: Cluster) -> Suggestion | None:
    """The first of: full remat (unless `auto` has tried it), then more microbatches (doubling), with which some
    mesh fits."""
    tries = [] if cfg.model.remat in ("full", AUTO) else [("model.remat", "full")]  # auto tries full already
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
        f" + {t.exposed_comm_s:.3g} s of exposed tensor/expert/pipeline transfers), MFU {top.mfu:.0%}"
    )
    if top.schedule is not None:
        why += f", the {top.schedule.name} schedule's bubble ({top.schedule.time_bubble_fraction():.0%}) included"
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
