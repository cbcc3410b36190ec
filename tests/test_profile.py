"""Profile before you scale: the bound component named, traces of a step window, goodput across kills, the report."""

import glob
import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from cli_runner import run_cli, start_cli, stopped_at_exit
from jax.profiler import ProfileData

import jaxscale
from jaxscale.profile import profile_run
from jaxscale.report import PANELS, write_report
from jaxscale.training.goodput import goodput, read_rows
from jaxscale.training.metrics import COMPONENTS

SMALL = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.head_dim=8",
    "model.d_ff=64",
    "train.global_batch=8",
    "train.seq_len=16",
]
QUIET = ["log.progress=false", "log.tensorboard=false"]


class SlowRows:
    """Rows that take 20 ms each to read: a slow input pipeline, made slow here and not in the product."""

    def __init__(self, seq_len: int) -> None:
        self.windows = np.random.default_rng(0).integers(0, 257, (64, seq_len + 1), dtype=np.int32)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> np.ndarray:
        time.sleep(0.02)
        return self.windows[index]


@pytest.mark.slow
def test_a_slow_source_makes_profile_say_input_bound(tmp_path):
    cfg = jaxscale.load_config("configs/tiny.yaml", [*SMALL, *QUIET, f"run.dir={tmp_path}"])
    result = profile_run(cfg, train_source=SlowRows(16), steps=3)
    assert result.bound == "input"
    assert result.verdict.startswith("input-bound: the pipeline supplies ")
    assert result.supply_ratio < 1.0
    assert set(result.loop_breakdown) == set(COMPONENTS)
    # The breakdown is the loop's wall time per step, split.
    assert sum(result.loop_breakdown.values()) == pytest.approx(result.loop_step_s, rel=1e-6)


@pytest.mark.slow
def test_the_default_config_is_compute_bound_and_the_command_prints_every_component(tmp_path):
    result = run_cli("profile", "configs/tiny.yaml", f"run.dir={tmp_path}", "--steps", "3", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    p = json.loads(result.stdout)
    assert p["bound"] == "compute" and p["verdict"].startswith("compute-bound: the step itself takes")
    assert p["mfu"] is None  # CPU: no known peak, so no made-up figure
    for key in ("input_tokens_per_s", "transfer_gb_per_s", "step_s", "tflops_per_device", "memory_gb_per_s"):
        assert p[key] > 0, key
    assert 0 < p["checkpoint_blocked_s"] <= p["checkpoint_total_s"] and p["compile_s"] > 0
    assert p["supply_ratio"] > 1.0


def traced_steps(trace_dir: Path) -> list[int]:
    """The step numbers annotated as `train` in the one jax.profiler trace under `trace_dir`."""
    (xplane,) = glob.glob(str(trace_dir / "**" / "*.xplane.pb"), recursive=True)
    data = ProfileData.from_file(xplane)
    events = [e for plane in data.planes for line in plane.lines for e in line.events if e.name == "train"]
    return sorted(int(dict(e.stats)["step_num"]) for e in events)


@pytest.fixture(scope="module")
def traced_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("traced")
    overrides = [*SMALL, *QUIET, f"run.dir={run_dir}", "train.steps=8", "log.every=2", "log.profile_steps=3:6"]
    jaxscale.train(jaxscale.load_config("configs/tiny.yaml", [*overrides, "checkpoint.every=4"]))
    return run_dir


def test_the_trace_holds_the_requested_steps_and_nothing_outside_them(traced_run):
    assert traced_steps(traced_run / "profile") == [3, 4, 5]


def test_every_log_row_splits_wall_time_and_reports_memory(traced_run):
    rows = [r for r in read_rows(traced_run) if "interval_steps" in r]
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    for row in rows:
        parts = sum(row[f"time_{c}_s"] for c in COMPONENTS)
        assert parts * row["interval_steps"] == pytest.approx(row["wall_s"], rel=1e-6)
        assert row["memory_peak_bytes"] > 0
    assert sum(r["time_checkpoint_s"] for r in rows) > 0  # the save at step 4


def test_report_draws_the_named_panels(traced_run, tmp_path):
    path, titles = write_report(traced_run, tmp_path / "report.png")
    assert titles == list(PANELS)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run_cli("report", str(traced_run)).returncode == 0 and (traced_run / "report.png").stat().st_size > 0


def wait_for_step(run_dir: Path, attempt: int, after_start: int, proc) -> None:
    """Wait until attempt number `attempt` (from 0) has logged a step `after_start` steps past where it started."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        rows = read_rows(run_dir) if (run_dir / "metrics.jsonl").exists() else []
        starts = [i for i, r in enumerate(rows) if r.get("event") == "start"]
        if len(starts) == attempt + 1:
            first = rows[starts[-1]]["step"]
            if any(r["step"] >= first + after_start for r in rows[starts[-1] :] if "loss" in r):
                return
        time.sleep(0.2)
    raise AssertionError("the run did not get there in 300 s")


@pytest.mark.slow
def test_goodput_counts_each_step_once_over_two_kills(tmp_path):
    args = ("train", "configs/tiny.yaml", f"run.dir={tmp_path}", *QUIET, "train.seq_len=32", "train.steps=20")
    args += ("log.every=1", "checkpoint.every=5", "train.eval_every=0", "train.eval_batches=1")
    for attempt in range(2):
        proc = start_cli(*args)
        with stopped_at_exit(proc):
            wait_for_step(tmp_path, attempt, 7, proc)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert run_cli(*args).returncode == 0
    rows = read_rows(tmp_path)
    starts = [i for i, r in enumerate(rows) if r.get("event") == "start"]
    assert len(starts) == 3
    lost = 0
    for this, following in zip(starts, starts[1:], strict=False):
        logged = max(r["step"] for r in rows[this:following] if "loss" in r)
        lost += logged - rows[following]["step"]  # run past the checkpoint the next attempt resumed from
    assert lost > 0
    result = goodput(rows)
    assert result.attempts == 3
    assert result.productive_steps == 20 and result.redone_steps == lost
    assert 0 < result.goodput < 1 and result.badput_s["redone"] > 0
    cli = run_cli("goodput", str(tmp_path), "--json")
    assert cli.returncode == 0 and json.loads(cli.stdout)["redone_steps"] == lost
