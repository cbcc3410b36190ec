"""Document-aware packing: a row of packed documents trains like each document alone, on every mesh.

fp32 compute. Tolerances: per-token losses within 1e-5 relative of each document run alone (attention
masked to the document, positions restarting: the same arithmetic on the same numbers, summed in
another order where the mesh splits it); pipeline gradients as in test_pipeline.py.
"""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from jaxscale.config import DataConfig, load_config
from jaxscale.data import ByteTokenizer, DocumentRows
from jaxscale.data.examples import ExampleEncoder
from jaxscale.data.finetune import FineTuneBatches, first_fit_decreasing
from jaxscale.data.segments import document_segments
from jaxscale.models.gathers import token_cross_entropy
from jaxscale.sharding import use_rules
from jaxscale.training.setup import setup_run
from jaxscale.training.step import pipelined_grads, summed_grads

EOS = 256
MODEL = [
    "model.compute_dtype=float32",
    "model.d_model=32",
    "model.n_layers=4",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.head_dim=8",
    "model.d_ff=64",
]


def test_segment_ids_and_positions_restart_after_each_eos():
    row = np.array([[7, 8, EOS, 5, 6, 9, EOS, 4]])
    segment_ids, positions = document_segments(row, EOS)
    np.testing.assert_array_equal(segment_ids, [[0, 0, 0, 1, 1, 1, 1, 2]])
    np.testing.assert_array_equal(positions, [[0, 1, 2, 0, 1, 2, 3, 0]])


class FixedRows:
    """One batch of fixed rows, the same for every step."""

    def __init__(self, rows: dict[str, np.ndarray]) -> None:
        self._rows = rows
        self.global_batch, self.seq_len = rows["inputs"].shape

    def rows(self, step: int, row_ids) -> dict[str, np.ndarray]:
        return {k: v[np.asarray(row_ids)] for k, v in self._rows.items()}


def window(tokens: np.ndarray, copies: int) -> dict[str, np.ndarray]:
    """`copies` identical rows of one window: inputs, targets (shifted by one) and a full loss mask."""
    tokens = np.tile(tokens[None], (copies, 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones(tokens[:, 1:].shape, np.float32)}


def per_token_losses(overrides: list[str], devices: list, batch: dict[str, np.ndarray]) -> np.ndarray:
    """Per-token losses [rows, L] of the model of `overrides`, initialized the same whatever the mesh."""
    cfg = load_config(None, [*MODEL, "train.global_batch=8", *overrides])
    setup = setup_run(cfg, devices, tokenizer_vocab=257)

    @jax.jit
    def losses(state: nnx.State, batch: dict) -> jax.Array:
        with use_rules(setup.rules, setup.mesh):
            model, _ = nnx.merge(setup.graphdef, state)
            return token_cross_entropy(model(batch["inputs"], model.documents(batch)), batch["targets"])

    return np.asarray(losses(setup.init_state(), jax.device_put(batch, setup.batch_sharding)))


@pytest.mark.parametrize(
    "mesh, num_devices",
    [
        (["mesh.fsdp=1"], 1),
        (["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"], 8),
        # Dropless MoE (with capacity, which tokens an expert drops depends on the whole row).
        (["model.num_experts=4", "model.capacity_factor=0.0", "mesh.data=2", "mesh.expert=4", "mesh.fsdp=1"], 8),
    ],
    ids=["one_device", "fsdp4_tensor2", "moe_data2_expert4"],
)
def test_a_packed_row_gives_each_documents_own_losses(mesh, num_devices):
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, EOS, 9), rng.integers(0, EOS, 6)
    packed = DocumentRows(FixedRows(window(np.concatenate([a, [EOS], b, [EOS]]), 8)), EOS).rows(0, range(8))
    alone_a, alone_b = window(np.concatenate([a, [EOS]]), 8), window(np.concatenate([b, [EOS]]), 8)
    devices = jax.devices()[:num_devices]
    got = per_token_losses(mesh, devices, packed)
    want_a = per_token_losses(mesh, devices, alone_a)
    want_b = per_token_losses(mesh, devices, alone_b)
    np.testing.assert_allclose(got[:, : len(a)], want_a, rtol=1e-5)
    np.testing.assert_allclose(got[:, len(a) + 1 :], want_b, rtol=1e-5)
    # The target after A's eos (B's first token) is nobody's to predict: out of the loss.
    assert packed["loss_mask"][0, len(a)] == 0 and packed["loss_mask"].sum() == 8 * (len(a) + len(b))


def grads_and_loss(overrides: list[str], num_devices: int, batch: dict) -> tuple[list, float]:
    cfg = load_config(None, [*MODEL, "train.global_batch=8", "train.seq_len=16", "train.grad_accum=4", *overrides])
    setup = setup_run(cfg, jax.devices()[:num_devices], tokenizer_vocab=257)

    @jax.jit
    def grads(state: nnx.State, batch: dict) -> tuple:
        with use_rules(setup.rules, setup.mesh):
            model_def, params, rest = nnx.split(nnx.merge(setup.graphdef, state)[0], nnx.Param, ...)
            if setup.layout.schedule is None:
                g, (loss_sum, _, _) = summed_grads(model_def, params, rest, batch, cfg.train.grad_accum)
            else:
                g, (loss_sum, _, _) = pipelined_grads(model_def, params, rest, batch, setup.layout.schedule)
            return g, loss_sum

    g, loss_sum = jax.device_get(grads(setup.init_state(), jax.device_put(batch, setup.batch_sharding)))
    return jax.tree.leaves(g), float(loss_sum)


