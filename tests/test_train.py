"""The real `jaxscale train` command: metrics, run directory, checkpoints and resume."""

import json

import pytest
import yaml
from cli_runner import run_cli

REQUIRED = {
    "step",
    "loss",
    "grad_norm",
    "lr",
    "tokens_per_sec",
    "step_time_s",
    "data_wait_s",
    "tflops_per_device",
    "mfu",
}
SHORT = [
    "train.seq_len=64",
    "log.every=5",
    "train.eval_every=10",
    "train.eval_batches=2",
    "log.progress=false",
    "checkpoint.every=10",
]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    result = run_cli("train", "configs/tiny.yaml", f"run.dir={run_dir}", "train.steps=20", *SHORT)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_metrics_config_tensorboard_and_checkpoints(first_run):
    run_dir, result = first_run
    train_rows = [r for r in rows(run_dir) if "loss" in r]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20]
    assert all(REQUIRED <= r.keys() for r in train_rows)
    assert train_rows[0]["mfu"] is None  # CPU: no known peak
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    assert [r["step"] for r in rows(run_dir) if "eval_loss" in r] == [10, 20]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["steps"] == 20
    assert list((run_dir / "tensorboard").iterdir())
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["10", "20"]
    assert "summary:" in result.stdout


def test_restart_resumes_from_the_latest_checkpoint(first_run):
    run_dir, _ = first_run
    result = run_cli("train", "configs/tiny.yaml", f"run.dir={run_dir}", "train.steps=30", *SHORT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "starting at step 20" in result.stdout
    resumed = [r for r in rows(run_dir) if "loss" in r and r["step"] > 20]
    assert [r["step"] for r in resumed] == [25, 30]
    before = [r for r in rows(run_dir) if "loss" in r and r["step"] == 20][0]
    assert resumed[0]["loss"] < before["loss"] + 0.5  # continues from trained weights, not from scratch (~5.9)
