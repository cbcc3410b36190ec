"""Model options that change memory and speed, never the math: each gives the loss and gradients without it.

- `model.logits_chunk`: the tiny model at 128 positions in chunks of 32 (every 4th position a chunk);
  a chunk missing, repeated or paired with another chunk's targets moves the loss by whole percents.
- `model.scan_unroll`: the layer loop unrolled whole, dense and mixture-of-experts, and with full remat.

fp32; tolerance 1e-5 relative: the same sums, in another order.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxscale.config import load_config
from jaxscale.errors import UserError
from jaxscale.sharding import use_rules
from jaxscale.training.setup import setup_run
from jaxscale.training.step import balance_for_context, summed_grads

BASE = ["train.seq_len=128", "train.global_batch=4", "model.compute_dtype=float32", "data.packing=concat"]
TOLERANCE = 1e-5


def loss_and_grads(overrides: list[str], devices=None, config: str = "configs/tiny.yaml") -> tuple:
    """Mean token loss and every gradient (host arrays) of one fixed batch, on the mesh `overrides` ask for."""
    setup = setup_run(load_config(config, [*BASE, *overrides]), devices, 257)
    model, _ = nnx.merge(setup.graphdef, setup.init_state())
    model_def, params, rest = nnx.split(model, nnx.Param, ...)
    context = setup.layout.axis_sizes["context"]

    @jax.jit
    def grads_of(params, rest, batch):
        with use_rules(setup.rules, setup.mesh):
            return summed_grads(model_def, params, rest, balance_for_context(batch, context), 2)

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 257, size=(4, 129), dtype=np.int32)
    batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_mask": (rng.random((4, 128)) > 0.2).astype(np.float32),
    }
    grads, (loss_sum, count, _) = grads_of(params, rest, jax.device_put(batch, setup.batch_sharding))
    return float(loss_sum / count), [np.asarray(g) for g in jax.tree.leaves(jax.device_get(grads))]


@pytest.fixture(scope="module")
def whole():
    """The reference: every position's logits at once, on one device."""
    return loss_and_grads(["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"], jax.devices()[:1])


@pytest.mark.parametrize(
    "mesh",
    [
        ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"],
        ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
        ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2", "mesh.context=2"],
    ],
    ids=["one_device", "data2_fsdp2_tensor2", "fsdp2_tensor2_context2"],
)
def test_chunked_logits_give_the_whole_loss_and_gradients(whole, mesh):
    devices = jax.devices()[:1] if mesh[0] == "mesh.data=1" and "mesh.fsdp=1" in mesh else None
    loss, grads = loss_and_grads([*mesh, "model.logits_chunk=32"], devices)
    reference_loss, reference_grads = whole
    assert loss == pytest.approx(reference_loss, rel=TOLERANCE)
    for got, want in zip(grads, reference_grads, strict=True):
        assert np.max(np.abs(got - want)) <= TOLERANCE * np.max(np.abs(want))


@pytest.mark.parametrize("chunk", ["-8", "48"])
def test_a_chunk_that_does_not_divide_the_sequence_is_refused(chunk):
    with pytest.raises(UserError, match=f"model.logits_chunk={chunk} must divide train.seq_len=128; choose a divisor"):
        load_config("configs/tiny.yaml", [*BASE, f"model.logits_chunk={chunk}"])


@pytest.mark.parametrize(
    "config, mesh, num_devices",
    [
        ("configs/tiny.yaml", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], 8),
        # Two devices: each microbatch's two rows split over the expert axis.
        ("configs/tiny_moe.yaml", ["mesh.data=1", "mesh.expert=2", "mesh.tensor=1"], 2),
    ],
    ids=["dense_data2_fsdp2_tensor2", "moe_expert2"],
)
def test_an_unrolled_layer_loop_gives_the_scanned_loss_and_gradients(config, mesh, num_devices):
    devices = jax.devices()[:num_devices]
    loss, grads = loss_and_grads([*mesh, "model.scan_unroll=64", "model.remat=none"], devices, config)
    reference_loss, reference_grads = loss_and_grads(
        [*mesh, "model.scan_unroll=1", "model.remat=none"], devices, config
    )
    assert loss == pytest.approx(reference_loss, rel=TOLERANCE)
    for got, want in zip(grads, reference_grads, strict=True):
        assert np.max(np.abs(got - want)) <= TOLERANCE * np.max(np.abs(want))


def test_remat_in_an_unrolled_loop_gives_the_scanned_loss_and_gradients():
    """With no loop between forward and backward the recomputation must not be merged into the forward (it
    is kept apart, jaxscale.models.transformer.run_stack): full remat, unrolled, is the same math."""
    mesh = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
    loss, grads = loss_and_grads([*mesh, "model.scan_unroll=4", "model.remat=full"])
    reference_loss, reference_grads = loss_and_grads([*mesh, "model.scan_unroll=1", "model.remat=none"])
    assert loss == pytest.approx(reference_loss, rel=TOLERANCE)
    for got, want in zip(grads, reference_grads, strict=True):
        assert np.max(np.abs(got - want)) <= TOLERANCE * np.max(np.abs(want))


def test_a_scan_unroll_below_one_is_refused():
    with pytest.raises(UserError, match=r"model.scan_unroll=0 is out of range; set it within \[1, inf\)"):
        load_config("configs/tiny.yaml", [*BASE, "model.scan_unroll=0"])


@pytest.mark.parametrize("value", ["fast", "2.5", "true"])
def test_a_scan_unroll_neither_auto_nor_whole_is_refused(value):
    shown = {"fast": "'fast'", "2.5": "2.5", "true": "True"}[value]
    with pytest.raises(UserError, match=f"model.scan_unroll={shown} is neither auto nor a number of layers; set "):
        load_config("configs/tiny.yaml", [*BASE, f"model.scan_unroll={value}"])
