"""The gated MLP's nonlinearity, one definition for dense layers and experts (all three expert paths).

A gated MLP computes act(x W_gate) * (x W_up) before its down projection: SwiGLU with SiLU (Llama,
Mistral, Qwen), GeGLU with the tanh approximation of GELU (Gemma; transformers' `gelu_pytorch_tanh`,
0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), which is `jax.nn.gelu(approximate=True)`).
"""

from __future__ import annotations

import functools

import jax

ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True)}


def gated(gate: jax.Array, up: jax.Array, activation: str) -> jax.Array:
    """act(gate) * up, elementwise, for `activation` one of ACTIVATIONS (`model.activation`)."""
    return ACTIVATIONS[activation](gate) * up
