"""Checkpoints that survive faults: bitwise resume, resharding restore, kills, SIGTERM, bad files, NaN.

Runs use fp32 compute and a fixed schedule length (optim.decay_steps) so a run stopped at step
k and resumed computes exactly what a straight run computes. Tolerances: same mesh, bitwise;
another mesh, losses within 1e-4 relative (reductions sum in another order).
"""

import json
import logging
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from cli_runner import REPO, cli_env, run_cli, start_cli, stopped_at_exit
from flax import nnx

from jaxscale.checkpoint import (
    Checkpointer,
    CheckpointRestoreError,
    ChecksumMismatchError,
    NonFiniteStateError,
    NoUsableCheckpointError,
)
from jaxscale.checkpoint.manager import CHECKSUM_ALGORITHM, checksums_json, fingerprint
from jaxscale.config import CheckpointConfig, load_config
from jaxscale.data import TokenBatches
from jaxscale.errors import UserError
from jaxscale.training.loop import NonFiniteLossError, train
from jaxscale.training.setup import setup_run

sys.path.insert(0, str(REPO / "scripts"))
import kill_harness  # noqa: E402

BASE = [
    "train.seq_len=32",
    "model.compute_dtype=float32",
    "optim.decay_steps=20",
    "log.every=1",
    "log.progress=false",
    "log.tensorboard=false",
    "train.eval_every=1000",
    "train.eval_batches=1",
    "checkpoint.every=5",
]
MESH_222 = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]


def run(run_dir: Path, *overrides: str, nan_steps: frozenset[int] = frozenset()) -> dict:
    """Train configs/tiny.yaml with BASE and `overrides`; the loss mask of each of `nan_steps` (0-based) is NaN."""
    cfg = load_config("configs/tiny.yaml", [f"run.dir={run_dir}", *BASE, *overrides])
    if not nan_steps:
        return train(cfg)
    shape = (cfg.data, cfg.train.seq_len, cfg.train.global_batch)
    return train(cfg, NaNAtSteps(nan_steps, *shape), TokenBatches(cfg.data, "eval", *shape[1:]))


class NaNAtSteps(TokenBatches):
    """The train split with a NaN loss mask at chosen steps: a fault injected into the loader, not the product."""

    def __init__(self, steps: frozenset[int], *args: object) -> None:
        super().__init__(args[0], "train", *args[1:])
        self.steps = steps

    def rows(self, step: int, row_ids) -> dict[str, np.ndarray]:
        rows = super().rows(step, row_ids)
        if step in self.steps:
            rows["loss_mask"] = rows["loss_mask"] * np.float32("nan")
        return rows


