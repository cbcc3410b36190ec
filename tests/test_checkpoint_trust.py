"""No good checkpoint lost, no silent restart, no config that cannot be right (issue 21).

Each test is the claim it checks: a dtype change restores by a cast, a directory with steps is never
trained over from step 0 unless asked, only the training run renames steps, a notice at any moment
ends with the last save committed, transient storage errors are told from permanent ones, a change of
the model's math is refused by name, the checksum's position index does not wrap, and every value a
config cannot hold is refused with the fix.
"""

import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_runner import run_cli, start_cli, stopped_at_exit
from test_checkpoint import BASE, _corrupt_every_step, _data_files, _saved, run

from jaxscale import cli
from jaxscale.checkpoint import (
    Checkpointer,
    CheckpointUnavailableError,
    NoUsableCheckpointError,
    step_directories,
)
from jaxscale.checkpoint.manager import (
    _CHECKSUM_ALGORITHM_32,
    _GOLDEN,
    CHECKSUM_ALGORITHM,
    checksum,
    is_corruption,
    linear_index_words,
)
from jaxscale.config import _RANGES, CheckpointConfig, in_range, load_config
from jaxscale.errors import TransientError, UserError
from jaxscale.storage import is_transient
from jaxscale.training.setup import RunSetup


def names(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --- a dtype change is a cast, never corruption -------------------------------------------------------------


@pytest.mark.slow  # 20-45 s on 2 busy cores; the default suite outgrew 15 min (sequence parallelism compiles slower)
def test_a_changed_param_dtype_restores_cast_and_sets_nothing_aside(tmp_path):
    run(tmp_path, "train.steps=5")
    summary = run(tmp_path, "train.steps=8", "model.param_dtype=bfloat16")  # steps in bfloat16 after the first too
    assert summary["start_step"] == 5 and np.isfinite(summary["final_loss"])
    assert names(tmp_path / "checkpoints") == ["5", "8"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    (change,) = [row for row in rows if row.get("event") == "layout_change"]
    assert "model/embed: float32 -> bfloat16" in change["dtype_changes"]


def test_restore_reads_as_stored_verifies_then_casts(tmp_path, tiny_state):
    state, structs = tiny_state
    _saved(tmp_path, state, steps=(5,)).close()
    as_bf16 = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            x.shape, jnp.bfloat16 if x.dtype == jnp.float32 else x.dtype, sharding=x.sharding
        ),
        structs,
    )
    ckpt = Checkpointer(tmp_path, CheckpointConfig())
    try:
        assert "model/embed: float32 -> bfloat16" in ckpt.check_compatible(5, as_bf16)
        restored = ckpt.restore(5, as_bf16)
    finally:
        ckpt.close()
    for got, saved in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert got.dtype == (jnp.bfloat16 if saved.dtype == jnp.float32 else saved.dtype)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(saved.astype(got.dtype)))


def test_a_dtype_that_is_not_a_float_is_refused_by_name(tmp_path, tiny_state):
    state, structs = tiny_state
    _saved(tmp_path, state, steps=(5,)).close()
    wrong = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32 if x.dtype == jnp.int32 else x.dtype, sharding=x.sharding),
        structs,
    )
    ckpt = Checkpointer(tmp_path, CheckpointConfig())
    try:
        with pytest.raises(
            UserError, match=r"optimizer/.*count: checkpoint has int32, model wants float32 \(only float"
        ):
            ckpt.restore_latest(wrong)
    finally:
        ckpt.close()
    assert names(tmp_path) == ["5"]


# --- never a silent restart ---------------------------------------------------------------------------------


