"""Logical axis rules: model code names dimensions, one table maps them to mesh axes.

A strategy (pure data parallel, FSDP, FSDP + tensor parallel) is a different table,
never different model code. Tables are swapped by `mesh.strategy` and refined
entry by entry with `mesh.rules`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxscale.errors import UserError

MeshAxes = tuple[str, ...]
Rules = dict[str, MeshAxes]

# Logical names used by the models. Parameters: embed, heads, kv_heads, head_dim, mlp, vocab,
# experts, layers, norm. Activations: batch, seq, act_embed (the model width of activations, which
# FSDP leaves whole), plus heads / kv_heads / mlp / vocab, which tensor parallelism splits in both.
# `act_seq` is the sequence of the residual stream between the blocks (embeddings, norms, residual
# adds): `seq` everywhere, and with sequence parallelism (`SEQUENCE_PARALLEL`) split over `tensor` too.
# `experts` goes to the expert axis in every table: there MoE layers trade tokens by all-to-all
# (jaxscale.models.expert_parallel), while outside them that axis splits the batch like `data`.
# `seq` goes to the context axis in every table: each device holds a slice of every sequence's tokens
# (context parallelism; jaxscale.models.attention gathers the keys and values of the whole sequence).
# `layers` goes to the pipeline axis in every table: stacked blocks are stored split into stages
# (jaxscale.parallel.pipeline), and an axis of size 1 is dropped, so without a pipeline it is a no-op.
_BATCH = ("data", "fsdp", "expert")
_EXPERTS = ("expert",)
_LAYERS = ("pipeline",)
_SEQ = ("context",)
STRATEGIES: dict[str, Rules] = {
    "dp": {"batch": _BATCH, "seq": _SEQ, "act_seq": _SEQ, "experts": _EXPERTS, "layers": _LAYERS},
    "fsdp": {
        "batch": _BATCH,
        "seq": _SEQ,
        "act_seq": _SEQ,
        "embed": ("fsdp",),
        "experts": _EXPERTS,
        "layers": _LAYERS,
    },
    "fsdp_tp": {
        "batch": _BATCH,
        "seq": _SEQ,
        "act_seq": _SEQ,
        "experts": _EXPERTS,
        "layers": _LAYERS,
        "embed": ("fsdp",),
        "heads": ("tensor",),
        "kv_heads": ("tensor",),
        "mlp": ("tensor",),
        "vocab": ("tensor",),
    },
}


# Megatron-style sequence parallelism (Korthikanti et al. 2022), as a refinement of any table: between the
# blocks the residual stream's tokens are split over `tensor` as well, so the norms, residual adds and the
# layer inputs kept for the backward are a tensor shard's share of the sequence. Where a block meets the
# stream, XLA turns the all-reduce that ends a tensor-parallel block into a reduce-scatter, and gathers the
# normed tokens (all-gather) where the next block starts: the same bytes, and no copy of the sequence on
# every tensor device.
SEQUENCE_PARALLEL: Rules = {"act_seq": (*_SEQ, "tensor")}


def make_rules(strategy: str, overrides: Mapping[str, Any] | None = None, sequence_parallel: bool = False) -> Rules:
    """The rule table of `strategy`, refined by `SEQUENCE_PARALLEL` where `sequence_parallel`, with `overrides`
    (logical name -> axis, list of axes, or None) applied last."""
    if strategy not in STRATEGIES:
        raise UserError(f"Unknown mesh.strategy '{strategy}'. Known strategies: {', '.join(sorted(STRATEGIES))}.")
    rules = dict(STRATEGIES[strategy]) | (SEQUENCE_PARALLEL if sequence_parallel else {})
    for name, axes in (overrides or {}).items():
        if axes is None:
            rules[name] = ()
        elif isinstance(axes, str):
            rules[name] = (axes,)
        elif isinstance(axes, (list, tuple)) and all(isinstance(a, str) for a in axes):
            rules[name] = tuple(axes)
        else:
            raise UserError(f"mesh.rules.{name} must be a mesh axis name, a list of them, or null; got {axes!r}.")
    return rules


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], rules: Rules, mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions carry logical `names`.

    A mesh axis that does not divide its dimension is dropped for that array (the array is
    replicated along it): two KV heads cannot split four ways, and that must not stop a run.
    A mesh axis is used at most once per array; the first dimension that claims it wins.
    """
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape, strict=True):
        axes = []
        for axis in rules.get(name, ()) if name else ():
            if axis not in mesh.shape:
                raise UserError(
                    f"Sharding rule for '{name}' names mesh axis '{axis}', which is not one of {mesh.axis_names}."
                )
            degree = mesh.shape[axis]
            if degree == 1 or axis in used or size % (degree * math.prod(mesh.shape[a] for a in axes)):
                continue
            axes.append(axis)
            used.add(axis)
        spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return PartitionSpec(*spec)


