"""Sharded train state: eval_shape -> shardings -> jit(init, out_shardings). Never a full copy on one device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxscale.config import Config, ModelConfig, OptimConfig
from jaxscale.models.transformer import Decoder, DecoderShape
from jaxscale.sharding import Rules, tree_shardings, use_rules


def padded_vocab(tokenizer_vocab: int, multiple: int = 128) -> int:
    """Vocabulary rounded up so the embedding splits evenly over tensor-parallel devices."""
    return -(-tokenizer_vocab // multiple) * multiple


def decoder_shape(cfg: ModelConfig, tokenizer_vocab: int) -> DecoderShape:
    return DecoderShape(
        vocab_size=cfg.vocab_size or padded_vocab(tokenizer_vocab),
        d_model=cfg.d_model,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        d_ff=cfg.d_ff,
        rope_theta=cfg.rope_theta,
        norm_eps=cfg.norm_eps,
        tie_embeddings=cfg.tie_embeddings,
        init_std=cfg.init_std,
        param_dtype=cfg.param_dtype,
        compute_dtype=cfg.compute_dtype,
        remat=cfg.remat,
        num_experts=cfg.num_experts,
        experts_per_token=cfg.experts_per_token,
        num_shared_experts=cfg.num_shared_experts,
        capacity_factor=cfg.capacity_factor,
        moe_every=cfg.moe_every,
        aux_loss_weight=cfg.aux_loss_weight,
        z_loss_weight=cfg.z_loss_weight,
    )


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at `optim.decay_steps` or `total_steps`."""
    total_steps = cfg.decay_steps or total_steps
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=cfg.lr / max(warmup, 1),  # the first step already learns
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def _decay_mask(params: Any) -> Any:
    """Weight decay on matrices only: norm scales (any path through a *norm module) are left alone."""

    def decays(path: tuple, _: Any) -> bool:
        return not any("norm" in str(getattr(k, "key", k)) for k in path)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(
            lr_schedule(cfg, total_steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=_decay_mask,
        ),
    )


@dataclass
class ShardedState:
    """The model and optimizer as a graph definition plus one sharded pytree of arrays."""

    graphdef: nnx.GraphDef
    state: nnx.State
    shardings: Any  # same structure as `state`, NamedSharding leaves


def _builder(cfg: Config, shape: DecoderShape):
    tx = make_optimizer(cfg.optim, cfg.train.steps)

    def build() -> tuple[Decoder, nnx.Optimizer]:
        model = Decoder(shape, nnx.Rngs(params=cfg.train.seed))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    return build


def abstract_state(cfg: Config, shape: DecoderShape, mesh: Mesh, rules: Rules) -> tuple[nnx.GraphDef, Any, Any]:
    """Graph definition, ShapeDtypeStructs carrying shardings, and the shardings, with no allocation."""
    graphdef, abstract = nnx.split(nnx.eval_shape(_builder(cfg, shape)))
    shardings = tree_shardings(abstract, nnx.get_partition_spec(abstract), rules, mesh)
    structs = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return graphdef, structs, shardings


def create_state(cfg: Config, shape: DecoderShape, mesh: Mesh, rules: Rules) -> ShardedState:
    """Initialize parameters and optimizer state directly in their shards."""
    graphdef, _, shardings = abstract_state(cfg, shape, mesh, rules)
    build = _builder(cfg, shape)

    def init() -> nnx.State:
        return nnx.split(build())[1]

    with use_rules(rules, mesh):
        state = jax.jit(init, out_shardings=shardings)()
    return ShardedState(graphdef, state, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, jax.sharding.PartitionSpec())