@pytest.mark.slow  # 20-45 s on 2 busy cores; the default suite outgrew 15 min (sequence parallelism compiles slower)
def test_packed_documents_through_the_pipeline_with_remat_match_one_device():
    tokens = np.random.default_rng(1).integers(0, EOS + 1, (8, 17)).astype(np.int32)  # eos about every 16 tokens
    tokens[:, 5] = EOS  # and at least one document boundary in every row
    plain = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((8, 16), np.float32)}
    batch = DocumentRows(FixedRows(plain), EOS).rows(0, range(8))
    ref_grads, ref_loss = grads_and_loss(["mesh.fsdp=1"], 1, batch)
    layout = ["mesh.pipeline=2", "mesh.fsdp=2", "mesh.tensor=2", "model.remat=full"]
    got_grads, loss = grads_and_loss(layout, 8, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for got, want in zip(got_grads, ref_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.max(np.abs(want)))


def sft_store(tmp_path, count: int = 48) -> tuple[DataConfig, dict[tuple, np.ndarray]]:
    """A prompt/completion jsonl of `count` examples of varied length (byte tokenizer), and each example's
    tokens -> learned flags, encoded directly (not through the store)."""
    rng = np.random.default_rng(3)
    letters = np.array(list("abcdefghij klmnop\n"))
    rows = [
        {
            "prompt": "".join(rng.choice(letters, rng.integers(1, 30))),
            "completion": "".join(rng.choice(letters, rng.integers(1, 30))),
        }
        for _ in range(count)
    ]
    path = tmp_path / "pc.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = DataConfig(source="prompt_completion", paths=str(path), eval_fraction=0.0, store=str(tmp_path / "store"))
    encoder = ExampleEncoder(cfg, ByteTokenizer())
    examples = {}
    for row in rows:
        ids, trained = encoder.prompt_completion(row["prompt"], row["completion"])
        examples[tuple(ids.tolist())] = trained
    return cfg, examples


@pytest.mark.parametrize(
    "mesh, num_devices",
    [(["mesh.fsdp=1"], 1), (["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], 8)],
    ids=["one_device", "data2_fsdp2_tensor2"],
)
def test_packed_fine_tuning_rows_give_each_examples_loss_alone(tmp_path, mesh, num_devices):
    cfg, examples = sft_store(tmp_path)
    packed = FineTuneBatches(cfg, "train", 64, 8)
    assert packed.describe()["data_fill_ratio"] > 0.85 and packed.describe()["data_rows"] < len(examples) / 2
    batch = packed.rows(0, range(8))
    devices = jax.devices()[:num_devices]
    got = per_token_losses(mesh, devices, batch)

    alone_rows, where = [], []  # each example of the packed rows, alone in a row of its own
    for r in range(8):
        for k in np.unique(batch["segment_ids"][r]):
            at = np.flatnonzero(batch["segment_ids"][r] == k)
            # The example's tokens: its inputs, and its last token too where that is only a target (row's end).
            shapes = [batch["inputs"][r][at], np.append(batch["inputs"][r][at], batch["targets"][r][at[-1]])]
            tokens = next((t for t in shapes if tuple(t.tolist()) in examples), None)
            if tokens is None:  # the padding after the last example
                assert k == batch["segment_ids"][r].max() and batch["loss_mask"][r][at].sum() == 0
                continue
            learned = examples[tuple(tokens.tolist())]
            # The mask is the example's own learned targets, and nothing crosses into the next example.
            np.testing.assert_array_equal(batch["loss_mask"][r][at][: tokens.size - 1], learned[1:])
            assert np.all(batch["loss_mask"][r][at][tokens.size - 1 :] == 0)
            assert np.all(batch["positions"][r][at] == np.arange(at.size))
            alone_rows.append(np.pad(tokens, (0, 65 - tokens.size), constant_values=EOS))
            where.append((r, at, learned))
    assert len(where) > 8  # several examples to a row
    for first in range(0, len(where), 8):
        chunk = alone_rows[first : first + 8]
        chunk += [chunk[-1]] * (8 - len(chunk))
        alone = per_token_losses(mesh, devices, window_rows(np.stack(chunk)))
        for i, (r, at, learned) in enumerate(where[first : first + 8]):
            trained = learned[1:].astype(bool)  # the example's targets, at its first positions
            np.testing.assert_allclose(
                got[r][at[: trained.size]][trained], alone[i][: trained.size][trained], rtol=1e-5
            )


def window_rows(tokens_NL: np.ndarray) -> dict[str, np.ndarray]:
    """Rows of whole windows: inputs, targets shifted by one, a full loss mask."""
    tokens_NL = tokens_NL.astype(np.int32)
    inputs, targets = tokens_NL[:, :-1], tokens_NL[:, 1:]
    return {"inputs": inputs, "targets": targets, "loss_mask": np.ones(inputs.shape, np.float32)}


def test_first_fit_decreasing_puts_each_example_in_the_first_row_with_room():
    sizes = np.random.default_rng(5).integers(1, 65, 300)
    rows: list[int] = []  # free room of each row, by the textbook's loop
    want = np.zeros(sizes.size, np.int64)
    for item in np.argsort(-sizes, kind="stable"):
        row = next((r for r, room in enumerate(rows) if room >= sizes[item]), len(rows))
        rows += [65] if row == len(rows) else []
        rows[row] -= sizes[item]
        want[item] = row
    np.testing.assert_array_equal(first_fit_decreasing(sizes, 65), want)
    assert sizes.sum() / (len(rows) * 65) > 0.97
