"""LoRA and QLoRA: a frozen base, adapters trained on any mesh, adapter dropout, NF4 / int8 storage, and their
refusals."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from cli_runner import run_cli
from flax import nnx

import jaxscale
from jaxscale.checkpoint import Checkpointer
from jaxscale.checkpoint.manager import checksums_json, fingerprint
from jaxscale.config import CheckpointConfig, load_config
from jaxscale.errors import UserError
from jaxscale.hardware import ACCELERATORS, Cluster
from jaxscale.hf.export import export_hf
from jaxscale.mesh import AXES
from jaxscale.models import lora
from jaxscale.models.lora import AdapterShape, adapter_dropout, base_weight, project, step_dropout_key, stored_value
from jaxscale.models.quant import dequantize, quantize
from jaxscale.planning.search import evaluate_config
from jaxscale.sharding import active_axis_size, use_rules
from jaxscale.training.base import initial_state, saved_part, with_saved
from jaxscale.training.goodput import read_rows
from jaxscale.training.setup import setup_run
from jaxscale.training.step import balance_for_context, summed_grads

MODEL = [
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.head_dim=16",
    "model.d_ff=128",
    "model.compute_dtype=float32",
    "data.packing=concat",
    "train.global_batch=8",
    "train.seq_len=16",
    "optim.warmup_steps=0",
    "optim.lr=1e-2",
]
LORA = ["lora.rank=4", "lora.alpha=8"]
DROPOUT = ["lora.dropout=0.25"]
MESH8 = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
CONTEXT8 = ["mesh.data=2", "mesh.context=2", "mesh.tensor=2"]  # each row's tokens reordered and split in two
STEPS = 20

# The 16 NF4 levels of the QLoRA paper (Dettmers et al. 2023, appendix E), written out independently of the code.
NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip


def lora_setup(overrides: list[str], num_devices: int):
    cfg = load_config(None, [*MODEL, *overrides])
    return setup_run(cfg, jax.devices()[:num_devices], tokenizer_vocab=257)


def random_batch(seed: int) -> dict[str, np.ndarray]:
    tokens = np.random.default_rng(seed).integers(0, 257, (8, 17)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((8, 16), np.float32)}


def pure(tree) -> dict:
    return jax.device_get(nnx.to_pure_dict(tree))


def flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def trained():
    """A LoRA run of STEPS steps on data=2 x fsdp=2 x tensor=2: its setup, and the state before and after."""
    setup = lora_setup([*LORA, *MESH8], 8)
    state = setup.init_state()
    before = pure(state)
    step = setup.train_step()
    for s in range(STEPS):
        state, _ = step(state, jax.device_put(random_batch(s), setup.batch_sharding))
    return setup, before, pure(state)


def test_the_base_stays_bitwise_and_only_adapters_hold_optimizer_state(trained):
    setup, before, after = trained
    model_before, model_after = flat(before[0]), flat(after[0])
    adapters = {k for k in model_before if "_lora" in k}
    assert len(adapters) == 2 * 7 * 1  # A and B of seven projections, stacked over the layers
    for key in model_before.keys() - adapters:
        assert np.array_equal(model_before[key], model_after[key]), f"the frozen base moved: {key}"
    assert any(not np.array_equal(model_before[k], model_after[k]) for k in adapters)

    adapter_shapes = sorted(model_after[k].shape for k in adapters)
    moments = [x for x in flat(after[1]).values() if x.ndim > 0]
    assert sorted(x.shape for x in moments) == sorted(adapter_shapes * 2)  # Adam's mu and nu, adapter-sized only
    assert setup.trainable_count == sum(math.prod(s) for s in adapter_shapes)
    # The frozen base is kept in the compute dtype, here float32; its optimizer state does not exist.
    assert setup.trainable_count < 0.1 * setup.parameter_count


def test_adapters_start_as_peft_starts_them_a_uniform_within_one_over_root_fan_in_and_b_zero():
    setup = lora_setup([*LORA, "mesh.fsdp=1"], 1)
    model = pure(setup.init_state())[0]
    scaled, b_values = [], []
    for layer_kind in ("attn", "mlp"):
        for name, adapter in model["blocks"][layer_kind].items():
            if name.endswith("_lora"):
                a_SIR, b_SRO = adapter["lora"]["lora_a"], adapter["lora"]["lora_b"]
                fan_in = a_SIR.shape[1]  # A is [layers, in, r]
                assert np.max(np.abs(a_SIR)) <= 1 / math.sqrt(fan_in), name  # torch's kaiming_uniform_(a=sqrt(5))
                scaled.append(a_SIR.ravel() * math.sqrt(fan_in))
                b_values.append(b_SRO.ravel())
    assert len(scaled) == 7
    scaled = np.concatenate(scaled)  # about 4000 draws of U(-1, 1): the std's own error is about 0.8%
    assert abs(np.std(scaled) / (1 / math.sqrt(3)) - 1) < 0.05  # std of U(+-1/sqrt(fan_in)): 1/sqrt(3 fan_in)
    assert abs(np.mean(scaled)) < 0.05
    assert not np.any(np.concatenate(b_values))


def decayed(setup) -> dict[str, bool]:
    """Which trainable parameters the run's AdamW moves on a zero gradient: those weight decay applies to."""
    model, optimizer = nnx.merge(setup.graphdef, setup.init_state())
    params = nnx.state(model, setup.trainable)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.tx.update(zeros, optimizer.tx.init(params), params)
    return {k: bool(np.any(v != 0)) for k, v in flat(pure(updates)).items()}


