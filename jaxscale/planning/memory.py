"""Per-device memory of one train step: state, gradients, saved activations, the working set, logits.

The figure estimated is what XLA reports as arguments + temporaries + outputs that do not reuse a
donated buffer (jaxscale.aot.CompiledStep.total_bytes): everything the step holds at its peak.

Activations are an inventory, per token and layer, of the arrays kept from forward to backward
under each remat policy. It was read off `jax.ad_checkpoint.print_saved_residuals` of one block and
XLA's buffer assignment of the compiled step (which fuses some of JAX's residuals away), once, for
all configs: it is the code's structure, not a fit. Sizes in bytes; letters as in
jaxscale.models.transformer, lower-case for this device's share (n heads, k KV heads, f hidden).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from jaxscale.models.expert_parallel import resolve_exchange
from jaxscale.models.transformer import DecoderShape, segments
from jaxscale.parallel.schedules import Schedule
from jaxscale.planning.shards import LocalSizes, Placement, shard_elements, without_fsdp

F32 = 4
# Attention that keeps no score matrix: it saves its inputs, output and softmax statistics and recomputes the
# scores in its backward. Splash and cuDNN are kernels; ring is jaxscale.models.ring_attention's custom VJP.
FUSED = ("splash", "cudnn", "ring")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device, by what holds them."""

    params: float  # with LoRA: the frozen base (compute dtype, or NF4 / int8 codes and scales) and the adapters
    optimizer: float  # of the trained parameters only
    gradients: float  # of the trained parameters, in their dtype; a second copy while microbatches accumulate
    batch: float  # inputs, targets and loss mask of the whole step
    activations: float  # saved for the backward pass, all layers, one microbatch
    working: float  # one layer's backward: its full forward intermediates (saved or recomputed) and their gradients
    logits: float  # float32 logits, their softmax and gradient for one microbatch

    @property
    def total(self) -> float:
        return sum(asdict(self).values())


def _norm(D: int, a: int) -> int:
    """RMSNorm: float32 input and normalized value, output in the compute dtype of `a` bytes (per token)."""
    return 2 * F32 * D + a * D


def _stream_norm(s: LocalSizes) -> float:
    """Per token, a norm of the residual stream: on the stream's share of the tokens (sequence parallelism), its
    output then gathered to every token of the sublayer it feeds."""
    gathered = (1 - s.stream_share) * s.act_bytes * s.d_model
    return s.stream_share * _norm(s.d_model, s.act_bytes) + gathered


def attention_bytes(s: LocalSizes, policy: str) -> int:
    """Saved per token by attention and its norm, plus the layer input every policy keeps.

    What attention itself keeps depends on how it is computed (`s.attention`, the implementation
    `model.attention` resolves to on the target): XLA's dense attention saves its [L, L] score
    matrix, a fused kernel (splash on TPU, cuDNN's flash attention on GPU) saves only its inputs,
    output and the softmax statistics, and recomputes the scores in its backward pass.
    """
    D, n, k, H, a = s.d_model, s.heads, s.kv_heads, s.head_dim, s.act_bytes
    fused = s.attention in FUSED
    stream = s.stream_share  # the layer input and the norm hold the stream's tokens (sequence parallelism)
    if policy == "none":  # norm; q, k, v; the attention output; the softmax (scores or statistics)
        softmax = _kernel_bytes(s) if fused else (F32 + a) * n * s.keys
        return _stream_norm(s) + 2 * a * n * H + 2 * a * k * H + softmax
    dots = stream * a * D + a * n * H + 2 * a * k * H + a * D  # input; q, k, v; output projection
    if policy == "dots_saveable" and not fused:  # also the batched attention dots: scores (float32), weighted values
        return dots + F32 * n * s.keys + a * n * H
    if s.attention == "ring" and policy in ("dots_saveable", "dots_with_no_batch_dims_saveable"):
        return dots + a * n * H + F32 * n  # the policy also keeps ring attention's output and log-sum-exp
    if policy in ("dots_saveable", "dots_with_no_batch_dims_saveable"):
        return dots  # a fused kernel is no dot: its outputs are recomputed, not saved
    return stream * a * D  # full: the layer input only


def ring_working_bytes(s: LocalSizes) -> float:
    """Per token, what ring attention's backward holds beyond the layer's forward intermediates
    (jaxscale.models.ring_attention): the float32 gradient of this device's queries; the recomputed forward's
    float32 output sum, twice (the step's branch writes a new one); and the float32 key and value gradients
    that travel with the blocks, one set arriving while another is summed into, beside the key and value
    block being passed on."""
    n, k, H, a = s.heads, s.kv_heads, s.head_dim, s.act_bytes
    return 3 * F32 * n * H + 2 * (2 * F32 * k * H) + 2 * (2 * a * k * H)


