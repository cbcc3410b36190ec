"""Context parallelism: sequences split over the `context` axis give one device's loss and gradients."""

import jax
import numpy as np
import pytest
from flax import nnx

import jaxscale
from jaxscale.aot import compile_train_step
from jaxscale.config import load_config
from jaxscale.hardware import parse_cluster
from jaxscale.mesh import AXES
from jaxscale.planning.search import evaluate_config
from jaxscale.sharding import use_rules
from jaxscale.training.setup import setup_run
from jaxscale.training.step import balance_for_context, summed_grads

BASE = ["train.seq_len=128", "train.global_batch=4", "model.compute_dtype=float32", "optim.decay_steps=10"]
TOLERANCE = 1e-5  # relative, fp32: the same sums, reduced in another order


def _batch(rows: int, length: int, documents: bool) -> dict[str, np.ndarray]:
    """Random tokens; with `documents`, rows packed with documents of random lengths (positions restart)."""
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 257, size=(rows, length), dtype=np.int32)
    batch = {
        "inputs": tokens,
        "targets": np.roll(tokens, -1, axis=1),
        "loss_mask": (rng.random((rows, length)) > 0.1).astype(np.float32),
    }
    if documents:
        segments = np.sort(rng.integers(0, 4, size=(rows, length)), axis=1).astype(np.int32)
        starts = np.concatenate([np.ones((rows, 1), bool), segments[:, 1:] != segments[:, :-1]], axis=1)
        index = np.arange(length)[None]
        batch |= {"segment_ids": segments, "positions": index - np.maximum.accumulate(np.where(starts, index, 0), 1)}
    return batch


def _loss_and_grads(mesh: list[str], documents: bool, devices=None) -> tuple[float, dict]:
    packing = "segmented" if documents else "concat"
    setup = setup_run(load_config("configs/tiny.yaml", [*BASE, *mesh, f"data.packing={packing}"]), devices, 257)
    model, _ = nnx.merge(setup.graphdef, setup.init_state())
    model_def, params, rest = nnx.split(model, nnx.Param, ...)
    context = setup.layout.axis_sizes["context"]

    @jax.jit
    def grads_of(params, rest, batch):
        with use_rules(setup.rules, setup.mesh):
            balanced = balance_for_context(batch, context) if context > 1 else batch
            return summed_grads(model_def, params, rest, balanced, 1)

    batch = {k: jax.device_put(v, setup.batch_sharding) for k, v in _batch(4, 128, documents).items()}
    grads, (loss_sum, count, _) = grads_of(params, rest, batch)
    return float(loss_sum) / float(count), jax.device_get(nnx.to_pure_dict(grads))


@pytest.fixture(scope="module")
def one_device():
    """The reference: the same batch on one device, with and without document packing."""
    mesh = ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"]
    return {documents: _loss_and_grads(mesh, documents, jax.devices()[:1]) for documents in (True, False)}


@pytest.mark.parametrize(
    "mesh, documents",
    [
        (["mesh.data=2", "mesh.fsdp=1", "mesh.tensor=2", "mesh.context=2"], True),
        (["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=1", "mesh.context=4"], True),
        (["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=1", "mesh.context=4"], False),
    ],
    ids=["context2_tensor2_documents", "context4_fsdp2_documents", "context4_fsdp2_causal_only"],
)
def test_split_sequences_give_one_devices_loss_and_gradients(one_device, mesh, documents):
    loss, grads = _loss_and_grads(mesh, documents)
    reference_loss, reference_grads = one_device[documents]
    assert loss == pytest.approx(reference_loss, rel=TOLERANCE)
    for (path, g), (_, r) in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves_with_path(reference_grads), strict=True
    ):
        assert np.max(np.abs(g - r)) <= TOLERANCE * np.max(np.abs(r)), jax.tree_util.keystr(path)


def test_zigzag_order_gives_every_device_a_chunk_from_each_end():
    """context=2, L=8: chunks of 2 in the order 0, 3, 1, 2, so device 0 holds tokens 0-1 and 6-7."""
    batch = {"inputs": np.arange(8, dtype=np.int32)[None]}
    balanced = jax.jit(lambda b: balance_for_context(b, 2))(batch)
    assert balanced["inputs"].tolist() == [[0, 1, 6, 7, 2, 3, 4, 5]]
    assert balanced["positions"].tolist() == [[0, 1, 6, 7, 2, 3, 4, 5]]
    assert balanced["segment_ids"].tolist() == [[0] * 8]


# XLA attention: on TPU `auto` picks splash, which keeps no score matrix and fits 16k tokens on one chip.
LONG = ["train.seq_len=16384", "train.global_batch=1", "model.compute_dtype=bfloat16", "mesh.strategy=fsdp"]
LONG += ["model.attention=xla"]


def test_a_sequence_too_long_for_one_device_fits_with_context_4_in_plan():
    """16k tokens of the tiny model: about 30 GiB planned on one v5e chip (16 GiB); plan on 4 picks context=4."""
    cfg = load_config("configs/tiny.yaml", [*LONG, "mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1"])
    alone = evaluate_config(cfg, dict.fromkeys(AXES, 1), parse_cluster("v5e-1"))
    assert not alone.fits
    result = jaxscale.plan(cfg, "v5e-4")
    best = result.ranked[0]
    assert best.mesh["context"] == 4 and best.fits
    assert best.memory.total < alone.memory.total / 3


def test_planned_memory_of_a_context_mesh_is_xlas_within_15_percent():
    cfg = load_config(
        "configs/tiny.yaml",
        ["train.seq_len=2048", "train.global_batch=2", "model.compute_dtype=float32", "data.packing=concat"]
        + ["mesh.data=-1", "mesh.fsdp=1", "mesh.tensor=1", "mesh.context=4"],
    )
    step = compile_train_step(cfg, jax.devices())
    planned = evaluate_config(cfg, step.mesh, parse_cluster("cpu-8"))
    assert planned.memory.total / step.total_bytes == pytest.approx(1, abs=0.15)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.seq_len=100", "mesh.context=4", "mesh.fsdp=2"], "train.seq_len=100 is not a multiple of 8"),
        (
            ["mesh.context=2", "mesh.pipeline=2", "mesh.fsdp=2", "train.grad_accum=2"],
            "mesh.context=2 with mesh.pipeline=2 is not supported yet",
        ),
        (
            ["model.preset=tiny-moe", "mesh.context=2", "mesh.fsdp=4"],
            "mesh.context=2 with a mixture-of-experts model is not supported yet",
        ),
        (
            ["mesh.context=2", "mesh.fsdp=4", "model.attention=splash"],
            "model.attention=splash with mesh.context=2: a sequence split over devices is attended by XLA",
        ),
    ],
    ids=["seq_len", "pipeline", "moe", "splash"],
)
def test_context_settings_that_cannot_run_are_refused(overrides, message):
    cfg = load_config("configs/tiny.yaml", ["mesh.data=1", "mesh.tensor=1", *overrides])
    with pytest.raises(jaxscale.UserError, match=message):
        setup_run(cfg, tokenizer_vocab=257)