def test_adapters_get_no_weight_decay_by_default_and_lora_weight_decay_decays_their_matrices_only():
    default = decayed(lora_setup([*LORA, "mesh.fsdp=1"], 1))
    assert len(default) == 14 and not any(default.values())  # as transformers' Trainer: weight_decay 0
    chosen = decayed(lora_setup([*LORA, "lora.weight_decay=0.1", "mesh.fsdp=1"], 1))
    assert {k for k, moved in chosen.items() if moved} == {k for k in chosen if k.endswith("['lora_a']")}  # B is 0


@pytest.mark.slow  # 20-45 s on 2 busy cores; the default suite outgrew 15 min (sequence parallelism compiles slower)
def test_a_full_run_decays_its_matrices_but_never_its_norms():
    moved = decayed(lora_setup(["mesh.fsdp=1"], 1))
    norms = {k for k in moved if "norm" in k}
    assert len(norms) == 3 and not any(moved[k] for k in norms)  # attn_norm, mlp_norm, final_norm
    assert all(moved[k] for k in moved.keys() - norms)  # embeddings, projections, head


def peft_linear(x, w_OI, a_RI, b_OR, scale, magnitude_O=None, dropped=None):
    """PEFT's lora.Linear forward (LoraLayer and DoraLinearLayer of peft 0.21) in float64: x W^T + scale x A^T B^T;
    with DoRA (k - 1) x' W^T + k scale x' A^T B^T added to x W^T instead, k = m / ||W + scale B A||, the norm of
    each output row; x' the input after dropout (x itself in eval)."""
    dropped = x if dropped is None else dropped
    base, lora_part = x @ w_OI.T, dropped @ a_RI.T @ b_OR.T
    if magnitude_O is None:
        return base + lora_part * scale
    k_O = magnitude_O / np.linalg.norm(w_OI + scale * b_OR @ a_RI, axis=1)
    return base + (k_O - 1) * (dropped @ w_OI.T) + k_O * lora_part * scale


def peft_merged(w_OI, a_RI, b_OR, scale, magnitude_O=None):
    """PEFT's merge (merge_and_unload) in float64: W + scale B A, with DoRA times m / ||W + scale B A|| per row."""
    merged = w_OI + scale * b_OR @ a_RI
    return merged if magnitude_O is None else (magnitude_O / np.linalg.norm(merged, axis=1))[:, None] * merged


@pytest.mark.parametrize(
    "rslora, dora, quant, dropout",
    [(True, False, "none", 0.0), (False, True, "none", 0.0), (True, True, "none", 0.25), (False, True, "nf4", 0.0)],
    ids=["rslora", "dora", "rslora_dora_dropout", "dora_nf4"],
)
def test_an_adapted_projection_computes_peft_formulas(rslora, dora, quant, dropout):
    shape = AdapterShape(4, 8.0, ("q",), quant, "float32", dropout, rslora, dora)
    rng = np.random.default_rng(0)
    w = nnx.Param(
        jnp.asarray(rng.normal(0, 0.1, (64, 4, 16)), jnp.float32),
        out_sharding=("embed", "heads", None),
        eager_sharding=False,
    )
    weight = base_weight(w, 0, shape)
    adapter = lora.adapter("q", shape, (64,), "embed", (4, 16), "heads", "float32", lora.adapter_rngs(0))
    adapter.lora.lora_b[...] = jnp.asarray(rng.normal(0, 0.1, (4, 64)), jnp.float32)  # B moved from zero
    if dora:
        adapter.magnitude_shift[...] = jnp.asarray(rng.normal(0, 0.1, (64,)), jnp.float32)
    x = jnp.asarray(rng.normal(0, 1, (2, 3, 64)), jnp.float32)
    key = jax.random.key(5) if dropout else None
    got = np.asarray(project("bld,dnh->blnh", x, weight, adapter, key)).reshape(2, 3, 64)

    w_OI = np.asarray(stored_value(weight), np.float64).reshape(64, 64).T  # an NF4 base enters dequantized
    a_RI, b_OR = np.asarray(adapter.lora.lora_a[...], np.float64).T, np.asarray(adapter.lora.lora_b[...], np.float64).T
    scale = 8 / 2 if rslora else 8 / 4  # alpha / sqrt(r), alpha / r
    # PEFT starts m at the base's row norms; jaxscale holds what training added to them.
    m_O = np.linalg.norm(w_OI, axis=1) + np.asarray(adapter.magnitude_shift[...]) if dora else None
    dropped = np.asarray(adapter_dropout(x, dropout, jax.random.fold_in(key, 0)), np.float64) if dropout else None
    want = peft_linear(np.asarray(x, np.float64), w_OI, a_RI, b_OR, scale, m_O, dropped)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.max(np.abs(want)))
    assert np.max(np.abs(want - peft_linear(np.asarray(x, np.float64), w_OI, a_RI, b_OR, 0.0))) > 0.1  # it adapts


