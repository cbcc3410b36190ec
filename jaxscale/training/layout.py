"""The layout validator: whether a run's batch, model and schedule fit a mesh, checked in one place.

`jaxscale train`, `jaxscale compile` and `jaxscale plan` all ask `check_layout`, with real devices,
a TPU topology or bare axis sizes, so they accept exactly the same layouts. Every refusal is a
UserError naming the number to change, raised before any compute. What it accepts comes back as
a `Layout`: the axis sizes and the sizes and schedule that follow from them, computed nowhere else.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from jaxscale.config import AUTO, Config
from jaxscale.errors import UserError
from jaxscale.mesh import AXES, resolve_axis_sizes
from jaxscale.models.transformer import DecoderShape
from jaxscale.parallel.schedules import BACKWARD_COST, Schedule, best_backward_ticks, build_schedule
from jaxscale.sharding import Rules, batch_axes


@dataclass(frozen=True)
class Layout:
    """A run's layout on a mesh that `check_layout` accepted."""

    axis_sizes: dict[str, int]  # every mesh axis (ICI x DCN degree), in jaxscale.mesh.AXES order
    batch_axes: tuple[str, ...]  # mesh axes of size > 1 that split the batch
    batch_shards: int  # devices the batch dimension is split over
    grad_accum: int  # microbatches per step: train.grad_accum, or with train.elastic the one that fits these devices
    microbatch: int  # sequences per microbatch, global
    per_device_batch: int  # sequences per device per microbatch
    tokens_per_step: int
    schedule: Schedule | None  # the pipeline schedule; None without a pipeline
    sequence_parallel: bool  # the residual stream's tokens split over `tensor` (parallel.sequence_parallel resolved)

    @property
    def num_devices(self) -> int:
        return math.prod(self.axis_sizes.values())


def check_layout(
    cfg: Config,
    shape: DecoderShape,
    rules: Rules,
    num_devices: int | None = None,
    axis_sizes: dict[str, int] | None = None,
) -> Layout:
    """The layout of `cfg` on `num_devices` devices (mesh degrees from cfg.mesh), or on explicit `axis_sizes`.

    Raises a UserError for the first thing that does not fit: the mesh degrees, the batch over its
    shards, experts over the expert axis, heads and hidden units over the tensor axis, the layers
    and microbatches over the pipeline. With train.elastic the layout's grad_accum is the smallest
    from train.grad_accum up that fits (see `_elastic_grad_accum`).
    """
    if axis_sizes is None:
        if num_devices is None:
            raise ValueError("check_layout needs num_devices or axis_sizes")
        axis_sizes = resolve_axis_sizes(cfg.mesh, num_devices)
    sizes = {a: axis_sizes.get(a, 1) for a in AXES}
    batch = batch_axes(rules, sizes)
    shards = math.prod(sizes[a] for a in batch)
    if cfg.train.elastic:
        cfg = _with_grad_accum(cfg, _elastic_grad_accum(cfg, shape, rules, sizes, shards))
    micro = cfg.train.global_batch // cfg.train.grad_accum
    if micro % shards:
        axes = " x ".join(f"mesh.{a}={sizes[a]}" for a in batch)
        raise UserError(
            f"train.global_batch={cfg.train.global_batch} over train.grad_accum={cfg.train.grad_accum} microbatches "
            f"gives {micro} sequences per microbatch, which does not split over the {shards} batch shards ({axes}); "
            f"make train.global_batch a multiple of {shards * cfg.train.grad_accum}."
        )
    _check_experts(shape, rules, sizes)
    _check_tensor(shape, sizes["tensor"])
    _check_context(cfg, shape, rules, sizes)
    return Layout(
        axis_sizes=sizes,
        batch_axes=batch,
        batch_shards=shards,
        grad_accum=cfg.train.grad_accum,
        microbatch=micro,
        per_device_batch=micro // shards,
        tokens_per_step=cfg.train.global_batch * cfg.train.seq_len,
        schedule=_check_pipeline(cfg, shape, sizes["pipeline"]),
        sequence_parallel=_sequence_parallel(cfg, sizes),
    )