def test_a_rerun_after_every_step_was_set_aside_still_refuses_and_says_why(tmp_path, tiny_state):
    state, structs = tiny_state
    _saved(tmp_path, state).close()
    _corrupt_every_step(tmp_path)
    for attempt in range(2):  # the second run finds only set-aside steps, which Orbax does not list
        ckpt = Checkpointer(tmp_path, CheckpointConfig())
        try:
            with pytest.raises(NoUsableCheckpointError) as caught:
                ckpt.restore_latest(structs)
        finally:
            ckpt.close()
        message = str(caught.value)
        assert "set checkpoint.allow_fresh_start=true to train again from step 0" in message
        if attempt:
            assert "10.unreadable-" in message and "(set aside earlier: step 10: " in message
            assert "5.unreadable-" in message
    assert all(".unreadable-" in name for name in names(tmp_path))


@pytest.mark.parametrize(
    "overrides, why",
    [
        (["checkpoint.resume=false"], "but checkpoint.resume=false, so this run would start over at step 0"),
        (["checkpoint.every=0"], "but this run saves no checkpoints (checkpoint.every=0"),
    ],
    ids=["resume_false", "checkpoints_off"],
)
def test_a_run_that_would_not_resume_refuses_a_run_dir_with_steps(tmp_path, overrides, why):
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "20").mkdir(parents=True)
    (checkpoints / "10.unreadable-1700000000").mkdir()
    (checkpoints / "30.orbax-checkpoint-tmp-7").mkdir()
    (tmp_path / "config.yaml").write_text("the previous run's\n")
    with pytest.raises(UserError) as caught:
        run(tmp_path, "train.steps=5", *overrides)
    message = str(caught.value)
    assert f"run.dir={tmp_path} holds checkpoints (10.unreadable-1700000000, 20, 30.orbax-checkpoint-tmp-7)" in message
    assert why in message and "Point run.dir at a new directory" in message
    assert (tmp_path / "config.yaml").read_text() == "the previous run's\n"
    assert step_directories(checkpoints) == ["10.unreadable-1700000000", "20", "30.orbax-checkpoint-tmp-7"]


# --- only the training run sets steps aside -----------------------------------------------------------------


def test_a_read_only_opener_passes_over_a_corrupt_step_and_renames_nothing(tmp_path, tiny_state, caplog):
    state, structs = tiny_state
    _saved(tmp_path, state).close()
    for path in _data_files(tmp_path / "10"):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    reader = Checkpointer(tmp_path, CheckpointConfig(), read_only=True)
    try:
        step, _ = reader.restore_latest(structs)
        assert step == 5
        _corrupt_every_step(tmp_path)
        with pytest.raises(NoUsableCheckpointError, match="nothing was renamed or deleted"):
            reader.restore_latest(structs)
    finally:
        reader.close()
    assert names(tmp_path) == ["10", "5"]
    assert "left in place (read-only)" in caplog.text


# --- a notice at any moment ends with the last save committed -----------------------------------------------


@pytest.mark.slow  # 20-45 s on 2 busy cores; the default suite outgrew 15 min (sequence parallelism compiles slower)
def test_sigterm_with_checkpoints_off_exits_4_saying_nothing_was_saved(tmp_path):
    proc = start_cli(
        "train", "configs/tiny.yaml", f"run.dir={tmp_path}", *BASE, "train.steps=200", "checkpoint.every=0"
    )
    with stopped_at_exit(proc):
        while not (tmp_path / "metrics.jsonl").exists() or "loss" not in (tmp_path / "metrics.jsonl").read_text():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 4, err[-3000:]
    assert "checkpoints are off (checkpoint.every=0), so nothing was saved" in err
    assert "saved step" not in err and not (tmp_path / "checkpoints").exists()


def _signal_self_during(monkeypatch, owner: type, method: str) -> None:
    """SIGTERM to this process from inside `owner.method`, then the method itself: a notice at that moment."""
    original = getattr(owner, method)

    def with_notice(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, method, with_notice)


def test_sigterm_while_compiling_stops_at_the_restored_step(tmp_path, monkeypatch):
    run(tmp_path, "train.steps=5")
    _signal_self_during(monkeypatch, RunSetup, "lower_train_step")
    summary = run(tmp_path, "train.steps=10")
    assert (summary["start_step"], summary["preempted_at"], summary["resumable_step"]) == (5, 5, 5)
    assert names(tmp_path / "checkpoints") == ["5"]


