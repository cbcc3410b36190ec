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
one sends their cotangents upstream. A stage's backward runs as k ticks, one group of its layers
each (see jaxscale.parallel.schedules for why), each recomputing its group's forward with `jax.vjp`
from the group input the forward kept; so a stage keeps only group inputs, k for each microbatch in
flight (M for GPipe, about P for 1F1B). The model is driven only through its hooks: `embed_tokens` on the first
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
import numpy as np
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
    flat, names, is_layer, model_of = _split_for_stages(model_def, params, rest)
    layers = [leaf for leaf, layer in zip(flat, is_layer, strict=True) if layer]
    shared = [
        _gathered_for_use(leaf, spec, rules, mesh)
        for leaf, spec, layer in zip(flat, names, is_layer, strict=True)
        if not layer
    ]
    rest_leaves = jax.tree.leaves(rest)
    n = layers[0].shape[0] // (p_ * v_)

    def to_stages(a: jax.Array) -> jax.Array:  # [S_layers, ...] -> [P, V, n, ...]: stage v P + p on device p
        return a.reshape(v_, p_, n, *a.shape[1:]).swapaxes(0, 1)

    def from_stages(a: jax.Array) -> jax.Array:
        return a.swapaxes(0, 1).reshape(p_ * v_ * n, *a.shape[3:])

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
    treedef = jax.tree.structure(params)
    grads = jax.tree.unflatten(treedef, [next(it_layers) if layer else next(it_shared) for layer in is_layer])
    return grads, (loss_sum, count)


def _split_for_stages(model_def: nnx.GraphDef, params: nnx.State, rest: nnx.State) -> tuple:
    """The parameter leaves, their logical names, which are stacked layer weights, and `model_of`.

    `model_of(chunk, shared, rest_leaves)` rebuilds the model from a chunk of the stacked layers
    (any depth: the model runs as many layers as it holds) and the other leaves.
    """
    flat, treedef = jax.tree_util.tree_flatten(params)
    names = jax.tree.leaves(nnx.get_partition_spec(params), is_leaf=lambda x: isinstance(x, PartitionSpec))
    is_layer = [len(n) > 0 and n[0] == "layers" for n in names]
    rest_def = jax.tree.structure(rest)

    def model_of(chunk: list[jax.Array], shared_leaves: list[jax.Array], rest_leaves: list[jax.Array]) -> nnx.Module:
        it_chunk, it_shared = iter(chunk), iter(shared_leaves)
        leaves = [next(it_chunk) if layer else next(it_shared) for layer in is_layer]
        return nnx.merge(model_def, jax.tree.unflatten(treedef, leaves), jax.tree.unflatten(rest_def, rest_leaves))

    return flat, names, is_layer, model_of


