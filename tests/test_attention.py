"""Attention implementations: splash (Pallas, interpret mode on CPU) against XLA's, sharded, masks included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxscale.config import MeshConfig, load_config
from jaxscale.errors import UserError
from jaxscale.mesh import build_mesh
from jaxscale.models.attention import attend, check, resolve
from jaxscale.models.causal_blocks import causal_attention, query_blocks
from jaxscale.sharding import make_rules, use_rules
from jaxscale.training.setup import setup_run

B, L, H = 4, 256, 32  # two splash tiles of 128 per sequence
POSITIONS = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))  # read only where the context axis splits rows
TOLERANCE = 1e-5  # relative, fp32: the kernel sums the softmax blockwise, XLA in one pass


def _inputs(n_heads: int, n_kv: int, documents: bool) -> tuple[jax.Array, ...]:
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(B, L, n, H)), jnp.float32) for n in (n_heads, n_kv, n_kv))
    if not documents:
        return q, k, v, None
    # Rows cut into documents at different places; one row is a single document.
    cuts = [[100], [30, 129, 200], [255], []]
    segments = np.stack([np.searchsorted(np.asarray(c, int), np.arange(L), side="right") for c in cuts])
    return q, k, v, jnp.asarray(segments, jnp.int32)


def _relative(a: jax.Array, b: jax.Array) -> float:
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize(
    "n_heads, n_kv, documents",
    [(4, 2, True), (4, 2, False), (4, 1, True)],
    ids=["gqa_documents", "gqa_causal_only", "kv_heads_replicated_over_tensor"],
)
def test_splash_equals_xla_on_a_mesh_loss_and_gradients(n_heads, n_kv, documents):
    """data=2 fsdp=2 tensor=2: splash runs per device under shard_map; outputs and gradients equal XLA's."""
    q, k, v, segments = _inputs(n_heads, n_kv, documents)
    mesh = build_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    rules = make_rules("fsdp_tp", {})

    def loss(implementation: str):
        def f(q, k, v):
            with use_rules(rules, mesh):
                out = attend(q, k, v, segments, POSITIONS, implementation, "float32")
            return jnp.sum(jnp.sin(out)), out

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (_, splash_out), splash_grads = loss("splash")
    (_, xla_out), xla_grads = loss("xla")
    assert _relative(splash_out, xla_out) < TOLERANCE
    for name, a, b in zip("qkv", splash_grads, xla_grads, strict=True):
        assert _relative(a, b) < TOLERANCE, name


@pytest.mark.parametrize(
    "length, window, documents",
    [(384, 0, True), (384, 150, True), (256, 0, False), (1000, 0, True)],
    ids=["three_blocks_documents", "window", "two_blocks_causal_only", "uneven_blocks"],
)
def test_causal_blocks_give_the_whole_squares_outputs_and_gradients(length, window, documents):
    """XLA's attention over query blocks (the keys above the diagonal never scored) equals one call of
    jax.nn.dot_product_attention over the whole masked square, outputs and q/k/v gradients, sharded on
    data=2 fsdp=2 tensor=2 (fp32: the same softmax summed in another order)."""
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.normal(size=(B, length, n, H)), jnp.float32) for n in (4, 2, 2))
    segments = jnp.asarray(np.cumsum(rng.random((B, length)) < 0.01, axis=1), jnp.int32) if documents else None
    mesh = build_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    rules = make_rules("fsdp_tp", {})

    def whole(q, k, v):
        mask = None if segments is None else segments[:, None, :, None] == segments[:, None, None, :]
        local = (window - 1, 0) if window else None
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, local_window_size=local)

    def loss(attention):
        def f(q, k, v):
            with use_rules(rules, mesh):
                out = attention(q, k, v)
            return jnp.sum(jnp.sin(out)), out

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    assert len(query_blocks(length)) == length // 128
    (_, blocked_out), blocked_grads = loss(lambda q, k, v: causal_attention(q, k, v, segments, window))
    (_, whole_out), whole_grads = loss(whole)
    assert _relative(blocked_out, whole_out) < 1e-6
    for name, a, b in zip("qkv", blocked_grads, whole_grads, strict=True):
        assert _relative(a, b) < 1e-6, name