def test_sigterm_during_the_final_close_commits_the_last_save(tmp_path, monkeypatch):
    _signal_self_during(monkeypatch, Checkpointer, "close")
    summary = run(tmp_path, "train.steps=5")
    monkeypatch.undo()  # the check below closes a Checkpointer too, with no watcher armed
    assert (summary["preempted_at"], summary["resumable_step"]) == (5, 5)
    ckpt = Checkpointer(tmp_path / "checkpoints", CheckpointConfig(), read_only=True)
    try:
        assert ckpt.steps() == [5] and ckpt.verify(5).ok
    finally:
        ckpt.close()


# --- transient storage errors are retried, permanent ones are not --------------------------------------------


class _HttpError(Exception):
    def __init__(self, code: int):
        super().__init__(f"HTTP {code}")
        self.code = code


@pytest.mark.parametrize(
    "error, transient",
    [
        (ValueError("UNAVAILABLE: Error reading gs://b/x: connection reset"), True),
        (ValueError("DEADLINE_EXCEEDED: Timed out reading"), True),
        (TimeoutError("timed out"), True),
        (ConnectionRefusedError(111, "Connection refused"), True),
        (_HttpError(503), True),
        (_HttpError(429), True),
        (OSError(116, "Stale file handle"), True),
        (_HttpError(403), False),
        (PermissionError(13, "Permission denied"), False),
        (ValueError("DATA_LOSS: checksum mismatch"), False),
        (jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate"), False),
    ],
)
def test_transient_errors_are_told_from_permanent_ones(error, transient):
    wrapped = RuntimeError("restore failed")
    wrapped.__cause__ = error
    assert is_transient(error) == transient and is_transient(wrapped) == transient


@pytest.mark.parametrize(
    "text",
    [
        'DATA_LOSS: Error reading "0.embed/0.0" in OCDBT database: checksum mismatch',
        'FAILED_PRECONDITION: Error reading "1.mu/0.0.6" in OCDBT database: ZSTD_decompressStream() failed: Unknown '
        "frame descriptor; at byte 0",
        "OUT_OF_RANGE: Read past the end of the file",
        "Error decoding b-tree node",
    ],
)
def test_damaged_bytes_are_corruption_and_storage_errors_are_not(text):
    wrapped = Exception("Encountered error while reading array index: (slice(0, 4, 1),)")
    wrapped.__cause__ = ValueError(text)
    assert is_corruption(wrapped)
    assert not is_corruption(ValueError("UNAVAILABLE: connection reset"))
    assert not is_corruption(PermissionError(13, "Permission denied"))


def test_storage_unavailable_on_restore_keeps_every_step_and_is_transient(tmp_path, tiny_state, monkeypatch):
    state, structs = tiny_state
    ckpt = _saved(tmp_path, state)

    def unavailable(*args, **kwargs):
        raise ValueError("UNAVAILABLE: Error reading local file: connection to the storage service lost")

    monkeypatch.setattr(ckpt.state_handler, "restore", unavailable)
    try:
        with pytest.raises(CheckpointUnavailableError, match=r"Reading checkpoint step 10 .* failed for now .*every"):
            ckpt.restore_latest(structs)
    finally:
        ckpt.close()
    assert names(tmp_path) == ["10", "5"]


def test_a_transient_error_exits_69(monkeypatch, capsys):
    def unavailable(cfg):
        raise TransientError("storage unavailable for now")

    monkeypatch.setattr("jaxscale.training.loop.train", unavailable)
    assert cli.main(["train", "configs/tiny.yaml"]) == 69
    assert "jaxscale: error (transient): storage unavailable for now" in capsys.readouterr().err


# --- a change of the model's math is refused by name ---------------------------------------------------------


@pytest.mark.slow  # 20-45 s on 2 busy cores; the default suite outgrew 15 min (sequence parallelism compiles slower)
def test_a_changed_rope_theta_is_refused_unless_allowed_on_purpose(tmp_path):
    run(tmp_path, "train.steps=5")
    with pytest.raises(UserError) as caught:
        run(tmp_path, "train.steps=6", "model.rope_theta=500000", "model.norm_eps=1e-6")
    message = str(caught.value)
    assert "trained with other model math: model.norm_eps: 1e-05 -> 1e-06; model.rope_theta: 10000.0 -> 500000.0" in (
        message
    )
    assert "checkpoint.allow_config_change=[model.norm_eps,model.rope_theta]" in message
    assert names(tmp_path / "checkpoints") == ["5"]
    allowed = "checkpoint.allow_config_change=[model.rope_theta,model.norm_eps]"
    summary = run(tmp_path, "train.steps=6", "model.rope_theta=500000", "model.norm_eps=1e-6", allowed)
    assert summary["start_step"] == 5


def test_allow_config_change_names_only_real_keys():
    with pytest.raises(UserError, match=r"checkpoint.allow_config_change lists 'model.rope_thta', which is no config"):
        load_config(None, ["checkpoint.allow_config_change=[model.rope_thta]"])


# --- the checksum's position index does not wrap at 2**32 -----------------------------------------------------


def test_far_apart_positions_of_a_huge_array_never_alias():
    """Layers 0 and 64 of a stacked [126, 16384, 53248] weight lie 13 * 2**32 elements apart."""
    shape = (126, 16384, 53248)
    rng = np.random.default_rng(0)
    rows, cols = rng.integers(0, shape[1], 64), rng.integers(0, shape[2], 64)
    for layer_a, layer_b in ((0, 64), (1, 65), (60, 124)):
        words = []
        for layer in (layer_a, layer_b):
            coords = [jnp.full(64, layer, jnp.uint32), jnp.asarray(rows, jnp.uint32), jnp.asarray(cols, jnp.uint32)]
            low, high = linear_index_words(coords, shape)
            exact = (layer * shape[1] + rows.astype(object)) * shape[2] + cols.astype(object)
            assert [int(x) for x in low] == [int(i % 2**32) for i in exact]
            assert [int(x) for x in high] == [int(i >> 32) for i in exact]
            words.append((np.asarray(low), np.asarray(high)))
        assert np.array_equal(words[0][0], words[1][0])  # the 32-bit index aliased: its low words are equal
        assert not np.array_equal(words[0][1], words[1][1])


def test_arrays_under_2_32_words_sum_as_with_the_32_bit_index():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 5, 7)), jnp.float32)
    bits = np.asarray(jax.lax.bitcast_convert_type(x, jnp.uint32)).ravel().astype(np.uint64)

    def fmix32(h):
        h = h ^ (h >> 16)
        h = (h * 0x85EBCA6B) % 2**32
        h = h ^ (h >> 13)
        h = (h * 0xC2B2AE35) % 2**32
        return h ^ (h >> 16)

    position = fmix32((np.arange(bits.size, dtype=np.uint64) + _GOLDEN) % 2**32)
    assert int(checksum(x)) == int(np.sum(fmix32(bits ^ position)) % 2**32)
    assert CHECKSUM_ALGORITHM != _CHECKSUM_ALGORITHM_32