def branch_flops(
    model_def: nnx.GraphDef, params: nnx.State, rest: nnx.State, micro: dict[str, jax.Array], schedule: Schedule
) -> np.ndarray:
    """XLA's FLOPs of each branch's op on one pipeline device (BRANCHES order), one microbatch each.

    `micro`: one microbatch's inputs, targets, loss_mask [B, L]. Each branch is lowered alone, off
    the mesh: data, fsdp and tensor divide every branch's work alike, so the ratios hold on any mesh.
    """
    flat, _, is_layer, model_of = _split_for_stages(model_def, params, rest)
    p_, v_, k = schedule.stages, schedule.virtual, schedule.backward_ticks
    # Any device's chunks [V, n, ...] (all have the same shapes): the first P V n-th of each stack.
    layers = [
        a[: a.shape[0] // p_].reshape(v_, -1, *a.shape[1:]) for a, is_l in zip(flat, is_layer, strict=True) if is_l
    ]
    shared = [a for a, is_l in zip(flat, is_layer, strict=True) if not is_l]
    rest_leaves = jax.tree.leaves(rest)
    branches, act = stage_branches(schedule, model_of, layers, shared, rest_leaves, micro)
    acc = ([jnp.zeros_like(a) for a in layers], [jnp.zeros_like(a) for a in shared], jnp.zeros(()), jnp.zeros(()))
    kept, cot = jnp.zeros((k, *act.shape), act.dtype), jnp.zeros(act.shape, act.dtype)
    # The group index is traced as in the runner (a dynamic slice), so the cost is that of any group.
    group = jnp.asarray(k - 1, jnp.int32)

    def flops(name: str) -> float:
        lowered = jax.jit(branches[name]).lower([a[0] for a in layers], jnp.int32(0), group, kept, cot, micro, acc)
        return float(lowered.cost_analysis().get("flops", 0.0))

    return np.array([flops(name) for name in sch.BRANCHES])


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
        k = schedule.backward_ticks
        first_micro = jax.tree.map(lambda a: a[0], micros)
        branches, act = stage_branches(schedule, model_of, layers, shared, rest, first_micro)

        def buffer(*slots: int) -> jax.Array:  # [*slots, B, L, D]
            names = (None,) * len(slots) + ("batch", "seq", "act_embed")
            return constrain(jnp.zeros((*slots, *act.shape), act.dtype), names)

        def tick(carry: tuple, rows_PC: jax.Array) -> tuple[tuple, None]:
            stash, cots, running, acc = carry
            row = rows_PC[device]
            v, group = row[sch.CHUNK], row[sch.GROUP]
            chunk = [lax.dynamic_index_in_dim(a, v, keepdims=False) for a in layers]
            micro = jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, row[sch.MB], keepdims=False), micros)
            kept = stash[row[sch.STASH_SLOT]]
            # A backward's first tick (its last group) starts from the cotangent the next stage sent;
            # its later ticks from the one the previous tick left on this device.
            cot = cots[row[sch.COT_SLOT]]
            if running is not None:
                cot = jnp.where(group == k - 1, cot, running)
            send_act, kept, d_x, acc = lax.switch(
                row[sch.BRANCH], [branches[name] for name in sch.BRANCHES], chunk, v, group, kept, cot, micro, acc
            )
            is_bwd = row[sch.BRANCH] >= sch.BRANCHES.index("bwd_first")
            send_cot = jnp.where(is_bwd & (group == 0), d_x, jnp.zeros_like(d_x))
            if running is not None:
                running = jnp.where(is_bwd & (group > 0), d_x, running)
            # Sends stay outside the switch: every device takes part in every collective.
            got_act = lax.ppermute(send_act, AXIS, forward_perm)
            got_cot = lax.ppermute(send_cot, AXIS, backward_perm)
            stash = stash.at[row[sch.STASH_SLOT]].set(kept)
            arrived = stash[row[sch.RECV_ACT_SLOT]].at[0].set(got_act)  # the input of the stage's group 0
            stash = _store(stash, row[sch.RECV_ACT], row[sch.RECV_ACT_SLOT], arrived)
            cots = _store(cots, row[sch.RECV_COT], row[sch.RECV_COT_SLOT], got_cot)
            return (stash, cots, running, acc), None

        acc = (
            [jnp.zeros(a.shape, a.dtype) for a in layers],
            [jnp.zeros(a.shape, a.dtype) for a in shared],
            jnp.zeros((), jnp.float32),
            jnp.zeros((), jnp.float32),
        )
        running = buffer() if k > 1 else None  # the cotangent between a backward's ticks
        init = (buffer(max(schedule.stash_slots, 1), k), buffer(max(schedule.cot_slots, 1)), running, acc)
        (_, _, _, (g_layers, g_shared, loss_sum, count)), _ = lax.scan(tick, init, table)
        # Shared weights got gradient on the first and the last device only; loss and count on the last.
        g_shared, loss_sum, count = lax.psum((g_shared, loss_sum, count), AXIS)
        return [g[None] for g in g_layers], g_shared, loss_sum, count

    return body