def test_dora_gradients_treat_the_norm_as_a_constant():
    """The DoRA paper's section 4.3, as PEFT detaches it: no gradient flows through ||W + scale B A||."""
    shape = AdapterShape(4, 8.0, ("q",), "none", "float32", dora=True)
    rng = np.random.default_rng(1)
    w = nnx.Param(
        jnp.asarray(rng.normal(0, 0.1, (64, 4, 16)), jnp.float32),
        out_sharding=("embed", "heads", None),
        eager_sharding=False,
    )
    adapter = lora.adapter("q", shape, (64,), "embed", (4, 16), "heads", "float32", lora.adapter_rngs(0))
    adapter.lora.lora_b[...] = jnp.asarray(rng.normal(0, 0.1, (4, 64)), jnp.float32)
    x = jnp.asarray(rng.normal(0, 1, (2, 3, 64)), jnp.float32)
    w_IO = np.asarray(w[...]).reshape(64, 64)
    norm_O = np.linalg.norm(w_IO + 2.0 * np.asarray(adapter.lora.lora_a[...] @ adapter.lora.lora_b[...]), axis=0)

    graphdef, state = nnx.split(adapter)

    def ours(state: nnx.State) -> jax.Array:
        return jnp.sum(jnp.sin(project("bld,dnh->blnh", x, w, nnx.merge(graphdef, state))))

    def constant_norm(a, b, shift):  # m / c * (x W + scale x A B), c a number
        k = (jnp.linalg.norm(w_IO, axis=0) + shift) / norm_O
        return jnp.sum(jnp.sin((k * (x @ w_IO + 2.0 * x @ a @ b)).reshape(2, 3, 4, 16)))

    got = nnx.to_pure_dict(jax.grad(ours)(state))
    want = jax.grad(constant_norm, (0, 1, 2))(adapter.lora.lora_a[...], adapter.lora.lora_b[...], jnp.zeros(64))
    for g, w_ in zip((got["lora"]["lora_a"], got["lora"]["lora_b"], got["magnitude_shift"]), want, strict=True):
        np.testing.assert_allclose(g, w_, rtol=1e-4, atol=1e-5 * np.max(np.abs(w_)))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_embedding_and_head_adapters_compute_peft_formulas(dora):
    extra = ["lora.targets=[q,embed_tokens,lm_head]", "model.tie_embeddings=false", *(["lora.dora=true"] * dora)]
    setup = lora_setup([*LORA, *extra, "mesh.fsdp=1"], 1)
    model = nnx.merge(setup.graphdef, setup.init_state())[0]
    emb, head = model.embed_lora, model.head_lora
    # As PEFT starts them: the embedding's A zero and B standard normal, the head's A uniform and B zero.
    assert not np.any(np.asarray(emb.lora.lora_a[...])) and 0.9 < np.std(np.asarray(emb.lora.lora_b[...])) < 1.1
    assert not np.any(np.asarray(head.lora.lora_b[...]))
    rng = np.random.default_rng(2)
    for adapter in (emb, head):
        for p in (adapter.lora.lora_a, adapter.lora.lora_b, *([adapter.magnitude_shift] if dora else [])):
            p[...] = jnp.asarray(rng.normal(0, 0.1, p.shape), jnp.float32)
    tokens = random_batch(0)["inputs"]
    scale = 8 / 4

    table_VD = np.asarray(model.embed[...], np.float64)
    emb_a_RV, emb_b_DR = np.asarray(emb.lora.lora_a[...], np.float64).T, np.asarray(emb.lora.lora_b[...], np.float64).T
    update = emb_a_RV.T[tokens] @ emb_b_DR.T * scale  # PEFT: F.embedding(x, lora_embedding_A.T) @ lora_embedding_B.T
    if dora:  # DoraEmbeddingLayer: the norm of each embedding feature over the vocabulary
        m_D = np.linalg.norm(table_VD, axis=0) + np.asarray(emb.magnitude_shift[...])
        k_D = m_D / np.linalg.norm(table_VD.T + scale * emb_b_DR @ emb_a_RV, axis=1)
        want = k_D * table_VD[tokens] + k_D * update
    else:
        want = table_VD[tokens] + update
    got = np.asarray(jax.jit(lambda t: model.embed_tokens(t))(tokens))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.max(np.abs(want)))

    head_OI = np.asarray(model.lm_head[...], np.float64).T  # nn.Linear(D, V).weight [V, D]
    a_RI, b_OR = np.asarray(head.lora.lora_a[...], np.float64).T, np.asarray(head.lora.lora_b[...], np.float64).T
    m_O = np.linalg.norm(head_OI, axis=1) + np.asarray(head.magnitude_shift[...]) if dora else None
    want_head = peft_merged(head_OI, a_RI, b_OR, scale, m_O).T
    np.testing.assert_allclose(np.asarray(model.head_DV()), want_head, rtol=1e-5, atol=1e-6)


