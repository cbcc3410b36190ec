"""What one device holds under a mesh: its shard of every state array, and the local sizes of activations.

Both come from the training code's own tables, never from a second copy of them: the state's
shapes and logical names from the abstract state of the real model and optimizer
(jaxscale.training.state), and each array's split from `jaxscale.sharding.logical_to_spec` on an
abstract mesh (no devices needed), with the same dimension names the model's `constrain` calls use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec

from jaxscale.config import Config
from jaxscale.models import attention
from jaxscale.models.quant import FrozenBase
from jaxscale.models.transformer import DecoderShape
from jaxscale.parallel.schedules import Schedule
from jaxscale.sharding import Rules, logical_to_spec


@dataclass(frozen=True)
class StepShape:
    """The numbers of one train step the planner needs besides the model's shape."""

    global_batch: int  # sequences per step
    seq_len: int
    grad_accum: int  # microbatches per step
    remat: str  # a jaxscale.config.REMAT_POLICIES name

    @classmethod
    def of(cls, cfg: Config) -> StepShape:
        return cls(cfg.train.global_batch, cfg.train.seq_len, cfg.train.grad_accum, cfg.model.remat)

    @property
    def microbatch(self) -> int:
        """Sequences per microbatch, global."""
        return self.global_batch // self.grad_accum

    @property
    def tokens(self) -> int:
        """Tokens per step, global."""
        return self.global_batch * self.seq_len


@dataclass(frozen=True)
class StateArray:
    """One array of the train state: shape, bytes per element, logical dimension names."""

    shape: tuple[int, ...]
    itemsize: int
    names: tuple[str | None, ...]
    is_param: bool  # a model array (else optimizer state)
    trainable: bool  # gets a gradient: every parameter, or with LoRA only the adapters
    entries_per_element: int = 1  # weights an element holds: 2 for NF4 codes (two 4-bit codes a byte), 0 for scales


