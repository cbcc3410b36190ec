"""The train state, (model, optimizer): its optimizer, its abstract shape, and its sharded initialization."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxscale.config import OptimConfig
from jaxscale.models.lora import adapter_rngs, trainable
from jaxscale.models.transformer import Decoder, DecoderShape
from jaxscale.sharding import Rules, use_rules


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


# Parameters AdamW never decays, by a part of their path: norm scales and biases (as transformers' Trainer leaves
# them) and DoRA's magnitudes (decay would pull each row's norm toward 0, not the weight toward its base).
UNDECAYED = ("norm", "bias", "magnitude")


def _decay_mask(params: Any) -> Any:
    """True for the parameters weight decay applies to: every one whose path names none of UNDECAYED."""

    def decays(path: tuple, _: Any) -> bool:
        return not any(word in str(getattr(k, "key", k)) for k in path for word in UNDECAYED)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(
    cfg: OptimConfig, total_steps: int, weight_decay: float | None = None
) -> optax.GradientTransformation:
    """AdamW of `cfg` with `weight_decay` (default optim.weight_decay; a LoRA run passes lora.weight_decay)."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(
            lr_schedule(cfg, total_steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay if weight_decay is None else weight_decay,
            mask=_decay_mask,
        ),
    )


def model_and_optimizer(
    shape: DecoderShape, remat: str, tx: optax.GradientTransformation, seed: int
) -> Callable[[], tuple[Decoder, nnx.Optimizer]]:
    """The constructor of the train state, (model, optimizer), that init, eval_shape and the planner share."""

    def build() -> tuple[Decoder, nnx.Optimizer]:
        rngs = adapter_rngs(seed) if shape.adapters else nnx.Rngs(params=seed)
        model = Decoder(shape, rngs, remat=remat)
        return model, nnx.Optimizer(model, tx, wrt=trainable(shape.adapters))

    return build


def abstract_state(build: Callable[[], tuple[Decoder, nnx.Optimizer]]) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and the state's ShapeDtypeStructs, whose metadata carry logical dimension names."""
    return nnx.split(nnx.eval_shape(build))


def init_state(build: Callable[[], tuple[Decoder, nnx.Optimizer]], shardings: Any, rules: Rules, mesh: Mesh) -> Any:
    """Initialize parameters and optimizer state directly in their shards: never a full copy on one device."""

    def init() -> nnx.State:
        return nnx.split(build())[1]

    with use_rules(rules, mesh):
        return jax.jit(init, out_shardings=shardings)()
