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

import functools
from dataclasses import dataclass

from jaxscale.models.expert_parallel import resolve_exchange
from jaxscale.models.transformer import DecoderShape, LayerKind, segments
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
    logits: float  # the loss of one microbatch: its logits, and the output head as FSDP gathers it
    overlap: float = 0.0  # of the terms above, bytes never alive at once (freed activations reused for gradients)
    loss_apart: bool = True  # whether the logits phase ends before a layer's backward begins (see `total`)

    @property
    def total(self) -> float:
        """What the step holds at its peak: the loss's logits phase and a layer's backward, the larger of the two
        where `loss_apart` (see `loss_apart`), else both."""
        held = self.params + self.optimizer + self.gradients + self.batch + self.activations
        phases = max(self.working, self.logits) if self.loss_apart else self.working + self.logits
        return held + phases - self.overlap


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


def unrolled_bytes(s: LocalSizes, shape: DecoderShape, policy: str, moe: bool, dense_ragged: bool = False) -> float:
    """Saved per token by one layer of a loop unrolled whole (no loop between forward and backward).

    Without remat XLA:TPU keeps what it materializes anyway, the operands and results of every matmul,
    and fuses the elementwise chains between them into the backward, recomputing them there (39 KB a
    token a layer at d_model 1024 on v5e against this inventory's 40 KB, where the scanned loop keeps
    84 KB). XLA:CPU keeps the scanned loop's inventory (tiny model, fsdp=8: 1.05 of XLA with it, 0.80
    with the matmuls' operands alone). Under dots_saveable XLA:TPU keeps the policy's dots, XLA:CPU
    only the layer inputs (as under full remat); full remat keeps the inputs. MoE layers keep their
    scanned inventory.
    """
    if moe or (policy == "none" and s.platform != "tpu"):
        return layer_bytes(s, shape, policy, moe, dense_ragged)
    if policy != "none":
        kept = policy if s.platform == "tpu" else "full"
        return layer_bytes(s, shape, kept, moe, dense_ragged)
    D, n, k, H, f, a = s.d_model, s.heads, s.kv_heads, s.head_dim, s.mlp, s.act_bytes
    fused = s.attention in ("splash", "cudnn")
    softmax = _kernel_bytes(s) if fused else (F32 + a) * n * s.keys  # the statistics, or scores and probabilities
    attention = a * D + a * (n + 2 * k) * H + a * n * H + a * D + softmax  # input, q k v, output, projected
    mlp = a * D + 2 * a * f + a * f + a * D  # input, gate and up, their product, projected
    return attention + mlp


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
    gathered = 0.0  # one layer's parameters as FSDP all-gathers them, in the compute dtype
    gathered_stored = 0.0  # the same in the dtype they are stored in (XLA:CPU gathers before it casts)
    head_gathered = 0.0  # the output head as FSDP gathers (or dequantizes) it, in the compute dtype
    shared_gathered = 0.0  # a pipeline stage's shared weights, gathered for the whole step
    lookup_gathered = 0.0  # a trained untied embedding as FSDP gathers it for its gradient
    vocab_casts = 0.0  # XLA:TPU: embedding and head shards cast to the compute dtype, held for the whole step
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
            shared_gathered += shared
        if a.trainable:
            accumulated += local if stacked else shared
        # A frozen base needs no cast kept for the backward: it is stored in the compute dtype, or its
        # backward dequantizes again (jaxscale.models.quant).
        if a.trainable and stacked:
            layer_casts += local / per_layer * s.act_bytes / a.itemsize
        # The output head's matmul gathers it whole. The embedding's lookup needs its table gathered only where it
        # is trained (its gradient); a frozen one is read at the step's start and not held at the peak.
        head = "vocab" in a.names and (a.names[0] == "vocab") == shape.tie_embeddings
        trained_lookup = "vocab" in a.names and not head and a.trainable
        if "vocab" in a.names and s.platform == "tpu" and a.itemsize != s.act_bytes:
            # XLA:TPU keeps the local shard of an embedding or head stored in another dtype (float32) cast to the
            # compute dtype for the whole step (bf16 [151936, 1024] of qwen3-8b's on fsdp=4: both are held).
            vocab_casts += local / a.itemsize * s.act_bytes
        if (mesh.shape["fsdp"] > 1 or a.entries_per_element > 1 or a.itemsize == 1) and (
            stacked or head or trained_lookup
        ):
            # Gathered by FSDP, or dequantized: one layer's weights whole in the compute dtype. A quantized base
            # scanned in periods of several layers (jaxscale.models.transformer.segments) is dequantized a period
            # at a time: gemma3-12b QLoRA (periods of six) holds 2.1 GiB more than its bf16 LoRA on v5e:2x2, five
            # more layers' weights, where a model of one kind holds as much as with bf16.
            elements = shard_elements(a.shape, a.names, rules, gathered_mesh) * a.entries_per_element / per_layer
            stored = a.itemsize if a.entries_per_element == 1 and a.itemsize > 1 else s.act_bytes
            if stacked:
                layers_at_once = longest_period if a.entries_per_element > 1 else 1
                gathered += elements * s.act_bytes * layers_at_once
                gathered_stored += elements * stored
            elif head:
                head_gathered += elements * s.act_bytes
                if a.trainable and shape.logits_chunk:
                    # The loss in chunks accumulates the head's gradient over them in float32, gathered whole.
                    head_gathered += elements * F32
            else:
                lookup_gathered += elements * s.act_bytes
    policy, n_moe = step.remat, shape.n_moe_layers
    # A pipeline tick runs one layer group's forward and its backward at once: the group's last layer
    # is the working set, and only the layers before it keep residuals.
    kept = shape.n_layers if p.schedule is None else group_layers(p.schedule, shape) - 1
    kinds = [False] * (kept - n_moe) + [True] * n_moe
    model_kinds = {moe for moe, count in ((False, shape.n_layers - n_moe), (True, n_moe)) if count}
    # The backward of one layer; of an MoE layer with a sized ragged buffer, as its fallback runs it.
    widest = max(layer_bytes(s, shape, "none", moe, dense_ragged, True) - _fused_swiglu(s, moe) for moe in model_kinds)
    if s.attention == "ring":
        widest += ring_working_bytes(s)
    if p.schedule is None:
        gradients, stash = trained * (1 if step.grad_accum == 1 else 2), 0.0
    else:
        gradients, stash = trained + accumulated, pipeline_stash_bytes(p.schedule, s)
    casts = kept * layer_casts if _casts_kept(s, policy) else 0.0
    overlap = 0.0
    if unrolled_whole(p):
        # No loop: each layer's residuals die with its backward, and the gradients take their place as they go.
        # A recomputed layer's backward holds its matmul operands (`unrolled_bytes`); without remat it reuses
        # its own residuals. The weights the backward needs are kept from the forward for every layer, as
        # stored, whatever the policy (XLA:CPU; assumed for GPU, which was not compiled here); XLA:TPU gathers
        # them again (v5e: 0.87-1.10 of XLA at d_model 1024, 4 and 8 layers).
        per_token = sum(unrolled_bytes(s, shape, policy, moe, dense_ragged) for moe in kinds)
        operands = max(unrolled_bytes(s, shape, "none", moe, dense_ragged) for moe in model_kinds)
        layers = gathered if s.platform == "tpu" else shape.n_layers * gathered_stored
        working = (operands * s.tokens if policy != "none" else 0.0) + layers
        activations = per_token * s.tokens + (casts if policy == "full" else 0.0)
        overlap = min(gradients, activations)
    else:
        # A partly unrolled loop's backward iteration holds its u layers' working sets at once.
        unroll = min(shape.scan_unroll, kept) if p.schedule is None else 1
        per_token = sum(layer_bytes(s, shape, policy, moe, dense_ragged) for moe in kinds)
        activations = per_token * s.tokens + casts + stash
        working = unroll * (widest * s.tokens + gathered)
    working += lookup_gathered + vocab_casts
    logits = logits_bytes(s, shape, step.seq_len) + head_gathered + vocab_casts
    if p.schedule is not None:  # the last stage's tick runs the loss and its layer group's backward together
        working, logits = working + shared_gathered + logits, 0.0
    return MemoryEstimate(
        params=params,
        optimizer=optimizer,
        gradients=gradients,
        batch=3 * 4 * s.rows * step.grad_accum * s.seq,
        activations=activations,
        working=working,
        logits=logits,
        overlap=overlap,
        loss_apart=loss_apart(p),
    )