def _kernel_bytes(s: LocalSizes) -> int:
    """Saved per token by a fused attention kernel beyond q, k, v and its output: the float32 log-sum-exp of
    each query head's scores, and what splash adds, read off the compiled step on TPU topologies.

    Splash (jaxscale.models.attention._splash) takes queries scaled and laid out per KV head group
    and returns its output in that layout, which is transposed back for the output projection: the
    step keeps both layouts of the output (and with KV heads split otherwise than the query heads,
    K and V repeated to every local query head). cuDNN's custom VJP saves its inputs and output as
    given. (XLA:GPU is not compiled here; the cuDNN figure is the residual list of jax's cudnn fused
    attention, not a measurement.)
    """
    n, H, a = s.heads, s.head_dim, s.act_bytes
    if s.attention != "splash":  # cuDNN, and ring attention's custom VJP (jaxscale.models.ring_attention)
        return F32 * n
    return F32 * n + a * n * H + (2 * a * (n - s.kv_heads) * H if s.kv_repeated else 0)


def mlp_bytes(f: int, policy: str, a: int) -> int:
    """Saved per token (or per expert slot) by a SwiGLU of local width f, without its norm; `a`: activation bytes."""
    if policy == "none":  # gate, up, silu and its parts, product
        return 6 * a * f
    if policy in ("dots_saveable", "dots_with_no_batch_dims_saveable"):
        return 2 * a * f  # gate and up projections
    return 0


def grouped(s: LocalSizes, shape: DecoderShape) -> bool:
    """Whether MoE layers take the grouped-matmul path (dropless, every expert on this device)."""
    return shape.num_experts > 0 and shape.capacity_factor <= 0 and s.expert_ways == 1


def ragged_buffer_share(s: LocalSizes, shape: DecoderShape, worst: bool = False) -> float:
    """Rows of a shard's ragged receive buffer per routed assignment on this device; 0: padded buffers.

    The ragged exchange (jaxscale.models.ragged_dispatch) takes `model.expert_exchange` as resolved
    for this platform, dropless routing and split experts; its buffer holds n (worst case) or
    `model.ragged_buffer` balanced shares. `worst`: the buffer of the fallback a sized one runs where
    routing overflows it (n shares).
    """
    dropless = shape.capacity_factor <= 0
    if s.expert_ways == 1 or resolve_exchange(shape.expert_exchange, s.platform, dropless) != "ragged":
        return 0.0
    n = s.expert_ways
    return float(n) if shape.ragged_buffer <= 0 or worst else min(float(n), shape.ragged_buffer)


def moe_bytes(s: LocalSizes, shape: DecoderShape, policy: str, dense_ragged: bool, worst: bool = False) -> float:
    """Saved per token by an MoE feed-forward (router, dispatch, experts, combine), without its norm.

    `dense_ragged`: the backend lowers `lax.ragged_dot` as one dense dot over all E groups with the
    other groups masked (XLA:CPU does), so its inputs are E times wider. `worst`: a sized ragged
    buffer's fallback to the worst case (`ragged_buffer_share`).
    """
    D, f, K, E, a = s.d_model, s.mlp, shape.experts_per_token, shape.num_experts, s.act_bytes
    router = 3 * F32 * E  # float32 logits, probabilities, one-hot choices
    if grouped(s, shape):
        # K sorted copies of each token through grouped matmuls, and their K results.
        widened = E * a * (D + f) if dense_ragged else 0
        if policy == "none":
            return router + K * (2 * a * D + mlp_bytes(f, policy, a) + widened)
        return K * mlp_bytes(f, policy, a) + (F32 * E if policy != "full" else 0)
    share = ragged_buffer_share(s, shape, worst)
    if share:
        # K sorted copies sent, a receive buffer of `share` x K rows per token through the local
        # experts' grouped matmuls (dense over the local groups where the backend lowers them so).
        rows = K * share
        widened = s.experts * a * (D + f) if dense_ragged else 0
        if policy == "none":
            return router + K * 2 * a * D + rows * (2 * a * D + mlp_bytes(f, policy, a) + widened)
        return rows * mlp_bytes(f, policy, a) + (F32 * E if policy != "full" else 0)
    slots = E * shape.moe_shape().capacity(s.seq) / s.seq  # buffer slots per token, padding included
    if policy == "none":  # buffers in and out, expert hidden units, the K gathered results and their mask
        return router + slots * (2 * a * D + mlp_bytes(f, policy, a)) + (2 * a + 1) * K * D
    if policy == "dots_saveable":  # router logits, expert dots (batched over experts), combine
        return F32 * E + slots * (mlp_bytes(f, policy, a) + a * D) + a * D
    if policy == "dots_with_no_batch_dims_saveable":
        return F32 * E  # the router's dot only: expert and combine dots batch over experts / tokens
    return 0


