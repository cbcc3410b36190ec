"""Mixture of experts: routing by hand, dropping and dropless agree, expert parallelism changes no numbers.

fp32 compute throughout. Tolerances: losses and routing statistics agree to 1e-5 (relative);
gradients to 1e-5 absolute plus 1e-4 relative (gradient entries are about 1e-3 to 1e-1; a token
sent to the wrong expert or a missed psum changes them by their own size). Layer outputs of
dropless and padded dispatch agree to 1e-5 absolute. Hand-computed routing figures are exact
up to float32 rounding (1e-6).
"""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_runner import run_cli
from flax import nnx
from jax.sharding import NamedSharding

from jaxscale.config import load_config
from jaxscale.errors import UserError
from jaxscale.mesh import build_mesh
from jaxscale.models import expert_parallel
from jaxscale.models.flops import matmul_params
from jaxscale.models.moe import MoE, MoEShape, route
from jaxscale.models.ragged_dispatch import emulated_ragged_all_to_all
from jaxscale.models.transformer import Decoder, decoder_shape
from jaxscale.sharding import logical_to_spec, make_rules, tree_shardings, use_rules
from jaxscale.training.setup import setup_run
from jaxscale.training.step import train_objective

# Two layers, moe_every=2: one dense block, then one MoE block with a shared expert. Capacity
# factor 1.25 (10 slots per expert per sequence of 16) drops a few tokens, so dropping is compared too.
TINY = [
    "model.preset=tiny-moe",
    "model.compute_dtype=float32",
    "model.n_layers=2",
    "model.moe_every=2",
    "model.num_shared_experts=1",
    "model.d_model=32",
    "model.d_ff=32",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.head_dim=8",
    "train.global_batch=8",
    "train.seq_len=16",
]
LAYOUTS = {
    "expert4": (["mesh.expert=4", "mesh.fsdp=1"], 4),
    "expert2_fsdp2_tensor2": (["mesh.expert=2", "mesh.fsdp=2", "mesh.tensor=2"], 8),
    "data2_expert4": (["mesh.data=2", "mesh.expert=4", "mesh.fsdp=1"], 8),
}


def random_batch(global_batch: int = 8, seq_len: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 257, (global_batch, seq_len + 1)).astype(np.int32)
    mask = (rng.random((global_batch, seq_len)) > 0.1).astype(np.float32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask}


@pytest.fixture(scope="module")
def tiny_model() -> tuple[nnx.GraphDef, nnx.State]:
    """Initialized once on the host; every layout gets these same parameters, resharded."""
    shape = decoder_shape(load_config(None, TINY).model, 257)
    return nnx.split(Decoder(shape, nnx.Rngs(params=0)))


def metrics_and_grads(tiny_model, overrides: list[str], devices: list[jax.Device]) -> tuple[dict, list[np.ndarray]]:
    """Mean token loss, MoE scalars and the gradient of the training objective, on the mesh `overrides` names."""
    graphdef, state = tiny_model
    cfg = load_config(None, TINY + overrides)
    mesh = build_mesh(cfg.mesh, devices)
    # Sequence parallelism as a run has it by default (parallel.sequence_parallel=auto): on the tensor=2 layout.
    rules = make_rules(cfg.mesh.strategy, cfg.mesh.rules, sequence_parallel=cfg.mesh.tensor > 1)
    state = jax.device_put(state, tree_shardings(state, nnx.get_partition_spec(state), rules, mesh))
    batch_sharding = NamedSharding(mesh, logical_to_spec(("batch", "seq"), (8, 1), rules, mesh))

    def grads_of(state: nnx.State, batch: dict) -> tuple[dict, nnx.State]:
        with use_rules(rules, mesh):
            model_def, params, rest = nnx.split(nnx.merge(graphdef, state), nnx.Param, ...)

            def objective(p: nnx.State) -> tuple[jax.Array, dict]:
                total, (loss_sum, count, aux) = train_objective(nnx.merge(model_def, p, rest), batch)
                return total / count, aux | {"loss": loss_sum / count}

            grads, metrics = jax.grad(objective, has_aux=True)(params)
            return metrics, grads

    metrics, grads = jax.jit(grads_of)(state, jax.device_put(random_batch(), batch_sharding))
    return jax.device_get(metrics), jax.device_get(jax.tree.leaves(grads))