def batch_axes(rules: Rules, axis_sizes: Mapping[str, int]) -> MeshAxes:
    """Mesh axes (of size > 1) that split the batch dimension; `axis_sizes` as `Mesh.shape` gives them."""
    return tuple(a for a in rules.get("batch", ()) if axis_sizes[a] > 1)


# The active (rules, mesh) pair, so model code can constrain activations by logical name only.
_ACTIVE: contextvars.ContextVar[tuple[Rules, Mesh] | None] = contextvars.ContextVar("jaxscale_rules", default=None)


def active_rules() -> tuple[Rules, Mesh] | None:
    """The (rules, mesh) that `use_rules` made active, for layers that schedule their own communication."""
    return _ACTIVE.get()


def active_axis_size(axis: str) -> int:
    """The size of mesh axis `axis` under the active rules (1 without active rules)."""
    active = _ACTIVE.get()
    return dict(active[1].shape).get(axis, 1) if active else 1


def active_platform() -> str:
    """The platform ('cpu', 'gpu', 'tpu') of the devices the step is traced for: the active mesh's, else the
    default backend's. An ahead-of-time compile for a TPU topology on a CPU host reads 'tpu'."""
    active = _ACTIVE.get()
    if active is None:
        return jax.default_backend()
    mesh = active[1]
    if isinstance(mesh, Mesh):
        return mesh.devices.flat[0].platform
    device = mesh.abstract_device  # inside a pipeline stage: the abstract mesh of the manual region
    return device.platform if device is not None else jax.default_backend()


def context_order(length: int, context: int) -> np.ndarray:
    """The token of a row of `length` each position holds once the row is balanced over `context` devices.

    Causal attention gives later tokens more keys, so a row cut into `context` contiguous slices would
    leave the last device most of the work. The row is cut into 2 * context chunks instead, and device i
    holds chunks i and 2 * context - 1 - i (jaxscale.training.step `balance_for_context`). [length] int;
    arange(length) where `context` is 1.
    """
    if context == 1:
        return np.arange(length)
    chunk = length // (2 * context)
    zigzag = [c for i in range(context) for c in (i, 2 * context - 1 - i)]
    return np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in zigzag])


@contextlib.contextmanager
def use_rules(rules: Rules, mesh: Mesh) -> Iterator[None]:
    """Make `rules` on `mesh` the ones `constrain` applies while tracing inside this block."""
    token = _ACTIVE.set((rules, mesh))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Pin activation `x` to the sharding its logical `names` map to; a no-op with no active rules."""
    active = _ACTIVE.get()
    if active is None:
        return x
    rules, mesh = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, x.shape, rules, mesh)))


def tree_shardings(abstract_state: Any, logical_names: Any, rules: Rules, mesh: Mesh) -> Any:
    """NamedShardings for every leaf of `abstract_state`, from a same-structured tree of logical names.

    `logical_names` leaves are PartitionSpecs of logical names (as `nnx.get_partition_spec` gives);
    an empty spec means replicated.
    """

    def one(leaf: jax.ShapeDtypeStruct, names: PartitionSpec) -> NamedSharding:
        padded = tuple(names) + (None,) * (len(leaf.shape) - len(names))
        return NamedSharding(mesh, logical_to_spec(padded, leaf.shape, rules, mesh))

    return jax.tree.map(one, abstract_state, logical_names)