def loss_apart(p: Placement) -> bool:
    """Whether the loss's logits phase ends before the first layer's backward begins, so that the step's peak is
    the larger of the two, not their sum. Read off compiled steps, not derived from XLA's scheduler:

    - XLA:TPU with the head trained, or with the loss in chunks (`model.logits_chunk`): apart. Llama 3 70B
      QLoRA on v5e:4x4 (seq 2048, chunks of 256): 1.02 of XLA with the larger, 1.26 with the sum; d_model
      1024 at 32k and 128k vocabularies on v5e:2x2: 1.10 and 1.10, where the sum reads 1.32 and 1.19.
    - XLA:TPU with a frozen head and the loss whole (LoRA of qwen3-8b and gemma3-12b on v5e:2x2, 2048
      tokens a chip): both held, 0.95-1.09 of XLA with the sum, 0.79-0.98 with the larger.
    - XLA:CPU: both held; its remat-full cases read 0.79-0.83 of XLA with the larger, 0.89-0.94 with the sum.
    """
    if p.local.platform == "cpu":
        return False
    head_trained = any(a.trainable and "vocab" in a.names for a in p.arrays)
    return head_trained or p.shape.logits_chunk > 0


@functools.lru_cache(maxsize=64)
def loop_iterations(kinds: tuple[LayerKind, ...]) -> int:
    """Iterations of the longest layer loop (jaxscale.models.transformer.run_stack) for layers of these kinds:
    an unroll of this many leaves no loop. Cached: the planner asks for every mesh and option it evaluates."""
    return max(seg.repeats for seg in segments(kinds))