@pytest.fixture(scope="module")
def single_device(tiny_model):
    return metrics_and_grads(tiny_model, ["mesh.fsdp=1"], jax.devices()[:1])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_expert_parallel_mesh_matches_single_device(layout, tiny_model, single_device):
    overrides, num_devices = LAYOUTS[layout]
    metrics, grads = metrics_and_grads(tiny_model, overrides, jax.devices()[:num_devices])
    ref_metrics, ref_grads = single_device
    assert metrics.keys() == ref_metrics.keys()
    for key in ref_metrics:
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
    assert ref_metrics["moe_dropped_fraction"] > 0  # the dropping path was taken
    for got, want in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


# Dropless routing with tokens sent to the split experts in exact counts (emulated on CPU).
RAGGED = ["model.capacity_factor=0", "model.expert_exchange=ragged"]


@pytest.fixture(scope="module")
def ragged_model() -> tuple[nnx.GraphDef, nnx.State]:
    shape = decoder_shape(load_config(None, TINY + RAGGED).model, 257)
    return nnx.split(Decoder(shape, nnx.Rngs(params=0)))


@pytest.fixture()
def ragged_exchanges(monkeypatch) -> list[int]:
    """Counts the ragged exchanges traced, so a test knows the ragged path ran (not the padded one)."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return emulated_ragged_all_to_all(*args, **kwargs)

    monkeypatch.setattr(expert_parallel, "emulated_ragged_all_to_all", counted)
    return calls


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ragged_exchange_matches_single_device(layout, ragged_model, ragged_exchanges):
    """Exact-count dispatch over split experts gives one device's grouped-matmul loss and gradients."""
    overrides, num_devices = LAYOUTS[layout]
    ref_metrics, ref_grads = metrics_and_grads(ragged_model, RAGGED + ["mesh.fsdp=1"], jax.devices()[:1])
    assert not ragged_exchanges  # one device: every expert is local, no exchange
    metrics, grads = metrics_and_grads(ragged_model, RAGGED + overrides, jax.devices()[:num_devices])
    assert ragged_exchanges  # the ragged path was traced (twice per MoE layer: there and back)
    assert ref_metrics["moe_dropped_fraction"] == 0.0
    for key in ref_metrics:
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
    for got, want in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layout", ["expert2_fsdp2_tensor2", "data2_expert4"])