# --- config values that cannot be right ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.n_kv_heads=0", "model.n_kv_heads=0 is out of range; set it within [1, inf), e.g. model.n_kv_heads=2"),
        ("model.d_model=0", "model.d_model=0 is out of range; set it within [1, inf)"),
        ("model.n_layers=-1", "model.n_layers=-1 is out of range; set it within [1, inf)"),
        ("model.head_dim=0", "model.head_dim=0 is out of range"),
        ("model.d_ff=0", "model.d_ff=0 is out of range"),
        ("model.rope_theta=.nan", "model.rope_theta=nan must be a finite number, e.g. model.rope_theta=10000.0"),
        ("model.norm_eps=-1", "model.norm_eps=-1.0 is out of range; set it within (0.0, inf)"),
        ("model.init_std=.nan", "model.init_std=nan must be a finite number"),
        ("optim.lr=.inf", "optim.lr=inf must be a finite number, e.g. optim.lr=0.003"),
        ("train.eval_batches=0", "train.eval_batches=0 is out of range; set it within [1, inf), e.g. train.eval_batc"),
        ("checkpoint.keep=0", "checkpoint.keep=0 is out of range; set it within [1, inf), e.g. checkpoint.keep=3 (the"),
        ("checkpoint.keep=-1", "checkpoint.keep=-1 is out of range"),
        (
            "checkpoint.every=-5",
            "checkpoint.every=-5 is out of range; set it within [0, inf), e.g. checkpoint.every=100",
        ),
        ("train.hang_timeout_s=-1", "train.hang_timeout_s=-1.0 is out of range"),
        ("data.eval_fraction=1", "data.eval_fraction=1.0 is out of range; set it within [0.0, 1.0)"),
        # The families' numbers, each a NaN or a meaningless model where it is negative (or zero: yarn's betas).
        (
            "model.query_pre_attn_scalar=-256",
            "model.query_pre_attn_scalar=-256.0 is out of range; set it within [0.0, inf), e.g. "
            "model.query_pre_attn_scalar=0.0 (logits scaled by its -1/2 power; 0: head_dim)",
        ),
        ("model.rope_local_theta=-1", "model.rope_local_theta=-1.0 is out of range; set it within [0.0, inf)"),
        ("model.attn_softcap=-50", "model.attn_softcap=-50.0 is out of range; set it within [0.0, inf)"),
        ("model.final_softcap=-30", "model.final_softcap=-30.0 is out of range; set it within [0.0, inf)"),
        ("model.rope_beta_fast=0", "model.rope_beta_fast=0.0 is out of range; set it within (0.0, inf)"),
        ("model.rope_beta_slow=-1", "model.rope_beta_slow=-1.0 is out of range; set it within (0.0, inf)"),
        ("model.rope_attention_factor=-1", "model.rope_attention_factor=-1.0 is out of range; set it within [0.0,"),
    ],
)
def test_values_a_config_cannot_hold_are_refused_with_the_fix(override, message):
    with pytest.raises(UserError) as caught:
        load_config(None, [override])
    assert message in str(caught.value)


