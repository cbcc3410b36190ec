"""FLOPs, communication and time of one train step on a mesh.

FLOPs: the matmuls the compiled step runs (forward, backward = 2 x forward, and the forward again
where remat recomputes it), counting what the code really computes: MoE capacity buffers with
their padding, and XLA:CPU's dense lowering of grouped matmuls. Elementwise work is left out.

Communication: per device per step, ring collectives ((n-1)/n of the data crosses each device's
links; an all-reduce twice that). Which collectives each axis costs is DESIGN.md's table, issued
as the step issues them: FSDP gathers weights for the forward and again for the backward and
reduce-scatters gradients (a layer loop unrolled whole gathers them once where XLA keeps the
forward's for the backward: XLA:CPU, assumed for GPU), and `data` all-reduces them, once per
microbatch (gradients accumulate in their sharded layout). Tensor parallelism all-reduces activations
twice per layer each way; expert parallelism sends every buffer slot out and back by all-to-all,
each way (the ragged exchange only the routed rows, though XLA counts its grouped matmuls over the
whole receive buffer).
A pipeline sends one activation and one cotangent per device per tick of its schedule, and its
devices run their share of the layers only.

Time: compute at peak, stretched by a pipeline schedule's bubble; collectives at the link speed of
the slowest link an axis crosses. Weight and gradient collectives (fsdp, data, the expert axis's
gradient all-reduce) overlap with compute, as XLA's scheduler runs them asynchronously; activation
transfers (tensor, expert all-to-all, pipeline sends) sit on the critical path and add to it.
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxscale.hardware import Cluster
from jaxscale.mesh import AXES
from jaxscale.models.flops import train_flops_per_token
from jaxscale.models.transformer import DecoderShape
from jaxscale.parallel.schedules import Schedule
from jaxscale.planning.memory import F32, grouped, keeps_gathered_layers, ragged_buffer_share
from jaxscale.planning.shards import LocalSizes, Placement, StepShape, shard_elements, without_fsdp


def step_flops(
    step: StepShape, shape: DecoderShape, s: LocalSizes, dense_ragged: bool = False, pipelined: bool = False
) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) of one step, summed over all devices.

    Model FLOPs are jaxscale.models.flops' (6 per active weight per token, plus attention): what MFU divides.
    Hardware FLOPs add remat recomputation and MoE padding: what the devices execute. A `pipelined` step
    runs each layer group's forward again in its backward ticks (jaxscale.parallel.pipeline), on top of
    what the remat policy recomputes.
    """
    tokens = step.tokens
    model = train_flops_per_token(shape, step.seq_len) * tokens
    D, F, L = shape.d_model, shape.d_ff, step.seq_len
    attn_weights = D * shape.head_dim * (2 * shape.n_heads + 2 * shape.n_kv_heads)
    attn_scores = 4 * L * shape.n_heads * shape.head_dim  # QK^T and PV, forward, per token
    mlp = 3 * D * F
    n_moe = shape.n_moe_layers
    dense_layer = 2 * (attn_weights + mlp) + attn_scores
    moe_layer = 2 * attn_weights + attn_scores
    if n_moe:
        ragged_share = ragged_buffer_share(s, shape)
        if grouped(s, shape):
            expert_rows = shape.experts_per_token * (shape.num_experts if dense_ragged else 1)
        elif ragged_share:  # every row of the ragged receive buffers, as XLA's cost analysis counts them
            expert_rows = shape.experts_per_token * ragged_share * (s.experts if dense_ragged else 1)
        else:  # every buffer slot is computed, filled or not
            expert_rows = shape.num_experts * shape.moe_shape().capacity(L) / L
        moe_layer += 2 * (D * shape.num_experts + (expert_rows + shape.num_shared_experts) * mlp)
    layers_fwd = (shape.n_layers - n_moe) * dense_layer + n_moe * moe_layer
    head_fwd = 2 * D * shape.vocab_size
    recompute = {"full": layers_fwd, "dots_with_no_batch_dims_saveable": shape.n_layers * attn_scores}
    again = layers_fwd if pipelined else 0.0
    hardware = (3 * (layers_fwd + head_fwd) + recompute.get(step.remat, 0.0) + again) * tokens
    return model, hardware


@dataclass(frozen=True)
class AxisTraffic:
    """One kind of collective over one mesh axis in one step, per device."""

    axis: str
    size: int
    collective: str  # what moves, e.g. "all-gather weights + reduce-scatter grads"
    bytes: float
    link: str  # "ici" / "nvlink" within a slice or node, "dcn" / "network" between
    seconds: float
    exposed: bool  # on the critical path (else hidden under compute when it is shorter)


def axis_links(sizes: dict[str, int], cluster: Cluster) -> dict[str, bool]:
    """Whether each axis stays on fast links: axes fill the fast domain innermost (tensor) first."""
    on_fast, inner = {}, 1
    for axis in reversed(AXES):
        inner *= sizes[axis]
        on_fast[axis] = inner <= cluster.accelerator.fast_domain
    return on_fast


