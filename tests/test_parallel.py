"""Every mesh layout of the same run gives the losses and parameters of one device.

fp32 compute throughout. Tolerances: losses and gradient norms agree to 2e-5 (relative);
parameters after 3 AdamW steps to 1e-4 absolute, a tenth of one step's learning rate.
Sharded reductions sum in another order, so bitwise equality is not expected, and Adam's
first steps move each weight by about lr * sign(gradient): a gradient within rounding of
zero may move 3e-5 differently. A wrong sharding or a missed all-reduce moves weights by
the whole learning rate (1e-3).
"""

import jax
import numpy as np
import pytest

from jaxscale.config import load_config
from jaxscale.training.setup import setup_run

STEPS = 3
LAYOUTS = {
    "data8": ["mesh.data=8", "mesh.fsdp=1"],
    "fsdp8": ["mesh.fsdp=8"],
    "fsdp2_tensor4": ["mesh.fsdp=2", "mesh.tensor=4"],
    "data2_fsdp2_tensor2": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
}
BASE = [
    "model.compute_dtype=float32",
    "train.global_batch=16",
    "train.seq_len=32",
    "optim.warmup_steps=1",
    "optim.lr=1e-3",
    "optim.decay_steps=100",
]


def random_batches(global_batch: int, seq_len: int, steps: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(steps):
        tokens = rng.integers(0, 257, (global_batch, seq_len + 1)).astype(np.int32)
        mask = (rng.random((global_batch, seq_len)) > 0.1).astype(np.float32)
        batches.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask})
    return batches


def run_steps(overrides: list[str], devices: list[jax.Device], batches: list[dict]) -> tuple[list[float], list]:
    """Loss and gradient norm of each step, and the final parameters (host arrays) of the run `overrides` names."""
    setup = setup_run(load_config(None, BASE + overrides), devices, tokenizer_vocab=257)
    step = setup.train_step()
    current, losses = setup.init_state(), []
    for batch in batches:
        current, metrics = step(current, jax.device_put(batch, setup.batch_sharding))
        losses += [float(metrics["loss"]), float(metrics["grad_norm"])]
    return losses, jax.device_get(jax.tree.leaves(current[0]))


@pytest.fixture(scope="module")
def batches():
    return random_batches(16, 32, STEPS)


@pytest.fixture(scope="module")
def single_device(batches):
    return run_steps(["mesh.fsdp=1"], jax.devices()[:1], batches)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mesh_layout_matches_single_device(layout, batches, single_device):
    losses, params = run_steps(LAYOUTS[layout], jax.devices(), batches)
    ref_losses, ref_params = single_device
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    assert losses[-2] < losses[0]  # the steps did train
    for got, want in zip(params, ref_params, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.slow
def test_grad_accum_matches_one_big_batch(batches):
    """4 microbatches of 4 give the update of one batch of 16."""
    one = run_steps(["mesh.fsdp=-1"], jax.devices()[:4], batches[:1])
    accum = run_steps(["mesh.fsdp=-1", "train.grad_accum=4"], jax.devices()[:4], batches[:1])
    np.testing.assert_allclose(accum[0], one[0], rtol=2e-5)
    for got, want in zip(accum[1], one[1], strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_remat_policy_changes_memory_not_math(policy, batches, single_device):
    losses, params = run_steps(["mesh.fsdp=1", f"model.remat={policy}"], jax.devices()[:1], batches)
    np.testing.assert_allclose(losses, single_device[0], rtol=2e-5)
    for got, want in zip(params, single_device[1], strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4)