def test_overflowing_one_share_buffer_gives_the_unsplit_loss_and_gradients(layout, ragged_model, ragged_exchanges):
    """A zero router sends every token to experts 0 and 1: on expert=2 both live on shard 0, which is sent twice
    its share; on expert=4 each of two shards is sent twice its share. With model.ragged_buffer=1 every expert
    group falls back to the worst-case buffer, and the loss and every gradient are one device's (unsplit
    grouped matmuls), nothing dropped."""
    graphdef, state = ragged_model
    tied = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if "router" in jax.tree_util.keystr(path) else x, state
    )
    ref_metrics, ref_grads = metrics_and_grads((graphdef, tied), RAGGED + ["mesh.fsdp=1"], jax.devices()[:1])
    sized = RAGGED + ["model.ragged_buffer=1"]
    sized_def = nnx.split(Decoder(decoder_shape(load_config(None, TINY + sized).model, 257), nnx.Rngs(params=0)))[0]
    overrides, num_devices = LAYOUTS[layout]
    metrics, grads = metrics_and_grads((sized_def, tied), sized + overrides, jax.devices()[:num_devices])
    assert ragged_exchanges
    assert metrics["moe_ragged_fallback"] == 1.0 and ref_metrics["moe_ragged_fallback"] == 0.0
    assert metrics["moe_dropped_fraction"] == 0.0
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def layer_on_expert_mesh(layer: MoE, x_BLD: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(output, input gradient, the layer's routing statistics) of `layer` on expert=2 x fsdp=2 x tensor=2."""
    cfg = load_config(None, TINY + RAGGED + ["mesh.expert=2", "mesh.fsdp=2", "mesh.tensor=2"])
    mesh, rules = build_mesh(cfg.mesh, jax.devices()), make_rules(cfg.mesh.strategy, cfg.mesh.rules)

    def summed(x: jax.Array) -> jax.Array:
        with use_rules(rules, mesh):
            return jnp.sum(jnp.sin(layer(x)[0]))

    def layer_and_grad(x: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        with use_rules(rules, mesh):
            y, stats = layer(x)
            return y, jax.grad(summed)(x), stats

    return jax.jit(layer_and_grad)(x_BLD)


@pytest.mark.slow  # 20-45 s on 2 busy cores; the default suite outgrew 15 min (sequence parallelism compiles slower)
def test_ragged_exchange_holds_every_token_routed_to_one_shard(ragged_exchanges):
    """A zero router ties every expert, so every token picks experts 0 and 1, both on expert shard 0 of 2:
    shard 0 receives all n * A rows, the whole worst-case buffer, and shard 1 none. Nothing is dropped."""
    shape = MoEShape(d_model=16, d_ff=24, num_experts=4, experts_per_token=2, expert_exchange="ragged")
    layer = MoE(shape, nnx.Rngs(params=0))
    layer.router[...] = jnp.zeros_like(layer.router[...])
    x_BLD = jax.random.normal(jax.random.key(3), (8, 6, 16))
    y, g, stats = layer_on_expert_mesh(layer, x_BLD)
    assert ragged_exchanges
    want_y, want_g = layer_output_and_grad(moe_layer(capacity_factor=0.0, router_zero=True), x_BLD)
    np.testing.assert_allclose(y, reference_moe(layer, x_BLD), atol=1e-5)
    np.testing.assert_allclose(y, want_y, atol=1e-5)
    np.testing.assert_allclose(g, want_g, atol=1e-5)
    assert float(stats["dropped_fraction"]) == 0.0 and float(stats["ragged_fallback"]) == 0.0


def test_ragged_buffer_of_one_share_falls_back_to_the_worst_case_and_stays_exact(ragged_exchanges):
    """The same routing with model.ragged_buffer=1: shard 0's buffer holds A rows of the 2 * A sent to it, so
    every expert group's dispatch runs again with the worst-case buffer, forward and backward. The output
    and input gradient are the unsplit grouped layer's (the output also the token-by-token reference's);
    nothing is dropped, and the layer says it fell back."""
    shape = MoEShape(16, 24, num_experts=4, experts_per_token=2, expert_exchange="ragged", ragged_buffer=1.0)
    layer = MoE(shape, nnx.Rngs(params=0))
    layer.router[...] = jnp.zeros_like(layer.router[...])
    x_BLD = jax.random.normal(jax.random.key(3), (8, 6, 16))
    y, g, stats = layer_on_expert_mesh(layer, x_BLD)
    assert ragged_exchanges
    want_y, want_g = layer_output_and_grad(moe_layer(capacity_factor=0.0, router_zero=True), x_BLD)
    np.testing.assert_allclose(y, reference_moe(layer, x_BLD), atol=1e-5)
    np.testing.assert_allclose(y, want_y, atol=1e-5)
    np.testing.assert_allclose(g, want_g, atol=1e-5)
    assert float(stats["dropped_fraction"]) == 0.0 and float(stats["ragged_fallback"]) == 1.0


@pytest.mark.parametrize("factor, fallback", [(1.5, 0.0), (1.0, 1.0)])
def test_ragged_buffer_falls_back_only_where_the_routing_overflows_it(factor, fallback, ragged_exchanges):
    """A random router on 8 rows of 6 tokens: each expert group (2 devices of 2 rows, A = 24 assignments
    each) sends its two shards 22 and 26 rows, and 27 and 21. A buffer of 1.5 shares (36 rows) holds
    them: the sized dispatch alone runs. One share (24 rows) does not, in either group: both run again
    with the worst-case buffer. Either way the output is the reference's."""
    shape = MoEShape(16, 24, num_experts=4, experts_per_token=2, expert_exchange="ragged", ragged_buffer=factor)
    layer = MoE(shape, nnx.Rngs(params=0))
    x_BLD = jax.random.normal(jax.random.key(3), (8, 6, 16))
    y, _, stats = layer_on_expert_mesh(layer, x_BLD)
    np.testing.assert_allclose(y, reference_moe(layer, x_BLD), atol=1e-5)
    assert float(stats["ragged_fallback"]) == fallback and float(stats["dropped_fraction"]) == 0.0


def test_emulated_ragged_all_to_all_gives_the_documented_result():
    """The example of `lax.ragged_all_to_all`'s documentation, on 2 devices: the emulation's result."""
    operand = np.array([[1, 2, 2], [3, 4, 0]], np.float32)
    output = np.zeros((2, 4), np.float32)
    input_offsets = np.array([[0, 1], [0, 1]], np.int32)
    send_sizes = np.array([[1, 2], [1, 1]], np.int32)
    output_offsets = np.array([[0, 0], [1, 2]], np.int32)
    recv_sizes = np.array([[1, 1], [2, 1]], np.int32)
    mesh = jax.make_mesh((2,), ("x",), devices=jax.devices()[:2], axis_types=(jax.sharding.AxisType.Auto,))
    split = jax.sharding.PartitionSpec("x")

    def each_device(*args):
        return emulated_ragged_all_to_all(*(a[0] for a in args), axis_name="x")[None]

    result = jax.jit(jax.shard_map(each_device, mesh=mesh, in_specs=(split,) * 6, out_specs=split))(
        operand, output, input_offsets, send_sizes, output_offsets, recv_sizes
    )
    np.testing.assert_array_equal(result, [[1, 3, 0, 0], [2, 2, 4, 0]])


@pytest.mark.parametrize(
    "exchange, platform, dropless, chosen",
    [
        ("auto", "tpu", True, "ragged"),
        ("auto", "gpu", True, "ragged"),
        ("auto", "cpu", True, "padded"),  # XLA:CPU can only emulate the ragged exchange
        ("auto", "tpu", False, "padded"),  # capacity routing fills fixed buffers anyway
        ("padded", "tpu", True, "padded"),
        ("ragged", "cpu", True, "ragged"),
    ],
)
def test_expert_exchange_auto_picks_by_platform_and_routing(exchange, platform, dropless, chosen):
    assert expert_parallel.resolve_exchange(exchange, platform, dropless) == chosen


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model.expert_exchange=ragged", "model.capacity_factor=1.25"],
            "model.expert_exchange=ragged sends exactly the routed tokens, which is dropless routing",
        ),
        (["model.expert_exchange=exact"], "model.expert_exchange='exact' is not one of auto, padded, ragged"),
    ],
)
def test_bad_expert_exchange_says_what_to_change(overrides, message):
    cfg = load_config(None, ["model.preset=tiny-moe", "mesh.expert=4", "mesh.data=2", *overrides])
    with pytest.raises(UserError) as err:
        setup_run(cfg, jax.devices(), tokenizer_vocab=257)
    assert message in str(err.value)