def placed(setup, state: dict) -> nnx.State:
    """`state` (pure dicts) on `setup`'s mesh."""
    abstract = jax.tree.map(lambda x: x, setup.state_structs)
    nnx.replace_by_pure_dict(abstract, state)
    return jax.device_put(abstract, setup.state_shardings)


def adapter_grads(setup, state: dict, dropout_key: jax.Array | None = None, grad_accum: int = 1) -> dict:
    """Gradients of the summed token loss w.r.t. the adapters, for `state` placed on `setup`'s mesh."""

    @jax.jit
    def grads(state: nnx.State, batch: dict) -> nnx.State:
        with use_rules(setup.rules, setup.mesh):
            batch = balance_for_context(batch, active_axis_size("context"))
            model_def, params, rest = nnx.split(nnx.merge(setup.graphdef, state)[0], setup.trainable, ...)
            return summed_grads(model_def, params, rest, batch, grad_accum, dropout_key)[0]

    return flat(pure(grads(placed(setup, state), jax.device_put(random_batch(99), setup.batch_sharding))))


def test_adapter_gradients_on_eight_devices_match_one_device(trained):
    setup, _, after = trained
    got = adapter_grads(setup, after)
    want = adapter_grads(lora_setup([*LORA, "mesh.fsdp=1"], 1), after)
    assert got.keys() == want.keys() and len(got) == 14
    for key in want:  # float32 throughout; only the order of the sharded sums differs
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-5 * np.max(np.abs(want[key])), err_msg=key)


def test_adapter_dropout_keeps_one_minus_p_of_the_input_scaled_by_its_inverse():
    p, x = 0.25, jax.random.normal(jax.random.key(1), (1000, 1000))
    y, x = np.asarray(adapter_dropout(x, p, jax.random.key(0))), np.asarray(x)
    kept = y != 0
    # A million independent draws: the kept share's standard deviation is sqrt(p (1 - p) / n) = 4.3e-4.
    assert abs(kept.mean() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / kept.size)
    np.testing.assert_array_equal(y[kept], (x * np.float32(1 / (1 - p)))[kept])  # inverted: the mean is kept


def test_the_same_key_draws_the_same_mask_and_another_step_or_seed_another():
    def mask(key: jax.Array) -> np.ndarray:
        return np.asarray(adapter_dropout(jnp.ones((64, 64)), 0.5, key)) != 0

    assert np.array_equal(mask(step_dropout_key(0, 3)), mask(step_dropout_key(0, 3)))
    assert not np.array_equal(mask(step_dropout_key(0, 3)), mask(step_dropout_key(0, 4)))
    assert not np.array_equal(mask(step_dropout_key(0, 3)), mask(step_dropout_key(1, 3)))


@pytest.mark.slow  # 20-45 s on 2 busy cores; the default suite outgrew 15 min (sequence parallelism compiles slower)
def test_each_step_microbatch_layer_and_projection_draws_its_own_mask(trained, monkeypatch):
    masks = []

    def recorded(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
        y = adapter_dropout(x, rate, key)
        jax.debug.callback(lambda m: masks.append(np.asarray(m).tobytes()), y != 0)
        return y

    monkeypatch.setattr(lora, "adapter_dropout", recorded)
    setup = lora_setup([*LORA, *DROPOUT, "mesh.fsdp=1"], 1)

    @jax.jit
    def grads(state: nnx.State, batch: dict, step: jax.Array) -> nnx.State:
        model_def, params, rest = nnx.split(nnx.merge(setup.graphdef, state)[0], setup.trainable, ...)
        return summed_grads(model_def, params, rest, batch, 2, step_dropout_key(0, step))[0]

    state, batch = placed(setup, trained[2]), random_batch(0)
    for step in (0, 1):
        jax.block_until_ready(grads(state, batch, step))
    # 2 steps x 2 microbatches x 2 layers x 7 projections, each drawn once (no remat) and all different.
    assert len(masks) == 56 and len(set(masks)) == 56
    jax.block_until_ready(jax.jit(lambda st, t: nnx.merge(setup.graphdef, st)[0](t))(state, batch["inputs"]))
    assert len(masks) == 56  # a forward outside training draws none


@pytest.fixture(scope="module")
def one_device_dropout_grads(trained) -> dict[str, np.ndarray]:
    """Adapter gradients of the trained state with dropout, two microbatches, on one device."""
    return adapter_grads(lora_setup([*LORA, *DROPOUT, "mesh.fsdp=1"], 1), trained[2], step_dropout_key(0, 5), 2)


@pytest.mark.parametrize(
    "mesh", [MESH8, pytest.param(CONTEXT8, marks=pytest.mark.slow)], ids=["data_fsdp_tensor", "data_context_tensor"]
)
def test_dropout_adapter_gradients_on_eight_devices_match_one_device(trained, one_device_dropout_grads, mesh):
    setup, _, after = trained
    # Eight devices recompute each layer's masks in the backward (remat), one device keeps them.
    eight = lora_setup([*LORA, *DROPOUT, *mesh, "model.remat=full"], 8)
    got, want = adapter_grads(eight, after, step_dropout_key(0, 5), 2), one_device_dropout_grads
    undropped = adapter_grads(setup, after)
    assert got.keys() == want.keys() and len(got) == 14
    for key in want:  # float32 throughout; only the order of the sharded sums differs
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-5 * np.max(np.abs(want[key])), err_msg=key)
    assert all(np.max(np.abs(want[k] - undropped[k])) > 0.01 * np.max(np.abs(want[k])) for k in want)


