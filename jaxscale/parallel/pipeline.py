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
for GPipe, about P for 1F1B). The model is driven only through its hooks: `embed_tokens` on the first
stage, `run_layers` on each stage's chunk of the stacked layers, `logits` and `loss` on the last,
which starts the backward with cotangent 1 on the summed token loss. Stacked layer weights are
found by their logical name: the first dimension of each is `layers`. The other (shared) weights,
such as the embedding, final norm and head, enter the stages gathered as FSDP would gather them
for use (see jaxscale.models.gathers for why the lookup needs it), get their gradients on the first
and last devices, and a psum over the pipeline adds them.

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
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxscale.parallel import schedules as sch
from jaxscale.parallel.schedules import Schedule
from jaxscale.sharding import Rules, constrain, logical_to_spec, use_rules

AXIS = "pipeline"


def pipeline_grads(
    model_def: nnx.GraphDef,
    params: nnx.State,
    rest: nnx.State,
    micros: dict[str, jax.Array],
    schedule: Schedule,
    rules: Rules,
    mesh: Mesh,
) -> tuple[nnx.State, tuple[jax.Array, jax.Array]]:
    """Summed gradients over all microbatches, and (summed token loss, token count), by `schedule`.

    `micros`: inputs, targets, loss_mask [M, B, L] (jaxscale.training.step.split_microbatches). The
    gradient is that of the summed loss: what one device gets by accumulating the same microbatches.
    """
    p_, v_ = schedule.stages, schedule.virtual
    flat, treedef = jax.tree_util.tree_flatten(params)
    names = jax.tree.leaves(nnx.get_partition_spec(params), is_leaf=lambda x: isinstance(x, PartitionSpec))
    is_layer = [len(n) > 0 and n[0] == "layers" for n in names]
    layers = [leaf for leaf, layer in zip(flat, is_layer, strict=True) if layer]
    shared = [
        _gathered_for_use(leaf, spec, rules, mesh)
        for leaf, spec, layer in zip(flat, names, is_layer, strict=True)
        if not layer
    ]
    n = layers[0].shape[0] // (p_ * v_)

    def to_stages(a: jax.Array) -> jax.Array:  # [S_layers, ...] -> [P, V, n, ...]: stage v P + p on device p
        return a.reshape(v_, p_, n, *a.shape[1:]).swapaxes(0, 1)

    def from_stages(a: jax.Array) -> jax.Array:
        return a.swapaxes(0, 1).reshape(p_ * v_ * n, *a.shape[3:])

    rest_leaves, rest_def = jax.tree.flatten(rest)

    def model_of(chunk: list[jax.Array], shared_leaves: list[jax.Array], rest_leaves: list[jax.Array]) -> nnx.Module:
        it_chunk, it_shared = iter(chunk), iter(shared_leaves)
        leaves = [next(it_chunk) if layer else next(it_shared) for layer in is_layer]
        return nnx.merge(model_def, jax.tree.unflatten(treedef, leaves), jax.tree.unflatten(rest_def, rest_leaves))

    body = _make_body(schedule, model_of, rules)
    replicated = PartitionSpec()
    staged = PartitionSpec(AXIS)
    run = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=([staged] * len(layers), [replicated] * len(shared), [replicated] * len(rest_leaves), replicated),
        out_specs=([staged] * len(layers), [replicated] * len(shared), replicated, replicated),
        axis_names={AXIS},
        # The body differentiates only local functions (jax.vjp per stage) and sums with explicit
        # psums, so the varying-axes type check would add nothing but annotations.
        check_vma=False,
    )
    g_layers, g_shared, loss_sum, count = run([to_stages(a) for a in layers], shared, rest_leaves, micros)
    it_layers, it_shared = iter(from_stages(g) for g in g_layers), iter(g_shared)
    grads = jax.tree.unflatten(treedef, [next(it_layers) if layer else next(it_shared) for layer in is_layer])
    return grads, (loss_sum, count)


def _gathered_for_use(leaf: jax.Array, names: PartitionSpec, rules: Rules, mesh: Mesh) -> jax.Array:
    """`leaf` split by its logical `names` except over the batch mesh axes: as FSDP gathers a weight to use it.

    Done here, outside the stages, where any relayout is safe (see jaxscale.models.gathers).
    """
    batch = set(rules.get("batch", ()))
    padded = tuple(names) + (None,) * (leaf.ndim - len(names))
    spec = logical_to_spec(padded, leaf.shape, rules, mesh)

    def without_batch(entry: str | tuple[str, ...] | None) -> str | tuple[str, ...] | None:
        kept = tuple(a for a in ((entry,) if isinstance(entry, str) else entry or ()) if a not in batch)
        return kept[0] if len(kept) == 1 else (kept or None)

    return lax.with_sharding_constraint(leaf, NamedSharding(mesh, PartitionSpec(*map(without_batch, spec))))