def test_every_default_lies_in_its_range():
    cfg = load_config(None, [])
    assert [
        key for key in _RANGES if not in_range(getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]), key)
    ] == []


# --- `jaxscale checkpoints`: every step directory listed, --verify tells corrupt from unreadable ---------------


def test_checkpoints_lists_bad_metadata_as_a_row_and_verify_finds_the_corrupt_step(tmp_path):
    run(tmp_path, "train.steps=15")
    checkpoints = tmp_path / "checkpoints"
    meta = checkpoints / "5" / "meta" / "metadata"
    meta.write_text(meta.read_text()[:40])  # cut short
    for path in _data_files(checkpoints / "10"):
        data = bytearray(path.read_bytes())
        data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)
        path.write_bytes(bytes(data))
    result = run_cli("checkpoints", str(tmp_path), "--verify", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["step"]: row for row in json.loads(result.stdout)}
    assert rows[5]["status"].startswith("unreadable: metadata unreadable (JSONDecodeError")
    assert rows[10]["verified"].startswith("corrupt: step 10: ")
    assert rows[15]["verified"] == "ok"
    assert names(checkpoints) == ["10", "15", "5"]  # nothing renamed


def test_verify_calls_a_failed_read_unreadable_not_corrupt(tmp_path, tiny_state, monkeypatch):
    state, _ = tiny_state
    ckpt = _saved(tmp_path, state, steps=(5,))

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(ckpt.state_handler, "restore", denied)
    try:
        verdict = ckpt.verify(5)
    finally:
        ckpt.close()
    assert verdict.status == "unreadable" and "PermissionError" in verdict.reason