@pytest.mark.slow  # 20-45 s on 2 busy cores; the default suite outgrew 15 min (sequence parallelism compiles slower)
def test_dropout_training_resumed_from_its_state_is_bitwise_the_straight_run():
    setup = lora_setup([*LORA, *DROPOUT, *MESH8, "train.grad_accum=2"], 8)

    def run(state: nnx.State, steps: range) -> tuple[dict, list[float]]:
        step, losses = setup.train_step(), []  # a step function of its own: nothing carries over but the state
        for s in steps:
            state, metrics = step(state, jax.device_put(random_batch(s), setup.batch_sharding))
            losses.append(float(metrics["loss"]))
        return pure(state), losses

    straight, straight_losses = run(setup.init_state(), range(4))
    half, first_losses = run(setup.init_state(), range(2))
    resumed, last_losses = run(placed(setup, half), range(2, 4))
    assert first_losses + last_losses == straight_losses
    assert all(np.array_equal(a, b) for a, b in zip(flat(resumed).values(), flat(straight).values(), strict=True))


def test_eval_loss_is_unaffected_by_dropout(trained):
    setup, _, after = trained
    dropping = lora_setup([*LORA, *DROPOUT, *MESH8], 8)
    batch = jax.device_put(random_batch(5), setup.batch_sharding)
    got = dropping.eval_step()(placed(dropping, after), batch)
    assert [float(x) for x in got] == [float(x) for x in setup.eval_step()(placed(setup, after), batch)]


def merged_weights(model: dict, scale: float) -> dict:
    """The base with each adapter folded in, by numpy: W + scale * A @ B reshaped to W's shape."""
    merged = {}
    for name, value in model.items():
        if not name.endswith("_lora"):
            merged[name] = merged_weights(value, scale) if isinstance(value, dict) else value
    for weight, target in [("wq", "q"), ("wk", "k"), ("wv", "v"), ("wo", "o")] + [
        (f"w_{t}", t) for t in ("gate", "up", "down")
    ]:
        if f"{target}_lora" in model:
            lora = model[f"{target}_lora"]["lora"]
            delta = np.einsum("sir,sro->sio", lora["lora_a"], lora["lora_b"]) * scale
            merged[weight] = model[weight] + delta.reshape(model[weight].shape)
    return merged


def test_merged_weights_give_the_adapter_models_logits(trained):
    setup, _, after = trained
    plain = lora_setup(["mesh.fsdp=1"], 1)
    merged = jax.tree.map(lambda x: x, plain.state_structs)
    merged_model = merged_weights(after[0], scale=8 / 4)  # alpha / rank
    nnx.replace_by_pure_dict(merged[0], merged_model)
    one = lora_setup([*LORA, "mesh.fsdp=1"], 1)
    adapted = jax.tree.map(lambda x: x, one.state_structs)
    nnx.replace_by_pure_dict(adapted, after)
    tokens = random_batch(7)["inputs"]

    def logits(s, state):
        return jax.jit(lambda st, t: nnx.merge(s.graphdef, st)[0](t))(state, tokens)

    got, want = logits(one, adapted), logits(plain, merged)
    base_only = jax.tree.map(lambda x: x, plain.state_structs)
    nnx.replace_by_pure_dict(base_only[0], merged_weights(after[0], 0.0))
    assert np.max(np.abs(got - logits(plain, base_only))) > 1e-3  # the adapters did change the model
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_nf4_round_trip_lands_on_the_codebook_nearest_level():
    w = np.random.default_rng(0).standard_normal((256, 3, 8)).astype(np.float32)
    codes, scales = quantize(jnp.asarray(w), 0, "nf4")
    assert codes.dtype == jnp.uint8 and codes.shape == (128, 3, 8)  # two 4-bit codes a byte
    assert scales.shape == (4, 3, 8)
    back = np.asarray(dequantize(codes, scales, 0, "nf4", jnp.float32))
    blocks = w.reshape(4, 64, 3, 8)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    unit = blocks / absmax
    levels = np.array(NF4, np.float32)
    nearest = levels[np.abs(unit[..., None] - levels).argmin(-1)]
    np.testing.assert_allclose(back.reshape(blocks.shape), nearest * absmax, rtol=1e-6)
    # Error bound: half the widest gap between neighbouring levels, times the block's absmax.
    assert np.all(np.abs(back.reshape(blocks.shape) - blocks) <= absmax * np.max(np.diff(levels)) / 2 + 1e-7)
    assert np.array_equal(np.abs(back).reshape(blocks.shape).max(axis=1, keepdims=True), absmax)