def loss_rows(run_dir: Path) -> dict[int, list[float]]:
    """Every logged (loss, grad_norm) per step; a step logged twice (before a kill and after) appears twice."""
    rows: dict[int, list[float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            rows.setdefault(row["step"], []).append((row["loss"], row["grad_norm"]))
    return rows


def params_equal(dir_a: Path, dir_b: Path, step: int) -> bool:
    return kill_harness.final_state_equal(dir_a, dir_b, step)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """20 uninterrupted steps on the 8-device data=2, fsdp=2, tensor=2 mesh."""
    run_dir = tmp_path_factory.mktemp("straight")
    run(run_dir, "train.steps=20", *MESH_222)
    return run_dir


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_identical(straight, tmp_path):
    """20 steps straight == 10 steps, SIGKILL, resume to 20: same parameters bit for bit, same loss rows."""
    proc = start_cli(
        "train", "configs/tiny.yaml", f"run.dir={tmp_path}", *BASE, "train.steps=20", "checkpoint.every=10", *MESH_222
    )
    with stopped_at_exit(proc):
        deadline = time.monotonic() + 300
        while not (tmp_path / "checkpoints" / "10").exists() and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    summary = run(tmp_path, "train.steps=20", "checkpoint.every=10", *MESH_222)
    assert summary["start_step"] in (10, 20)
    assert summary["start_step"] == 10 or not (tmp_path / "checkpoints" / "20").exists()
    assert params_equal(straight, tmp_path, 20)
    reference = loss_rows(straight)
    for step, values in loss_rows(tmp_path).items():
        assert all(v == reference[step][0] for v in values), step


@pytest.mark.parametrize(
    "saved_on, resumed_on",
    [
        (MESH_222, ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=4"]),
        (MESH_222, ["mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1"]),
    ],
    ids=["222_to_fsdp2_tensor4", "222_to_data8"],
)
def test_checkpoint_restores_onto_another_mesh(straight, tmp_path, saved_on, resumed_on):
    run(tmp_path, "train.steps=10", *saved_on)
    summary = run(tmp_path, "train.steps=20", *resumed_on)
    assert summary["start_step"] == 10
    resumed, reference = loss_rows(tmp_path), loss_rows(straight)
    for step in range(11, 21):
        np.testing.assert_allclose(resumed[step][0], reference[step][0], rtol=1e-4)


@pytest.mark.slow  # 20-45 s on 2 busy cores; the default suite outgrew 15 min (sequence parallelism compiles slower)
def test_checkpoint_restores_onto_fewer_devices(straight, tmp_path):
    """Saved on 8 devices, resumed in a new process with 4: the global batch and the losses continue."""
    run(tmp_path, "train.steps=10", *MESH_222)
    result = run_cli(
        "train",
        "configs/tiny.yaml",
        f"run.dir={tmp_path}",
        *BASE,
        "train.steps=20",
        "runtime.cpu_devices=4",
        "mesh.data=1",
        "mesh.fsdp=4",
        "mesh.tensor=1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "starting at step 10" in result.stdout
    resumed, reference = loss_rows(tmp_path), loss_rows(straight)
    for step in range(11, 21):
        np.testing.assert_allclose(resumed[step][-1], reference[step][0], rtol=1e-4)


@pytest.mark.slow
def test_random_sigkills_lose_nothing(tmp_path):
    """Five SIGKILLs at random moments (many during async writes), then finish: bitwise equal, all usable."""
    kill_harness.run_to_completion(tmp_path / "straight")
    # Kills land within a sixth of the straight run's training time, so that five of them fit in one run
    # however fast this machine steps.
    wall_s = json.loads((tmp_path / "straight" / "summary.json").read_text())["wall_s"]
    stats = kill_harness.kill_repeatedly(tmp_path / "killed", kills=5, rng=random.Random(1), max_delay_s=wall_s / 6)
    assert stats.kills >= 4
    kill_harness.run_to_completion(tmp_path / "killed")
    assert kill_harness.final_state_equal(tmp_path / "straight", tmp_path / "killed", 24)
    assert kill_harness.unusable_checkpoints(tmp_path / "killed") == []


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_75(straight, tmp_path):
    proc = start_cli(
        "train", "configs/tiny.yaml", f"run.dir={tmp_path}", *BASE, "train.steps=20", "checkpoint.every=100", *MESH_222
    )
    with stopped_at_exit(proc):
        while kill_harness._logged_steps(tmp_path) < 3 and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    stopped = int(err.split("preempted at step ")[1].split(";")[0])
    saved = int(err.split("the newest checkpoint is step ")[1].split(";")[0])
    assert 3 <= saved == stopped < 20
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [saved]
    assert run(tmp_path, "train.steps=20", *MESH_222)["start_step"] == saved
    assert params_equal(straight, tmp_path, 20)


def test_checkpoint_of_another_model_is_refused_before_compute(tmp_path):
    run(tmp_path, "train.steps=5")
    with pytest.raises(
        UserError,
        match=r"written by a different model: model/blocks/mlp/w_down: checkpoint has "
        r"\(4, 384, 128\), model wants \(4, 256, 128\)",
    ):
        run(tmp_path, "train.steps=10", "model.d_ff=256")


def _data_files(step_dir: Path) -> list[Path]:
    return sorted(p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d")


@pytest.mark.parametrize("damage", ["corrupt", "truncate"])
def test_damaged_checkpoint_falls_back_to_the_previous_step(tmp_path, caplog, damage):
    run(tmp_path, "train.steps=10")
    for path in _data_files(tmp_path / "checkpoints" / "10"):
        data = bytearray(path.read_bytes())
        if damage == "corrupt":
            data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)
        else:
            data = data[: len(data) // 3]
        path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="jaxscale.checkpoint"):
        summary = run(tmp_path, "train.steps=12")
    assert summary["start_step"] == 5
    assert "checkpoint step 10" in caplog.text and "unreadable" in caplog.text


def test_half_written_checkpoint_is_skipped_with_a_warning(tmp_path, caplog):
    run(tmp_path, "train.steps=5")
    partial = tmp_path / "checkpoints" / "10.orbax-checkpoint-tmp-1234"
    (partial / "state").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="jaxscale.checkpoint"):
        summary = run(tmp_path, "train.steps=6")
    assert summary["start_step"] == 5
    assert "10.orbax-checkpoint-tmp-1234 was not fully written" in caplog.text
    assert not partial.exists()


@pytest.mark.slow
def test_failed_write_keeps_the_previous_checkpoint_and_stops_cleanly(tmp_path):
    """A file-size limit (ulimit -f) makes every large write fail as a full disk would (EFBIG)."""
    run(tmp_path, "train.steps=5")

    result = subprocess.run(
        [
            "bash",
            "-c",
            'ulimit -f 256 && exec "$0" "$@"',
            sys.executable,
            "-m",
            "jaxscale.cli",
            "train",
            "configs/tiny.yaml",
            f"run.dir={tmp_path}",
            *BASE,
            "train.steps=10",
        ],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    # Orbax logs the failed writes of its threads; the run's own word is one error line naming the fix.
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("jaxscale: error:")]
    assert "Saving a checkpoint (step 10)" in error and "File too large" in error
    assert "The last complete checkpoint is step 5; free disk space" in error
    ckpt = Checkpointer(tmp_path / "checkpoints", CheckpointConfig())
    try:
        assert ckpt.steps() == [5] and ckpt.verify(5).ok
    finally:
        ckpt.close()


def test_nan_stop_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"Step 8 gave a non-finite loss .* last good checkpoint is step 5"):
        run(tmp_path, "train.steps=20", "train.on_nan=stop", nan_steps=frozenset({7}))
    ckpt = Checkpointer(tmp_path / "checkpoints", CheckpointConfig())
    try:
        assert ckpt.steps() == [5] and ckpt.verify(5).ok
    finally:
        ckpt.close()


def test_nan_skip_drops_the_update_and_counts_it(tmp_path):
    summary = run(tmp_path, "train.steps=10", "train.on_nan=skip", nan_steps=frozenset({2, 6}))
    assert summary["skipped_steps"] == 2
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = [row for row in rows if "loss" in row][-1]
    assert last["skipped_steps"] == 2 and np.isfinite(last["loss"])
    ckpt = Checkpointer(tmp_path / "checkpoints", CheckpointConfig())
    try:
        assert ckpt.steps() == [5, 10] and ckpt.verify(10).ok
    finally:
        ckpt.close()


def test_restore_never_unpickles(tmp_path, monkeypatch):
    run(tmp_path, "train.steps=5")

    def refuse(*args, **kwargs):
        raise AssertionError("checkpoint loading called pickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    assert run(tmp_path, "train.steps=6")["start_step"] == 5


def test_checkpoints_command_lists_steps_completeness_mesh_and_config_diff(tmp_path):
    run(tmp_path, "train.steps=10", *MESH_222)
    (tmp_path / "checkpoints" / "15.orbax-checkpoint-tmp-99").mkdir()
    result = run_cli("checkpoints", str(tmp_path), "train.steps=30", "--config", str(tmp_path / "config.yaml"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["step", "size", "mesh", "processes", "status"]
    assert any(
        line.split()[:1] == ["5"] and "data=2 fsdp=2 tensor=2" in line and line.endswith(" complete") for line in lines
    )
    assert any(line.split()[0] == "15" and line.endswith(" partial (never committed)") for line in lines)
    assert "train.steps: 10 -> 30" in result.stdout


def test_keep_last_k_plus_every_mth_for_good(tmp_path):
    run(tmp_path, "train.steps=20", "checkpoint.every=2", "checkpoint.keep=2", "checkpoint.keep_every=10")
    kept = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == [10, 18, 20]


def test_time_based_saves(tmp_path):
    """checkpoint.every_minutes alone saves whenever that much time has passed (here: every step)."""
    run(tmp_path, "train.steps=6", "checkpoint.every=0", "checkpoint.every_minutes=1e-6", "checkpoint.keep=10")
    kept = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == [1, 2, 3, 4, 5, 6]


def test_a_state_with_nan_is_never_written(tmp_path):
    cfg = load_config("configs/tiny.yaml", BASE)
    state = setup_run(cfg, tokenizer_vocab=257).init_state()
    poisoned = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(np.nan) if x.dtype == np.float32 else x, state)
    ckpt = Checkpointer(tmp_path, CheckpointConfig())
    try:
        # The finite check runs in the save's background write: it stops the step's commit, and the
        # error surfaces once the save is waited for (here at once, in the loop at the next save).
        with pytest.raises(NonFiniteStateError, match="step 3 holds NaN or Inf; not saving it"):
            ckpt.save(3, poisoned, {}, wait=True)
        assert ckpt.steps() == [] and not (tmp_path / "3").exists()
        ckpt.save(4, state, {}, wait=True)
        assert ckpt.steps() == [4]
    finally:
        ckpt.close()


def _saved(directory: Path, state, steps=(5, 10), **cfg) -> Checkpointer:
    ckpt = Checkpointer(directory, CheckpointConfig(**cfg))
    for step in steps:
        ckpt.save(step, state, {}, wait=True)
    return ckpt


@pytest.mark.parametrize(
    "error, named",
    [
        (
            jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.50GiB"),
            "Out of memory",
        ),
        (PermissionError(13, "Permission denied"), "PermissionError: [Errno 13] Permission denied"),
    ],
    ids=["out_of_memory", "permission"],
)
def test_restore_error_that_is_not_corruption_keeps_every_checkpoint(tmp_path, tiny_state, monkeypatch, error, named):
    state, structs = tiny_state
    ckpt = _saved(tmp_path, state)

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(ckpt.state_handler, "restore", fail)
    try:
        with pytest.raises(CheckpointRestoreError) as caught:
            ckpt.restore_latest(structs)
    finally:
        ckpt.close()
    message = str(caught.value)
    assert message.startswith(f"Restoring checkpoint step 10 under {tmp_path} failed") and named in message
    assert "not proven corrupt, so it and every other checkpoint are kept" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["10", "5"]


def _corrupt_every_step(directory: Path) -> None:
    for step_dir in directory.iterdir():
        for path in _data_files(step_dir):
            data = bytearray(path.read_bytes())
            data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)
            path.write_bytes(bytes(data))


def test_all_checkpoints_corrupt_stops_with_the_list(tmp_path, tiny_state):
    state, structs = tiny_state
    _saved(tmp_path, state).close()
    _corrupt_every_step(tmp_path)
    ckpt = Checkpointer(tmp_path, CheckpointConfig())
    try:
        with pytest.raises(
            NoUsableCheckpointError,
            match=r"is usable: step 10 \(.*\); step 5 \(.*\)\. .*"
            r"set checkpoint.allow_fresh_start=true to train again from step 0",
        ):
            ckpt.restore_latest(structs)
    finally:
        ckpt.close()


def test_all_checkpoints_corrupt_exits_2_from_the_cli(tmp_path):
    run(tmp_path, "train.steps=5")
    _corrupt_every_step(tmp_path / "checkpoints")
    result = run_cli("train", "configs/tiny.yaml", f"run.dir={tmp_path}", *BASE, "train.steps=6")
    assert result.returncode == 2, result.stderr[-3000:]
    # Orbax's threads may print to stderr while the error line is written: find the line by its prefix.
    error = result.stderr[result.stderr.index("jaxscale: error:") :].splitlines()[0]
    assert "No checkpoint under" in error and "step 5 (" in error


def test_allow_fresh_start_trains_from_step_0_when_all_are_corrupt(tmp_path, tiny_state):
    state, structs = tiny_state
    _saved(tmp_path, state).close()
    _corrupt_every_step(tmp_path)
    ckpt = Checkpointer(tmp_path, CheckpointConfig(allow_fresh_start=True))
    try:
        assert ckpt.restore_latest(structs) is None
    finally:
        ckpt.close()


def _save_uncompressed(directory: Path, step: int, state) -> None:
    """A checkpoint as Checkpointer writes it, but with raw array files: no zstd, no OCDBT (one file per chunk).

    Orbax's PyTreeCheckpointHandler (which StandardCheckpointHandler wraps) takes use_compression and use_ocdbt.
    """
    arrays = nnx.to_pure_dict(state)
    sums, _ = fingerprint(arrays)
    meta = {"step": step, "checksum_algorithm": CHECKSUM_ALGORITHM, "checksums": checksums_json(sums)}
    handlers = {
        "state": ocp.PyTreeCheckpointHandler(use_compression=False, use_ocdbt=False),
        "meta": ocp.JsonCheckpointHandler(),
    }
    with ocp.CheckpointManager(directory, item_handlers=handlers) as manager:
        manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(arrays), meta=ocp.args.JsonSave(meta)))
        manager.wait_until_finished()


def _raw_chunk(step_dir: Path) -> Path:
    """An uncompressed float32 chunk file of a model weight (its elements differ: random init)."""
    array_dir = step_dir / "state" / "0.blocks.mlp.w_up"
    assert json.loads((array_dir / ".zarray").read_text())["compressor"] is None
    return sorted(p for p in array_dir.iterdir() if not p.name.startswith("."))[0]


@pytest.mark.parametrize("damage", ["flip_one_bit", "swap_two_elements"])
def test_checksum_catches_damage_in_an_uncompressed_array_file(tmp_path, tiny_state, damage):
    state, structs = tiny_state
    _save_uncompressed(tmp_path, 7, state)
    chunk = _raw_chunk(tmp_path / "7")
    data = bytearray(chunk.read_bytes())
    if damage == "flip_one_bit":
        data[len(data) // 2] ^= 0x04
    else:
        assert data[0:4] != data[4:8]
        data[0:4], data[4:8] = data[4:8], data[0:4]
    chunk.write_bytes(bytes(data))
    ckpt = Checkpointer(tmp_path, CheckpointConfig())
    try:
        with pytest.raises(
            ChecksumMismatchError, match=r"step 7: checksum mismatch in 1 array\(s\), first model/blocks/mlp/w_up"
        ):
            ckpt.restore(7, structs)
    finally:
        ckpt.close()


def test_checksum_is_the_same_on_every_mesh(tiny_state):
    state, _ = tiny_state
    on_mesh = checksums_json(fingerprint(nnx.to_pure_dict(state))[0])
    on_one_device = checksums_json(fingerprint(jax.device_put(nnx.to_pure_dict(state), jax.devices()[0]))[0])
    assert on_mesh == on_one_device