def layer_bytes(
    s: LocalSizes, shape: DecoderShape, policy: str, moe: bool, dense_ragged: bool = False, worst: bool = False
) -> float:
    """Saved per token by one layer (dense or MoE) under `policy`; `worst`: with a sized ragged buffer's fallback."""
    ffn_norm = _stream_norm(s) if policy == "none" else 0
    if not moe:
        return attention_bytes(s, policy) + ffn_norm + mlp_bytes(s.mlp, policy, s.act_bytes)
    shared = mlp_bytes(s.mlp * shape.num_shared_experts, policy, s.act_bytes) if shape.num_shared_experts else 0
    return attention_bytes(s, policy) + ffn_norm + moe_bytes(s, shape, policy, dense_ragged, worst) + shared


def _casts_kept(s: LocalSizes, policy: str) -> bool:
    """Whether every layer's weights, cast to the compute dtype, are kept from forward to backward.

    Under remat=none they are residuals of the layer's matmuls. Under the other policies XLA:CPU
    casts again in the backward, but XLA:TPU keeps the forward's casts under every policy: the
    compiled forward scan of a v5e / v6e step outputs every layer's cast weights (stacked) under
    remat=full and dots_saveable too.
    """
    return policy == "none" or s.platform == "tpu"


def _fused_swiglu(s: LocalSizes, moe: bool) -> float:
    """Bytes per token of a dense layer's backward that XLA:TPU never materializes.

    The working set stands one layer's forward intermediates in for their gradients. In the backward
    scan XLA:TPU compiles, the only hidden-width arrays made are d_gate and d_up, the two outputs of
    one fusion that also computes the gradients of silu and of the product: those two never exist.
    """
    return 2 * s.act_bytes * s.mlp if s.platform == "tpu" and not moe else 0.0