def test_int8_round_trip_is_within_half_a_step():
    w = np.random.default_rng(1).standard_normal((4, 128)).astype(np.float32)
    codes, scales = quantize(jnp.asarray(w), 1, "int8")
    assert codes.dtype == jnp.int8 and codes.shape == w.shape and scales.shape == (4, 2)
    back = np.asarray(dequantize(codes, scales, 1, "int8", jnp.float32))
    absmax = np.abs(w.reshape(4, 2, 64)).max(axis=2, keepdims=True)
    assert np.all(np.abs(back.reshape(4, 2, 64) - w.reshape(4, 2, 64)) <= absmax / 127 / 2 + 1e-7)
    assert np.abs(np.asarray(codes)).max() == 127


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["lora.targets=[q,attn]"], "lora.targets=['q', 'attn'] names 'attn'; list any of q, k, v, o, gate, up, down"),
        (["lora.rank=-1"], "lora.rank=-1 is out of range: it must be 0 (off) or between 1 and 32"),
        (["lora.rank=33"], "lora.rank=33 is out of range"),
        (["lora.rank=0", "lora.base_quant=nf4"], "set lora.rank (e.g. lora.rank=8) or lora.base_quant=none"),
        (["lora.base_quant=nf3"], "lora.base_quant='nf3' must be one of none, nf4, int8"),
        (["lora.dropout=1"], "lora.dropout=1.0 must be at least 0 and below 1: the share of each adapter's input"),
        (["lora.dropout=-0.1"], "lora.dropout=-0.1 must be at least 0 and below 1"),
        (
            ["lora.rank=0", "lora.dropout=0.1"],
            "but LoRA is off (lora.rank=0); set lora.rank (e.g. lora.rank=8) or lora.dropout=0",
        ),
        (["lora.weight_decay=-0.1"], "lora.weight_decay=-0.1 must not be negative; 0 (the default"),
        (["lora.rank=0", "lora.weight_decay=0.1"], "set optim.weight_decay for a full run, or lora.rank"),
        (["lora.rank=0", "lora.dora=true"], "lora.dora=true shapes LoRA adapters, but LoRA is off (lora.rank=0)"),
        (["lora.rank=0", "lora.rslora=true"], "set lora.rank (e.g. lora.rank=8) or lora.rslora=false"),
        (
            ["lora.targets=[q,lm_head]", "model.tie_embeddings=true"],
            "lora.targets names lm_head, but model.tie_embeddings=true: one matrix is both the embedding and the head",
        ),
        (
            ["lora.targets=[embed_tokens,lm_head]", "model.tie_embeddings=false", "lora.dropout=0.1"],
            "lora.targets names lm_head with lora.dropout=0.1: jaxscale folds the head's adapter into the head",
        ),
        (["model.d_model=96", "lora.base_quant=nf4"], "make both multiples of 64 or set lora.base_quant=none"),
        (["model.num_experts=4", "lora.targets=[q,up]"], "Set lora.targets=[q,k,v,o] and lora.base_quant=none"),
    ],
)
def test_bad_lora_settings_name_the_fix(overrides, message):
    with pytest.raises(UserError) as error:
        load_config(None, [*MODEL, *LORA, *overrides])
    assert message in str(error.value)


def test_lora_refuses_a_pipeline_mesh():
    with pytest.raises(UserError) as error:
        lora_setup([*LORA, "mesh.pipeline=2", "mesh.fsdp=4", "train.grad_accum=2"], 8)
    assert "mesh.pipeline=2 with LoRA (lora.rank=4) is not supported yet" in str(error.value)
    assert "Use mesh.pipeline=1" in str(error.value)


def train_run(run_dir, overrides: list[str], steps: int) -> list[float]:
    """`jaxscale.train` on the stdlib corpus on data=2 x fsdp=2 x tensor=2; the losses it logged, step by step."""
    cfg = load_config(
        None,
        [*MODEL, *MESH8, f"run.dir={run_dir}", f"train.steps={steps}", "optim.decay_steps=4", "log.every=1"]
        + ["checkpoint.every=2", "train.eval_every=0", "log.tensorboard=false", "log.progress=false", *overrides],
    )
    jaxscale.train(cfg)
    return [row["loss"] for row in read_rows(run_dir) if "loss" in row]