def test_query_blocks_cover_the_sequence_once():
    """Blocks of at least 128 queries, at most 8 of them, in order, each query in exactly one."""
    assert query_blocks(100) == [(0, 100)]
    assert query_blocks(256) == [(0, 128), (128, 256)]
    assert query_blocks(1000) == [(i * 1000 // 7, (i + 1) * 1000 // 7) for i in range(7)]
    assert len(query_blocks(32768)) == 8 and query_blocks(32768)[-1][1] == 32768


def _numpy_attention(q, k, v, segments, window: int, scale: float, softcap: float) -> np.ndarray:
    """float64 attention as transformers' eager attention with a sliding-window causal mask computes it."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scores = np.einsum("blnh,bmnh->bnlm", q, k) * scale
    if softcap:
        scores = softcap * np.tanh(scores / softcap)
    i, j = np.arange(L)[:, None], np.arange(L)[None, :]
    visible = (j <= i) & ((i - j < window) if window else True)
    visible = visible & (np.asarray(segments)[:, None, :, None] == np.asarray(segments)[:, None, None, :])
    scores = np.where(visible, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bnlm,bmnh->blnh", probs, v)


@pytest.mark.parametrize("window, softcap", [(100, 0.0), (0, 3.0), (37, 3.0)], ids=["window", "softcap", "both"])
def test_local_window_and_soft_cap_in_splash_and_xla(window, softcap):
    """A sliding window (query i sees keys i - w + 1 .. i), a logit scale other than 1/sqrt(H) and soft-capped
    logits: XLA's attention equals a float64 numpy one, and splash (sharded on data=2 fsdp=2 tensor=2) XLA's,
    outputs and gradients, with documents packed."""
    q, k, v, segments = _inputs(4, 2, documents=True)
    mesh = build_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    rules = make_rules("fsdp_tp", {})
    options = {"window": window, "scale": 0.1, "softcap": softcap}

    def loss(implementation: str):
        def f(q, k, v):
            with use_rules(rules, mesh):
                out = attend(q, k, v, segments, POSITIONS, implementation, "float32", **options)
            return jnp.sum(jnp.sin(out)), out

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (_, splash_out), splash_grads = loss("splash")
    (_, xla_out), xla_grads = loss("xla")
    want = _numpy_attention(q, k, v, segments, window, 0.1, softcap)
    assert float(np.max(np.abs(np.asarray(xla_out) - want)) / np.max(np.abs(want))) < TOLERANCE
    assert _relative(splash_out, xla_out) < TOLERANCE
    for name, a, b in zip("qkv", splash_grads, xla_grads, strict=True):
        assert _relative(a, b) < TOLERANCE, name


def test_splash_documents_mask_is_applied():
    """The same inputs without segment ids give other outputs: the document mask is not ignored."""
    q, k, v, segments = _inputs(4, 2, documents=True)
    with_documents = attend(q, k, v, segments, POSITIONS, "splash", "float32")
    assert _relative(with_documents, attend(q, k, v, segments, POSITIONS, "xla", "float32")) < TOLERANCE
    assert _relative(with_documents, attend(q, k, v, None, POSITIONS, "xla", "float32")) > 0.1


def _batch(setup, rows: int) -> dict[str, jax.Array]:
    """`rows` random sequences of 128 tokens, four documents of 32 in each."""
    tokens = np.random.default_rng(1).integers(0, 257, size=(rows, 128), dtype=np.int32)
    batch = {
        "inputs": tokens,
        "targets": np.roll(tokens, -1, axis=1),
        "loss_mask": np.ones((rows, 128), np.float32),
        "segment_ids": np.repeat(np.arange(4, dtype=np.int32), 32)[None].repeat(rows, axis=0),
        "positions": np.tile(np.arange(32, dtype=np.int32), 4)[None].repeat(rows, axis=0),
    }
    return {key: jax.device_put(x, setup.batch_sharding) for key, x in batch.items()}


def _setup(implementation: str, *overrides: str):
    common = ["train.seq_len=128", "model.compute_dtype=float32", "train.global_batch=8"]
    cfg = load_config("configs/tiny.yaml", [*common, *overrides, f"model.attention={implementation}"])
    return setup_run(cfg, tokenizer_vocab=257)


def test_a_model_with_splash_attention_has_xla_attentions_loss():
    """The tiny model's held-out loss on one batch, sharded on 8 devices, is the same with either kernel."""
    losses = {}
    for implementation in ("splash", "xla"):
        setup = _setup(implementation)
        total, count = setup.eval_step()(setup.init_state(), _batch(setup, 8))
        losses[implementation] = float(total) / float(count)
    assert losses["splash"] == pytest.approx(losses["xla"], rel=TOLERANCE)


@pytest.mark.slow
def test_splash_inside_pipeline_stages_trains_as_xla():
    """pipeline=2 fsdp=2 tensor=2: splash's shard_map nests in the stages' own; one step's loss and grad norm match."""
    metrics = {}
    for implementation in ("splash", "xla"):
        setup = _setup(implementation, "mesh.pipeline=2", "mesh.data=1", "train.grad_accum=2")
        _, step_metrics = setup.train_step()(setup.init_state(), _batch(setup, 8))
        metrics[implementation] = (float(step_metrics["loss"]), float(step_metrics["grad_norm"]))
    assert metrics["splash"] == pytest.approx(metrics["xla"], rel=TOLERANCE)


@pytest.mark.parametrize(
    "platform, dtype, chosen",
    [
        ("tpu", "bfloat16", "splash"),
        ("gpu", "bfloat16", "cudnn"),
        ("gpu", "float32", "xla"),
        ("cpu", "bfloat16", "xla"),
    ],
)
def test_auto_picks_the_fused_kernel_of_the_platform(platform, dtype, chosen):
    assert resolve("auto", platform, dtype) == chosen


@pytest.mark.parametrize(
    "setting, platform, dtype, seq_len, message",
    [
        ("flash", "cpu", "float32", 128, "model.attention='flash' is not one of auto, xla, cudnn, splash"),
        ("cudnn", "cpu", "bfloat16", 128, "model.attention=cudnn runs on NVIDIA GPUs, and this run's devices are cpu"),
        ("cudnn", "gpu", "float32", 128, "computes in bfloat16 or float16, not float32; set model.compute_dtype"),
        ("splash", "tpu", "bfloat16", 200, "train.seq_len=200 is not a multiple of 128; round train.seq_len up"),
        ("cudnn", "gpu", "bfloat16", 128, "cuDNN's flash attention cannot soft-cap the logits (model.attn_softcap"),
    ],
)
def test_attention_settings_that_cannot_run_are_refused(setting, platform, dtype, seq_len, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check(setting, platform, dtype, seq_len, softcap=50.0 if "soft-cap" in message else 0.0)


def test_auto_leaves_cudnn_for_xla_when_logits_are_soft_capped():
    assert resolve("auto", "gpu", "bfloat16", softcap=50.0) == "xla"
    assert resolve("auto", "tpu", "bfloat16", softcap=50.0) == "splash"  # splash caps them itself