def reference_moe(layer: MoE, x_BLD: jax.Array) -> jax.Array:
    """Token by token: the sum over kept assignments of weight x SwiGLU of that expert. No buffers, no sorting."""
    logits_BLE = jnp.einsum("bld,de->ble", x_BLD, layer.router[...])
    r = route(logits_BLE, layer.s.experts_per_token, layer.s.capacity(x_BLD.shape[1]))
    kept_BLK = (r.slots_BLK < layer.s.capacity(x_BLD.shape[1])).astype(x_BLD.dtype)
    wg, wu, wd = (w[...][r.experts_BLK] for w in (layer.w_gate, layer.w_up, layer.w_down))  # [B, L, K, ...]
    h_BLKF = jax.nn.silu(jnp.einsum("bld,blkdf->blkf", x_BLD, wg)) * jnp.einsum("bld,blkdf->blkf", x_BLD, wu)
    out_BLKD = jnp.einsum("blkf,blkfd->blkd", h_BLKF, wd)
    return jnp.einsum("blkd,blk->bld", out_BLKD, r.weights_BLK * kept_BLK)


def moe_layer(capacity_factor: float, router_zero: bool = False) -> MoE:
    shape = MoEShape(d_model=16, d_ff=24, num_experts=4, experts_per_token=2, capacity_factor=capacity_factor)
    layer = MoE(shape, nnx.Rngs(params=0))  # the same seed: the same weights whatever the capacity
    if router_zero:
        layer.router[...] = jnp.zeros_like(layer.router[...])
    return layer


