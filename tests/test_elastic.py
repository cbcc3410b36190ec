"""Elastic restarts: gradient accumulation that is exactly one big batch, the grad_accum an elastic layout
picks, the supervisor's restart policy (with stand-in children), and real runs that lose and regain hosts.

Tolerances: fp32 compute. Accumulated loss and gradients against one big batch: 1e-5 relative (the same
sums in another order). Runs on other device counts or grad_accum: losses within 2e-3 relative of an
uninterrupted run (measured far closer; reductions sum in another order), batch fingerprints exactly equal.
A checkpoint read back on any mesh: bitwise.
"""

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cli_runner import REPO, cli_env, stopped_at_exit
from flax import nnx

from jaxscale.checkpoint import Checkpointer
from jaxscale.cli import main
from jaxscale.config import load_config
from jaxscale.data import DocumentRows
from jaxscale.errors import UserError
from jaxscale.sharding import make_rules, use_rules
from jaxscale.training.layout import check_layout
from jaxscale.training.loop import train
from jaxscale.training.setup import run_shape, setup_run
from jaxscale.training.step import summed_grads
from jaxscale.training.supervise import RestartPolicy, Supervisor, describe_layout_change, layout_change

EOS = 256
MODEL = [
    "model.compute_dtype=float32",
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.head_dim=8",
    "model.d_ff=64",
]


class FixedRows:
    """One batch of fixed rows, the same for every step."""

    def __init__(self, rows: dict[str, np.ndarray]) -> None:
        self._rows = rows
        self.global_batch, self.seq_len = rows["inputs"].shape

    def rows(self, step: int, row_ids) -> dict[str, np.ndarray]:
        return {k: v[np.asarray(row_ids)] for k, v in self._rows.items()}


def packed_batch_with_uneven_masks() -> dict[str, np.ndarray]:
    """8 rows of packed documents; rows 0 and 4 (in the same microbatch for 2 and 4 microbatches) keep only 3
    targets each, so microbatches hold very different token counts and a mean of means would be off."""
    tokens = np.random.default_rng(3).integers(0, EOS + 1, (8, 17)).astype(np.int32)
    tokens[:, 6] = EOS
    plain = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((8, 16), np.float32)}
    batch = DocumentRows(FixedRows(plain), EOS).rows(0, range(8))
    batch["loss_mask"][[0, 4], 3:] = 0.0
    return batch


def token_mean_mismatch(batch: dict) -> tuple[dict[int, tuple[float, list]], tuple[float, list], list]:
    """From one initial state on one device: {grad_accum: (loss, gradient)} as the train step takes them (summed
    over 2 or 4 microbatches, divided by the batch's token count); the whole batch's token mean and its gradient,
    written out here; and the gradient of the mean of 4 microbatch means (what accumulation must not compute)."""
    setup = setup_run(load_config(None, [*MODEL, "train.global_batch=8", "train.seq_len=16"]), jax.devices()[:1], 257)
    model_def, params, rest = nnx.split(nnx.merge(setup.graphdef, setup.init_state())[0], nnx.Param, ...)

    @functools.partial(jax.jit, static_argnums=0)
    def accumulated(grad_accum: int, params: nnx.State) -> tuple[jax.Array, list[jax.Array]]:
        with use_rules(setup.rules, setup.mesh):
            grad_sum, (loss_sum, count, _) = summed_grads(model_def, params, rest, batch, grad_accum)
            return loss_sum / count, jax.tree.leaves(jax.tree.map(lambda g: g / count, grad_sum))

    def mean_loss(p: nnx.State, rows: dict) -> jax.Array:
        model = nnx.merge(model_def, p, rest)
        logits = model(rows["inputs"], model.documents(rows)).astype(jnp.float32)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, rows["targets"])
        return jnp.sum(losses * rows["loss_mask"]) / jnp.sum(rows["loss_mask"])

    def mean_of_means(p: nnx.State) -> jax.Array:
        return sum(mean_loss(p, {k: v[a::4] for k, v in batch.items()}) for a in range(4)) / 4

    @jax.jit
    def references(params: nnx.State) -> tuple[tuple[jax.Array, list[jax.Array]], list[jax.Array]]:
        with use_rules(setup.rules, setup.mesh):
            loss, grads = jax.value_and_grad(lambda p: mean_loss(p, batch))(params)
            return (loss, jax.tree.leaves(grads)), jax.tree.leaves(jax.grad(mean_of_means)(params))

    got = {k: jax.device_get(accumulated(k, params)) for k in (2, 4)}
    want, wrong = jax.device_get(references(params))
    return got, want, wrong


