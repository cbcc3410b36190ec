"""Causal self-attention with document masks, computed by XLA, cuDNN flash attention or splash attention.

`xla` is `jax.nn.dot_product_attention`'s default lowering: it materializes the [L, L] score
matrix of every head (less the blocks above the causal diagonal: jaxscale.models.causal_blocks).
The fused kernels never do: cuDNN's flash attention on NVIDIA GPUs, and
splash attention (a Pallas kernel that also skips the blocks the causal and document masks hide)
on TPUs. `auto` picks by the platform of the devices the step runs on, so an ahead-of-time compile
for a TPU topology on a CPU host picks splash.

A Pallas kernel is opaque to XLA's sharding propagation, so splash runs inside `shard_map`: each
device attends over its own rows and heads (batch over the batch axes, heads over `tensor`), which
needs no communication since every head and row is independent.

A local layer (sliding window w, as transformers masks it: query i sees keys i - w + 1 .. i) is the
same call with the window: `local_window_size=(w - 1, 0)` for XLA and cuDNN (cuDNN's sliding window of
w), a `LocalMask` of (w - 1, 0) for splash, which then also skips the blocks outside the window. Logit
soft-capping (c tanh(logits / c), Gemma 2) is splash's `attn_logits_soft_cap`; cuDNN has none, and XLA's
`dot_product_attention` neither, so XLA's is written out here (`masked_attention`).
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec

from jaxscale.errors import UserError
from jaxscale.models.causal_blocks import causal_attention, fused_causal_attention
from jaxscale.models.ring_attention import ring_attention
from jaxscale.sharding import active_axis_size, active_platform, active_rules, constrain, logical_to_spec

log = logging.getLogger("jaxscale.attention")

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
_FUSED_BY_PLATFORM = {"tpu": "splash", "gpu": "cudnn"}
_CUDNN_DTYPES = ("bfloat16", "float16")
SPLASH_BLOCK = 128  # the sequence tile of the splash kernel: a TPU vector register's lane count


def resolve(implementation: str, platform: str, compute_dtype: str, context: int = 1, softcap: float = 0.0) -> str:
    """The implementation `model.attention=implementation` runs on devices of `platform` ('cpu', 'gpu', 'tpu').

    `auto` is splash on TPU, cuDNN on GPU when the compute dtype is one cuDNN's flash attention
    takes and the logits are not soft-capped (`softcap`, `model.attn_softcap`; else XLA), and XLA
    elsewhere or when the context axis splits the sequence.
    """
    if implementation not in IMPLEMENTATIONS:
        raise UserError(f"model.attention={implementation!r} is not one of {', '.join(IMPLEMENTATIONS)}.")
    if implementation != "auto":
        return implementation
    if context > 1:
        return "xla"
    fused = _FUSED_BY_PLATFORM.get(platform, "xla")
    cudnn_cannot = compute_dtype not in _CUDNN_DTYPES or softcap > 0
    return "xla" if fused == "cudnn" and cudnn_cannot else fused


def check(
    implementation: str, platform: str, compute_dtype: str, seq_len: int, context: int = 1, softcap: float = 0.0
) -> str:
    """The resolved implementation, or a UserError (before any compute) for a setting it cannot run.

    `context`: the degree of the context axis; a split sequence is attended by XLA (see `attend`).
    `softcap`: `model.attn_softcap`, which cuDNN cannot apply.
    """
    chosen = resolve(implementation, platform, compute_dtype, context, softcap)
    if context > 1 and chosen != "xla":
        raise UserError(
            f"model.attention={implementation} with mesh.context={context}: a sequence split over devices is "
            f"attended by XLA (by ring or all-gather, parallel.context_attention; masked by document and position); "
            f"set model.attention=xla or auto."
        )
    if chosen == "cudnn" and platform != "gpu":
        raise UserError(
            f"model.attention=cudnn runs on NVIDIA GPUs, and this run's devices are {platform}; "
            f"use model.attention=auto (or xla)."
        )
    if chosen == "cudnn" and compute_dtype not in _CUDNN_DTYPES:
        raise UserError(
            f"model.attention=cudnn: cuDNN's flash attention computes in bfloat16 or float16, not {compute_dtype}; "
            f"set model.compute_dtype=bfloat16, or model.attention=xla."
        )
    if chosen == "cudnn" and softcap > 0:
        raise UserError(
            f"model.attention=cudnn: cuDNN's flash attention cannot soft-cap the logits (model.attn_softcap="
            f"{softcap}); set model.attention=auto (or xla)."
        )
    if chosen == "splash" and seq_len % SPLASH_BLOCK:
        raise UserError(
            f"model.attention=splash tiles the sequence in blocks of {SPLASH_BLOCK}, and train.seq_len={seq_len} "
            f"is not a multiple of {SPLASH_BLOCK}; round train.seq_len up, or set model.attention=xla."
        )
    if chosen == "splash" and platform != "tpu":
        log.warning("model.attention=splash on %s runs the kernel in Pallas interpret mode: exact but slow", platform)
    return chosen


def attend(
    q_BLNH: jax.Array,
    k_BLKH: jax.Array,
    v_BLKH: jax.Array,
    segment_ids_BL: jax.Array | None,
    positions_BL: jax.Array,
    implementation: str,
    compute_dtype: str,
    *,
    window: int = 0,
    scale: float | None = None,
    softcap: float = 0.0,
    context_attention: str = "ring",
) -> jax.Array:
    """Causal attention [B, L, N, H] of queries to keys and values ([B, L, K, H], K dividing N: GQA).

    With `segment_ids_BL`, a token attends only to earlier tokens of its own document. Where the
    context axis splits the sequence, its tokens are not in order (jaxscale.training.step
    `balance_for_context`), so "earlier" is read from the positions, not the index, and
    `context_attention` says how the split sequence attends: `ring` passes key/value blocks around the
    context devices (jaxscale.models.ring_attention), `allgather` gathers the whole sequence's keys and
    values on each (XLA's attention under a mask, partitioned by XLA).
    `window` > 0: only to the last `window` tokens, itself included (a local layer); `scale`: of the
    logits, None for 1/sqrt(H); `softcap` > 0: logits capped to c tanh(logits / c) before the mask.
    """
    context = active_axis_size("context")
    chosen = resolve(implementation, active_platform(), compute_dtype, context, softcap)
    if chosen == "splash":
        return _splash_sharded(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, window, scale, softcap)
    if context > 1 and segment_ids_BL is None:
        raise ValueError("a sequence split over the context axis needs explicit segment ids and positions")
    if context > 1 and context_attention == "ring":
        return ring_attention(
            q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, positions_BL, window=window, scale=scale, softcap=softcap
        )
    if context > 1 or softcap > 0:
        if context == 1:  # in order: the index is the position within a document
            positions_BL = jnp.broadcast_to(jnp.arange(q_BLNH.shape[1]), q_BLNH.shape[:2])
        distance_B1LL = positions_BL[:, None, :, None] - positions_BL[:, None, None, :]
        mask_B1LL = (distance_B1LL >= 0) & (distance_B1LL < window if window else True)
        if segment_ids_BL is not None:
            mask_B1LL = mask_B1LL & (segment_ids_BL[:, None, :, None] == segment_ids_BL[:, None, None, :])
        mask_B1LL = constrain(mask_B1LL, ("batch", None, "seq", None))
        return masked_attention(q_BLNH, k_BLKH, v_BLKH, mask_B1LL, scale, softcap)
    if chosen == "xla":  # the blocks above the causal diagonal skipped (jaxscale.models.causal_blocks)
        return causal_attention(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, window, scale)
    return fused_causal_attention(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, window, scale, chosen)


def masked_attention(
    q_BLNH: jax.Array,
    k_BMKH: jax.Array,
    v_BMKH: jax.Array,
    mask_B1LM: jax.Array,
    scale: float | None = None,
    softcap: float = 0.0,
) -> jax.Array:
    """XLA's attention [B, L, N, H] of queries to M keys under an explicit mask [B, 1, L, M] (True: seen).

    With `softcap` > 0 as transformers' eager attention computes it: scaled logits, c tanh(logits / c),
    masked, a float32 softmax, weighted values. A query that sees no key gets an average of values.
    """
    if not softcap:
        return jax.nn.dot_product_attention(q_BLNH, k_BMKH, v_BMKH, mask=mask_B1LM, scale=scale)
    cap = softcap
    B, L, N, H = q_BLNH.shape
    K = k_BMKH.shape[2]
    q_BLKGH = q_BLNH.reshape(B, L, K, N // K, H)
    logits_BKGLM = jnp.einsum("blkgh,bmkh->bkglm", q_BLKGH, k_BMKH, preferred_element_type=jnp.float32)
    logits_BKGLM = logits_BKGLM * (H**-0.5 if scale is None else scale)
    logits_BKGLM = cap * jnp.tanh(logits_BKGLM / cap)
    logits_BKGLM = jnp.where(mask_B1LM[:, :, None], logits_BKGLM, jnp.finfo(jnp.float32).min)
    probs_BKGLM = jax.nn.softmax(logits_BKGLM, axis=-1).astype(v_BMKH.dtype)
    return jnp.einsum("bkglm,bmkh->blkgh", probs_BKGLM, v_BMKH).reshape(B, L, N, H)


def _splash_sharded(
    q_BLNH: jax.Array,
    k_BLKH: jax.Array,
    v_BLKH: jax.Array,
    segment_ids_BL: jax.Array | None,
    window: int = 0,
    scale: float | None = None,
    softcap: float = 0.0,
) -> jax.Array:
    """`_splash` on each device's rows and heads under the active rules (on one device without them)."""
    splash = functools.partial(_splash, window=window, scale=scale, softcap=softcap)
    active = active_rules()
    if active is None:
        return splash(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL)
    rules, mesh = active
    q_spec = logical_to_spec(("batch", None, "heads", None), q_BLNH.shape, rules, mesh)
    kv_spec = logical_to_spec(("batch", None, "kv_heads", None), k_BLKH.shape, rules, mesh)
    if kv_spec[2] != q_spec[2]:
        # The KV heads are split differently from the queries' (too few to split as far): give every
        # query head its own copy, so each device's query heads find their keys on the same device.
        group = q_BLNH.shape[2] // k_BLKH.shape[2]
        k_BLKH, v_BLKH = (jnp.repeat(x, group, axis=2) for x in (k_BLKH, v_BLKH))
        kv_spec = q_spec
    rows_spec = PartitionSpec(q_spec[0], None)
    if segment_ids_BL is None:
        return jax.shard_map(
            lambda q, k, v: splash(q, k, v, None),
            mesh=mesh,
            in_specs=(q_spec, kv_spec, kv_spec),
            out_specs=q_spec,
            check_vma=False,
        )(q_BLNH, k_BLKH, v_BLKH)
    return jax.shard_map(
        splash, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, rows_spec), out_specs=q_spec, check_vma=False
    )(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL)