def layer_output_and_grad(layer: MoE, x_BLD: jax.Array) -> tuple[jax.Array, jax.Array]:
    def summed(x: jax.Array) -> jax.Array:
        return jnp.sum(jnp.sin(layer(x)[0]))  # a loss that weighs every output entry differently

    return jax.jit(lambda x: (layer(x)[0], jax.grad(summed)(x)))(x_BLD)


def test_dropless_equals_dropping_mode_with_capacity_that_drops_nothing():
    """Dropless (sorted grouped matmul) equals capacity-padded dispatch when the capacity holds every token."""
    x_BLD = jax.random.normal(jax.random.key(1), (3, 12, 16))
    dropless = moe_layer(capacity_factor=0.0)
    roomy = moe_layer(capacity_factor=2.0)  # E / K: capacity = sequence length
    assert roomy.s.capacity(12) == 12
    y_dropless, g_dropless = layer_output_and_grad(dropless, x_BLD)
    y_roomy, g_roomy = layer_output_and_grad(roomy, x_BLD)
    np.testing.assert_allclose(y_dropless, y_roomy, atol=1e-5)
    np.testing.assert_allclose(g_dropless, g_roomy, atol=1e-5)
    np.testing.assert_allclose(y_dropless, reference_moe(dropless, x_BLD), atol=1e-5)
    assert float(dropless(x_BLD)[1]["dropped_fraction"]) == 0.0


def test_small_capacity_drops_the_hand_computed_assignments():
    """4 tokens, top-2 of 2 experts, capacity ceil(0.5 * 4 * 2 / 2) = 2 slots per expert.

    First choices (0, 0, 1, 0) fill expert 0 in token order: t0, t1 kept, t3 dropped; t2 takes
    expert 1's slot 0. Second choices (1, 1, 0, 1) come after: t0 takes expert 1's slot 1, then
    expert 1 is full (t1, t3 dropped) and expert 0 is full (t2 dropped). 4 of 8 assignments drop.
    """
    first = np.array([0, 0, 1, 0])
    logits_BLE = jnp.asarray(np.where(np.arange(2) == first[:, None], 1.0, 0.0)[None], jnp.float32)
    shape = MoEShape(d_model=8, d_ff=8, num_experts=2, experts_per_token=2, capacity_factor=0.5)
    assert shape.capacity(4) == 2
    r = route(logits_BLE, 2, shape.capacity(4))
    np.testing.assert_array_equal(r.experts_BLK[0], [[0, 1], [0, 1], [1, 0], [0, 1]])
    np.testing.assert_array_equal(r.slots_BLK[0], [[0, 1], [1, 2], [0, 3], [2, 3]])
    assert float(r.dropped_fraction) == 0.5

    # The layer itself: a dropped assignment adds nothing, a kept one its weighted expert output.
    layer = MoE(shape, nnx.Rngs(params=0))
    x_BLD = jax.random.normal(jax.random.key(2), (1, 4, 8))
    layer.router[...] = jnp.linalg.pinv(x_BLD[0]) @ logits_BLE[0]  # makes the router's logits the ones above
    np.testing.assert_allclose(layer(x_BLD)[0], reference_moe(layer, x_BLD), atol=1e-5)
    assert float(layer(x_BLD)[1]["dropped_fraction"]) == 0.5


