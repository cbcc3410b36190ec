"""The decoder every family shares, in flax NNX: RMSNorm, RoPE, grouped-query attention, a gated MLP.

What differs between the families jaxscale imports (jaxscale/families.py) is a switch of the shape,
never a fork of this code: attention biases, q/k norms, norms that scale by (1 + w), norms after
attention and MLP as well as before, the MLP's activation, embeddings scaled by sqrt(D), the logit
scale, soft-capped logits, a rope variant, and which layers attend within a sliding window (local,
with their own rope base) or to everything before them (global).

Parameters and activations carry logical dimension names only (see jaxscale.sharding). The blocks
are created stacked (a leading `layers` dimension), one stack of dense blocks and one of MoE blocks
(jaxscale.models.moe), and applied with `lax.scan`, so compile time does not grow with depth. What
varies from layer to layer (dense or MoE, local or global) must be static for the fused attention
kernels, so the layers are cut into segments that repeat one period of kinds (`segments`): a model
of one kind is one scan over its layers; Gemma 3 (five local, one global) scans groups of six, each
group's layers written out; Qwen2 with its last layers local is two scans.

Shape letters: B batch, L sequence, D model width, N query heads, K key/value
heads, H head dim, F MLP hidden, V vocabulary, S layers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxscale.config import AUTO, ModelConfig
from jaxscale.models.attention import attend
from jaxscale.models.gathers import token_cross_entropy
from jaxscale.models.glu import gated
from jaxscale.models.lora import AdapterShape, adapted_weight, adapter, base_weight, embedding_rows, project
from jaxscale.models.moe import MoE, MoEShape
from jaxscale.models.params import normal_param
from jaxscale.models.ring_attention import RESIDUALS as RING_RESIDUALS
from jaxscale.sharding import active_axis_size, constrain


def _and_ring_residuals(policy: Callable) -> Callable:
    """`policy`, saving ring attention's residuals as well: a policy that saves dots would else keep the dots of
    its forward's every tile to recompute them from (jaxscale.models.ring_attention.RESIDUALS)."""
    return jax.checkpoint_policies.save_from_both_policies(
        policy, jax.checkpoint_policies.save_only_these_names(RING_RESIDUALS)
    )


# Keyed by jaxscale.config.REMAT_POLICIES, the names `model.remat` accepts.
CHECKPOINT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": _and_ring_residuals(jax.checkpoint_policies.dots_saveable),
    "dots_with_no_batch_dims_saveable": _and_ring_residuals(jax.checkpoint_policies.dots_with_no_batch_dims_saveable),
}


@dataclass(frozen=True)
class Documents:
    """Where the documents packed into each row lie: each token's document and its position in it.

    Attention stays within a document and rotary positions restart at each one. Built from a batch by
    `Documents.of`: None where the batch carries no `segment_ids` (each row is one sequence).
    """

    segment_ids_BL: jax.Array  # int32: tokens of one document share an id
    positions_BL: jax.Array  # int32: 0 at each document's first token

    @classmethod
    def of(cls, batch: dict[str, jax.Array]) -> Documents | None:
        if "segment_ids" not in batch:
            return None
        return cls(batch["segment_ids"], batch["positions"])


@dataclass(frozen=True)
class LayerKind:
    """What a layer is beyond its weights: its feed-forward (MoE or dense) and its attention (local or global)."""

    moe: bool = False
    local: bool = False


@dataclass(frozen=True)
class Segment:
    """Layers start .. start + len(period) * repeats - 1: `period` (their kinds) over and over."""

    start: int
    period: tuple[LayerKind, ...]
    repeats: int


def segments(kinds: tuple[LayerKind, ...]) -> tuple[Segment, ...]:
    """The layers cut into periodic segments, each one `lax.scan` whose body writes out one period.

    Chosen for the least code to compile: each segment costs its period's layers plus one (its loop),
    the fewest in all (dynamic programming over where each segment ends).
    """
    n = len(kinds)
    best: list[tuple[int, tuple[Segment, ...]]] = [(0, ())] * (n + 1)
    for start in range(n - 1, -1, -1):
        options = []
        for p in range(1, n - start + 1):
            period = kinds[start : start + p]
            repeats = 1
            while kinds[start + repeats * p : start + (repeats + 1) * p] == period:
                repeats += 1
            cost, rest = best[start + repeats * p]
            options.append((p + 1 + cost, (Segment(start, period, repeats), *rest)))
        best[start] = min(options, key=lambda option: (option[0], len(option[1])))
    return best[0][1]