def stage_branches(
    schedule: Schedule,
    model_of: Callable[..., nnx.Module],
    layers: list[jax.Array],
    shared: list[jax.Array],
    rest: list[jax.Array],
    micro: dict[str, jax.Array],
) -> tuple[dict[str, Callable], jax.ShapeDtypeStruct]:
    """What a device can do in one tick, by branch name (jaxscale.parallel.schedules.BRANCHES), and the
    activation [B, L, D] the ticks pass on (its shape and dtype).

    `layers`: this device's chunks [V, n, ...]; `micro`: one microbatch (for shapes). Every branch
    maps (chunk [n, ...] leaves, chunk index v, group g, kept group inputs [k, B, L, D], cotangent
    [B, L, D], microbatch, accumulators) to (activation to send [B, L, D], kept group inputs,
    cotangent of the group's input [B, L, D], accumulators). Accumulators: chunk gradients [V, n, ...],
    shared gradients, summed loss, token count.
    """
    k = schedule.backward_ticks
    size = layers[0].shape[1] // k  # layers per group
    any_chunk = [a[0] for a in layers]  # embedding and head use no block weights, but the model needs some

    def group_of(chunk: list[jax.Array], g: jax.Array) -> list[jax.Array]:
        return [lax.dynamic_slice_in_dim(a, g * size, size) for a in chunk]

    def run_group(group: list[jax.Array], x_BLD: jax.Array, micro: dict[str, jax.Array]) -> jax.Array:
        model = model_of(group, shared, rest)
        return model.run_layers(x_BLD, model.documents(micro))[0]

    def embed(shared: list[jax.Array], tokens_BL: jax.Array) -> jax.Array:
        return model_of(any_chunk, shared, rest).embed_tokens(tokens_BL)

    def head_loss(shared: list[jax.Array], x_BLD: jax.Array, micro: dict) -> tuple[jax.Array, jax.Array]:
        model = model_of(any_chunk, shared, rest)
        return model.token_loss(x_BLD, micro)

    act = jax.eval_shape(embed, shared, micro["inputs"])
    zeros_act = jnp.zeros(act.shape, act.dtype)

    def forward(chunk: list[jax.Array], x_BLD: jax.Array, kept: jax.Array, micro: dict, last: bool) -> tuple:
        """Run the groups from x, keeping the inputs of groups 1 .. k - 1; the chunk's output unless `last`.

        Group 0's input is kept where it arrives (or, on the first stage, recomputed from the tokens).
        On the last stage only the head needs the last group's output, and its backward recomputes it.
        """
        for g in range(1, k):
            x_BLD = run_group([a[(g - 1) * size : g * size] for a in chunk], x_BLD, micro)
            kept = kept.at[g].set(x_BLD)
        if last:
            return zeros_act, kept
        return run_group([a[(k - 1) * size :] for a in chunk], x_BLD, micro), kept

    def add(acc, v, g, d_group, d_shared=None, loss=0.0, count=0.0):
        g_layers, g_shared, loss_sum, count_sum = acc
        g_layers = [_add_group(a, v, g * size, d) for a, d in zip(g_layers, d_group, strict=True)]
        if d_shared is not None:
            g_shared = [a + d.astype(a.dtype) for a, d in zip(g_shared, d_shared, strict=True)]
        return g_layers, g_shared, loss_sum + loss, count_sum + count

    def idle(chunk, v, g, kept, cot, micro, acc):
        return zeros_act, kept, zeros_act, acc

    def fwd_first(chunk, v, g, kept, cot, micro, acc):
        out, kept = forward(chunk, embed(shared, micro["inputs"]), kept, micro, last=False)
        return out, kept, zeros_act, acc

    def fwd_mid(chunk, v, g, kept, cot, micro, acc):
        out, kept = forward(chunk, kept[0], kept, micro, last=False)
        return out, kept, zeros_act, acc

    def fwd_last(chunk, v, g, kept, cot, micro, acc):
        out, kept = forward(chunk, kept[0], kept, micro, last=True)
        return out, kept, zeros_act, acc

    def bwd_first(chunk, v, g, kept, cot, micro, acc):
        _, vjp = jax.vjp(lambda c, s: run_group(c, embed(s, micro["inputs"]), micro), group_of(chunk, g), shared)
        d_group, d_shared = vjp(cot)
        return zeros_act, kept, zeros_act, add(acc, v, g, d_group, d_shared)

    def bwd_mid(chunk, v, g, kept, cot, micro, acc):
        _, vjp = jax.vjp(lambda c, x: run_group(c, x, micro), group_of(chunk, g), kept[g])
        d_group, d_x = vjp(cot)
        return zeros_act, kept, d_x, add(acc, v, g, d_group)

    def bwd_last(chunk, v, g, kept, cot, micro, acc):
        def loss_of(c, s, x):
            return head_loss(s, run_group(c, x, micro), micro)

        (loss, count), vjp = jax.vjp(loss_of, group_of(chunk, g), shared, kept[g])
        d_group, d_shared, d_x = vjp((jnp.ones((), loss.dtype), jnp.zeros((), count.dtype)))
        f32 = jnp.float32
        return zeros_act, kept, d_x, add(acc, v, g, d_group, d_shared, loss.astype(f32), count.astype(f32))

    branches = {
        "idle": idle,
        "fwd_first": fwd_first,
        "fwd_mid": fwd_mid,
        "fwd_last": fwd_last,
        "bwd_first": bwd_first,
        "bwd_mid": bwd_mid,
        "bwd_last": bwd_last,
    }
    return branches, act


def _add_group(acc_VN: jax.Array, v: jax.Array, start: jax.Array, d_group: jax.Array) -> jax.Array:
    """acc[v, start : start + len(d_group)] += d_group: one layer group's gradient into its chunk's."""
    index = (v, start) + (0,) * (acc_VN.ndim - 2)
    current = lax.dynamic_slice(acc_VN, index, (1, *d_group.shape))
    return lax.dynamic_update_slice(acc_VN, current + d_group[None].astype(acc_VN.dtype), index)


def _store(buf_K: jax.Array, valid: jax.Array, slot: jax.Array, x: jax.Array) -> jax.Array:
    """buf[slot] = x where `valid`; a tick with nothing arriving leaves the buffer as it was."""
    return buf_K.at[slot].set(jnp.where(valid > 0, x, buf_K[slot]))