def _splash(
    q_BLNH: jax.Array,
    k_BLKH: jax.Array,
    v_BLKH: jax.Array,
    segment_ids_BL: jax.Array | None,
    window: int = 0,
    scale: float | None = None,
    softcap: float = 0.0,
) -> jax.Array:
    """Splash attention of local arrays: one multi-query kernel call per (row, KV head) over its query group."""
    batch, length, n_heads, head_dim = q_BLNH.shape
    n_kv = k_BLKH.shape[2]
    group = n_heads // n_kv
    kernel = _kernel(length, group, active_platform() != "tpu", window, softcap)
    # Splash takes unscaled logits: the scale of dot-product attention goes into the queries.
    q_scale = head_dim**-0.5 if scale is None else scale
    q_BKGLH = (q_BLNH * q_scale).reshape(batch, length, n_kv, group, head_dim).transpose(0, 2, 3, 1, 4)
    k_BKLH, v_BKLH = (x.transpose(0, 2, 1, 3) for x in (k_BLKH, v_BLKH))

    def one_row(q_KGLH: jax.Array, k_KLH: jax.Array, v_KLH: jax.Array, segments_L: jax.Array | None) -> jax.Array:
        ids = None if segments_L is None else splash_kernel.SegmentIds(q=segments_L, kv=segments_L)
        return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q_KGLH, k_KLH, v_KLH)

    out_BKGLH = jax.vmap(one_row)(q_BKGLH, k_BKLH, v_BKLH, segment_ids_BL)
    return out_BKGLH.transpose(0, 3, 1, 2, 4).reshape(batch, length, n_heads, head_dim).astype(q_BLNH.dtype)


def _kernel(
    length: int, group: int, interpret: bool, window: int = 0, softcap: float = 0.0
) -> splash_kernel.SplashAttentionKernel:
    """The causal (or, with `window`, local) multi-query splash kernel for `group` query heads per KV head,
    tiles as large as divide L; its logits soft-capped at `softcap` when > 0."""
    block = next(b for b in (512, 256, SPLASH_BLOCK) if length % b == 0)
    sizes = splash_kernel.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    if window:
        head_mask = splash_mask.LocalMask((length, length), window_size=(window - 1, 0), offset=0)
    else:
        head_mask = splash_mask.CausalMask((length, length))
    mask = splash_mask.MultiHeadMask([head_mask for _ in range(group)])
    return splash_kernel.make_splash_mqa(
        mask,
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
        attn_logits_soft_cap=softcap or None,
    )