@dataclass(frozen=True)
class Rope:
    """The rotary embedding of one kind of layer, its frequencies as transformers' modeling_rope_utils
    computes them for `kind` (default, linear, dynamic, yarn, llama3); fields as jaxscale.config.ModelConfig's
    rope_* keys."""

    kind: str
    theta: float
    head_dim: int
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 0.0
    truncate: bool = True

    @property
    def scaling(self) -> float:
        """What cos and sin are multiplied by: yarn's attention factor (0.1 ln(factor) + 1 unless given), else 1."""
        if self.kind != "yarn":
            return 1.0
        if self.attention_factor:
            return self.attention_factor
        return 0.1 * math.log(self.factor) + 1.0 if self.factor > 1 else 1.0

    def inv_freq(self, seq_len: jax.Array | None = None) -> jax.Array:
        """The float32 angle per position of each feature pair [H/2]; `seq_len` (dynamic only): the batch's
        largest position + 1, past `original_context` the base grows with it."""
        half, dim = self.head_dim // 2, self.head_dim
        if self.kind == "dynamic":
            seq = jnp.maximum(jnp.asarray(seq_len, jnp.float32), self.original_context)
            base = self.theta * ((self.factor * seq / self.original_context) - (self.factor - 1)) ** (dim / (dim - 2))
            return 1.0 / base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
        if self.kind == "yarn":
            return self._yarn()
        freqs = self.theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
        if self.kind == "linear":
            return freqs / self.factor
        if self.kind == "llama3":
            return self._llama3(freqs)
        return freqs

    def _llama3(self, freqs: jax.Array) -> jax.Array:
        """Stretch long wavelengths by `factor`, keep short ones, blend those between."""
        wavelengths = 2 * jnp.pi / freqs
        stretched = jnp.where(wavelengths > self.original_context / self.low_freq_factor, freqs / self.factor, freqs)
        blend = (self.original_context / wavelengths - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        smoothed = (1 - blend) * stretched / self.factor + blend * stretched
        medium = (wavelengths >= self.original_context / self.high_freq_factor) & (
            wavelengths <= self.original_context / self.low_freq_factor
        )
        return jnp.where(medium, smoothed, stretched)

    def _yarn(self) -> jax.Array:
        """Interpolated (divided by `factor`) below the band of beta_slow..beta_fast rotations over the original
        context, extrapolated (kept) above it, blended linearly across it."""
        dim = self.head_dim

        def dimension_of(rotations: float) -> float:  # the feature pair that turns `rotations` times
            return dim * math.log(self.original_context / (rotations * 2 * math.pi)) / (2 * math.log(self.theta))

        low, high = dimension_of(self.beta_fast), dimension_of(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # transformers' guard against a zero-width band
        pos_freqs = self.theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
        ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
        kept = 1 - ramp
        return (1.0 / (self.factor * pos_freqs)) * (1 - kept) + (1.0 / pos_freqs) * kept


@dataclass(frozen=True)
class DecoderShape:
    """The numbers a decoder needs, and nothing of the run around it: built from the model config by
    `decoder_shape`, whose fields (jaxscale.config.ModelConfig) document them."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    rope_theta: float
    norm_eps: float
    tie_embeddings: bool
    init_std: float
    param_dtype: str
    compute_dtype: str
    num_experts: int  # 0: dense
    experts_per_token: int
    num_shared_experts: int
    capacity_factor: float
    moe_every: int
    aux_loss_weight: float
    z_loss_weight: float
    attention: str = "auto"  # auto | xla | cudnn | splash (jaxscale.models.attention)
    context_attention: str = "ring"  # ring | allgather: a sequence split over `context` (parallel.context_attention)
    expert_exchange: str = "auto"  # auto | padded | ragged (jaxscale.models.expert_parallel)
    ragged_buffer: float = 0.0  # ragged receive buffer in balanced shares; 0: worst case
    rope_type: str = "default"
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_attention_factor: float = 0.0
    rope_truncate: bool = True
    rope_local_theta: float = 0.0
    sliding_window: int = 0
    attention_pattern: str = ""
    attention_bias: str = "none"  # none | qkv | qkvo
    qk_norm: bool = False
    norm_offset: float = 0.0
    sandwich_norms: bool = False
    activation: str = "silu"
    scale_embeddings: bool = False
    query_pre_attn_scalar: float = 0.0
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    expert_d_ff: int = 0
    router_weights: str = "auto"
    mlp_only_layers: tuple[int, ...] = ()
    aux_loss_style: str = "switch"
    logits_chunk: int = 0  # positions per row whose logits exist at once in the loss; 0: all (`token_loss`)
    scan_unroll: int = 1  # iterations of each segment's layer scan per loop step (`run_stack`)
    adapters: AdapterShape | None = None  # LoRA (jaxscale.models.lora): None trains every parameter

    @property
    def out_std(self) -> float:
        """Init scale of the projections that write into the residual stream (GPT-2 style)."""
        return self.init_std / (2 * self.n_layers) ** 0.5

    @property
    def layer_kinds(self) -> tuple[LayerKind, ...]:
        """Each layer's kind: MoE where moe_every says (not in mlp_only_layers), local where the pattern says L."""
        pattern = self.attention_pattern or ("L" if self.sliding_window else "G") * self.n_layers
        return tuple(
            LayerKind(
                moe=bool(self.num_experts) and (i + 1) % self.moe_every == 0 and i not in self.mlp_only_layers,
                local=pattern[i] == "L",
            )
            for i in range(self.n_layers)
        )

    @property
    def n_moe_layers(self) -> int:
        return sum(kind.moe for kind in self.layer_kinds)

    @property
    def attention_scale(self) -> float | None:
        """The logits' scale: query_pre_attn_scalar ** -1/2 where set, else None (1/sqrt(head_dim))."""
        return self.query_pre_attn_scalar**-0.5 if self.query_pre_attn_scalar else None

    def rope(self, local: bool) -> Rope:
        """The rotary embedding of local or global layers: local ones take rope_local_theta unscaled where set."""
        if local and self.rope_local_theta:
            return Rope("default", self.rope_local_theta, self.head_dim)
        return Rope(
            self.rope_type,
            self.rope_theta,
            self.head_dim,
            self.rope_scaling_factor,
            self.rope_low_freq_factor,
            self.rope_high_freq_factor,
            self.rope_original_context,
            self.rope_beta_fast,
            self.rope_beta_slow,
            self.rope_attention_factor,
            self.rope_truncate,
        )

    def moe_shape(self) -> MoEShape:
        return MoEShape(
            d_model=self.d_model,
            d_ff=self.expert_d_ff or self.d_ff,
            num_experts=self.num_experts,
            experts_per_token=self.experts_per_token,
            capacity_factor=self.capacity_factor,
            expert_exchange=self.expert_exchange,
            ragged_buffer=self.ragged_buffer,
            init_std=self.init_std,
            out_std=self.out_std,
            param_dtype=self.param_dtype,
            activation=self.activation,
            router_weights=self.router_weights,
        )


def padded_vocab(tokenizer_vocab: int, multiple: int = 128) -> int:
    """Vocabulary rounded up so the embedding splits evenly over tensor-parallel devices."""
    return -(-tokenizer_vocab // multiple) * multiple


def decoder_shape(cfg: ModelConfig, tokenizer_vocab: int) -> DecoderShape:
    """The decoder a model config describes; model.vocab_size=0 takes the tokenizer's, padded."""
    same = {
        f.name: getattr(cfg, f.name)
        for f in dataclasses.fields(DecoderShape)
        if f.name not in ("vocab_size", "adapters", "mlp_only_layers", "context_attention")
    }
    vocab = cfg.vocab_size or padded_vocab(tokenizer_vocab)
    if same["scan_unroll"] == AUTO:  # the run setup puts the planner's choice here; a model built alone is scanned
        same["scan_unroll"] = 1
    return DecoderShape(vocab_size=vocab, mlp_only_layers=tuple(cfg.mlp_only_layers), **same)


def rms_norm(x_BLD: jax.Array, scale_D: jax.Array, eps: float, offset: float = 0.0) -> jax.Array:
    """x [..., D] over its root mean square (in float32), times (offset + scale) [D]; in x's dtype."""
    x = x_BLD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    scale = scale_D.astype(jnp.float32)
    return (x * (scale + offset if offset else scale)).astype(x_BLD.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm over the last `dim` features; its scale is (offset + w), w starting at 1 - offset (so at 1)."""

    def __init__(self, dim: int, eps: float, param_dtype: str, offset: float = 0.0):
        self.eps, self.offset = eps, offset
        start = jnp.full((dim,), 1.0 - offset, jnp.dtype(param_dtype))
        self.scale = nnx.Param(start, out_sharding=("norm",), eager_sharding=False)

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        return rms_norm(x_BLD, self.scale[...], self.eps, self.offset)


def head_logits(x_BLD: jax.Array, norm_scale_D: jax.Array, head_DV: jax.Array, s: DecoderShape) -> jax.Array:
    """Final norm and output head: the last block's output [B, L, D] -> float32 logits [B, L, V], soft-capped
    at `s.final_softcap` where set."""
    x_BLD = rms_norm(x_BLD, norm_scale_D, s.norm_eps, s.norm_offset)
    logits_BLV = jnp.einsum("bld,dv->blv", x_BLD, head_DV.astype(x_BLD.dtype)).astype(jnp.float32)
    if s.final_softcap:
        logits_BLV = s.final_softcap * jnp.tanh(logits_BLV / s.final_softcap)
    return constrain(logits_BLV, ("batch", "seq", "vocab"))


def rotary(x_BLNH: jax.Array, positions_BL: jax.Array, rope: Rope, seq_len: jax.Array | None = None) -> jax.Array:
    """Rotate feature pairs (first half, second half) by position-dependent angles; times `rope.scaling`.

    `seq_len`: the batch's largest position + 1, which a dynamic rope reads (None for the others).
    """
    angles_BLH = positions_BL[..., None].astype(jnp.float32) * rope.inv_freq(seq_len)
    sin, cos = jnp.sin(angles_BLH)[:, :, None, :], jnp.cos(angles_BLH)[:, :, None, :]
    if rope.scaling != 1.0:
        sin, cos = sin * rope.scaling, cos * rope.scaling
    x1, x2 = jnp.split(x_BLNH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BLNH.dtype)


def _zeros(shape: tuple[int, ...], names: tuple[str | None, ...], dtype: str) -> nnx.Param:
    """A bias: zeros, its dimensions named as the weight's output."""
    return nnx.Param(jnp.zeros(shape, jnp.dtype(dtype)), out_sharding=names, eager_sharding=False)


class Attention(nnx.Module):
    def __init__(self, s: DecoderShape, rngs: nnx.Rngs):
        self.s = s
        std, out_std = s.init_std, s.out_std
        self.wq = normal_param(
            rngs, (s.d_model, s.n_heads, s.head_dim), ("embed", "heads", "head_dim"), std, s.param_dtype
        )
        kv_names = ("embed", "kv_heads", "head_dim")
        self.wk = normal_param(rngs, (s.d_model, s.n_kv_heads, s.head_dim), kv_names, std, s.param_dtype)
        self.wv = normal_param(rngs, (s.d_model, s.n_kv_heads, s.head_dim), kv_names, std, s.param_dtype)
        self.wo = normal_param(
            rngs, (s.n_heads, s.head_dim, s.d_model), ("heads", "head_dim", "embed"), out_std, s.param_dtype
        )
        # Biases and norms are zeros and ones: they draw nothing, so the weights above are a Llama's either way.
        if s.attention_bias != "none":
            self.q_bias = _zeros((s.n_heads, s.head_dim), ("heads", "head_dim"), s.param_dtype)
            self.k_bias = _zeros((s.n_kv_heads, s.head_dim), ("kv_heads", "head_dim"), s.param_dtype)
            self.v_bias = _zeros((s.n_kv_heads, s.head_dim), ("kv_heads", "head_dim"), s.param_dtype)
        if s.attention_bias == "qkvo":
            self.o_bias = _zeros((s.d_model,), ("embed",), s.param_dtype)
        if s.qk_norm:
            self.q_norm = RMSNorm(s.head_dim, s.norm_eps, s.param_dtype, s.norm_offset)
            self.k_norm = RMSNorm(s.head_dim, s.norm_eps, s.param_dtype, s.norm_offset)
        # LoRA: the base frozen (quantized in blocks along `embed`), adapters beside the projections targeted.
        a, d, q, kv, dt = s.adapters, (s.d_model,), (s.n_heads, s.head_dim), (s.n_kv_heads, s.head_dim), s.param_dtype
        self.wq, self.wk, self.wv = (base_weight(w, 0, a) for w in (self.wq, self.wk, self.wv))
        self.wo = base_weight(self.wo, 2, a)
        self.q_lora = adapter("q", a, d, "embed", q, "heads", dt, rngs)
        self.k_lora = adapter("k", a, d, "embed", kv, "kv_heads", dt, rngs)
        self.v_lora = adapter("v", a, d, "embed", kv, "kv_heads", dt, rngs)
        self.o_lora = adapter("o", a, q, "heads", d, "embed", dt, rngs)

    def __call__(
        self,
        x_BLD: jax.Array,
        positions_BL: jax.Array,
        segment_ids_BL: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
        local: bool = False,
    ) -> jax.Array:
        """Causal self-attention; with `segment_ids_BL`, a token attends only within its own document; `local`:
        only to the last `sliding_window` tokens, rotated by the local rope.

        `dropout_key`: the layer's key of the adapters' dropout in training (jaxscale.models.lora); None: none.
        """
        s = self.s
        q_BLNH, k_BLKH, v_BLKH = self.qkv(x_BLD, positions_BL, dropout_key, local)
        out_BLNH = attend(
            q_BLNH,
            k_BLKH,
            v_BLKH,
            segment_ids_BL,
            positions_BL,
            s.attention,
            s.compute_dtype,
            window=s.sliding_window if local else 0,
            scale=s.attention_scale,
            softcap=s.attn_softcap,
            context_attention=s.context_attention,
        )
        return self.output(out_BLNH, dropout_key)

    def qkv(
        self, x_BLD: jax.Array, positions_BL: jax.Array, dropout_key: jax.Array | None = None, local: bool = False
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries [B, L, N, H], keys and values [B, L, K, H] of `x_BLD` (biased, q and k normed per head where
        the shape says), queries and keys rotated to their positions. Shared with cached decoding
        (jaxscale.models.decode), which attends to keys of earlier steps."""
        s, key, kv_names = self.s, dropout_key, ("batch", "seq", "kv_heads", None)
        q_BLNH = self._biased(project("bld,dnh->blnh", x_BLD, self.wq, self.q_lora, key), "q_bias")
        k_BLKH = self._biased(project("bld,dkh->blkh", x_BLD, self.wk, self.k_lora, key), "k_bias")
        v_BLKH = self._biased(project("bld,dkh->blkh", x_BLD, self.wv, self.v_lora, key), "v_bias")
        q_BLNH = constrain(q_BLNH, ("batch", "seq", "heads", None))
        if s.n_kv_heads % active_axis_size("tensor"):
            # Too few KV heads to split over `tensor`: every tensor device projects them all. Where the stream is
            # split over `tensor` (sequence parallelism) each projects its own tokens and the keys and values are
            # gathered, smaller than the stream; their gradients then stay split as the stream is.
            stream_kv = ("batch", "act_seq", "kv_heads", None)
            k_BLKH, v_BLKH = constrain(k_BLKH, stream_kv), constrain(v_BLKH, stream_kv)
        k_BLKH, v_BLKH = constrain(k_BLKH, kv_names), constrain(v_BLKH, kv_names)
        if s.qk_norm:
            q_BLNH, k_BLKH = self.q_norm(q_BLNH), self.k_norm(k_BLKH)
        rope = s.rope(local)
        seq_len = jnp.max(positions_BL) + 1 if rope.kind == "dynamic" else None
        q_BLNH = rotary(q_BLNH, positions_BL, rope, seq_len)
        k_BLKH = rotary(k_BLKH, positions_BL, rope, seq_len)
        return q_BLNH, k_BLKH, v_BLKH

    def output(self, out_BLNH: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        """The heads' attention outputs [B, L, N, H] projected back to the model width [B, L, D]."""
        out_BLNH = constrain(out_BLNH, ("batch", "seq", "heads", None))
        return self._biased(project("blnh,nhd->bld", out_BLNH, self.wo, self.o_lora, dropout_key), "o_bias")

    def _biased(self, y: jax.Array, name: str) -> jax.Array:
        """`y` plus the bias `name` where this attention has one (its last axes are the bias's)."""
        bias = getattr(self, name, None)
        return y if bias is None else y + bias[...].astype(y.dtype)


class GatedMLP(nnx.Module):
    """act(x W_gate) * (x W_up) W_down: SwiGLU or GeGLU (`s.activation`, jaxscale.models.glu)."""

    def __init__(self, s: DecoderShape, rngs: nnx.Rngs, d_ff: int | None = None):
        std, out_std, d_ff = s.init_std, s.out_std, d_ff or s.d_ff
        self.activation = s.activation
        self.w_gate = normal_param(rngs, (s.d_model, d_ff), ("embed", "mlp"), std, s.param_dtype)
        self.w_up = normal_param(rngs, (s.d_model, d_ff), ("embed", "mlp"), std, s.param_dtype)
        self.w_down = normal_param(rngs, (d_ff, s.d_model), ("mlp", "embed"), out_std, s.param_dtype)
        # LoRA: the base frozen (quantized in blocks along its input width), adapters beside the projections targeted.
        a, dt = s.adapters, s.param_dtype
        self.w_gate, self.w_up, self.w_down = (base_weight(w, 0, a) for w in (self.w_gate, self.w_up, self.w_down))
        self.gate_lora = adapter("gate", a, (s.d_model,), "embed", (d_ff,), "mlp", dt, rngs)
        self.up_lora = adapter("up", a, (s.d_model,), "embed", (d_ff,), "mlp", dt, rngs)
        self.down_lora = adapter("down", a, (d_ff,), "mlp", (s.d_model,), "embed", dt, rngs)

    def __call__(self, x_BLD: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        """[B, L, D] -> [B, L, D]; `dropout_key` as Attention's."""
        gate_BLF = project("bld,df->blf", x_BLD, self.w_gate, self.gate_lora, dropout_key)
        up_BLF = project("bld,df->blf", x_BLD, self.w_up, self.up_lora, dropout_key)
        h_BLF = constrain(gated(gate_BLF, up_BLF, self.activation), ("batch", "seq", "mlp"))
        return project("blf,fd->bld", h_BLF, self.w_down, self.down_lora, dropout_key)


# The residual stream's logical names: its tokens split as `act_seq` (jaxscale.sharding).
_STREAM = ("batch", "act_seq", "act_embed")

# What a block's attention sublayer is called with: its normed input [B, L, D] -> (output [B, L, D], anything
# the caller wants back from it, e.g. decoding's updated key/value cache).
AttentionCall = Callable[[jax.Array], tuple[jax.Array, Any]]


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x)); the mlp dense or MoE. With sandwich
    norms (Gemma 2, 3) each sublayer's output is normed again before it is added."""

    def __init__(self, s: DecoderShape, rngs: nnx.Rngs, moe: bool = False):
        norm = functools.partial(RMSNorm, s.d_model, s.norm_eps, s.param_dtype, s.norm_offset)
        self.attn_norm = norm()
        self.attn = Attention(s, rngs)
        self.mlp_norm = norm()
        self.mlp = MoE(s.moe_shape(), rngs) if moe else GatedMLP(s, rngs)
        if moe and s.num_shared_experts:
            self.shared_mlp = GatedMLP(s, rngs, d_ff=s.num_shared_experts * s.d_ff)
        if s.sandwich_norms:
            self.post_attn_norm = norm()
            self.post_mlp_norm = norm()

    def __call__(
        self,
        x_BLD: jax.Array,
        positions_BL: jax.Array,
        segment_ids_BL: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
        local: bool = False,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x [B, L, D] -> (x [B, L, D], routing statistics: empty for a dense block); `dropout_key` and `local`
        as Attention's."""

        def attention(h_BLD: jax.Array) -> tuple[jax.Array, None]:
            return self.attn(h_BLD, positions_BL, segment_ids_BL, dropout_key, local), None

        x_BLD, stats, _ = self.residual(x_BLD, attention, dropout_key)
        return x_BLD, stats

    def residual(
        self, x_BLD: jax.Array, attention: AttentionCall, dropout_key: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array], Any]:
        """The block's residual structure around `attention` (training's, or decoding's with a cache):
        (x [B, L, D], routing statistics, what `attention` gave back beside its output).

        The stream (x, the norms, the residual adds) is split as `act_seq` says: with sequence parallelism
        over `tensor` too (jaxscale.sharding.SEQUENCE_PARALLEL), so each sublayer's input is gathered where
        it is used and its output reduce-scattered back to the stream's split.
        """
        y_BLD, extra = attention(constrain(self.attn_norm(x_BLD), _STREAM))
        y_BLD = constrain(y_BLD, _STREAM)
        if hasattr(self, "post_attn_norm"):
            y_BLD = self.post_attn_norm(y_BLD)
        x_BLD = constrain(x_BLD + y_BLD, _STREAM)
        h_BLD = constrain(self.mlp_norm(x_BLD), _STREAM)
        if isinstance(self.mlp, MoE):
            y_BLD, stats = self.mlp(h_BLD)
            if hasattr(self, "shared_mlp"):
                y_BLD = y_BLD + self.shared_mlp(h_BLD, dropout_key)
        else:
            y_BLD, stats = self.mlp(h_BLD, dropout_key), {}
        y_BLD = constrain(y_BLD, _STREAM)
        if hasattr(self, "post_mlp_norm"):
            y_BLD = self.post_mlp_norm(y_BLD)
        return constrain(x_BLD + y_BLD, _STREAM), stats, extra


# One layer of `Decoder.run_stack`: (its block, its kind, x [B, L, D], its slice of the per-layer input) ->
# (x, routing statistics, its per-layer output).
LayerCall = Callable[[Block, LayerKind, jax.Array, Any], tuple[jax.Array, dict[str, jax.Array], Any]]


class Decoder(nnx.Module):
    """Token ids [B, L] -> float32 logits [B, L, V].

    The pipeline (jaxscale.parallel.pipeline) runs it piece by piece through its hooks:
    `embed_tokens`, `run_layers` on a stage's slice of the stacked layers (with `documents` of the
    microbatch), `logits` and `loss`.
    """

    def __init__(self, s: DecoderShape, rngs: nnx.Rngs, remat: str = "none"):
        self.s = s
        self.remat = remat  # a key of CHECKPOINT_POLICIES: what the backward recomputes
        self.embed = normal_param(rngs, (s.vocab_size, s.d_model), ("vocab", "embed"), s.init_std, s.param_dtype)

        def stack(n: int, moe: bool) -> Block:
            @nnx.split_rngs(splits=n)
            @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def stacked_blocks(rngs: nnx.Rngs) -> Block:
                return Block(s, rngs, moe)

            return stacked_blocks(rngs)

        n_dense = s.n_layers - s.n_moe_layers
        if n_dense:
            self.blocks = stack(n_dense, moe=False)
        if s.n_moe_layers:
            self.moe_blocks = stack(s.n_moe_layers, moe=True)
        self.final_norm = RMSNorm(s.d_model, s.norm_eps, s.param_dtype, s.norm_offset)
        if not s.tie_embeddings:
            self.lm_head = normal_param(rngs, (s.d_model, s.vocab_size), ("embed", "vocab"), s.init_std, s.param_dtype)
        # LoRA on the embedding and the head, where lora.targets names them (untied only: jaxscale.config).
        v, d, dt = (s.vocab_size,), (s.d_model,), s.param_dtype
        self.embed_lora = adapter("embed_tokens", s.adapters, v, "vocab", d, "embed", dt, rngs)
        self.head_lora = adapter("lm_head", s.adapters, d, "embed", v, "vocab", dt, rngs)

    def __call__(self, tokens_BL: jax.Array, documents: Documents | None = None) -> jax.Array:
        return self.forward(tokens_BL, documents)[0]

    def forward(
        self, tokens_BL: jax.Array, documents: Documents | None = None, dropout_key: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Token ids [B, L] -> (float32 logits [B, L, V], MoE scalars; empty for a dense model).

        `documents`: where packed documents begin and end (see `Documents`); None: one per row.
        `dropout_key`: the microbatch's key of the adapters' dropout, in training only; None: no dropout.

        The MoE scalars: `moe_loss`, the weighted load-balancing and z losses to add to the mean
        token loss, and each term and routing statistic averaged over MoE layers (`moe_aux_loss`,
        `moe_z_loss`, `moe_imbalance`: max over mean tokens per expert, `moe_dropped_fraction`),
        plus `moe_imbalance_worst`, the most imbalanced layer's figure. With `aux_loss_style=transformers`
        the load-balancing loss is transformers' load_balancing_loss_func instead: E * sum over experts
        and the k choices of the share of every layer's tokens choosing the expert, times its mean
        probability over every layer's tokens.
        """
        x_BLD, aux = self.hidden(tokens_BL, documents, dropout_key)
        return self.logits(x_BLD), aux

    def hidden(
        self, tokens_BL: jax.Array, documents: Documents | None = None, dropout_key: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """What `forward` returns, with the last block's output [B, L, D] in place of the logits."""
        s = self.s
        x_BLD, stats = self.run_layers(self.embed_tokens(tokens_BL), documents, dropout_key)
        if not stats:
            return x_BLD, {}
        per_expert = {k: stats.pop(k) for k in list(stats) if k.endswith("_E")}  # [n_moe_layers, E] each
        aux = {f"moe_{k}": jnp.mean(v) for k, v in stats.items()}
        aux["moe_imbalance_worst"] = jnp.max(stats["imbalance"])
        if s.aux_loss_style == "transformers":
            share_E, probability_E = (jnp.mean(per_expert[k], axis=0) for k in ("assigned_share_E", "probability_E"))
            aux["moe_aux_loss"] = s.num_experts * s.experts_per_token * jnp.sum(share_E * probability_E)
        aux["moe_loss"] = s.aux_loss_weight * aux["moe_aux_loss"] + s.z_loss_weight * aux["moe_z_loss"]
        return x_BLD, aux

    def documents(self, batch: dict[str, jax.Array]) -> Documents | None:
        """What of a batch the layers need beside its activations: the documents packed in each row."""
        return Documents.of(batch)

    def embed_tokens(self, tokens_BL: jax.Array) -> jax.Array:
        """Token ids [B, L] -> embeddings [B, L, D] in the compute dtype (times sqrt(D) where scaled, in that
        dtype too, as Gemma rounds its scale to the weights' dtype)."""
        x_BLD = embedding_rows(self.embed[...], tokens_BL, self.s.compute_dtype, self.embed_lora)
        if self.s.scale_embeddings:
            x_BLD = x_BLD * jnp.asarray(self.s.d_model**0.5, x_BLD.dtype)
        return x_BLD

    def logits(self, x_BLD: jax.Array) -> jax.Array:
        """Final norm and output head: the last block's output [B, L, D] -> float32 logits [B, L, V]."""
        return head_logits(x_BLD, self.final_norm.scale[...], self.head_DV(), self.s)

    def head_DV(self) -> jax.Array:
        """The output head [D, V]: the embedding's transpose when tied; with its LoRA adapter folded in."""
        return self.embed[...].T if self.s.tie_embeddings else adapted_weight(self.lm_head[...], self.head_lora)

    def token_loss(self, x_BLD: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """`loss(logits(x), batch)` from the last block's output [B, L, D]: (summed token loss, count).

        With `logits_chunk` = c > 0 the head and loss run over c positions of every row at a time,
        and the backward recomputes each chunk's logits: the float32 logits [B, L, V], their softmax
        and gradient (the largest activations of a model with a big vocabulary at long context)
        exist one [B, c, V] chunk at a time. A chunk takes every (L / c)-th position (positions i,
        i + L/c, ...), so it spans the whole row: split over `context` as the row is.
        """
        c, length = self.s.logits_chunk, x_BLD.shape[1]
        if c in (0, length):
            return self.loss(self.logits(x_BLD), batch)
        n = length // c
        norm_D, head_DV = self.final_norm.scale[...], self.head_DV()

        def strided(a: jax.Array) -> jax.Array:  # [B, L, ...] -> [n, B, c, ...]: chunk i holds i, n + i, ...
            return jnp.moveaxis(a.reshape(a.shape[0], c, n, *a.shape[2:]), 2, 0)

        @jax.checkpoint  # keep only each chunk's input; its logits are recomputed in the backward
        def chunk_loss(x_BcD: jax.Array, targets_Bc: jax.Array, mask_Bc: jax.Array) -> tuple[jax.Array, jax.Array]:
            logits_BcV = head_logits(x_BcD, norm_D, head_DV, self.s)
            return self.loss(logits_BcV, {"targets": targets_Bc, "loss_mask": mask_Bc})

        def add_chunk(total: tuple, chunk: tuple) -> tuple[tuple, None]:
            loss, count = chunk_loss(*chunk)
            return (total[0] + loss, total[1] + count), None

        chunks = (strided(x_BLD), strided(batch["targets"]), strided(batch["loss_mask"]))
        zero = jnp.zeros((), jnp.float32)
        (loss_sum, count), _ = jax.lax.scan(add_chunk, (zero, zero), chunks)
        return loss_sum, count

    def loss(self, logits_BLV: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """Summed next-token cross entropy over the positions `batch["loss_mask"]` keeps, and their count.

        `batch`: targets int32 [B, L], loss_mask float32 [B, L].
        """
        losses_BL = token_cross_entropy(logits_BLV, batch["targets"])
        mask_BL = batch["loss_mask"]
        return jnp.sum(losses_BL * mask_BL), jnp.sum(mask_BL)

    def run_layers(
        self, x_BLD: jax.Array, documents: Documents | None = None, dropout_key: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """All blocks: [B, L, D] -> [B, L, D]; statistics stacked over MoE layers ([n_moe_layers] each).

        The depth is that of the stacked parameters this module holds, so a pipeline stage runs its
        own slice of the layers by holding only those. `dropout_key` (adapter dropout in training) is
        folded with each layer's number, which the scan carries beside the layer's parameters.
        """
        if documents is None:
            positions_BL, segment_ids_BL = jnp.broadcast_to(jnp.arange(x_BLD.shape[1]), x_BLD.shape[:2]), None
        else:
            positions_BL, segment_ids_BL = documents.positions_BL, documents.segment_ids_BL

        def layer(block: Block, kind: LayerKind, x_BLD: jax.Array, number: jax.Array | None) -> tuple:
            # Derived inside the (rematerialized) layer, so the backward recomputes the very same masks.
            key = None if number is None else jax.random.fold_in(dropout_key, number)
            x_BLD, stats = block(x_BLD, positions_BL, segment_ids_BL, key, kind.local)
            return x_BLD, stats, None

        # Numbered over the whole model: a pipeline stage's slice would need its offset (pipelines take no LoRA).
        numbers = None if dropout_key is None else jnp.arange(self.depth, dtype=jnp.int32)
        x_BLD, stats, _ = self.run_stack(x_BLD, layer, numbers)
        return x_BLD, stats

    @property
    def depth(self) -> int:
        """The layers this module holds: all of them, or a pipeline stage's."""
        stacks = [getattr(self, name) for name in ("blocks", "moe_blocks") if hasattr(self, name)]
        return sum(jax.tree.leaves(nnx.state(b))[0].shape[0] for b in stacks)

    def layer_kinds(self) -> tuple[LayerKind, ...]:
        """The kinds of the layers this module holds. A pipeline stage holds a slice of a model whose layers
        are all of one kind (jaxscale.training.layout refuses others)."""
        kinds = self.s.layer_kinds
        return kinds if self.depth == len(kinds) else kinds[:1] * self.depth

    def run_stack(
        self, x_BLD: jax.Array, layer: LayerCall, per_layer: Any = None
    ) -> tuple[jax.Array, dict[str, jax.Array], Any]:
        """Every layer in order, each `layer(block, kind, x, its slice of per_layer)`, by one `lax.scan` per
        segment (`segments`), each layer under the remat policy: (x [B, L, D], the MoE layers' statistics
        stacked [n_moe_layers, ...], the layers' outputs stacked [depth, ...]).

        `per_layer`: arrays with a leading layer axis [depth, ...] (a layer's number, a decoding cache), or None.
        Training (`run_layers`) and cached decoding (jaxscale.models.decode) share it, so both walk the
        layers, their kinds and their parameters the same way.
        """
        split = {
            moe: nnx.split(getattr(self, name))
            for moe, name in ((False, "blocks"), (True, "moe_blocks"))
            if hasattr(self, name)
        }
        policy = CHECKPOINT_POLICIES[self.remat]

        def one_layer(kind: LayerKind, index: int | None, unrolled: bool) -> Callable:
            """The layer of `kind`, its state the `index`-th of a period's stacked states of its kind (None: the
            state itself). The layer takes the stack and picks its own inside the remat: a state sliced before
            would be a residual the scan stacks for the backward (a copy of every layer's weights), where the
            scan's own input is not. `unrolled`: no loop is left around the layer (its segment unrolled whole)."""
            graphdef = split[kind.moe][0]

            def apply(x_BLD: jax.Array, states: nnx.State, extra: Any) -> tuple:
                state = states if index is None else jax.tree.map(lambda a: a[index], states)
                return layer(nnx.merge(graphdef, state), kind, x_BLD, extra)

            # Inside a loop XLA cannot merge the backward's recomputation with the forward, so CSE may run;
            # with no loop between them (a segment unrolled whole) it would, and remat would save nothing.
            return apply if policy is None else jax.checkpoint(apply, policy=policy, prevent_cse=unrolled)

        taken = {False: 0, True: 0}  # layers of each stack the segments before have used
        stats_parts, out_parts = [], []
        for seg in segments(self.layer_kinds()):
            r, period = seg.repeats, seg.period
            counts = {moe: sum(k.moe == moe for k in period) for moe in (False, True)}
            states = {}
            for moe, count in counts.items():
                if count:
                    states[moe] = jax.tree.map(functools.partial(_repeats, taken[moe], r, count), split[moe][1])
                    taken[moe] += r * count
            cut = functools.partial(_repeats, seg.start, r, len(period), keep_axis=True)
            inputs = None if per_layer is None else jax.tree.map(cut, per_layer)

            def group(x_BLD: jax.Array, xs: tuple, period=period, counts=counts, r=r) -> tuple:
                states_g, inputs_g = xs
                seen, stats, outs = {False: 0, True: 0}, [], []
                for j, kind in enumerate(period):
                    index = seen[kind.moe] if counts[kind.moe] > 1 else None
                    seen[kind.moe] += 1
                    extra = None if inputs_g is None else jax.tree.map(lambda a, j=j: a[j], inputs_g)
                    layer_fn = one_layer(kind, index, self.s.scan_unroll >= r)
                    x_BLD, layer_stats, out = layer_fn(x_BLD, states_g[kind.moe], extra)
                    if kind.moe:
                        stats.append(layer_stats)
                    outs.append(out)
                return x_BLD, (_stacked(stats), _stacked(outs))

            scan = functools.partial(jax.lax.scan, unroll=self.s.scan_unroll)
            x_BLD, (stats, outs) = scan(group, x_BLD, (states, inputs), length=r)
            stats_parts.append(_flattened(stats))
            out_parts.append(_flattened(outs))
        return x_BLD, _joined(stats_parts) or {}, _joined(out_parts)


def _repeats(start: int, repeats: int, count: int, stacked: jax.Array, keep_axis: bool = False) -> jax.Array:
    """Layers start .. start + repeats * count - 1 of a stack, as [repeats, count, ...] (for a count of one
    [repeats, ...], unless `keep_axis`)."""
    a = stacked[start : start + repeats * count]
    return a.reshape(repeats, count, *a.shape[1:]) if count > 1 or keep_axis else a


def _stacked(trees: list) -> Any:
    """Trees of one structure stacked along a new leading axis; None for none (or trees of nothing)."""
    trees = [t for t in trees if jax.tree.leaves(t)]
    return jax.tree.map(lambda *a: jnp.stack(a), *trees) if trees else None


def _flattened(tree: Any) -> Any:
    """[r, p, ...] leaves (a segment's repeats, each period's layers) as [r * p, ...]."""
    return None if tree is None else jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), tree)


def _joined(parts: list) -> Any:
    """The segments' stacked trees concatenated in layer order; None where there are none."""
    parts = [p for p in parts if p is not None]
    return jax.tree.map(lambda *a: jnp.concatenate(a), *parts) if parts else None
