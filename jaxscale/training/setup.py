"""The run setup: everything a run derives from its config and its devices, built once.

config -> rules -> model shape -> layout (jaxscale.training.layout validates it) -> mesh -> optimizer
-> abstract state -> state and batch shardings. `jaxscale train`, `jaxscale compile`, the tests and
the scripts all start from `setup_run`; nothing else rebuilds these. The devices may be real, the
first N of this process's CPU devices, or a TPU topology's devices that are compiled for but never
touched: nothing here allocates.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxscale.config import Config
from jaxscale.data import Batch, build_tokenizer
from jaxscale.data.segments import carries_documents
from jaxscale.errors import UserError
from jaxscale.hardware import ACCELERATORS, Cluster, accelerator_of
from jaxscale.hf.load import init_state_from_hf
from jaxscale.hf_config import hf_directory
from jaxscale.mesh import build_mesh
from jaxscale.models import attention
from jaxscale.models.expert_parallel import check_exchange
from jaxscale.models.lora import adapter_shape, trainable
from jaxscale.models.transformer import Decoder, DecoderShape, decoder_shape
from jaxscale.planning.auto import LoopChoice, choose_loop, device_budget, wants_choice
from jaxscale.planning.shards import StepShape, state_arrays
from jaxscale.sharding import Rules, logical_to_spec, make_rules, tree_shardings
from jaxscale.training.layout import Layout, check_layout
from jaxscale.training.state import abstract_state, init_state, lr_schedule, make_optimizer, model_and_optimizer
from jaxscale.training.step import jit_train_step, make_eval_step, make_train_step

BATCH_DTYPES = {"inputs": np.int32, "targets": np.int32, "loss_mask": np.float32}
DOCUMENT_DTYPES = {"segment_ids": np.int32, "positions": np.int32}  # with data.packing=segmented


@dataclass(frozen=True)
class RunSetup:
    """One run on one mesh: its layout, model, optimizer, abstract state and shardings."""

    cfg: Config
    mesh: Mesh
    rules: Rules
    layout: Layout
    shape: DecoderShape
    lr_schedule: optax.Schedule
    build_state: Callable[[], tuple[nnx.Module, nnx.Optimizer]]  # the (model, optimizer) constructor
    graphdef: nnx.GraphDef
    state_structs: Any  # the state's ShapeDtypeStructs, each carrying its sharding
    state_shardings: Any  # same structure, NamedSharding leaves
    batch_sharding: NamedSharding  # of every [global_batch, seq_len] batch array
    loop: LoopChoice  # the layer loop's unroll and the remat policy, as set or as `auto` chose them

    @property
    def parameter_count(self) -> int:
        """Parameters of the model: the base's (counted as in full precision, even when stored quantized) and any
        adapters'."""
        unadapted = dataclasses.replace(self.shape, adapters=None)
        base = nnx.eval_shape(lambda: Decoder(unadapted, nnx.Rngs(0)))
        adapters = self.trainable_count if self.shape.adapters else 0
        return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(base, nnx.Param))) + adapters

    @property
    def trainable(self) -> type[nnx.Variable]:
        """The variables the optimizer updates: every parameter, or with LoRA only the adapters."""
        return trainable(self.shape.adapters)

    @property
    def trainable_count(self) -> int:
        return sum(math.prod(x.shape) for x in jax.tree.leaves(self._model_state(self.trainable)))

    def _model_state(self, kind: type[nnx.Variable]) -> Any:
        return nnx.state(nnx.merge(self.graphdef, self.state_structs)[0], kind)

    def init_state(self) -> nnx.State:
        """Freshly initialized parameters (or those of model.init_from) and optimizer state, created directly
        in their shards."""
        if self.cfg.model.init_from:
            directory = hf_directory(self.cfg.model.init_from)
            return init_state_from_hf(
                directory,
                self.shape,
                self.build_state,
                self.graphdef,
                self.state_structs,
                self.state_shardings,
                self.rules,
                self.mesh,
            )
        return init_state(self.build_state, self.state_shardings, self.rules, self.mesh)

    def batch_structs(self) -> dict[str, jax.ShapeDtypeStruct]:
        """The global batch of one step, abstract: [global_batch, seq_len] per array, sharded."""
        shape = (self.cfg.train.global_batch, self.cfg.train.seq_len)
        dtypes = BATCH_DTYPES | (DOCUMENT_DTYPES if carries_documents(self.cfg.data) else {})
        return {k: jax.ShapeDtypeStruct(shape, dt, sharding=self.batch_sharding) for k, dt in dtypes.items()}

    def train_step(self) -> Callable[[nnx.State, Batch], tuple[nnx.State, dict[str, jax.Array]]]:
        """The jitted train step (state donated), running the pipeline schedule when the layout has one."""
        dropout = self.shape.adapters is not None and self.shape.adapters.dropout > 0
        step = make_train_step(
            self.graphdef,
            self.lr_schedule,
            self.cfg.train.grad_accum,
            self.layout.schedule,
            self.trainable,
            dropout_seed=self.cfg.train.seed if dropout else None,
        )
        return jit_train_step(step, self.mesh, self.rules, self.state_shardings, self.batch_sharding)

    def lower_train_step(self) -> jax.stages.Lowered:
        """The train step lowered on the abstract state and batch: what `train` compiles and `compile` inspects."""
        return self.train_step().lower(self.state_structs, self.batch_structs())

    def eval_step(self) -> Callable[[nnx.State, Batch], tuple[jax.Array, jax.Array]]:
        """Jitted (summed token loss, token count) of the state's model on one global batch."""
        return make_eval_step(self.graphdef, self.mesh, self.rules, self.state_shardings, self.batch_sharding)