def test_load_balancing_and_z_losses_match_their_formulas():
    """Top-1 of 2 experts; both tokens pick expert 0 with probabilities (0.7, 0.3) and (0.6, 0.4).

    f = (1, 0), P = (0.65, 0.35): aux = E * sum f * P = 2 * 0.65 = 1.3.
    Logits log p + c have logsumexp c; with c = 1, 2: z = (1 + 4) / 2 = 2.5.
    Tokens per expert (2, 0): imbalance max / mean = 2.
    """
    probs = np.array([[0.7, 0.3], [0.6, 0.4]])
    logits_BLE = jnp.asarray(np.log(probs) + np.array([[1.0], [2.0]]), jnp.float32)[None]
    r = route(logits_BLE, 1, capacity=2)
    np.testing.assert_allclose(float(r.aux_loss), 1.3, rtol=1e-6)
    np.testing.assert_allclose(float(r.z_loss), 2.5, rtol=1e-6)
    np.testing.assert_array_equal(r.load_E, [2.0, 0.0])
    np.testing.assert_allclose(r.weights_BLK[0, :, 0], [0.7, 0.6], rtol=1e-6)  # k = 1: raw probabilities


def test_flops_count_only_the_active_experts():
    """Doubling the experts adds only router FLOPs; each MoE layer costs k expert MLPs."""
    shape = decoder_shape(load_config(None, ["model.preset=tiny-moe"]).model, 256)
    wider = decoder_shape(load_config(None, ["model.preset=tiny-moe", "model.num_experts=8"]).model, 256)
    dense = decoder_shape(load_config(None, ["model.preset=tiny-moe", "model.num_experts=0"]).model, 256)
    mlp = 3 * shape.d_model * shape.d_ff
    router = shape.d_model * shape.num_experts
    assert matmul_params(wider) - matmul_params(shape) == shape.n_layers * router
    assert matmul_params(shape) - matmul_params(dense) == shape.n_layers * (router + mlp)  # k = 2: one more MLP


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.experts_per_token=5"], "model.experts_per_token=5 must be between 1 and model.num_experts=4"),
        (["model.moe_every=3"], "model.moe_every=3 must be at least 1 and divide model.n_layers=4"),
        (["model.num_experts=0", "model.num_shared_experts=1"], "needs routed experts; set model.num_experts > 0"),
        (["model.capacity_factor=-1"], "must not be negative (capacity_factor=0 means dropless)"),
        (["model.ragged_buffer=0.5"], "model.ragged_buffer=0.5 must be 0 (worst-case buffers, never drops) or at"),
    ],
)
def test_bad_moe_config_says_what_to_change(overrides, message):
    with pytest.raises(UserError) as err:
        load_config(None, ["model.preset=tiny-moe", *overrides])
    assert message in str(err.value)


def test_experts_not_dividing_the_expert_axis_says_what_to_change():
    cfg = load_config(None, ["model.preset=tiny-moe", "model.num_experts=6", "mesh.expert=4", "mesh.data=2"])
    with pytest.raises(UserError) as err:  # refused by the run setup, before anything is traced
        setup_run(cfg, jax.devices(), tokenizer_vocab=257)
    assert "model.num_experts=6 does not split over the 4 expert shards (mesh.expert=4)" in str(err.value)
    assert "multiple of 4" in str(err.value)


def test_capacity_is_per_sequence_and_never_above_its_length():
    shape = MoEShape(d_model=8, d_ff=8, num_experts=8, experts_per_token=2, capacity_factor=1.25)
    assert shape.capacity(128) == math.ceil(1.25 * 128 * 2 / 8) == 40
    assert MoEShape(8, 8, 2, 2, capacity_factor=4.0).capacity(16) == 16


