"""Mixture-of-experts feed-forward layer: softmax router, top-k, capacity or dropless, balance losses.

Routing (which experts, which buffer slot, the losses and statistics) is computed here on global
arrays, so it is the same on every mesh; moving tokens to the experts and back is
jaxscale.models.expert_parallel's job.

Capacity is counted per sequence: a sequence is never split over devices, so a token is dropped
on the same condition whatever the mesh. Within a sequence first choices take slots before second
choices (as in GShard), each in token order.

Shape letters: B batch, L sequence, D model width, E experts, K experts per token (top-k),
F expert hidden width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from jaxscale.models.expert_parallel import expert_ffn
from jaxscale.models.params import normal_param
from jaxscale.sharding import constrain


@dataclass(frozen=True)
class MoEShape:
    """The numbers an MoE layer needs."""

    d_model: int
    d_ff: int
    num_experts: int
    experts_per_token: int
    capacity_factor: float = 0.0  # 0: dropless
    expert_exchange: str = "auto"  # auto | padded | ragged (jaxscale.models.expert_parallel)
    ragged_buffer: float = 0.0  # ragged receive buffer in balanced shares; 0: worst case (ragged_dispatch)
    init_std: float = 0.02
    out_std: float = 0.02
    param_dtype: str = "float32"
    activation: str = "silu"  # the experts' gate nonlinearity (jaxscale.models.glu)
    router_weights: str = "auto"  # auto | normalized | raw: the combine weights (`route`)

    def capacity(self, seq_len: int) -> int:
        """Buffer slots per expert per sequence. Dropless: seq_len, as a token picks an expert at most once."""
        if self.capacity_factor <= 0:
            return seq_len
        wanted = math.ceil(self.capacity_factor * seq_len * self.experts_per_token / self.num_experts)
        return min(seq_len, wanted)


@dataclass(frozen=True)
class Routing:
    """Where each token goes, and what the router's choices cost and look like."""

    experts_BLK: jax.Array  # int32 expert ids, best first
    weights_BLK: jax.Array  # float32 combine weights
    slots_BLK: jax.Array  # int32 slot in the expert's per-sequence buffer; >= capacity: dropped
    aux_loss: jax.Array  # load-balancing loss; 1.0 when routing is uniform
    z_loss: jax.Array  # mean squared log-partition of the router logits
    load_E: jax.Array  # float32 assignments per expert (before dropping)
    probability_E: jax.Array  # float32 mean router probability of each expert
    dropped_fraction: jax.Array  # of the B * L * K assignments


def route(logits_BLE: jax.Array, experts_per_token: int, capacity: int, weights: str = "auto") -> Routing:
    """Top-k of a softmax router, with buffer slots, the balance losses and load statistics.

    Combine weights (`weights`, `model.router_weights`) are the top-k probabilities: `auto` renormalized
    to sum to 1 when k > 1 (Mixtral) and with k = 1 the raw probability, so the router still learns from
    the token loss (Switch); `normalized` always renormalized (transformers' norm_topk_prob=true; top-1
    weighs 1); `raw` never (norm_topk_prob=false, Qwen3-MoE's default).
    Load-balancing loss (Switch Transformer, eq. 4, counting every one of the k choices):
    E * sum_e f_e * P_e, with f_e the fraction of assignments to expert e and P_e its mean probability.
    """
    B, L, E = logits_BLE.shape
    K = experts_per_token
    logits_BLE = logits_BLE.astype(jnp.float32)
    probs_BLE = jax.nn.softmax(logits_BLE, axis=-1)
    weights_BLK, experts_BLK = _top_k(probs_BLE, K)
    if weights == "normalized" or (weights == "auto" and K > 1):
        weights_BLK = weights_BLK / jnp.sum(weights_BLK, axis=-1, keepdims=True)

    # Slot = how many earlier assignments of the same sequence chose the same expert, choice-major.
    chosen_BKLE = jax.nn.one_hot(experts_BLK.transpose(0, 2, 1), E, dtype=jnp.int32)
    chosen_BPE = chosen_BKLE.reshape(B, K * L, E)
    slots_BP = jnp.sum((jnp.cumsum(chosen_BPE, axis=1) - 1) * chosen_BPE, axis=-1)
    slots_BLK = slots_BP.reshape(B, K, L).transpose(0, 2, 1)

    load_E = jnp.sum(chosen_BPE, axis=(0, 1)).astype(jnp.float32)
    probability_E = jnp.mean(probs_BLE, axis=(0, 1))
    aux_loss = E * jnp.sum(load_E / (B * L * K) * probability_E)
    z_loss = jnp.mean(jax.nn.logsumexp(logits_BLE, axis=-1) ** 2)
    dropped_fraction = jnp.mean((slots_BLK >= capacity).astype(jnp.float32))
    return Routing(experts_BLK, weights_BLK, slots_BLK, aux_loss, z_loss, load_E, probability_E, dropped_fraction)