@pytest.mark.slow  # about 80 s: four short runs
def test_lora_checkpoints_hold_adapters_and_a_base_reference_and_resume_bitwise(tmp_path):
    full = tmp_path / "full"
    train_run(full, [], 2)  # a full training run: the base the adapters are trained on
    adapters = [*LORA, *DROPOUT, f"lora.base={full}"]
    straight = train_run(tmp_path / "straight", adapters, 4)
    train_run(tmp_path / "resumed", adapters, 2)
    resumed = train_run(tmp_path / "resumed", adapters, 4)
    assert resumed == straight and len(straight) == 4  # bitwise, dropout too: 2 steps, 2 more from the checkpoint

    ckpt = Checkpointer(tmp_path / "straight" / "checkpoints", CheckpointConfig())
    meta = ckpt.read_meta(4)
    ckpt.close()
    saved = meta["checksums"].keys()
    assert any("q_lora" in k for k in saved) and any(k.startswith("optimizer/") for k in saved)
    assert not [k for k in saved if k.startswith("model/") and "_lora" not in k]  # no base array in it
    assert meta["lora_base"]["source"] == str(full.absolute()) and len(meta["lora_base"]["sha256"]) == 64

    # The base the adapters trained on is the full run's last model, stored in the compute dtype.
    plain = Checkpointer(full / "checkpoints", CheckpointConfig())
    full_sums = plain.read_meta(2)["checksums"]
    plain.close()
    setup = lora_setup([*LORA, *MESH8, f"lora.base={full}"], 8)
    state = initial_state(setup)
    got = checksums_json(fingerprint(nnx.to_pure_dict(state))[0])
    assert got["model/blocks/attn/wq"] == full_sums["model/blocks/attn/wq"]  # float32 compute: bitwise the same

    with pytest.raises(UserError) as error:  # the same checkpoints onto the seeded initial model instead
        train_run(tmp_path / "straight", [*LORA], 6)
    assert f"were trained on the base {full.absolute()}" in str(error.value)
    assert "this run's base is initial model, train.seed=0" in str(error.value)
    assert "Resume with the base they were trained on" in str(error.value)


def test_the_cli_exits_2_naming_the_lora_fix():
    result = run_cli("train", "configs/tiny.yaml", "lora.rank=8", "lora.targets=[q,mlp]", timeout=120)
    assert result.returncode == 2
    assert "lora.targets=['q', 'mlp'] names 'mlp'; list any of q, k, v, o, gate, up, down" in result.stderr


