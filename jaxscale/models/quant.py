"""Frozen base weights stored quantized (QLoRA): 4-bit NormalFloat or int8, absmax scales per block of 64.

A weight is cut into blocks of 64 consecutive entries along one of its axes (`block_axis`, a model
width: `embed` or `mlp`, so blocks never straddle heads). Each block is divided by its largest
magnitude and every entry rounded to the nearest level: for NF4 one of the 16 NormalFloat levels
of the QLoRA paper (two 4-bit codes packed per byte along the block axis), for int8 one of
-127..127. Codes and scales keep the weight's rank and logical dimension names, so they are sharded
as the weight would be. The layer dequantizes right before its matmul (`quantized_einsum`), one
layer at a time inside the layer scan, and its backward dequantizes again instead of keeping the
full-precision weight.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

BLOCK = 64
QUANT_KINDS = ("nf4", "int8")

# The 16 NF4 levels (Dettmers et al. 2023, appendix E): quantiles of N(0, 1) scaled to [-1, 1], with an exact 0.
NF4_LEVELS = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)


class FrozenBase(nnx.Variable):
    """A stored (quantized) base weight: neither a parameter the optimizer sees nor a gradient target."""


def quantize(w: jax.Array, block_axis: int, kind: str) -> tuple[jax.Array, jax.Array]:
    """`w` -> (codes, float32 scales), blocks of 64 along `block_axis` (whose size 64 must divide).

    codes: uint8 with `block_axis` halved (two NF4 codes a byte, the even entry in the low nibble) or
    int8 of `w`'s shape; scales: `w`'s shape with `block_axis` divided by 64.
    """
    w = jnp.moveaxis(w.astype(jnp.float32), block_axis, 0)
    blocks = w.reshape(w.shape[0] // BLOCK, BLOCK, *w.shape[1:])
    scales = jnp.max(jnp.abs(blocks), axis=1)
    unit = blocks / jnp.where(scales == 0, 1.0, scales)[:, None]
    if kind == "int8":
        codes = jnp.round(unit * 127).astype(jnp.int8).reshape(w.shape)
    else:
        # The nearest level: how many midpoints between neighbouring levels lie below the value.
        midpoints = jnp.asarray((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2)
        nibbles = jnp.searchsorted(midpoints, unit.reshape(w.shape)).astype(jnp.uint8)
        pairs = nibbles.reshape(w.shape[0] // 2, 2, *w.shape[1:])
        codes = pairs[:, 0] | (pairs[:, 1] << 4)
    return jnp.moveaxis(codes, 0, block_axis), jnp.moveaxis(scales, 0, block_axis)


def dequantize(codes: jax.Array, scales: jax.Array, block_axis: int, kind: str, dtype: jnp.dtype) -> jax.Array:
    """The weight that (codes, scales) of `quantize` stand for, in `dtype`."""
    codes, scales = jnp.moveaxis(codes, block_axis, 0), jnp.moveaxis(scales, block_axis, 0)
    if kind == "int8":
        unit = codes.astype(jnp.float32) / 127
    else:
        nibbles = jnp.stack([codes & 0xF, codes >> 4], axis=1).reshape(2 * codes.shape[0], *codes.shape[1:])
        unit = jnp.asarray(NF4_LEVELS)[nibbles]
    blocks = unit.reshape(scales.shape[0], BLOCK, *scales.shape[1:]) * scales[:, None]
    return jnp.moveaxis(blocks.reshape(unit.shape).astype(dtype), 0, block_axis)


class QuantizedWeight(nnx.Module):
    """A frozen base weight kept as codes and scales (see `quantize`), under its original logical names."""

    def __init__(self, param: nnx.Param, block_axis: int, kind: str):
        names = param.get_metadata()["out_sharding"]
        codes, scales = quantize(param[...], block_axis, kind)
        self.codes = FrozenBase(codes, out_sharding=names, eager_sharding=False)
        self.scales = FrozenBase(scales, out_sharding=names, eager_sharding=False)
        self.block_axis, self.kind = block_axis, kind

    def dequantized(self, dtype: jnp.dtype) -> jax.Array:
        return dequantize(self.codes[...], self.scales[...], self.block_axis, self.kind, dtype)


def quantized_einsum(spec: str, x: jax.Array, weight: QuantizedWeight) -> jax.Array:
    """`jnp.einsum(spec, x, W)` with W dequantized to x's dtype; the backward dequantizes W again.

    So the full-precision weight lives only while its own matmul runs: autodiff would otherwise keep
    every layer's dequantized weight from the forward for the backward.
    """
    return _einsum_dequantized(spec, weight.block_axis, weight.kind, x, weight.codes[...], weight.scales[...])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _einsum_dequantized(
    spec: str, block_axis: int, kind: str, x: jax.Array, codes: jax.Array, scales: jax.Array
) -> jax.Array:
    return jnp.einsum(spec, x, dequantize(codes, scales, block_axis, kind, x.dtype))


def _forward(spec: str, block_axis: int, kind: str, x: jax.Array, codes: jax.Array, scales: jax.Array) -> tuple:
    return _einsum_dequantized(spec, block_axis, kind, x, codes, scales), (x, codes, scales)


def _backward(spec: str, block_axis: int, kind: str, saved: tuple, dy: jax.Array) -> tuple:
    x, codes, scales = saved
    w = dequantize(codes, scales, block_axis, kind, x.dtype)
    _, x_vjp = jax.vjp(lambda x_: jnp.einsum(spec, x_, w), x)
    return (*x_vjp(dy), None, None)  # the frozen codes and scales get no gradient


_einsum_dequantized.defvjp(_forward, _backward)