def state_arrays(abstract: nnx.State) -> list[StateArray]:
    """Every array of an abstract (model, optimizer) state (jaxscale.training.state.abstract_state), with its names."""
    names = jax.tree.leaves(nnx.get_partition_spec(abstract), is_leaf=lambda x: isinstance(x, PartitionSpec))
    kinds = jax.tree.leaves(jax.tree.map(type, abstract, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    trained = nnx.LoRAParam if nnx.LoRAParam in kinds else nnx.Param
    arrays = []
    for (path, leaf), spec, kind in zip(jax.tree.leaves_with_path(abstract), names, kinds, strict=True):
        padded = tuple(spec) + (None,) * (len(leaf.shape) - len(spec))
        is_param = getattr(path[0], "key", getattr(path[0], "idx", None)) == 0  # (model, optimizer)[0]
        packed = _weights_per_element(kind, leaf.dtype)
        arrays.append(
            StateArray(
                tuple(leaf.shape), leaf.dtype.itemsize, padded, is_param, is_param and issubclass(kind, trained), packed
            )
        )
    return arrays


def _weights_per_element(kind: type, dtype: np.dtype) -> int:
    """How many of the model's weights one element stands for: a quantized base's scales stand for none."""
    if not issubclass(kind, FrozenBase):
        return 1
    return {np.dtype(np.uint8): 2, np.dtype(np.int8): 1}.get(np.dtype(dtype), 0)


def without_fsdp(mesh: AbstractMesh) -> AbstractMesh:
    """The same mesh with fsdp=1: what a weight looks like once FSDP has all-gathered it."""
    return AbstractMesh(tuple(1 if a == "fsdp" else n for a, n in mesh.shape.items()), mesh.axis_names)


def shard_elements(shape: tuple[int, ...], names: tuple[str | None, ...], rules: Rules, mesh: AbstractMesh) -> int:
    """Elements of one device's shard of an array with these logical dimension names."""
    spec = logical_to_spec(names, shape, rules, mesh)
    return math.prod(size // split_degree(entry, mesh) for size, entry in zip(shape, spec, strict=True))


def split_degree(entry: str | tuple[str, ...] | None, mesh: AbstractMesh) -> int:
    """How many ways one PartitionSpec entry splits its dimension."""
    if entry is None:
        return 1
    axes = (entry,) if isinstance(entry, str) else entry
    return math.prod(mesh.shape[a] for a in axes)


@dataclass(frozen=True)
class LocalSizes:
    """Per-device sizes of the activations of one microbatch (letters as in jaxscale.models.transformer)."""

    rows: int  # B: sequences per device per microbatch
    seq: int  # L: tokens of each sequence on this device (all of them unless the context axis splits it)
    stream: int  # tokens of each sequence in the residual stream on this device: L / tensor with sequence parallelism
    keys: int  # keys each query attends over: the whole sequence, also where the context axis splits it
    d_model: int  # D: activations keep the whole width
    heads: int  # N on this device
    kv_heads: int  # K on this device
    head_dim: int  # H
    mlp: int  # F on this device (dense MLP; also each expert's hidden units)
    vocab: int  # V on this device
    experts: int  # E on this device (0: dense model)
    expert_ways: int  # devices the experts are split over
    act_bytes: int  # bytes per element of activations: model.compute_dtype
    platform: str = "cpu"  # what the step is compiled for: 'cpu', 'gpu' or 'tpu'
    attention: str = "xla"  # how the step attends on the target: `attention_kernel`
    kv_repeated: bool = False  # splash: KV heads split otherwise than query heads, so repeated to each local query head

    @property
    def tokens(self) -> int:
        return self.rows * self.seq

    @property
    def stream_share(self) -> float:
        """The share of this device's tokens whose residual stream (layer inputs, norms) it holds: 1 / tensor
        with sequence parallelism (jaxscale.sharding.SEQUENCE_PARALLEL), else 1."""
        return self.stream / self.seq


def local_sizes(
    step: StepShape, shape: DecoderShape, rules: Rules, mesh: AbstractMesh, platform: str = "cpu"
) -> LocalSizes:
    """Local activation sizes, split by the same logical names the model constrains its activations with,
    for a step compiled for devices of `platform` ('cpu', 'gpu', 'tpu'), which picks the attention kernel."""
    micro, L = step.microbatch, step.seq_len

    def local(names: tuple[str | None, ...], dims: tuple[int, ...], which: int) -> int:
        spec = logical_to_spec(names, dims, rules, mesh)
        return dims[which] // split_degree(spec[which], mesh)

    heads = local(("batch", "seq", "heads", None), (micro, L, shape.n_heads, shape.head_dim), 2)
    kv_heads = local(("batch", "seq", "kv_heads", None), (micro, L, shape.n_kv_heads, shape.head_dim), 2)

    experts = 0
    expert_ways = 1
    if shape.num_experts:
        experts = local(("experts", None, None), (shape.num_experts, shape.d_model, shape.d_ff), 0)
        expert_ways = shape.num_experts // experts
    return LocalSizes(
        rows=local(("batch", "seq"), (micro, L), 0),
        seq=local(("batch", "seq"), (micro, L), 1),
        stream=local(("batch", "act_seq", "act_embed"), (micro, L, shape.d_model), 1),
        keys=L,
        d_model=shape.d_model,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=shape.head_dim,
        mlp=local(("batch", "seq", "mlp"), (micro, L, shape.d_ff), 2),
        vocab=local(("batch", "seq", "vocab"), (micro, L, shape.vocab_size), 2),
        experts=experts,
        expert_ways=expert_ways,
        act_bytes=np.dtype(shape.compute_dtype).itemsize,
        platform=platform,
        attention=attention_kernel(shape, platform, dict(mesh.shape)["context"]),
        kv_repeated=shape.n_heads // heads != shape.n_kv_heads // kv_heads,
    )


def attention_kernel(shape: DecoderShape, platform: str, context: int) -> str:
    """How the step attends on devices of `platform`: the implementation model.attention resolves to, or `ring`
    where the context axis splits the sequence and parallel.context_attention=ring (jaxscale.models.attention)."""
    if context > 1 and shape.context_attention == "ring":
        return "ring"
    return attention.resolve(shape.attention, platform, shape.compute_dtype, context, shape.attn_softcap)


@dataclass(frozen=True)
class Placement:
    """One step of one model on one mesh: what the memory and traffic models read."""

    step: StepShape
    shape: DecoderShape
    arrays: list[StateArray]  # the train state
    rules: Rules
    mesh: AbstractMesh
    local: LocalSizes  # activation sizes on one device
    schedule: Schedule | None = None  # the pipeline schedule (jaxscale.training.layout); None without a pipeline
