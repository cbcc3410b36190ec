"""The jitted train and eval steps: pure functions of (state, batch), sharded in and out, state donated."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxscale.checkpoint.manager import checksum
from jaxscale.data import Batch
from jaxscale.models.lora import step_dropout_key
from jaxscale.parallel.pipeline import pipeline_grads
from jaxscale.parallel.schedules import Schedule
from jaxscale.sharding import Rules, active_axis_size, active_rules, constrain, context_order, use_rules


def train_objective(
    model: nnx.Module, batch: Batch, dropout_key: jax.Array | None = None
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, dict]]:
    """What the step differentiates, and (token loss sum, token count, the model's auxiliary scalars).

    An MoE model's `moe_loss` (weighted balance and z losses) counts once per token, so dividing
    the sum by the global token count gives mean token loss + moe_loss, with or without accumulation.
    `dropout_key`: the microbatch's key of the adapters' dropout; None: no dropout.
    """
    x_BLD, aux = model.hidden(batch["inputs"], model.documents(batch), dropout_key)
    loss_sum, count = model.token_loss(x_BLD, batch)
    objective = loss_sum + count * aux["moe_loss"] if aux else loss_sum
    return objective, (loss_sum, count, aux)


def balance_for_context(batch: Batch, context: int) -> Batch:
    """`batch` [B, L] with each row's tokens reordered for the context axis, and its documents explicit
    (unchanged where `context` is 1).

    The order (jaxscale.sharding.context_order) gives every device as many keys to attend over, and
    is invisible to the result: attention masks by document and position, not index
    (jaxscale.models.attention), rotary embeddings read the positions, adapter dropout draws each
    token's mask by its place in the original row, and the loss sums over tokens.
    """
    if context == 1:
        return batch
    rows, length = batch["inputs"].shape
    if "segment_ids" not in batch:  # one document per row
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (rows, length))
        batch = batch | {"segment_ids": jnp.zeros((rows, length), jnp.int32), "positions": positions}
    order = context_order(length, context)
    return {k: constrain(x[:, order], ("batch", "seq")) for k, x in batch.items()}


def split_microbatches(batch: Batch, num_micro: int) -> Batch:
    """[B, L] -> [A, B/A, L] with microbatch a taking rows a, a+A, a+2A, ...

    Striding (not blocking) keeps every device's rows in every microbatch, so the split moves no data.
    """

    def split(x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]).swapaxes(0, 1)
        return constrain(x, (None, "batch", "seq"))

    return jax.tree.map(split, batch)


def summed_grads(
    model_def: nnx.GraphDef,
    params: nnx.State,
    rest: nnx.State,
    batch: Batch,
    grad_accum: int,
    dropout_key: jax.Array | None = None,
) -> tuple[nnx.State, tuple[jax.Array, jax.Array, dict[str, jax.Array]]]:
    """Gradient of the objective summed over `grad_accum` microbatches of `batch` [B, L], and terms.

    Gradients accumulate in the parameters' dtype; the terms are (token loss sum, token count, the
    model's auxiliary scalars averaged over microbatches). `dropout_key`: the step's key of the
    adapters' dropout (None: none), folded with each microbatch's index.
    """

    def loss_of(p: nnx.State, micro: Batch, index: jax.Array | int | None) -> tuple[jax.Array, tuple]:
        key = None if index is None else jax.random.fold_in(dropout_key, index)
        return train_objective(nnx.merge(model_def, p, rest), micro, key)

    grad_fn = jax.grad(loss_of, has_aux=True)
    first = None if dropout_key is None else 0
    if grad_accum == 1:
        return grad_fn(params, batch, first)

    def accumulate(carry: tuple, micro: tuple[Batch, jax.Array | None]) -> tuple[tuple, None]:
        grads, terms = grad_fn(params, *micro)
        return jax.tree.map(jnp.add, carry, (grads, terms)), None

    micros = split_microbatches(batch, grad_accum)
    indices = None if dropout_key is None else jnp.arange(grad_accum)  # no scan input without dropout
    terms = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micros), first)[1])
    init = (jax.tree.map(jnp.zeros_like, params), jax.tree.map(lambda t: jnp.zeros(t.shape, t.dtype), terms))
    (grad_sum, (loss_sum, count, aux)), _ = jax.lax.scan(accumulate, init, (micros, indices))
    aux = {k: v / grad_accum for k, v in aux.items()}  # MoE scalars: the mean over microbatches
    return grad_sum, (loss_sum, count, aux)


def pipelined_grads(
    model_def: nnx.GraphDef, params: nnx.State, rest: nnx.State, batch: Batch, pipeline: Schedule
) -> tuple[nnx.State, tuple[jax.Array, jax.Array, dict[str, jax.Array]]]:
    """What `summed_grads` returns, computed by pipeline `pipeline` over its microbatches (dense models).

    Needs active rules (jaxscale.sharding.use_rules): the pipeline runs on their mesh.
    """
    active = active_rules()
    if active is None:
        raise ValueError("pipelined_grads runs on a mesh: call it inside jaxscale.sharding.use_rules")
    micros = split_microbatches(batch, pipeline.microbatches)
    grads, (loss_sum, count) = pipeline_grads(model_def, params, rest, micros, pipeline, *active)
    return grads, (loss_sum, count, {})


def make_train_step(
    graphdef: nnx.GraphDef,
    schedule: optax.Schedule,
    grad_accum: int,
    pipeline: Schedule | None = None,
    trainable: type[nnx.Variable] = nnx.Param,
    dropout_seed: int | None = None,
) -> Callable[[nnx.State, Batch], tuple[nnx.State, dict[str, jax.Array]]]:
    """One optimizer step over a global batch, accumulating fp32 gradients over `grad_accum` microbatches.

    Only the `trainable` variables (the optimizer's `wrt`; with LoRA the adapters) are differentiated;
    the rest of the model enters the step as constants. `dropout_seed` (train.seed, with lora.dropout > 0):
    the adapters' dropout draws from its key of the optimizer step (jaxscale.models.lora.step_dropout_key).

    The loss is normalized by the token count of the whole global batch, so accumulating A
    microbatches gives the same update as one batch of A times the size. With a `pipeline`
    schedule (jaxscale.parallel.schedules) its microbatches run through the pipeline stages instead.
    """

    def train_step(state: nnx.State, batch: Batch) -> tuple[nnx.State, dict[str, jax.Array]]:
        previous = jax.tree.map(lambda x: x, state)  # a fresh tree: merge() shares Variables that update() mutates
        model, optimizer = nnx.merge(graphdef, state)
        model_def, params, rest = nnx.split(model, trainable, ...)
        if pipeline is None:
            balanced = balance_for_context(batch, active_axis_size("context"))
            key = None if dropout_seed is None else step_dropout_key(dropout_seed, optimizer.step[...])
            grad_sum, (loss_sum, count, aux) = summed_grads(model_def, params, rest, balanced, grad_accum, key)
        else:
            grad_sum, (loss_sum, count, aux) = pipelined_grads(model_def, params, rest, batch, pipeline)

        count = jnp.maximum(count, 1.0)
        # Divided in float32, kept in the parameters' dtype: the optimizer state keeps its dtype step to step.
        grads = jax.tree.map(lambda g: (g / count).astype(g.dtype), grad_sum)
        lr = schedule(optimizer.step[...])
        grad_norm = optax.tree.norm(grads)
        optimizer.update(model, grads)
        # A non-finite loss or gradient leaves the state as it was; the loop stops or counts it (train.on_nan).
        finite = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), nnx.state((model, optimizer)), previous)
        metrics = {
            "loss": loss_sum / count,
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens": count,
            "nonfinite": 1.0 - finite.astype(jnp.float32),
            "batch_fingerprint": batch_fingerprint(batch),
        } | aux
        return new_state, metrics

    return train_step


def batch_fingerprint(batch: Batch) -> jax.Array:
    """A uint32 checksum of the whole global batch (every array, every element at its position).

    Exact and the same on any mesh or process count (see jaxscale.checkpoint.manager.checksum), so the
    logs show that a run restarted on other hosts trained each step on the same batch.
    """
    return sum((checksum(x) for x in jax.tree.leaves(batch)), jnp.uint32(0))


def jit_train_step(
    step_fn: Callable, mesh: Mesh, rules: Rules, state_shardings: Any, batch_sharding: NamedSharding
) -> Callable[[nnx.State, Batch], tuple[nnx.State, dict[str, jax.Array]]]:
    """jit with explicit in/out shardings; the old state's buffers are donated to the new one."""
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())

    def traced(state: nnx.State, batch: Batch) -> tuple[nnx.State, dict[str, jax.Array]]:
        with use_rules(rules, mesh):
            return step_fn(state, batch)

    return jax.jit(
        traced,
        in_shardings=(state_shardings, batch_sharding),  # one sharding for every array of the batch
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )


def make_eval_step(
    graphdef: nnx.GraphDef, mesh: Mesh, rules: Rules, state_shardings: Any, batch_sharding: NamedSharding
) -> Callable[[nnx.State, Batch], tuple[jax.Array, jax.Array]]:
    """Jitted (loss_sum, token_count) of the model in `state` on one batch."""

    def eval_step(state: nnx.State, batch: Batch) -> tuple[jax.Array, jax.Array]:
        with use_rules(rules, mesh):
            model, _ = nnx.merge(graphdef, state)
            batch = balance_for_context(batch, active_axis_size("context"))
            return model.token_loss(model.hidden(batch["inputs"], model.documents(batch))[0], batch)

    return jax.jit(eval_step, in_shardings=(state_shardings, batch_sharding))