def run_shape(cfg: Config, tokenizer_vocab: int | None = None) -> DecoderShape:
    """The decoder of `cfg`; model.vocab_size=0 sizes it from `tokenizer_vocab` (default: cfg.data's tokenizer)."""
    if tokenizer_vocab is None:
        tokenizer_vocab = build_tokenizer(cfg.data).vocab_size
    shape = dataclasses.replace(
        decoder_shape(cfg.model, tokenizer_vocab),
        adapters=adapter_shape(cfg.lora, cfg.model.compute_dtype),
        context_attention=cfg.parallel.context_attention,
    )
    if shape.vocab_size < tokenizer_vocab:
        raise UserError(
            f"model.vocab_size={shape.vocab_size} is smaller than the tokenizer's {tokenizer_vocab} tokens; "
            f"set model.vocab_size=0 to size it from the tokenizer."
        )
    return shape


def run_rules(cfg: Config, layout: Layout | None = None) -> Rules:
    """The logical axis rules of `cfg`: mesh.strategy's table, with sequence parallelism where the `layout`
    has it on (parallel.sequence_parallel resolved for its mesh), and mesh.rules over both. Without a layout
    the table `check_layout` takes: sequence parallelism changes no batch, expert or context split it checks."""
    return make_rules(cfg.mesh.strategy, cfg.mesh.rules, layout is not None and layout.sequence_parallel)


def state_builder(cfg: Config, shape: DecoderShape) -> Callable[[], tuple[nnx.Module, nnx.Optimizer]]:
    """The (model, optimizer) constructor of `cfg`: its shape, remat policy, optimizer and seed."""
    decay = cfg.lora.weight_decay if cfg.lora.rank else cfg.optim.weight_decay  # a LoRA run trains its adapters only
    tx = make_optimizer(cfg.optim, cfg.train.steps, decay)
    return model_and_optimizer(shape, cfg.model.remat, tx, cfg.train.seed)


def setup_run(cfg: Config, devices: Sequence[jax.Device] | None = None, tokenizer_vocab: int | None = None) -> RunSetup:
    """The setup of `cfg` on `devices` (default: all of them); a UserError, before any compute, if it does not fit.

    `tokenizer_vocab` sizes the model when model.vocab_size is 0 (default: the data config's tokenizer).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = run_shape(cfg, tokenizer_vocab)
    layout = check_layout(cfg, shape, run_rules(cfg), num_devices=len(devices))
    rules = run_rules(cfg, layout)
    platform, context = devices[0].platform, layout.axis_sizes["context"]
    attention.check(
        cfg.model.attention, platform, cfg.model.compute_dtype, cfg.train.seq_len, context, cfg.model.attn_softcap
    )
    if shape.num_experts:
        check_exchange(cfg.model.expert_exchange, platform, dropless=cfg.model.capacity_factor <= 0)
    # With train.elastic the layout may have chosen another grad_accum; everything below follows it.
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=layout.grad_accum))
    mesh = build_mesh(cfg.mesh, devices)
    build = state_builder(cfg, shape)
    graphdef, abstract = abstract_state(build)
    loop = _loop_choice(cfg, shape, rules, layout, state_arrays(abstract), devices)
    if (loop.remat, loop.scan_unroll) != (cfg.model.remat, cfg.model.scan_unroll):
        cfg = dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, remat=loop.remat, scan_unroll=loop.scan_unroll)
        )
        shape = dataclasses.replace(shape, scan_unroll=loop.scan_unroll)
        if layout.schedule is not None:  # a pipeline's backward ticks are chosen knowing whether remat is full
            layout = check_layout(cfg, shape, rules, num_devices=len(devices))
        build = state_builder(cfg, shape)
        graphdef, abstract = abstract_state(build)
    shardings = tree_shardings(abstract, nnx.get_partition_spec(abstract), rules, mesh)
    structs = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    # The batch dimension is split as a microbatch's is, so splitting a step into microbatches moves no data.
    spec = logical_to_spec(("batch", "seq"), (layout.microbatch, 1), rules, mesh)
    return RunSetup(
        cfg=cfg,
        mesh=mesh,
        rules=rules,
        layout=layout,
        shape=shape,
        lr_schedule=lr_schedule(cfg.optim, cfg.train.steps),
        build_state=build,
        graphdef=graphdef,
        state_structs=structs,
        state_shardings=shardings,
        batch_sharding=NamedSharding(mesh, spec),
        loop=loop,
    )


def _loop_choice(
    cfg: Config, shape: DecoderShape, rules: Rules, layout: Layout, arrays: list, devices: list[jax.Device]
) -> LoopChoice:
    """model.scan_unroll and model.remat for this run: as set, or where `auto`, the planner's choice for these
    devices' memory (jaxscale.planning.auto), which `jaxscale plan` and `jaxscale compile` make alike."""
    platform = devices[0].platform
    accelerator = accelerator_of(devices[0].device_kind) or dataclasses.replace(ACCELERATORS["cpu"], platform=platform)
    cluster = Cluster(platform, accelerator, len(devices))
    budget = device_budget(cfg.runtime.device_memory_gib, devices) if wants_choice(cfg) else None
    step = StepShape.of(cfg)
    sizes, schedule = layout.axis_sizes, layout.schedule
    return choose_loop(step, shape, arrays, sizes, rules, cluster, schedule, cfg.model.scan_unroll, budget)[1]
