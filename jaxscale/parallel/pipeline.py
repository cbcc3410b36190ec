"""Pipeline parallelism: the layer stack split into stages over the `pipeline` mesh axis.

Parameters keep one canonical layout: the stacked blocks [S_layers, ...], sharded over `layers` ->
`pipeline` like any other logical dimension, so checkpoints move between pipeline degrees as
between any two meshes. Each step views the stack as [P, V, n, ...] (n = layers / (P V)): stage
s = v P + p holds layers s n .. (s + 1) n - 1 and lives on device p as its chunk v. With V = 1 the
view is the canonical sharding itself; interleaved (V > 1) stages are a reshuffle of it on the way
in and of their gradients on the way out, one all-to-all of the layer weights per step.

The run itself is `jax.shard_map` over the pipeline axis only: data, fsdp and tensor stay automatic
inside it, so every stage's matmuls are partitioned by the same rules as without a pipeline. A
`lax.scan` over the ticks of a static schedule (jaxscale.parallel.schedules) picks each device's op
with `lax.switch` on its row of the table; then one `lax.ppermute` sends activations downstream and
one sends their cotangents upstream. A backward recomputes its stage's forward with `jax.vjp` from
the stashed stage input, so a stage keeps only inputs: as many as the schedule has in flight (M
for GPipe, about P for 1F1B). The first stage embeds tokens, the last applies the head and the loss
and starts the backward with cotangent 1 on the summed token loss; the shared weights (embedding,
final norm, head) get their gradients on those two devices and a psum over the pipeline adds them.

Shape letters: M microbatches, B sequences per microbatch (global), L sequence, D width, P pipeline
devices, V chunks per device, K stash slots, n layers per chunk, T ticks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from jaxscale.config import Config
from jaxscale.errors import UserError
from jaxscale.parallel import schedules as sch
from jaxscale.parallel.schedules import Schedule, build_schedule
from jaxscale.sharding import Rules, constrain, logical_to_spec, use_rules

AXIS = "pipeline"
LossFn = Callable[[jax.Array, dict[str, jax.Array]], tuple[jax.Array, jax.Array]]


def check_pipeline(cfg: Config, stages: int) -> Schedule | None:
    """The schedule `cfg` asks for on `stages` pipeline devices (None for no pipeline), or a UserError."""
    par = cfg.parallel
    if stages == 1:
        return None
    m = cfg.train.grad_accum
    v = par.virtual_stages if par.pipeline_schedule == "interleaved" else 1
    if cfg.model.num_experts:
        raise UserError(
            f"mesh.pipeline={stages} with mixture-of-experts layers (model.num_experts={cfg.model.num_experts}) is "
            f"not supported yet: pipeline stages run dense blocks only. Use mesh.pipeline=1 for MoE models (split "
            f"them with mesh.expert, mesh.fsdp and mesh.tensor), or set model.num_experts=0."
        )
    if cfg.model.n_layers % (stages * v):
        what = f"mesh.pipeline={stages} stages" + (f" x parallel.virtual_stages={v}" if v > 1 else "")
        raise UserError(
            f"model.n_layers={cfg.model.n_layers} does not split into {what} = {stages * v} equal parts; make "
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
    return build_schedule(par.pipeline_schedule, stages, m, v)


def _is_layer(path: tuple) -> bool:
    return getattr(path[0], "key", None) == "blocks"


def _is_embedding(path: tuple) -> bool:
    return getattr(path[0], "key", None) == "embed"


def pipeline_grads(
    model_def: nnx.GraphDef,
    params: nnx.State,
    rest: nnx.State,
    micros: dict[str, jax.Array],
    schedule: Schedule,
    rules: Rules,
    mesh: Mesh,
    loss_fn: LossFn,
) -> tuple[nnx.State, tuple[jax.Array, jax.Array]]:
    """Summed gradients over all microbatches, and (summed token loss, token count), by `schedule`.

    `micros`: inputs, targets, loss_mask [M, B, L] (jaxscale.train.step.split_microbatches).
    `loss_fn(logits [B, L, V], micro) -> (loss sum, token count)`. The gradient is that of the summed
    loss: what one device gets by accumulating the same microbatches.
    """
    p_, v_ = schedule.stages, schedule.virtual
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    is_layer = [_is_layer(path) for path, _ in flat]
    layers = [leaf for (_, leaf), layer in zip(flat, is_layer, strict=True) if layer]
    shared = [leaf for (_, leaf), layer in zip(flat, is_layer, strict=True) if not layer]
    n = layers[0].shape[0] // (p_ * v_)
    # The first stage's lookup table: the embedding with its FSDP shards gathered here, outside the
    # stages, where any relayout is safe (see vocab_parallel_lookup).
    (embedding,) = [leaf for path, leaf in flat if _is_embedding(path)]
    lookup_VD = constrain(embedding, ("vocab", None))

    def to_stages(a: jax.Array) -> jax.Array:  # [S_layers, ...] -> [P, V, n, ...]: stage v P + p on device p
        return a.reshape(v_, p_, n, *a.shape[1:]).swapaxes(0, 1)

    def from_stages(a: jax.Array) -> jax.Array:
        return a.swapaxes(0, 1).reshape(p_ * v_ * n, *a.shape[3:])

    rest_leaves, rest_def = jax.tree.flatten(rest)

    def model_of(chunk: list[jax.Array], shared_leaves: list[jax.Array], rest_leaves: list[jax.Array]) -> nnx.Module:
        it_chunk, it_shared = iter(chunk), iter(shared_leaves)
        leaves = [next(it_chunk) if layer else next(it_shared) for layer in is_layer]
        p_state = jax.tree.unflatten(treedef, leaves)
        return nnx.merge(model_def, p_state, jax.tree.unflatten(rest_def, rest_leaves))

    body = _make_body(schedule, model_of, loss_fn, rules)
    replicated = PartitionSpec()
    staged = PartitionSpec(AXIS)
    run = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(
            [staged] * len(layers),
            [replicated] * len(shared),
            [replicated] * len(rest_leaves),
            replicated,
            replicated,
        ),
        out_specs=([staged] * len(layers), [replicated] * len(shared), replicated, replicated, replicated),
        axis_names={AXIS},
        # The body differentiates only local functions (jax.vjp per stage) and sums with explicit
        # psums, so the varying-axes type check would add nothing but annotations.
        check_vma=False,
    )
    g_layers, g_shared, g_lookup, loss_sum, count = run(
        [to_stages(a) for a in layers], shared, rest_leaves, lookup_VD, micros
    )
    it_layers, it_shared = iter(from_stages(g) for g in g_layers), iter(g_shared)
    leaves = [next(it_layers) if layer else next(it_shared) for layer in is_layer]
    leaves = [
        g + g_lookup.astype(g.dtype) if _is_embedding(path) else g for (path, _), g in zip(flat, leaves, strict=True)
    ]
    grads = jax.tree.unflatten(treedef, leaves)
    return grads, (loss_sum, count)


def _make_body(schedule: Schedule, model_of: Callable[..., nnx.Module], loss_fn: LossFn, rules: Rules) -> Callable:
    """The per-device program: ticks of `schedule`, each a switch over the branches, then the sends."""
    p_, table = schedule.stages, jnp.asarray(schedule.table)
    forward_perm = [(p, (p + 1) % p_) for p in range(p_)]
    backward_perm = [(p, (p - 1) % p_) for p in range(p_)]

    def body(*inputs: Any) -> tuple[list[jax.Array], list[jax.Array], jax.Array, jax.Array, jax.Array]:
        # The model's activation constraints name the mesh; inside shard_map that is the mesh whose
        # pipeline axis is manual.
        with use_rules(rules, jax.sharding.get_abstract_mesh()):
            return run_ticks(*inputs)

    def run_ticks(
        layers: list[jax.Array],
        shared: list[jax.Array],
        rest: list[jax.Array],
        lookup_VD: jax.Array,
        micros: dict[str, jax.Array],
    ) -> tuple[list[jax.Array], list[jax.Array], jax.Array, jax.Array, jax.Array]:
        layers = [a[0] for a in layers]  # [V, n, ...]: this device's chunks
        device = lax.axis_index(AXIS)
        # Embedding and head use no block weights, but the model needs some in their place.
        any_chunk = [a[0] for a in layers]
        compute_dtype = model_of(any_chunk, shared, rest).s.compute_dtype

        def stage(chunk: list[jax.Array], shared: list[jax.Array], x_BLD: jax.Array) -> jax.Array:
            return model_of(chunk, shared, rest).run_layers(x_BLD)[0]

        def embed(table_VD: jax.Array, tokens_BL: jax.Array) -> jax.Array:  # Decoder.embed_tokens, by hand
            x_BLD = vocab_parallel_lookup(table_VD, tokens_BL, rules, compute_dtype)
            return constrain(x_BLD, ("batch", "seq", "act_embed"))

        def head_loss(shared: list[jax.Array], x_BLD: jax.Array, micro: dict) -> tuple[jax.Array, jax.Array]:
            return loss_fn(model_of(any_chunk, shared, rest).logits(x_BLD), micro)

        act = jax.eval_shape(lambda: embed(lookup_VD, micros["inputs"][0]))  # [B, L, D]

        def buffer(slots: int) -> jax.Array:  # [K, B, L, D]
            return constrain(jnp.zeros((slots, *act.shape), act.dtype), (None, "batch", "seq", "act_embed"))

        zeros_act = jnp.zeros(act.shape, act.dtype)
        f32 = jnp.float32

        # Every branch: (chunk params, chunk index, stage input, output cotangent, micro, accumulators)
        # -> (activation to send, cotangent to send, accumulators). Accumulators: chunk grads [V, n, ...],
        # shared grads, embedding lookup table grad, loss sum, token count.
        def idle(chunk, v, x, g, micro, acc):
            return zeros_act, zeros_act, acc

        def fwd_first(chunk, v, x, g, micro, acc):
            return stage(chunk, shared, embed(lookup_VD, micro["inputs"])), zeros_act, acc

        def fwd_mid(chunk, v, x, g, micro, acc):
            return stage(chunk, shared, x), zeros_act, acc

        def add(acc, v, d_chunk, d_shared=None, loss=0.0, count=0.0, d_lookup=None):
            g_layers, g_shared, g_lookup, loss_sum, count_sum = acc
            g_layers = [a.at[v].add(d.astype(a.dtype)) for a, d in zip(g_layers, d_chunk, strict=True)]
            if d_shared is not None:
                g_shared = [a + d.astype(a.dtype) for a, d in zip(g_shared, d_shared, strict=True)]
            if d_lookup is not None:
                g_lookup = g_lookup + d_lookup.astype(g_lookup.dtype)
            return g_layers, g_shared, g_lookup, loss_sum + loss, count_sum + count

        def bwd_first(chunk, v, x, g, micro, acc):
            _, vjp = jax.vjp(lambda c, t: stage(c, shared, embed(t, micro["inputs"])), chunk, lookup_VD)
            d_chunk, d_lookup = vjp(g)
            return zeros_act, zeros_act, add(acc, v, d_chunk, d_lookup=d_lookup)

        def bwd_mid(chunk, v, x, g, micro, acc):
            _, vjp = jax.vjp(lambda c, x: stage(c, shared, x), chunk, x)
            d_chunk, d_x = vjp(g)
            return zeros_act, d_x, add(acc, v, d_chunk)

        def bwd_last(chunk, v, x, g, micro, acc):
            (loss, count), vjp = jax.vjp(lambda c, s, x: head_loss(s, stage(c, s, x), micro), chunk, shared, x)
            d_chunk, d_shared, d_x = vjp((jnp.ones((), loss.dtype), jnp.zeros((), count.dtype)))
            return zeros_act, d_x, add(acc, v, d_chunk, d_shared, loss.astype(f32), count.astype(f32))

        branches = {
            "idle": idle,
            "fwd_first": fwd_first,
            "fwd_mid": fwd_mid,
            "bwd_first": bwd_first,
            "bwd_mid": bwd_mid,
            "bwd_last": bwd_last,
        }

        def tick(carry: tuple, rows_PC: jax.Array) -> tuple[tuple, None]:
            stash, cots, acc = carry
            row = rows_PC[device]
            v = row[sch.CHUNK]
            chunk = [lax.dynamic_index_in_dim(a, v, keepdims=False) for a in layers]
            micro = jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, row[sch.MB], keepdims=False), micros)
            x = stash[row[sch.STASH_SLOT]]
            g = cots[row[sch.COT_SLOT]]
            send_act, send_cot, acc = lax.switch(
                row[sch.BRANCH], [branches[name] for name in sch.BRANCHES], chunk, v, x, g, micro, acc
            )
            # Sends stay outside the switch: every device takes part in every collective.
            got_act = lax.ppermute(send_act, AXIS, forward_perm)
            got_cot = lax.ppermute(send_cot, AXIS, backward_perm)
            stash = _store(stash, row[sch.RECV_ACT], row[sch.RECV_ACT_SLOT], got_act)
            cots = _store(cots, row[sch.RECV_COT], row[sch.RECV_COT_SLOT], got_cot)
            return (stash, cots, acc), None

        acc = (
            [jnp.zeros(a.shape, a.dtype) for a in layers],
            [jnp.zeros(a.shape, a.dtype) for a in shared],
            jnp.zeros(lookup_VD.shape, lookup_VD.dtype),
            jnp.zeros((), f32),
            jnp.zeros((), f32),
        )
        init = (buffer(schedule.stash_slots), buffer(schedule.cot_slots), acc)
        (_, _, (g_layers, g_shared, g_lookup, loss_sum, count)), _ = lax.scan(tick, init, table)
        # Shared weights got gradient on the first and the last device only; loss and count on the last.
        g_shared, g_lookup, loss_sum, count = lax.psum((g_shared, g_lookup, loss_sum, count), AXIS)
        return [g[None] for g in g_layers], g_shared, g_lookup, loss_sum, count

    return body


def vocab_parallel_lookup(table_VD: jax.Array, tokens_BL: jax.Array, rules: Rules, dtype: Any) -> jax.Array:
    """table[tokens] -> [B, L, D] in `dtype`, with the table's rows split over the `vocab` mesh axes.

    Each shard looks up the tokens among its own rows (zeros for the rest) and a psum over the vocab
    axes adds the shards up, all inside a shard_map over every axis left automatic. Inside the
    pipeline's shard_map, XLA's SPMD partitioner aborts (a CHECK in spmd_partitioner_util.cc, XLA of
    jax 0.12) when it splits a gather or its scatter-add gradient itself, and a relayout of the table
    there becomes a collective-permute over all devices that only the first stage reaches (a
    deadlock on XLA:CPU), so the table comes in already laid out (vocab rows split, width whole).
    """
    mesh = jax.sharding.get_abstract_mesh()
    table_spec = logical_to_spec(("vocab", None), table_VD.shape, rules, mesh)
    token_spec = logical_to_spec(("batch", "seq"), tokens_BL.shape, rules, mesh)
    vocab_axes = table_spec[0]

    def lookup(table_local: jax.Array, tokens_local: jax.Array) -> jax.Array:
        rows = table_local.shape[0]
        ids = tokens_local - (lax.axis_index(vocab_axes) * rows if vocab_axes else 0)
        mine = (ids >= 0) & (ids < rows)
        found = jnp.where(mine[..., None], table_local.astype(dtype)[jnp.clip(ids, 0, rows - 1)], 0)
        return lax.psum(found, vocab_axes) if vocab_axes else found

    automatic = {a for a in mesh.axis_names if a != AXIS}
    return jax.shard_map(
        lookup,
        mesh=mesh,
        in_specs=(table_spec, token_spec),
        out_specs=PartitionSpec(*token_spec, None),
        axis_names=automatic,
        check_vma=False,
    )(table_VD, tokens_BL)


def _store(buf_K: jax.Array, valid: jax.Array, slot: jax.Array, x: jax.Array) -> jax.Array:
    """buf[slot] = x where `valid`; a tick with nothing arriving leaves the buffer as it was."""
    return buf_K.at[slot].set(jnp.where(valid > 0, x, buf_K[slot]))


def describe(schedule: Schedule) -> dict[str, Any]:
    """The schedule's numbers for the run log: bubble from the table beside the textbook figure."""
    return {
        "pipeline_schedule": schedule.name,
        "pipeline_stages": schedule.stages,
        "pipeline_virtual_stages": schedule.virtual,
        "pipeline_microbatches": schedule.microbatches,
        "pipeline_ticks": schedule.ticks,
        "pipeline_bubble": round(schedule.bubble_fraction, 4),
        "pipeline_bubble_theory": round(schedule.theory_bubble_fraction, 4),
        "pipeline_stash_slots": schedule.stash_slots,
    }
