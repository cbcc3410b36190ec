"""Analytic FLOP counts of the decoder, for MFU and planning."""

from __future__ import annotations

from jaxscale.models.transformer import DecoderShape


def matmul_params(s: DecoderShape) -> int:
    """Parameters that take part in a matmul per token (the embedding lookup does not; a tied head does).

    In an MoE layer only the router, the token's k experts and the shared experts count: FLOPs of
    the active parameters, not of all experts (nor of the padding a capacity buffer carries).
    """
    attn = s.d_model * s.head_dim * (2 * s.n_heads + 2 * s.n_kv_heads)
    mlp = 3 * s.d_model * s.d_ff
    active_experts = s.experts_per_token + s.num_shared_experts
    moe = s.d_model * s.num_experts + active_experts * mlp
    n_moe = s.n_moe_layers
    return s.n_layers * attn + (s.n_layers - n_moe) * mlp + n_moe * moe + s.d_model * s.vocab_size


def train_flops_per_token(s: DecoderShape, seq_len: int) -> float:
    """Forward + backward FLOPs per token: 6 per matmul weight, plus attention scores and values.

    Attention counts the full L x L score matrix, as XLA's dense attention computes it.
    Recomputation under remat is not counted (model FLOPs, as MFU is defined).
    """
    attention = 12 * s.n_layers * seq_len * s.n_heads * s.head_dim
    return 6 * matmul_params(s) + attention