@pytest.mark.slow
def test_tiny_moe_run_trains_on_expert_mesh_and_logs_balance(tmp_path):
    """configs/tiny_moe.yaml (data=2 x expert=4 on 8 devices), shortened: loss falls, MoE figures are logged."""
    result = run_cli(
        "train",
        "configs/tiny_moe.yaml",
        f"run.dir={tmp_path}",
        "train.steps=20",
        "train.seq_len=32",
        "log.every=5",
        "log.progress=false",
        "train.eval_every=20",
        "train.eval_batches=1",
        "checkpoint.every=0",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "'expert': 4" in result.stdout
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    for row in train_rows:
        assert row["moe_imbalance"] >= 1.0 and 0.0 <= row["moe_dropped_fraction"] < 1.0
        assert {"moe_aux_loss", "moe_z_loss", "moe_imbalance_worst", "moe_loss"} <= row.keys()


@pytest.mark.slow
def test_sized_ragged_buffer_run_is_dropless_and_logs_how_often_it_fell_back(tmp_path):
    """configs/tiny_moe.yaml dropless through the ragged exchange with one-share buffers: the router at init
    sends some expert shard more than its share in every step, so each step falls back somewhere, drops
    nothing, and the log counts the steps that fell back."""
    result = run_cli(
        "train",
        "configs/tiny_moe.yaml",
        f"run.dir={tmp_path}",
        *RAGGED,
        "model.ragged_buffer=1",
        "train.steps=3",
        "train.seq_len=32",
        "log.every=1",
        "log.progress=false",
        "train.eval_every=0",
        "checkpoint.every=0",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    fell_back = 0
    for row in train_rows:
        assert row["moe_dropped_fraction"] == 0.0 and math.isfinite(row["loss"])
        fell_back += row["moe_ragged_fallback"] > 0
        assert row["moe_ragged_fallback_steps"] == fell_back
    assert fell_back == 3


def numpy_moe(x_BLD: np.ndarray, router_DE: np.ndarray, w_gate, w_up, w_down, k: int, weights: str, act: str):
    """Every token through its top-k experts in float64, as transformers' Qwen3MoeSparseMoeBlock computes it:
    softmax, top-k, renormalized where `weights` is normalized (norm_topk_prob), a GeGLU or SwiGLU expert."""
    x, logits = x_BLD.astype(np.float64), x_BLD.astype(np.float64) @ router_DE
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1, kind="stable")[..., :k]
    chosen = np.take_along_axis(probs, top, axis=-1)
    if weights == "normalized":
        chosen /= chosen.sum(-1, keepdims=True)
    if act == "gelu_tanh":
        activation = lambda a: 0.5 * a * (1 + np.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a**3)))  # noqa: E731
    else:
        activation = lambda a: a / (1 + np.exp(-a))  # noqa: E731
    out = np.zeros_like(x)
    for e in range(router_DE.shape[1]):
        y = (activation(x @ w_gate[e]) * (x @ w_up[e])) @ w_down[e]
        out += np.sum(np.where(top == e, chosen, 0.0), -1, keepdims=True) * y
    return out


@pytest.mark.parametrize("exchange", ["grouped", "padded", "ragged"])
@pytest.mark.parametrize("weights, activation", [("raw", "gelu_tanh"), ("normalized", "silu")])
def test_router_weights_and_activation_on_every_dispatch_path(exchange, weights, activation, ragged_exchanges):
    """Qwen3-MoE's routing (top-4 of 8, raw or renormalized weights) with GeGLU or SwiGLU experts, dropless:
    one device's grouped matmuls, and on expert=2 x fsdp=2 x tensor=2 padded buffers or the ragged exchange,
    each equal to a float64 numpy forward."""
    shape = MoEShape(16, 24, 8, 4, expert_exchange="ragged" if exchange == "ragged" else "padded")
    shape = dataclasses.replace(shape, router_weights=weights, activation=activation)
    layer = MoE(shape, nnx.Rngs(params=0))
    x_BLD = jax.random.normal(jax.random.key(5), (8, 6, 16))
    y = layer(x_BLD)[0] if exchange == "grouped" else layer_on_expert_mesh(layer, x_BLD)[0]
    params = [np.asarray(w[...], np.float64) for w in (layer.router, layer.w_gate, layer.w_up, layer.w_down)]
    want = numpy_moe(np.asarray(x_BLD), *params, 4, weights, activation)
    np.testing.assert_allclose(np.asarray(y), want, atol=1e-5)
    assert bool(ragged_exchanges) == (exchange == "ragged")