def _make_body(schedule: Schedule, model_of: Callable[..., nnx.Module], rules: Rules) -> Callable:
    """The per-device program: ticks of `schedule`, each a switch over the branches, then the sends."""
    p_, table = schedule.stages, jnp.asarray(schedule.table)
    forward_perm = [(p, (p + 1) % p_) for p in range(p_)]
    backward_perm = [(p, (p - 1) % p_) for p in range(p_)]

    def body(*inputs: Any) -> tuple[list[jax.Array], list[jax.Array], jax.Array, jax.Array]:
        # The model's activation constraints name the mesh; inside shard_map that is the mesh whose
        # pipeline axis is manual.
        with use_rules(rules, jax.sharding.get_abstract_mesh()):
            return run_ticks(*inputs)

    def run_ticks(
        layers: list[jax.Array], shared: list[jax.Array], rest: list[jax.Array], micros: dict[str, jax.Array]
    ) -> tuple[list[jax.Array], list[jax.Array], jax.Array, jax.Array]:
        layers = [a[0] for a in layers]  # [V, n, ...]: this device's chunks
        device = lax.axis_index(AXIS)
        # Embedding and head use no block weights, but the model needs some in their place.
        any_chunk = [a[0] for a in layers]

        def stage(chunk: list[jax.Array], x_BLD: jax.Array, micro: dict[str, jax.Array]) -> jax.Array:
            model = model_of(chunk, shared, rest)
            return model.run_layers(x_BLD, model.documents(micro))[0]

        def embed(shared: list[jax.Array], tokens_BL: jax.Array) -> jax.Array:
            return model_of(any_chunk, shared, rest).embed_tokens(tokens_BL)

        def head_loss(shared: list[jax.Array], x_BLD: jax.Array, micro: dict) -> tuple[jax.Array, jax.Array]:
            model = model_of(any_chunk, shared, rest)
            return model.loss(model.logits(x_BLD), micro)

        act = jax.eval_shape(lambda: embed(shared, micros["inputs"][0]))  # [B, L, D]

        def buffer(slots: int) -> jax.Array:  # [K, B, L, D]
            return constrain(jnp.zeros((slots, *act.shape), act.dtype), (None, "batch", "seq", "act_embed"))

        zeros_act = jnp.zeros(act.shape, act.dtype)
        f32 = jnp.float32

        # Every branch: (chunk params, chunk index, stage input, output cotangent, micro, accumulators)
        # -> (activation to send, cotangent to send, accumulators). Accumulators: chunk grads [V, n, ...],
        # shared grads, loss sum, token count.
        def idle(chunk, v, x, g, micro, acc):
            return zeros_act, zeros_act, acc

        def fwd_first(chunk, v, x, g, micro, acc):
            return stage(chunk, embed(shared, micro["inputs"]), micro), zeros_act, acc

        def fwd_mid(chunk, v, x, g, micro, acc):
            return stage(chunk, x, micro), zeros_act, acc

        def add(acc, v, d_chunk, d_shared=None, loss=0.0, count=0.0):
            g_layers, g_shared, loss_sum, count_sum = acc
            g_layers = [a.at[v].add(d.astype(a.dtype)) for a, d in zip(g_layers, d_chunk, strict=True)]
            if d_shared is not None:
                g_shared = [a + d.astype(a.dtype) for a, d in zip(g_shared, d_shared, strict=True)]
            return g_layers, g_shared, loss_sum + loss, count_sum + count

        def bwd_first(chunk, v, x, g, micro, acc):
            _, vjp = jax.vjp(lambda c, s: stage(c, embed(s, micro["inputs"]), micro), chunk, shared)
            d_chunk, d_shared = vjp(g)
            return zeros_act, zeros_act, add(acc, v, d_chunk, d_shared)

        def bwd_mid(chunk, v, x, g, micro, acc):
            _, vjp = jax.vjp(lambda c, x: stage(c, x, micro), chunk, x)
            d_chunk, d_x = vjp(g)
            return zeros_act, d_x, add(acc, v, d_chunk)

        def bwd_last(chunk, v, x, g, micro, acc):
            (loss, count), vjp = jax.vjp(lambda c, s, x: head_loss(s, stage(c, x, micro), micro), chunk, shared, x)
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
            jnp.zeros((), f32),
            jnp.zeros((), f32),
        )
        init = (buffer(schedule.stash_slots), buffer(schedule.cot_slots), acc)
        (_, _, (g_layers, g_shared, loss_sum, count)), _ = lax.scan(tick, init, table)
        # Shared weights got gradient on the first and the last device only; loss and count on the last.
        g_shared, loss_sum, count = lax.psum((g_shared, loss_sum, count), AXIS)
        return [g[None] for g in g_layers], g_shared, loss_sum, count

    return body


def _store(buf_K: jax.Array, valid: jax.Array, slot: jax.Array, x: jax.Array) -> jax.Array:
    """buf[slot] = x where `valid`; a tick with nothing arriving leaves the buffer as it was."""
    return buf_K.at[slot].set(jnp.where(valid > 0, x, buf_K[slot]))