def traffic(p: Placement, cluster: Cluster) -> list[AxisTraffic]:
    """Bytes each axis moves per device per step, and the seconds they take (see the module docstring)."""
    step, shape, arrays, rules, mesh, s = p.step, p.shape, p.arrays, p.rules, p.mesh, p.local
    sizes = dict(mesh.shape)
    A = step.grad_accum
    ring = {a: (n - 1) / n for a, n in sizes.items()}
    params = [a for a in arrays if a.is_param]
    gathered = sum(shard_elements(a.shape, a.names, rules, without_fsdp(mesh)) for a in params)
    local = sum(shard_elements(a.shape, a.names, rules, mesh) for a in params)
    not_expert = sum(shard_elements(a.shape, a.names, rules, mesh) for a in params if "experts" not in a.names)
    act = s.tokens * s.d_model * s.act_bytes  # one [B, L, D] activation, per device
    # A scan gathers each layer's weights for the forward and again for the backward; with the loop unrolled
    # whole XLA:CPU (and, assumed, XLA:GPU) gathers once and keeps them (jaxscale.planning.memory).
    gathers = 1 if keeps_gathered_layers(p) else 2
    # Forwards run again in the backward: by full remat, and by a pipeline's backward ticks.
    remat_fwd = (step.remat == "full") + (p.schedule is not None)
    moe_layers = shape.n_moe_layers
    slots = shape.num_experts * shape.moe_shape().capacity(s.seq) / s.seq if moe_layers else 0
    # (axis, collective, bytes, exposed): activation collectives wait on what was just computed.
    moved = [
        (
            "fsdp",
            "all-gather weights, reduce-scatter grads",
            A * ring["fsdp"] * gathered * (gathers * s.act_bytes + F32),
            False,
        ),
        ("data", "all-reduce grads", A * 2 * ring["data"] * local * F32, False),
        (
            "tensor",
            "all-reduce activations",
            A
            * 2
            * ring["tensor"]
            * act
            * (shape.n_layers // sizes["pipeline"] * (4 + 2 * remat_fwd) + 2 * moe_layers + 2),
            True,
        ),
    ]
    if p.schedule is not None:
        # Every tick each device sends one activation downstream and one cotangent upstream, then waits for
        # its neighbours' (jaxscale.parallel.pipeline): point to point, nothing rings.
        moved.append(("pipeline", "ppermute activations and cotangents", p.schedule.ticks * 2 * act, True))
    if sizes["context"] > 1:
        # Every layer gathers the whole sequence's keys and values (forward, recompute), and its backward
        # reduce-scatters their gradients; context devices also share the weights' gradients, as data does.
        kv = s.rows * s.keys * 2 * s.kv_heads * s.head_dim * s.act_bytes
        passes = 2 + remat_fwd
        moved.append(
            ("context", "all-gather keys and values", A * ring["context"] * shape.n_layers * passes * kv, True)
        )
        moved.append(("context", "all-reduce grads", A * 2 * ring["context"] * local * F32, False))
    if s.expert_ways > 1:
        moved.append(("expert", "all-reduce non-expert grads", A * 2 * ring["expert"] * not_expert * F32, False))
        # The ragged exchange moves the K routed rows of each token; the padded one every buffer slot.
        rows = shape.experts_per_token if ragged_buffer_share(s, shape) else slots
        tokens_moved = moe_layers * (4 + 2 * remat_fwd) * rows * act
        moved.append(("expert", "all-to-all tokens", A * ring["expert"] * tokens_moved, True))
    else:  # the expert axis splits only the batch: a data axis
        moved.append(("expert", "all-reduce grads", A * 2 * ring["expert"] * local * F32, False))
    fast = axis_links(sizes, cluster)
    gpu = cluster.accelerator.name in ("a100", "h100", "h200")
    out = []
    for axis, collective, nbytes, exposed in moved:
        if sizes[axis] == 1:
            continue
        bandwidth = cluster.accelerator.fast_bandwidth if fast[axis] else cluster.accelerator.network_bandwidth
        link = ("nvlink" if gpu else "ici") if fast[axis] else ("network" if gpu else "dcn")
        out.append(AxisTraffic(axis, sizes[axis], collective, nbytes, link, nbytes / bandwidth, exposed))
    return out


@dataclass(frozen=True)
class StepTime:
    compute_s: float  # hardware FLOPs per device at peak
    hidden_comm_s: float  # collectives that overlap with compute
    exposed_comm_s: float  # collectives on the critical path
    model_flops: float  # per step, all devices

    @property
    def step_s(self) -> float:
        return max(self.compute_s, self.hidden_comm_s) + self.exposed_comm_s


def step_time(
    model_flops: float,
    hardware_flops: float,
    axes: list[AxisTraffic],
    cluster: Cluster,
    schedule: Schedule | None = None,
) -> StepTime:
    """Predicted step time: compute at peak, overlapped collectives, plus exposed ones.

    A pipeline `schedule` stretches the compute by its bubble: its lockstep ticks last as long as their
    costliest op (`Schedule.time_bubble_fraction`, with the schedule's nominal op costs).
    """
    bubble = 0.0 if schedule is None else schedule.time_bubble_fraction()
    return StepTime(
        compute_s=hardware_flops / cluster.devices / cluster.accelerator.peak_flops / (1 - bubble),
        hidden_comm_s=sum(t.seconds for t in axes if not t.exposed),
        exposed_comm_s=sum(t.seconds for t in axes if t.exposed),
        model_flops=model_flops,
    )


def mfu(t: StepTime, cluster: Cluster) -> float:
    """Model FLOPs utilization the predicted step time gives."""
    return t.model_flops / (t.step_s * cluster.devices * cluster.accelerator.peak_flops)