@pytest.mark.slow  # about 60 s: two runs of 30 steps
def test_qlora_loss_is_within_five_percent_of_bf16_lora(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(400):
        a, b = rng.integers(0, 100, 2)
        rows.append({"prompt": f"add({a}, {b}) ==", "completion": f" {a + b}"})
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = ["data.source=prompt_completion", f"data.paths={tmp_path / 'sft.jsonl'}", "model.compute_dtype=bfloat16"]
    common = [*LORA, *data, "checkpoint.every=0", "optim.decay_steps=0", "optim.lr=3e-3", "train.seq_len=32"]
    lora = train_run(tmp_path / "lora", common, 30)
    qlora = train_run(tmp_path / "qlora", [*common, "lora.base_quant=nf4"], 30)
    final_lora, final_qlora = np.mean(lora[-5:]), np.mean(qlora[-5:])
    # The adapters learned something: the loss falls 9-10% in these 30 steps, while the first loss moves by about 1%
    # with the train split, which is a hash of each row's path (tmp_path) and line. Adapters that learn nothing
    # stay near a ratio of 1.
    assert final_lora < 0.95 * np.mean(lora[:3]), lora
    assert abs(final_qlora - final_lora) <= 0.05 * final_lora, (lora, qlora)


# A Llama 3.2 1B shape (16 layers of width 2048, GQA 32/8 heads of 64, MLP 8192, vocabulary 128256).
LLAMA_1B = [
    "model.preset=llama3.2-1b",
    "model.param_dtype=float32",
    "model.compute_dtype=bfloat16",
]


def test_the_planner_models_the_quantized_base_and_adapter_only_optimizer_state():
    cluster = Cluster("v5e-16", ACCELERATORS["v5e"], 16)
    sizes = dict.fromkeys(AXES, 1) | {"fsdp": 16}

    def planned(overrides: list[str]):
        return evaluate_config(load_config(None, [*LLAMA_1B, "mesh.fsdp=16", *overrides]), sizes, cluster).memory

    full, lora, nf4 = planned([]), planned(["lora.rank=16"]), planned(["lora.rank=16", "lora.base_quant=nf4"])
    d, layers, q, kv, f, r = 2048, 16, 32 * 64, 8 * 64, 8192, 16
    block_weights = layers * (d * q * 2 + d * kv * 2 + 3 * d * f)  # q and o, k and v, gate up down
    # By the rules of pure FSDP only `embed` splits: the A of q, k, v, gate, up and the B of o, down are
    # split 16 ways; the other side of each adapter (heads, kv_heads, mlp and the rank) is whole on every device.
    adapters = layers * (r * d * 7 / 16 + r * (q + f) + r * (q + 2 * kv + 2 * f))
    assert lora.optimizer == pytest.approx(2 * 4 * adapters, rel=1e-3)  # Adam's two fp32 moments
    assert lora.gradients == pytest.approx(4 * adapters, rel=1e-3)
    assert full.optimizer > 9 * lora.optimizer
    # NF4: half a byte per weight plus a float32 scale per 64; bf16 LoRA keeps 2 bytes per weight.
    saved = (2 - 0.5 - 4 / 64) * block_weights / 16
    assert lora.params - nf4.params == pytest.approx(saved, rel=1e-3)


def model_logits(setup, state, tokens_BL: np.ndarray) -> np.ndarray:
    @jax.jit
    def logits(state: nnx.State, tokens_BL: jax.Array) -> jax.Array:
        with use_rules(setup.rules, setup.mesh):
            return nnx.merge(setup.graphdef, state)[0](tokens_BL)

    return np.asarray(logits(state, jax.device_put(tokens_BL, setup.batch_sharding)))


@pytest.mark.slow  # about 70 s: a QLoRA run, three exports, an import
def test_merged_and_peft_exports_of_a_qlora_run_give_its_model(tmp_path):
    run = tmp_path / "run"
    train_run(run, [*LORA, *DROPOUT, "lora.base_quant=nf4"], 2)
    export_hf(run, tmp_path / "merged-nf4", merge=True, merge_into_quantized=True)
    export_hf(run, tmp_path / "merged", merge=True)
    export_hf(run, tmp_path / "peft")

    # The adapter model as training left it: its saved adapters on the rebuilt NF4 base.
    cfg = load_config(run / "config.yaml")
    setup = setup_run(cfg)
    ckpt = Checkpointer(run / "checkpoints", cfg.checkpoint, read_only=True)
    step, saved = ckpt.restore_latest(saved_part(setup, setup.state_structs))
    ckpt.close()
    adapted = with_saved(initial_state(setup), saved)
    tokens = random_batch(3)["inputs"]
    merged_cfg = load_config(
        None, [f"model.init_from=hf:{tmp_path / 'merged-nf4'}", *MESH8, "model.compute_dtype=float32"]
    )
    merged = setup_run(merged_cfg)
    np.testing.assert_allclose(
        model_logits(merged, merged.init_state(), tokens), model_logits(setup, adapted, tokens), rtol=1e-5, atol=1e-5
    )

    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["lora_dropout"]) == ("LORA", 4, 8.0, 0.25)
    assert (config["use_rslora"], config["use_dora"]) == (False, False)
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    adapter = safetensors.numpy.load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert len(adapter) == 2 * 7 * 2  # A and B of seven projections in each of two layers
    name = "base_model.model.model.layers.1.self_attn.q_proj"
    lora_a, lora_b = adapter[f"{name}.lora_A.weight"], adapter[f"{name}.lora_B.weight"]
    assert lora_a.shape == (4, 64) and lora_b.shape == (4 * 16, 4)  # [r, in], [out, r]
    delta = 8 / 4 * lora_b.astype(np.float64) @ lora_a.astype(np.float64)
    # PEFT's own merge, W + alpha/r * B @ A in HF's [out, in]: into the NF4 base with --merge-into-quantized ...
    wq = pure(adapted)[0]["blocks"]["attn"]["wq"]  # the NF4 base of layer 1, dequantized by the model's own code
    base_q = np.asarray(dequantize(wq["codes"][1], wq["scales"][1], 0, "nf4", jnp.float32), np.float64)
    weight = f"{name.removeprefix('base_model.model.')}.weight"
    q_proj = safetensors.numpy.load_file(str(tmp_path / "merged-nf4" / "model.safetensors"))[weight]
    np.testing.assert_allclose(q_proj, base_q.reshape(64, 64).T + delta, rtol=1e-6, atol=1e-7)
    # ... and by default into the seeded float32 base the NF4 codes were rounded from.
    plain = lora_setup([*MESH8], 8)
    seeded_q = np.asarray(pure(plain.init_state())[0]["blocks"]["attn"]["wq"][1], np.float64)
    q_proj = safetensors.numpy.load_file(str(tmp_path / "merged" / "model.safetensors"))[weight]
    np.testing.assert_allclose(q_proj, seeded_q.reshape(64, 64).T + delta, rtol=1e-6, atol=1e-7)


@pytest.mark.slow  # about 60 s: a mixture-of-experts compile
def test_lora_on_the_attention_of_an_moe_model_trains_on_an_expert_mesh():
    cfg = load_config("configs/tiny_moe.yaml", [*MODEL, *LORA, "lora.targets=[q,k,v,o]", "model.num_experts=4"])
    setup = setup_run(cfg, jax.devices(), tokenizer_vocab=257)
    assert (setup.mesh.shape["data"], setup.mesh.shape["expert"]) == (2, 4)
    state = setup.init_state()
    before = flat(pure(state)[0])
    step = setup.train_step()
    for s in range(3):
        state, _ = step(state, jax.device_put(random_batch(s), setup.batch_sharding))
    after = flat(pure(state)[0])
    assert all(np.array_equal(before[k], after[k]) for k in before if "_lora" not in k)  # experts and router too
    assert any(not np.array_equal(before[k], after[k]) for k in before if "_lora" in k)