def estimate_memory(p: Placement, dense_ragged: bool = False) -> MemoryEstimate:
    """Per-device bytes of the compiled train step of `p` (see the module docstring).

    On a pipeline mesh (`p.schedule`) the device is the worst stage's: its chunk of the layers, the
    embedding and head every stage holds, the stash of the schedule, and one layer group's backward
    with the head's logits (the last stage's); see `pipeline_stash_bytes`.
    """
    step, shape, rules, mesh, s = p.step, p.shape, p.rules, p.mesh, p.local
    params = optimizer = trained = 0.0
    accumulated = 0.0  # a pipeline's gradient accumulators: layers in their shards, shared weights gathered
    layer_casts = 0.0  # one layer's local parameters in the compute dtype, kept for the backward (see _casts_kept)
    gathered = 0.0  # one layer's parameters and the head as FSDP all-gathers them, in the compute dtype
    gathered_mesh = without_fsdp(mesh)
    longest_period = max(len(seg.period) for seg in segments(shape.layer_kinds))
    for a in p.arrays:
        local = shard_elements(a.shape, a.names, rules, mesh) * a.itemsize
        if not a.is_param:
            optimizer += local
            continue
        params += local
        trained += local if a.trainable else 0.0
        stacked = a.names[0] == "layers" and a.shape[0] > 1
        per_layer = a.shape[0] // mesh.shape["pipeline"] if stacked else 1  # all layers, or a pipeline stage's
        # Pipeline stages take the shared weights (embedding, final norm, head) gathered as FSDP gathers them,
        # for the whole step, and accumulate their gradients so (jaxscale.parallel.pipeline).
        shared = 0.0 if stacked else shard_elements(a.shape, a.names, rules, gathered_mesh) * a.itemsize
        if p.schedule is not None:
            gathered += shared
        if a.trainable:
            accumulated += local if stacked else shared
        # A frozen base needs no cast kept for the backward: it is stored in the compute dtype, or its
        # backward dequantizes again (jaxscale.models.quant).
        if a.trainable and stacked:
            layer_casts += local / per_layer * s.act_bytes / a.itemsize
        # A frozen embedding apart from the head is gathered for the lookup at the step's start only: its
        # backward needs no table, so it is not held at the peak (a tied one is the head as well).
        frozen_lookup = a.names[:2] == ("vocab", "embed") and not a.trainable and not shape.tie_embeddings
        if "vocab" in a.names and s.platform == "tpu" and a.itemsize != s.act_bytes:
            # XLA:TPU keeps the local shard of an embedding or head stored in another dtype (float32) cast to the
            # compute dtype for the whole step (bf16 [151936, 1024] of qwen3-8b's on fsdp=4: both are held).
            gathered += local / a.itemsize * s.act_bytes
        if (mesh.shape["fsdp"] > 1 or a.entries_per_element > 1 or a.itemsize == 1) and (
            stacked or ("vocab" in a.names and not frozen_lookup)
        ):
            # Gathered by FSDP, or dequantized: one layer's weights whole in the compute dtype. A quantized base
            # scanned in periods of several layers (jaxscale.models.transformer.segments) is dequantized a period
            # at a time: gemma3-12b QLoRA (periods of six) holds 2.1 GiB more than its bf16 LoRA on v5e:2x2, five
            # more layers' weights, where a model of one kind holds as much as with bf16.
            elements = shard_elements(a.shape, a.names, rules, gathered_mesh) * a.entries_per_element
            layers_at_once = longest_period if stacked and a.entries_per_element > 1 else 1
            gathered += elements / per_layer * s.act_bytes * layers_at_once
    policy, n_moe = step.remat, shape.n_moe_layers
    # A pipeline tick runs one layer group's forward and its backward at once: the group's last layer
    # is the working set, and only the layers before it keep residuals.
    kept = shape.n_layers if p.schedule is None else group_layers(p.schedule, shape) - 1
    kinds = [False] * (kept - n_moe) + [True] * n_moe
    per_token = sum(layer_bytes(s, shape, policy, moe, dense_ragged) for moe in kinds)
    model_kinds = {moe for moe, count in ((False, shape.n_layers - n_moe), (True, n_moe)) if count}
    widest = max(layer_bytes(s, shape, "none", moe, dense_ragged) - _fused_swiglu(s, moe) for moe in model_kinds)
    if s.attention == "ring":
        widest += ring_working_bytes(s)
    if p.schedule is None:
        gradients, stash = trained * (1 if step.grad_accum == 1 else 2), 0.0
    else:
        gradients, stash = trained + accumulated, pipeline_stash_bytes(p.schedule, s)
    return MemoryEstimate(
        params=params,
        optimizer=optimizer,
        gradients=gradients,
        batch=3 * 4 * s.rows * step.grad_accum * s.seq,
        activations=per_token * s.tokens + (kept * layer_casts if _casts_kept(s, policy) else 0.0) + stash,
        working=widest * s.tokens + gathered,
        logits=_logits_bytes(s) * s.tokens * s.vocab * _logits_share(shape.logits_chunk, step.seq_len),
    )


def _logits_bytes(s: LocalSizes) -> float:
    """Bytes per logit (one position, one vocabulary entry) the head's forward and backward hold at once.

    XLA:CPU holds three float32 arrays [B, L, V]: the logits, their softmax and gradient. XLA:TPU fuses the
    softmax into the gradient, which it makes in the compute dtype for the matmuls that take it: its buffer
    assignment of a qwen3-8b and a gemma3-12b LoRA step (v5e:2x2) holds f32 [1, 2048, V] and bf16 [2048, V]
    and no other array of that size.
    """
    return F32 + s.act_bytes if s.platform == "tpu" else 3 * F32


def group_layers(schedule: Schedule, shape: DecoderShape) -> int:
    """Layers of one backward tick's group: a pipeline device differentiates one group at a time."""
    return shape.n_layers // (schedule.stages * schedule.virtual * schedule.backward_ticks)


def pipeline_stash_bytes(schedule: Schedule, s: LocalSizes) -> float:
    """What a pipeline device carries from tick to tick (jaxscale.parallel.pipeline): k group inputs per
    stash slot, one cotangent per cotangent slot, and between a backward's ticks the running cotangent,
    each a [B, L, D] activation. XLA keeps two copies of the loop carry: the one a tick reads and the
    one it writes.
    """
    k = schedule.backward_ticks
    slots = max(schedule.stash_slots, 1) * k + max(schedule.cot_slots, 1) + (1 if k > 1 else 0)
    return 2 * slots * s.tokens * s.d_model * s.act_bytes


def _logits_share(chunk: int, seq_len: int) -> float:
    """The share of a microbatch's positions whose logits exist at once (`model.logits_chunk`)."""
    return chunk / seq_len if chunk else 1.0