def _top_k(probs_BLE: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`lax.top_k` by k rounds of argmax (the lowest index wins a tie, as in top_k).

    The SPMD partitioner runs `lax.top_k` on the whole batch, all-gathered; argmax splits with it.
    """
    E = probs_BLE.shape[-1]
    weights, experts, remaining_BLE = [], [], probs_BLE
    for _ in range(k):
        best_BL = jnp.argmax(remaining_BLE, axis=-1)
        weights.append(jnp.take_along_axis(probs_BLE, best_BL[..., None], axis=-1)[..., 0])
        experts.append(best_BL.astype(jnp.int32))
        remaining_BLE = jnp.where(jnp.arange(E) == best_BL[..., None], -jnp.inf, remaining_BLE)
    return jnp.stack(weights, axis=-1), jnp.stack(experts, axis=-1)


class MoE(nnx.Module):
    """E gated-MLP experts behind a softmax router; each token is processed by its top-k experts."""

    def __init__(self, s: MoEShape, rngs: nnx.Rngs):
        self.s = s
        E, D, F = s.num_experts, s.d_model, s.d_ff
        self.router = normal_param(rngs, (D, E), ("embed", None), s.init_std, s.param_dtype)
        self.w_gate = normal_param(rngs, (E, D, F), ("experts", "embed", "mlp"), s.init_std, s.param_dtype)
        self.w_up = normal_param(rngs, (E, D, F), ("experts", "embed", "mlp"), s.init_std, s.param_dtype)
        self.w_down = normal_param(rngs, (E, F, D), ("experts", "mlp", "embed"), s.out_std, s.param_dtype)

    def __call__(self, x_BLD: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x [B, L, D] -> (y [B, L, D], statistics of this layer's routing: scalars, and [E] per expert for
        names ending in `_E`)."""
        s, dt = self.s, x_BLD.dtype
        # The router runs in float32: top-k near ties and the z-loss are sensitive to rounding.
        logits_BLE = jnp.einsum("bld,de->ble", x_BLD.astype(jnp.float32), self.router[...].astype(jnp.float32))
        # Pinned to the batch split, so FSDP gathers the small router rather than resharding the tokens.
        logits_BLE = constrain(logits_BLE, ("batch", "seq", None))
        capacity = s.capacity(x_BLD.shape[1])
        r = route(logits_BLE, s.experts_per_token, capacity, s.router_weights)
        y_BLD, fallback = expert_ffn(
            x_BLD,
            r.experts_BLK,
            r.weights_BLK.astype(dt),
            r.slots_BLK,
            self.w_gate[...].astype(dt),
            self.w_up[...].astype(dt),
            self.w_down[...].astype(dt),
            capacity=capacity,
            dropless=s.capacity_factor <= 0,
            exchange=s.expert_exchange,
            ragged_buffer=s.ragged_buffer,
            activation=s.activation,
        )
        stats = {
            "aux_loss": r.aux_loss,
            "z_loss": r.z_loss,
            "imbalance": jnp.max(r.load_E) / jnp.mean(r.load_E),
            "dropped_fraction": r.dropped_fraction,
            # The share of expert groups whose sized ragged buffer overflowed and ran again with the worst case.
            "ragged_fallback": fallback,
        }
        # Per expert, for a load-balancing loss over all layers' tokens together (`aux_loss_style=transformers`).
        per_expert = {"assigned_share_E": r.load_E / jnp.sum(r.load_E), "probability_E": r.probability_E}
        return y_BLD, stats | per_expert