def unrolled_whole(p: Placement) -> bool:
    """Whether no layer loop is left: `model.scan_unroll` at least the longest loop's iterations."""
    return p.schedule is None and p.shape.scan_unroll >= loop_iterations(p.shape.layer_kinds)


def keeps_gathered_layers(p: Placement) -> bool:
    """Whether the step keeps every layer's FSDP-gathered weights from forward to backward, gathering each
    once: with no loop between them XLA:CPU merges the backward's gather with the forward's, under any remat
    policy (measured; assumed for GPU). XLA:TPU gathers again (`estimate_memory`)."""
    return unrolled_whole(p) and p.local.platform != "tpu"


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


def logits_bytes(s: LocalSizes, shape: DecoderShape, seq_len: int) -> float:
    """The logits of one microbatch as the loss holds them, for the positions whose logits exist at once
    (`model.logits_chunk`).

    XLA:CPU holds the head's output in the compute dtype and two float32 arrays [B, L, V], the logits and their
    softmax's gradient (bf16 at a 32k vocabulary, 8 emulated devices: 1.13 of XLA, where three float32 arrays
    read 1.25). XLA:TPU fuses the softmax into the gradient, which it makes in the compute dtype for the matmuls
    that take it: its buffer assignment of a qwen3-8b and a gemma3-12b LoRA step (v5e:2x2) holds f32 [1, 2048,
    V] and bf16 [2048, V] and no other array of that size.
    """
    per_logit = F32 + s.act_bytes if s.platform == "tpu" else 2 * F32 + s.act_bytes
    return per_logit * s.tokens * s.vocab * _logits_share(shape.logits_chunk, seq_len)


def _logits_share(chunk: int, seq_len: int) -> float:
    """The share of a microbatch's positions whose logits exist at once (`model.logits_chunk`)."""
    return chunk / seq_len if chunk else 1.0