def _with_grad_accum(cfg: Config, grad_accum: int) -> Config:
    """`cfg` with train.grad_accum set, and train.elastic off (the choice is made)."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=grad_accum, elastic=False))


def _elastic_grad_accum(cfg: Config, shape: DecoderShape, rules: Rules, sizes: dict[str, int], shards: int) -> int:
    """The smallest grad_accum from train.grad_accum up whose microbatches split over the `shards` batch shards
    with at most train.max_device_batch sequences per device (0: any number), and that the rest of the layout
    (the pipeline's microbatch rules) accepts.

    train.global_batch never changes, so a restart on another device count trains on the same batches; only
    how each step's batch is cut into microbatches does.
    """
    batch, limit = cfg.train.global_batch, cfg.train.max_device_batch
    splits = [k for k in range(cfg.train.grad_accum, batch + 1) if batch % k == 0 and (batch // k) % shards == 0]
    # The largest of `splits` puts one sequence on each device, so some k fits any limit once one splits.
    fitting = [k for k in splits if not limit or batch // k // shards <= limit]
    if not fitting:
        raise UserError(
            f"On {math.prod(sizes.values())} devices the batch splits over {shards} batch shards "
            f"({_batch_degrees(rules, sizes)}), and no train.grad_accum from {cfg.train.grad_accum} up cuts "
            f"train.global_batch={batch} into microbatches that are multiples of {shards}. The global batch cannot "
            f"change within a run (the data order follows it): run on a device count whose batch shards divide "
            f"{batch // cfg.train.grad_accum}, or start a new run with train.global_batch a multiple of "
            f"{shards * cfg.train.grad_accum}."
        )
    refusal = None
    for k in fitting:
        try:
            check_layout(_with_grad_accum(cfg, k), shape, rules, axis_sizes=sizes)
        except UserError as e:  # e.g. fewer microbatches than pipeline stages: a larger k may fit
            refusal = refusal or e
            continue
        return k
    raise refusal


def _batch_degrees(rules: Rules, sizes: dict[str, int]) -> str:
    return " x ".join(f"mesh.{a}={sizes[a]}" for a in batch_axes(rules, sizes)) or "no axis splits it"


def _check_experts(shape: DecoderShape, rules: Rules, sizes: dict[str, int]) -> None:
    if not shape.num_experts and sizes["expert"] > 1:
        raise UserError(
            f"mesh.expert={sizes['expert']} splits the experts of mixture-of-experts layers, but the model is dense "
            f"(model.num_experts=0); give those devices to mesh.data or mesh.fsdp and set mesh.expert=1."
        )
    split = [a for a in rules.get("experts", ()) if sizes[a] > 1]
    ways = math.prod(sizes[a] for a in split)
    if shape.num_experts % ways:
        axes = " x ".join(f"mesh.{a}={sizes[a]}" for a in split)
        raise UserError(
            f"model.num_experts={shape.num_experts} does not split over the {ways} expert shards ({axes}); make "
            f"num_experts a multiple of {ways} or change the mesh."
        )


def _check_tensor(shape: DecoderShape, tensor: int) -> None:
    # A degree that does not divide them would leave heads or hidden units whole on every tensor
    # device: the devices would repeat each other's work.
    if shape.n_heads % tensor or shape.d_ff % tensor:
        raise UserError(
            f"mesh.tensor={tensor} does not divide model.n_heads={shape.n_heads} and model.d_ff={shape.d_ff}; "
            f"pick a tensor degree that divides both (and give the other devices to mesh.data or mesh.fsdp)."
        )


def _check_context(cfg: Config, shape: DecoderShape, rules: Rules, sizes: dict[str, int]) -> None:
    context = sizes["context"]
    if context == 1:
        return
    seq_axes = tuple(a for a in rules.get("seq", ()) if sizes[a] > 1)
    if cfg.parallel.context_attention == "ring" and seq_axes != ("context",):
        raise UserError(
            f"parallel.context_attention=ring passes key/value blocks around the context axis, but mesh.rules split "
            f"the sequence over {' x '.join(seq_axes) or 'no axis'}; map `seq` to context alone (the default), or "
            f"set parallel.context_attention=allgather."
        )
    if cfg.train.seq_len % (2 * context):
        raise UserError(
            f"mesh.context={context} cuts each sequence into {2 * context} chunks (two per device, for causal "
            f"balance), and train.seq_len={cfg.train.seq_len} is not a multiple of {2 * context}; change train.seq_len "
            f"or mesh.context."
        )
    if sizes["pipeline"] > 1 or shape.num_experts:
        what = f"mesh.pipeline={sizes['pipeline']}" if sizes["pipeline"] > 1 else "a mixture-of-experts model"
        raise UserError(
            f"mesh.context={context} with {what} is not supported yet; give those devices to mesh.data or "
            f"mesh.fsdp, or set mesh.context=1."
        )


def _sequence_parallel(cfg: Config, sizes: dict[str, int]) -> bool:
    """parallel.sequence_parallel on this mesh: on only where mesh.tensor > 1; auto where seq_len splits too."""
    tensor, context = sizes["tensor"], sizes["context"]
    splits = cfg.train.seq_len % (context * tensor) == 0
    if cfg.parallel.sequence_parallel == AUTO:
        return tensor > 1 and splits
    if not cfg.parallel.sequence_parallel or tensor == 1:
        return False
    if splits:
        return True
    split = f"mesh.tensor={tensor}" + (f" on each of mesh.context={context}" if context > 1 else "")
    raise UserError(
        f"parallel.sequence_parallel=true splits each sequence's tokens over {split}, and train.seq_len="
        f"{cfg.train.seq_len} is not a multiple of {context * tensor}; change train.seq_len, or set "
        f"parallel.sequence_parallel=auto (on only where the tokens split) or false."
    )


def _check_pipeline(cfg: Config, shape: DecoderShape, stages: int) -> Schedule | None:
    """The schedule `cfg` asks for on `stages` pipeline devices (None for no pipeline)."""
    if stages == 1:
        return None
    par = cfg.parallel
    m = cfg.train.grad_accum
    v = par.virtual_stages if par.pipeline_schedule == "interleaved" else 1
    if shape.num_experts:
        raise UserError(
            f"mesh.pipeline={stages} with mixture-of-experts layers (model.num_experts={shape.num_experts}) is "
            f"not supported yet: pipeline stages run dense blocks only. Use mesh.pipeline=1 for MoE models (split "
            f"them with mesh.expert, mesh.fsdp and mesh.tensor), or set model.num_experts=0."
        )
    if len(set(shape.layer_kinds)) > 1:
        raise UserError(
            f"mesh.pipeline={stages} with layers of different kinds (model.attention_pattern="
            f"{shape.attention_pattern!r}: local and global layers) is not supported yet: a stage runs layers of one "
            f"kind. Use mesh.pipeline=1 and split the model with mesh.fsdp and mesh.tensor."
        )
    if shape.adapters is not None:
        raise UserError(
            f"mesh.pipeline={stages} with LoRA (lora.rank={shape.adapters.rank}) is not supported yet: the frozen "
            f"base would enter every pipeline stage whole. Use mesh.pipeline=1 and split the model with mesh.fsdp "
            f"and mesh.tensor (LoRA's small optimizer state leaves room for it), or set lora.rank=0."
        )
    if shape.n_layers % (stages * v):
        what = f"mesh.pipeline={stages} stages" + (f" x parallel.virtual_stages={v}" if v > 1 else "")
        raise UserError(
            f"model.n_layers={shape.n_layers} does not split into {what} = {stages * v} equal parts; make "
            f"n_layers a multiple of {stages * v} or change mesh.pipeline"
            + (" or parallel.virtual_stages." if v > 1 else ".")
        )
    if par.pipeline_schedule != "gpipe" and m < stages:
        raise UserError(
            f"parallel.pipeline_schedule={par.pipeline_schedule} needs at least as many microbatches as pipeline "
            f"stages, but train.grad_accum={m} (the microbatch count when mesh.pipeline > 1) is less than "
            f"mesh.pipeline={stages}; raise train.grad_accum to {stages} or more (4 x stages keeps the bubble "
            f"near 20%), or use parallel.pipeline_schedule=gpipe."
        )
    if par.pipeline_schedule == "interleaved" and m % stages:
        raise UserError(
            f"parallel.pipeline_schedule=interleaved runs microbatches in groups of mesh.pipeline={stages}, but "
            f"train.grad_accum={m} is not a multiple of {stages}; make train.grad_accum a multiple of {stages}."
        )
    per_chunk = shape.n_layers // (stages * v)
    backward_cost = BACKWARD_COST + (cfg.model.remat == "full")  # full remat recomputes the layers once more
    k = par.pipeline_backward_ticks
    if k == 0:
        k = best_backward_ticks(par.pipeline_schedule, stages, m, v, per_chunk, backward_cost)
    if per_chunk % k:
        raise UserError(
            f"parallel.pipeline_backward_ticks={k} does not divide the {per_chunk} layers of each pipeline chunk "
            f"(model.n_layers={shape.n_layers} over {stages * v} chunks); choose a divisor of {per_chunk}, or 0 "
            f"to let the schedule choose."
        )
    return build_schedule(par.pipeline_schedule, stages, m, v, k, backward_cost)
