"""Run directory and optimizer settings: every problem stops before any compute, with the fix in the message."""

import socket
from collections import namedtuple

import jax
import numpy as np
import pytest
from cli_runner import start_cli, stopped_at_exit

from jaxscale.config import load_config
from jaxscale.errors import UserError
from jaxscale.training import rundir
from jaxscale.training.loop import train

DiskUsage = namedtuple("DiskUsage", "total used free")


def test_full_disk_stops_before_any_compute(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda path: DiskUsage(2**30, 2**30 - 2**20, 2**20))
    cfg = load_config("configs/tiny.yaml", [f"run.dir={tmp_path}", "train.steps=2", "train.seq_len=32"])
    with pytest.raises(
        UserError,
        match=r"has 1 MiB free, but one checkpoint of this model takes up to 9.58 MiB \(plus 16 MiB for logs\). "
        r"Free disk space or point run.dir at a larger disk",
    ):
        train(cfg)
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing compiled


def test_state_bytes_counts_every_array():
    structs = {"w": jax.ShapeDtypeStruct((4, 8), np.float32), "step": jax.ShapeDtypeStruct((), np.int32)}
    assert rundir.state_bytes(structs) == 4 * 8 * 4 + 4


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=0", r"optim.lr=0.0 is out of range; set it within \(0.0, inf\)"),
        ("optim.warmup_steps=-1", r"optim.warmup_steps=-1 is out of range; set it within \[0, inf\)"),
        ("optim.decay_steps=-5", r"optim.decay_steps=-5 is out of range"),
        ("optim.min_lr_ratio=1.5", r"optim.min_lr_ratio=1.5 is out of range; set it within \[0.0, 1.0\]"),
        ("optim.b1=1", r"optim.b1=1.0 is out of range; set it within \[0.0, 1.0\), e.g. optim.b1=0.9"),
        ("optim.b2=-0.1", r"optim.b2=-0.1 is out of range; set it within \[0.0, 1.0\)"),
        ("optim.eps=0", r"optim.eps=0.0 is out of range; set it within \(0.0, inf\)"),
        ("optim.weight_decay=-0.1", r"optim.weight_decay=-0.1 is out of range"),
        ("optim.clip_norm=0", r"optim.clip_norm=0.0 is out of range; set it within \(0.0, inf\)"),
        ("optim.lr=.nan", r"optim.lr=nan must be a finite number, e.g. optim.lr=0.003"),
    ],
)
def test_optimizer_setting_out_of_range_is_refused(override, message):
    with pytest.raises(UserError, match=message):
        load_config("configs/tiny.yaml", [override])


def two_processes(*run_dirs) -> list[tuple[int, str, str]]:
    """A 2-step run as two processes x 4 devices on 127.0.0.1, process i given run.dir=run_dirs[i] (as each host's
    own disk would be); each one's exit code, stdout and stderr."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cluster = ["runtime.cpu_devices=4", f"runtime.coordinator_address=127.0.0.1:{port}", "runtime.num_processes=2"]
    procs = [
        start_cli(
            "train", "configs/tiny.yaml", f"run.dir={run_dir}", "train.steps=2", "train.seq_len=32",
            *cluster, f"runtime.process_id={i}",
        )
        for i, run_dir in enumerate(run_dirs)
    ]  # fmt: skip
    with stopped_at_exit(*procs):
        outputs = [p.communicate(timeout=300) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs, strict=True)]


def test_run_dir_not_shared_by_two_processes_stops_both_before_compute(tmp_path):
    run_dirs = [tmp_path / "host0", tmp_path / "host1"]
    for run_dir, (code, out, err) in zip(run_dirs, two_processes(*run_dirs), strict=True):
        assert code == 2, err[-3000:]
        assert (
            f"run.dir={run_dir} is not shared: process(es) 1 of 2 do not see the file process 0 wrote "
            "there. Every process writes its part of each checkpoint into run.dir, so with several hosts it must be "
            "storage all of them see: a bucket (run.dir=gs://BUCKET/PATH)" in err
        )
        assert "compiled in" not in out
    assert list(run_dirs[0].iterdir()) == []  # the token file is gone


def test_a_run_dir_problem_on_one_process_stops_every_process(tmp_path):
    """Process 1's directory cannot be created: it says why, and process 0 stops too instead of waiting for it."""
    (code0, out0, err0), (code1, _, err1) = two_processes(tmp_path / "run", "/proc/jaxscale-run")
    assert code1 == 2 and "run.dir=/proc/jaxscale-run cannot be created" in err1
    assert code0 == 2, err0[-3000:]
    assert f"run.dir={tmp_path / 'run'} cannot be used by process(es) 1 of 2; their own error says why" in err0
    assert "compiled in" not in out0