@pytest.mark.slow  # 20-45 s on 2 busy cores; the default suite outgrew 15 min (sequence parallelism compiles slower)
def test_grad_accum_gives_the_token_mean_of_one_big_batch():
    """Packed documents and uneven masks: 2 or 4 microbatches give one big batch's loss and gradient, not the
    gradient of a mean of microbatch means."""
    got, (loss, grads), wrong = token_mean_mismatch(packed_batch_with_uneven_masks())
    tolerance = [1e-5 * np.max(np.abs(g)) for g in grads]
    assert max(np.max(np.abs(w - g)) / t for w, g, t in zip(wrong, grads, tolerance, strict=True)) > 100
    for got_loss, got_grads in got.values():
        np.testing.assert_allclose(got_loss, loss, rtol=1e-5)
        for g, want, atol in zip(got_grads, grads, tolerance, strict=True):
            np.testing.assert_allclose(g, want, rtol=0, atol=atol)


def elastic_layout(num_devices: int, *overrides: str):
    cfg = load_config(None, [*MODEL, "mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1", "train.elastic=true", *overrides])
    return check_layout(cfg, run_shape(cfg, 257), make_rules(cfg.mesh.strategy, cfg.mesh.rules), num_devices)


def test_elastic_grad_accum_keeps_the_device_batch_and_falls_back_to_the_configured_one():
    for devices, grad_accum in ((8, 1), (4, 2), (2, 4), (1, 8), (8, 1)):
        layout = elastic_layout(devices, "train.global_batch=16", "train.max_device_batch=2")
        assert (layout.grad_accum, layout.per_device_batch, layout.microbatch) == (grad_accum, 2, 16 // grad_accum)
    # Never below what the user configured, even where fewer microbatches would fit.
    assert elastic_layout(8, "train.global_batch=16", "train.grad_accum=2", "train.max_device_batch=2").grad_accum == 2


def test_elastic_grad_accum_rises_where_the_batch_would_not_split():
    base = ["train.global_batch=24", "train.grad_accum=2"]
    assert elastic_layout(4, *base).grad_accum == 2  # 12 sequences split over 4 shards
    assert elastic_layout(8, *base).grad_accum == 3  # 12 do not split over 8; 8 do
    with pytest.raises(UserError, match="does not split over the 8 batch shards"):
        elastic_layout(8, *base, "train.elastic=false")


def test_a_batch_no_grad_accum_can_split_names_the_shards():
    with pytest.raises(UserError) as e:
        elastic_layout(6, "train.global_batch=16")
    assert "On 6 devices the batch splits over 6 batch shards (mesh.fsdp=6)" in str(e.value)
    assert "no train.grad_accum from 1 up cuts train.global_batch=16 into microbatches that are multiples of 6" in str(
        e.value
    )


def test_a_layout_change_is_against_the_checkpoint_resumed_or_the_configured_grad_accum():
    saved = {"mesh": {"data": 1, "fsdp": 8}, "process_count": 4, "config": {"train": {"grad_accum": 1}}}
    assert layout_change(1, {"devices": 8, "processes": 4, "grad_accum": 1}, saved) is None
    change = layout_change(1, {"devices": 4, "processes": 2, "grad_accum": 2}, saved)
    assert change == dict(devices_before=8, processes_before=4, grad_accum_before=1, devices=4, processes=2,
                          grad_accum=2, grad_accum_configured=1)  # fmt: skip
    assert describe_layout_change(6, change, 2) == (
        "jaxscale: layout change at step 6: 8 -> 4 devices (4 -> 2 processes), train.grad_accum 1 -> 2 "
        "(configured 1); the global batch is unchanged, 2 sequences per device per microbatch"
    )
    fresh = layout_change(1, {"devices": 4, "processes": 1, "grad_accum": 2}, None)
    assert (fresh["devices_before"], fresh["grad_accum_before"], fresh["grad_accum"]) == (4, 1, 2)


# Stand-ins for `jaxscale train`: they start in milliseconds and end as told.
def exits(code: int) -> list[str]:
    return [sys.executable, "-c", f"import sys; sys.exit({code})"]


SLEEPS = [sys.executable, "-c", "import time; time.sleep(600)"]
KILLS_ITSELF = [sys.executable, "-c", "import os, signal, time; time.sleep(0.3); os.kill(os.getpid(), signal.SIGKILL)"]
SAVES_ON_SIGTERM = [
    sys.executable,
    "-c",
    "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(75)); print('ready', flush=True); "
    "time.sleep(600)",
]


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its reaper does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# Supervising from this process forks it after JAX started its threads; the command line's supervisor
# imports no JAX. The children exec at once and run no JAX.
in_process_supervisor = pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")


def supervise(attempts: list[list[list[str]]], **policy: float) -> tuple[int, list[str], list[int]]:
    """Supervise `attempts` (the commands of each, the last repeating) in this process: (exit code, log, pids)."""
    lines, calls = [], []

    def commands(attempt: int) -> list[list[str]]:
        calls.append(attempt)
        return attempts[min(attempt, len(attempts) - 1)]

    code = Supervisor(commands, RestartPolicy(**policy), lines.append).run()
    pids = [int(p) for line in lines if "pids" in line for p in line.split("pids ")[1].split()]
    assert calls == list(range(len(calls)))
    return code, lines, pids


@in_process_supervisor
def test_a_crash_is_restarted_after_the_backoff_and_the_stuck_processes_are_killed():
    started = time.monotonic()
    code, lines, pids = supervise([[SLEEPS, KILLS_ITSELF], [exits(0), exits(0)]], backoff_s=0.5, grace_s=1.0)
    assert code == 0 and time.monotonic() - started > 0.5 + 1.0
    assert lines[1] == "process(es) [0] still running 1 s after another exited: killed"
    assert (
        lines[2]
        == "attempt 1 ended: process 1 killed by SIGKILL (a crash); restart 1 of 3 in 0.5 s, from the newest checkpoint"
    )
    assert lines[-1] == "attempt 2: finished" and len(pids) == 4
    assert not any(alive(p) for p in pids)


@in_process_supervisor
def test_a_user_error_divergence_or_an_unsaved_preemption_is_not_restarted():
    for code, words in (
        (2, "a mistake to fix (not retried)"),
        (3, "diverged (not retried: it would again)"),
        (4, "preempted with checkpoints off, nothing saved (not retried: it would start over)"),
    ):
        got, lines, _ = supervise([[exits(0), exits(code)]], backoff_s=0.0)
        assert got == code and len([line for line in lines if "pids" in line]) == 1
        assert lines[-1] == f"attempt 1 ended: process 1 exit {code} ({words}); not restarting"


@in_process_supervisor
def test_preemptions_are_restarted_with_doubling_backoff_until_restarts_run_out():
    code, lines, _ = supervise([[exits(75)]], max_restarts=2, backoff_s=0.01)
    assert code == 75
    assert [line.split("; ")[1] for line in lines if "restart " in line] == [
        "restart 1 of 2 in 0.01 s, from the newest checkpoint",
        "restart 2 of 2 in 0.02 s, from the newest checkpoint",
    ]
    assert (
        lines[-1]
        == "attempt 3 ended: process 0 exit 75 (preempted, checkpoint saved); no restarts left (--max-restarts 2)"
    )
    assert RestartPolicy(backoff_s=10, max_backoff_s=300).backoff(7) == 300
    assert RestartPolicy(backoff_s=10, max_backoff_s=300).backoff(5000) == 300  # no float overflow


@in_process_supervisor
def test_storage_unavailable_is_retried_and_any_signal_number_is_named():
    dies_by_signal_40 = [sys.executable, "-c", "import os; os.kill(os.getpid(), 40)"]
    code, lines, _ = supervise([[exits(69)], [dies_by_signal_40], [exits(0)]], backoff_s=0.0)
    assert code == 0
    assert "attempt 1 ended: process 0 exit 69 (storage unavailable for now); restart 1 of 3" in lines[1]
    assert "attempt 2 ended: process 0 killed by signal 40 (a crash); restart 2 of 3" in lines[3]


STARTS_A_WORKER_AND_CRASHES = [
    sys.executable,
    "-c",
    "import subprocess, sys, time; w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
    "print(w.pid, flush=True); time.sleep(0.5); sys.exit(1)",
]


@in_process_supervisor
def test_a_crashed_child_is_stopped_with_every_process_it_started(capfd):
    code, _, _ = supervise([[STARTS_A_WORKER_AND_CRASHES]], max_restarts=0)
    assert code == 1
    worker = int(capfd.readouterr().out.split()[0])
    deadline = time.monotonic() + 10
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(worker)


BEATS_THEN_HANGS = [
    sys.executable,
    "-c",
    "import os, pathlib, time; beat = pathlib.Path(os.environ['JAXSCALE_HEARTBEAT'])\n"
    "for _ in range(3): beat.touch(); time.sleep(0.2)\n"
    "time.sleep(600)",
]


@in_process_supervisor
def test_a_child_that_stops_making_progress_is_killed_and_restarted():
    started = time.monotonic()
    code, lines, pids = supervise([[BEATS_THEN_HANGS], [exits(0)]], backoff_s=0.0, hang_timeout_s=1.5)
    assert code == 0 and time.monotonic() - started < 30
    assert lines[1] == "process 0 made no progress for 1.5 s (train.hang_timeout_s): hung, killed"
    assert "attempt 1 ended: process 0 killed by SIGKILL (a crash); restart 1 of 3" in lines[2]
    assert not alive(pids[0])


SUPERVISOR = """
import sys
import threading
from jaxscale.training.supervise import RestartPolicy, Supervisor, describe_layout_change, layout_change
child = {child!r}
sys.exit(Supervisor(lambda attempt: [child, child], RestartPolicy(backoff_s=0), lambda m: print(m, flush=True)).run())
"""


def start_supervisor(child: list[str]) -> tuple[subprocess.Popen, list[int]]:
    """A supervisor of two `child` processes in its own process; its pids line read."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR.format(child=child)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    line = proc.stdout.readline()
    return proc, [int(p) for p in line.split("pids ")[1].split()]


def test_sigterm_to_the_supervisor_saves_and_stops_every_process():
    proc, pids = start_supervisor(SAVES_ON_SIGTERM)
    with stopped_at_exit(proc):
        time.sleep(1.0)  # the children install their handler
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 75
    assert "stopped by SIGTERM; training ended with exit 75 (preempted, checkpoint saved)" in out
    assert not any(alive(p) for p in pids)


def test_no_process_outlives_a_killed_supervisor():
    proc, pids = start_supervisor(SLEEPS)
    with stopped_at_exit(proc):
        assert all(alive(p) for p in pids)
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in pids)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-restarts", "-1"], "--max-restarts -1 must be 0 or more (0: never restart)."),
        (["--backoff-s", "-2"], "--backoff-s -2.0 must be 0 or more seconds."),
        (["--grace-s", "0"], "--grace-s 0.0 must be more than 0 seconds."),
        (["--local-processes", "4,0"], "--local-processes 4,0 must be a process count of 1 or more"),
        (["--devices-per-process", "2"], "--devices-per-process 2: give it with --local-processes"),
        (["train.max_device_batch=-1"], "train.max_device_batch=-1 is out of range; set it within [0, inf)"),
        (["train.max_restart=3"], "Unknown config key 'train.max_restart'"),
    ],
)
def test_supervise_refuses_settings_out_of_range(capsys, args, message):
    assert main(["supervise", "configs/tiny.yaml", *args]) == 2
    assert message in capsys.readouterr().err


# A run small enough for 4 processes on 2 cores: 16 sequences a step, at most 2 per device per microbatch.
RUN = [
    *MODEL,
    "train.seq_len=32",
    "train.global_batch=16",
    "mesh.data=1",
    "mesh.fsdp=-1",
    "mesh.tensor=1",
    "optim.warmup_steps=2",
    "log.every=1",
    "log.progress=false",
    "log.tensorboard=false",
    "train.eval_every=0",
    "train.eval_batches=1",
]


def rows_of(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written, or cut by a kill
            continue
    return rows


def by_step(run_dir: Path, key: str) -> dict[int, float]:
    """The last logged `key` of each step (an attempt after a restart logs the steps past its checkpoint again)."""
    return {row["step"]: row[key] for row in rows_of(run_dir) if "loss" in row}


def steps_after_a_layout_change(run_dir: Path) -> list[int]:
    """The steps logged since the first layout_change row (by the attempt that wrote it, or later ones)."""
    rows = rows_of(run_dir)
    first = next((i for i, row in enumerate(rows) if row.get("event") == "layout_change"), len(rows))
    return [row["step"] for row in rows[first:] if "loss" in row]


def with_compile_cache() -> dict[str, str]:
    """The session's compilation cache for the processes a test starts: later attempts reuse earlier compiles."""
    return cli_env(
        {
            "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        }
    )


class Supervised:
    """`jaxscale supervise` in a child process; its output read line by line as it comes."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jaxscale.cli", "supervise", *args],
            cwd=REPO,
            env=with_compile_cache(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    def attempt_pids(self, attempt: int) -> list[int]:
        """The pids of attempt `attempt` (from 1), once it has started."""
        prefix = f"jaxscale supervise: attempt {attempt}: "
        self.wait_for(lambda: any(line.startswith(prefix) for line in self.lines))
        line = next(line for line in self.lines if line.startswith(prefix))
        return [int(p) for p in line.split("pids ")[1].split()]

    def wait_for(self, condition, timeout: float = 400) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None and time.monotonic() < deadline, "".join(self.lines[-60:])
            time.sleep(0.05)

    def finish(self, timeout: float = 400) -> str:
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return "".join(self.lines)


@pytest.mark.slow
def test_a_run_that_loses_a_host_and_gets_it_back_trains_like_an_uninterrupted_one(tmp_path):
    """4 processes x 2 devices; one SIGKILLed: the supervisor resumes on 2 processes (grad_accum 1 -> 2 keeps
    2 sequences per device), that attempt is preempted, and the last runs on 4 again (grad_accum back to 1)."""
    run = [*RUN, "train.steps=14", "optim.decay_steps=14", "checkpoint.every=2", "train.max_device_batch=2"]
    train(load_config("configs/tiny.yaml", [f"run.dir={tmp_path / 'straight'}", *run, "runtime.cpu_devices=8"]))

    run_dir = tmp_path / "elastic"
    supervisor = Supervised(
        "configs/tiny.yaml", f"run.dir={run_dir}", *run, "--local-processes", "4,2,4", "--devices-per-process", "2",
        "--backoff-s", "0.5", "--grace-s", "10",
    )  # fmt: skip
    with stopped_at_exit(supervisor.proc):
        first = supervisor.attempt_pids(1)
        supervisor.wait_for(
            lambda: (run_dir / "checkpoints" / "2").is_dir() and max(by_step(run_dir, "loss"), default=0) >= 3
        )
        os.kill(first[2], signal.SIGKILL)
        second = supervisor.attempt_pids(2)
        supervisor.wait_for(lambda: len(steps_after_a_layout_change(run_dir)) >= 2)
        os.kill(second[1], signal.SIGTERM)  # a preemption notice to one host
        third = supervisor.attempt_pids(3)
        out = supervisor.finish()
    assert supervisor.proc.returncode == 0, out[-5000:]
    assert not any(alive(p) for p in first + second + third)
    assert "attempt 1 ended: process 2 killed by SIGKILL (a crash); restart 1 of 3" in out
    assert "ended: process 0 exit 75 (preempted" in out or "ended: process 1 exit 75 (preempted" in out

    changes = [row for row in rows_of(run_dir) if row.get("event") == "layout_change"]
    shrink, grow = [{k: row[k] for k in row if k not in ("step", "event", "time")} for row in changes]
    assert shrink == dict(devices_before=8, processes_before=4, grad_accum_before=1, devices=4, processes=2,
                          grad_accum=2, grad_accum_configured=1)  # fmt: skip
    assert grow == dict(devices_before=4, processes_before=2, grad_accum_before=2, devices=8, processes=4,
                        grad_accum=1, grad_accum_configured=1)  # fmt: skip
    assert "8 -> 4 devices (4 -> 2 processes), train.grad_accum 1 -> 2 (configured 1)" in out

    # Every step logged by any attempt trained on the straight run's batch of that step, bit for bit.
    straight_batches = by_step(tmp_path / "straight", "batch_fingerprint")
    for row in rows_of(run_dir):
        if "loss" in row:
            assert row["batch_fingerprint"] == straight_batches[row["step"]], row["step"]
    straight, elastic = by_step(tmp_path / "straight", "loss"), by_step(run_dir, "loss")
    assert sorted(elastic) == sorted(straight) == list(range(1, 15))
    np.testing.assert_allclose([elastic[s] for s in straight], list(straight.values()), rtol=2e-3)


def launched(run_dir: Path, processes: int, devices: int, *overrides: str) -> str:
    """Train with `processes` local processes of `devices` emulated devices each (no restarts); the output."""
    supervisor = Supervised(
        "configs/tiny.yaml", f"run.dir={run_dir}", *overrides, "--local-processes", str(processes),
        "--devices-per-process", str(devices), "--max-restarts", "0",
    )  # fmt: skip
    with stopped_at_exit(supervisor.proc):
        out = supervisor.finish()
    assert supervisor.proc.returncode == 0, out[-5000:]
    return out


def restored(run_dir: Path, step: int, num_devices: int) -> list[np.ndarray]:
    """The arrays of checkpoint `step` of `run_dir`, read into this process on `num_devices` devices (fsdp)."""
    cfg = load_config("configs/tiny.yaml", RUN)
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    try:
        state = ckpt.restore(step, setup_run(cfg, jax.devices()[:num_devices]).state_structs)
    finally:
        ckpt.close()
    return jax.device_get(jax.tree.leaves(state))


@pytest.mark.slow
def test_a_checkpoint_saved_on_two_processes_resumes_on_one_and_on_four(tmp_path):
    """Saved at step 4 by 2 processes x 4 devices; resumed to step 8 by 1 process x 4 devices (other shards)
    and by 4 processes x 2 devices. The restored arrays are the saved bits on any mesh; the resumed runs train
    on the same batches as an uninterrupted run, to its losses and parameters."""
    run = [*RUN, "optim.decay_steps=8", "checkpoint.every=4"]
    launched(tmp_path / "saved", 2, 4, *run, "train.steps=4")
    for name, processes, devices in (("one", 1, 4), ("four", 4, 2)):
        shutil.copytree(tmp_path / "saved", tmp_path / name)
        launched(tmp_path / name, processes, devices, *run, "train.steps=8")
    straight = tmp_path / "straight"
    train(load_config("configs/tiny.yaml", [f"run.dir={straight}", *run, "train.steps=8", "runtime.cpu_devices=8"]))

    saved_bits = restored(tmp_path / "saved", 4, 8)
    for got, want in zip(restored(tmp_path / "saved", 4, 1), saved_bits, strict=True):
        np.testing.assert_array_equal(got, want)
    for name in ("one", "four"):
        assert by_step(tmp_path / name, "batch_fingerprint") == by_step(straight, "batch_fingerprint")
        losses, want = by_step(tmp_path / name, "loss"), by_step(straight, "loss")
        np.testing.assert_allclose([losses[s] for s in range(5, 9)], [want[s] for s in range(5, 9)], rtol=1e-5)
        for got, want in zip(restored(tmp_path / name, 8, 8), restored(straight, 8, 8), strict=True):
            np.testing.assert_allclose(got, want, atol=1e-4)
