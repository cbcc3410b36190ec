"""Two processes x 4 emulated devices (jax.distributed on 127.0.0.1) train like one process x 8 devices."""

import json
import signal
import socket
import subprocess
import time

import numpy as np
import pytest
from cli_runner import run_cli, start_cli, stopped_at_exit

COMMON = [
    "train.steps=3",
    "train.seq_len=32",
    "log.every=1",
    "log.progress=false",
    "checkpoint.every=0",
    "model.compute_dtype=float32",
    "train.eval_every=1000",
    "train.eval_batches=1",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(run_dir) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]


def start_two_processes(run_dir, *overrides: str) -> list[subprocess.Popen]:
    """The same run as two processes x 4 emulated devices, joined by jax.distributed on 127.0.0.1."""
    port = free_port()
    cluster = ["runtime.cpu_devices=4", f"runtime.coordinator_address=127.0.0.1:{port}", "runtime.num_processes=2"]
    return [
        start_cli(
            "train", "configs/tiny.yaml", f"run.dir={run_dir}", *COMMON, *overrides, *cluster, f"runtime.process_id={i}"
        )
        for i in range(2)
    ]


PIPELINE_ACROSS_HOSTS = ["mesh.data=1", "mesh.pipeline=2", "train.grad_accum=4"]  # stage 0 on one host, 1 on the other


@pytest.mark.parametrize(
    "mesh",
    [pytest.param([], marks=pytest.mark.slow), pytest.param(PIPELINE_ACROSS_HOSTS, marks=pytest.mark.slow)],
    ids=["data2_fsdp2_tensor2", "pipeline2_fsdp2_tensor2"],
)
def test_two_processes_match_one_process(tmp_path, mesh):
    single = run_cli("train", "configs/tiny.yaml", f"run.dir={tmp_path / 'one'}", *COMMON, *mesh)
    assert single.returncode == 0, single.stderr[-3000:]

    procs = start_two_processes(tmp_path / "two", *mesh)
    with stopped_at_exit(*procs):
        outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5)


def preempt_one_of_two(run_dir, *overrides: str) -> int:
    """Two processes train; SIGTERM to process 1 only. Both must exit 75 having saved one and the same step."""
    procs = start_two_processes(run_dir, "train.steps=200", "checkpoint.every=1000", *overrides)
    with stopped_at_exit(*procs):
        deadline = time.monotonic() + 300
        while not (run_dir / "metrics.jsonl").exists() or len(losses(run_dir)) < 3:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGTERM)
        outputs = [p.communicate(timeout=300) for p in procs]
    saved = []
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 75, err[-3000:]
        saved.append(int(err.split("the newest checkpoint is step ")[1].split(";")[0]))
    assert saved[0] == saved[1] < 200
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()] == [str(saved[0])]
    return saved[0]


@pytest.mark.slow
def test_sigterm_on_one_host_saves_the_same_step_on_every_host(tmp_path):
    """JAX's preemption sync service spreads one host's SIGTERM; both processes save one step and exit 75."""
    preempt_one_of_two(tmp_path / "run")


def finish_two_processes(run_dir, *overrides: str) -> None:
    procs = start_two_processes(run_dir, *overrides)
    with stopped_at_exit(*procs):
        outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]


def loss_by_step(run_dir) -> dict[int, float]:
    """The last logged loss of each step (a resumed run logs the steps after its checkpoint again)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


@pytest.mark.slow
def test_preempted_two_process_run_resumes_like_an_uninterrupted_one(tmp_path):
    """Preempted on one host, resumed on both: the steps after the save give bitwise the losses of a straight run."""
    # The same learning-rate schedule whatever train.steps; checkpoints on (COMMON turns them off) to resume.
    schedule = ("optim.decay_steps=200", "checkpoint.every=1000")
    saved = preempt_one_of_two(tmp_path / "preempted", *schedule)
    finish_two_processes(tmp_path / "preempted", *schedule, f"train.steps={saved + 2}")
    finish_two_processes(tmp_path / "straight", *schedule, f"train.steps={saved + 2}")
    resumed, straight = loss_by_step(tmp_path / "preempted"), loss_by_step(tmp_path / "straight")
    assert [resumed[s] for s in (saved + 1, saved + 2)] == [straight[s] for s in (saved + 1, saved + 2)]


@pytest.mark.slow
def test_a_step_corrupt_in_one_process_shards_falls_back_on_both_within_seconds(tmp_path):
    """fsdp=8 over 2 processes: process 1 alone reads the files it wrote. Corrupt them in the newest step: process 1's
    read fails (undecodable bytes), process 0's succeeds; they exchange verdicts, both set the step aside, and both
    resume from the step before, with no barrier left waiting."""
    layout = ["mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1", "checkpoint.every=2", "optim.decay_steps=8"]
    finish_two_processes(tmp_path, *layout, "train.steps=4")
    files = sorted(p for p in (tmp_path / "checkpoints" / "4" / "state").rglob("*") if "process_1" in str(p))
    files = [p for p in files if p.is_file() and p.parent.name == "d"]
    assert files
    for path in files:
        data = bytearray(path.read_bytes())
        data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)
        path.write_bytes(bytes(data))
    started = time.monotonic()
    procs = start_two_processes(tmp_path, *layout, "train.steps=6")
    with stopped_at_exit(*procs):
        outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "restored step 2" in outputs[0][0]
    assert "process 1: " in outputs[0][1] and "set aside as 4.unreadable-" in outputs[0][1]
    assert time.monotonic() - started < 120  # not Orbax's 300 s barrier timeout
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept[:2] == ["2", "4"] and kept[2].startswith("4.unreadable-") and "6" in kept
