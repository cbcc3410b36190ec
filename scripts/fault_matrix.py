"""The faults a production user meets first, each run end to end through the CLI on the tiny config.

Prints one row per scenario: its exit code, the message it ended with, the step directories before and
after, the steps of training lost, and whether the promise held (nothing lost, nothing good renamed,
no silent start from step 0). Usage:

    .venv/bin/python scripts/fault_matrix.py [--workdir DIR] [--only NAME[,NAME...]] [--markdown]

Storage that fails for now is injected, not simulated in jaxscale's code: the supervised children run
with this script's `fault_injection/` on PYTHONPATH, whose sitecustomize makes Orbax's array reads
raise tensorstore's UNAVAILABLE error while a marker file exists.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INJECTION = Path(__file__).resolve().parent / "fault_injection"
BASE = [
    "train.seq_len=32",
    "model.compute_dtype=float32",
    "optim.decay_steps=40",
    "log.every=1",
    "log.progress=false",
    "log.tensorboard=false",
    "train.eval_every=1000",
    "train.eval_batches=1",
    "checkpoint.every=10",
]


@dataclass
class Row:
    scenario: str
    code: int
    message: str
    before: list[str]
    after: list[str]
    steps_lost: int | str
    held: bool


def env(extra: dict[str, str] | None = None) -> dict[str, str]:
    environment = os.environ | {"PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu"} | (extra or {})
    environment.pop("XLA_FLAGS", None)
    return environment


def command(verb: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "jaxscale.cli", verb, *args]


def run(verb: str, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command(verb, *args), cwd=REPO, capture_output=True, text=True, env=env(extra_env))


def train(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run("train", "configs/tiny.yaml", f"run.dir={run_dir}", *BASE, *overrides)


def start(run_dir: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        command("train", "configs/tiny.yaml", f"run.dir={run_dir}", *BASE, *overrides),
        cwd=REPO,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def steps(run_dir: Path) -> list[str]:
    directory = run_dir / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted((p.name for p in directory.iterdir()), key=lambda n: (int(n.split(".")[0]), n))


def committed(names: list[str]) -> list[int]:
    return [int(n) for n in names if n.isdigit()]


def start_step(run_dir: Path) -> int | None:
    """The start step of the newest run in `run_dir`'s metrics (None: none started)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    starts = [row["step"] for row in map(json.loads, path.read_text().splitlines()) if row.get("event") == "start"]
    return starts[-1] if starts else None


def message(result: subprocess.CompletedProcess | tuple[int, str]) -> str:
    """The line a run ended with: its last `jaxscale...` line on stderr, else on stdout."""
    texts = [result[1]] if isinstance(result, tuple) else [result.stderr, result.stdout]
    for text in texts:
        lines = [line for line in text.splitlines() if line.startswith("jaxscale")]
        if lines:
            return lines[-1][:300]
    return "(no message)"


def damage(step_dir: Path, only: str = "") -> None:
    """Zero the second half of every array data file of a step (those of one process's writer with `only`)."""
    for path in sorted((step_dir / "state").rglob("*")):
        if path.is_file() and path.parent.name == "d" and only in str(path):
            data = bytearray(path.read_bytes())
            data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)
            path.write_bytes(bytes(data))


def wait_for(predicate: Callable[[], bool], proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"gave up waiting: exit {proc.poll()}: {proc.communicate()[1][-2000:]}")
        time.sleep(0.05)


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return sum('"loss"' in line for line in path.read_text().splitlines()) if path.exists() else 0


# --- the scenarios: each returns a Row --------------------------------------------------------------------------


def dtype_change(d: Path) -> Row:
    train(d, "train.steps=20")
    before = steps(d)
    result = train(d, "train.steps=30", "model.param_dtype=bfloat16")
    after = steps(d)
    held = result.returncode == 0 and start_step(d) == 20 and not any(".unreadable" in n for n in after)
    return Row("model.param_dtype changed on resume", result.returncode, message(result), before, after, 0, held)


def rerun_after_set_aside(d: Path) -> Row:
    train(d, "train.steps=20")
    for name in steps(d):
        damage(d / "checkpoints" / name)
    before = steps(d)
    first = train(d, "train.steps=30")
    second = train(d, "train.steps=30")
    after = steps(d)
    held = (first.returncode, second.returncode) == (2, 2) and "set aside earlier" in second.stderr
    held = held and start_step(d) == 0 and logged_steps(d) == 20  # the first run's rows only: nothing trained again
    return Row("every step corrupt, run twice", second.returncode, message(second), before, after, "all corrupt", held)


def keep_zero(d: Path) -> Row:
    result = train(d, "train.steps=20", "checkpoint.keep=0")
    held = result.returncode == 2 and "checkpoint.keep=0 is out of range" in result.stderr and not steps(d)
    return Row("checkpoint.keep=0", result.returncode, message(result), [], steps(d), 0, held)


def checkpoints_off_sigterm(d: Path) -> Row:
    proc = start(d, "train.steps=500", "checkpoint.every=0")
    wait_for(lambda: logged_steps(d) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    held = proc.returncode == 4 and "nothing was saved" in err and "saved step" not in err
    return Row("checkpoints off + SIGTERM", proc.returncode, message((0, err)), [], steps(d), "none saved", held)


def resume_false_on_used_dir(d: Path) -> Row:
    train(d, "train.steps=20")
    before, config = steps(d), (d / "config.yaml").read_text()
    result = train(d, "train.steps=30", "checkpoint.resume=false")
    held = result.returncode == 2 and steps(d) == before and (d / "config.yaml").read_text() == config
    name = "checkpoint.resume=false on a used run.dir"
    return Row(name, result.returncode, message(result), before, steps(d), 0, held)


def export_beside_live_run(d: Path) -> Row:
    """The training run is paused (SIGSTOP) between saves while its newest step is damaged and exported: the
    export must fall back past it without renaming it; the run then goes on and ends with a save."""
    proc = start(d, "train.steps=400", "checkpoint.every=5", "checkpoint.keep=10")
    wait_for(lambda: len(committed(steps(d))) >= 2, proc)
    proc.send_signal(signal.SIGSTOP)  # every thread stops: a save under way stays uncommitted until SIGCONT
    newest = max(committed(steps(d)))
    damage(d / "checkpoints" / str(newest))
    before = steps(d)
    exported = run("export", str(d), "--to", "hf", str(d.parent / f"{d.name}-hf"))
    kept = str(newest) in steps(d)
    proc.send_signal(signal.SIGCONT)
    time.sleep(2.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    after = steps(d)
    held = exported.returncode == 0 and kept and proc.returncode == 75
    warned = f"checkpoint step {newest} under" in exported.stderr and "left in place (read-only)" in exported.stderr
    held = held and warned
    written = exported.stdout.split("jaxscale export: step ")[-1].split(" ")[0]
    text = f"exported step {written}; step {newest} corrupt, left in place; the live run: exit {proc.returncode}"
    return Row("export beside a live run, newest step corrupt", exported.returncode, text, before, after, 0, held)


def transient_restore_under_supervise(d: Path) -> Row:
    train(d, "train.steps=20")
    before = steps(d)
    marker = d.parent / f"{d.name}-storage-down"
    marker.write_text("")
    extra = {"PYTHONPATH": str(INJECTION), "JAXSCALE_FAULT_UNAVAILABLE_WHILE": str(marker)}
    proc = subprocess.Popen(
        command("supervise", "configs/tiny.yaml", f"run.dir={d}", *BASE, "train.steps=30", "--backoff-s", "2"),
        cwd=REPO,
        env=env(extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip())
        if "exit 69 (storage unavailable for now)" in line:
            marker.unlink()  # storage is back before the restart
    _, err = proc.communicate(timeout=600)
    held = proc.returncode == 0 and any("exit 69" in line for line in lines) and start_step(d) == 20
    text = next((line for line in lines if "exit 69" in line), message((0, err)))
    return Row("storage unavailable on restore, under supervise", proc.returncode, text, before, steps(d), 0, held)


def sigterm_while_compiling(d: Path) -> Row:
    train(d, "train.steps=20")
    before = steps(d)
    proc = start(d, "train.steps=30")
    for line in proc.stdout:
        if "compiling the train step" in line:
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=300)
    held = proc.returncode == 75 and steps(d) == before and "the newest checkpoint is step 20" in err
    return Row("SIGTERM during compile", proc.returncode, message((0, err)), before, steps(d), 0, held)


def sigterm_after_last_step(d: Path) -> Row:
    proc = start(d, "train.steps=20", "train.eval_batches=8")
    wait_for(lambda: logged_steps(d) >= 20, proc)
    proc.send_signal(signal.SIGTERM)  # during the final eval or the close that waits for the last save
    _, err = proc.communicate(timeout=300)
    held = proc.returncode in (0, 75) and 20 in committed(steps(d))
    return Row("SIGTERM during the final eval / close", proc.returncode, message((0, err)), [], steps(d), 0, held)


def rope_theta_changed(d: Path) -> Row:
    train(d, "train.steps=20")
    before = steps(d)
    result = train(d, "train.steps=30", "model.rope_theta=500000")
    held = result.returncode == 2 and "model.rope_theta: 10000.0 -> 500000.0" in result.stderr and steps(d) == before
    return Row("model.rope_theta changed on resume", result.returncode, message(result), before, steps(d), 0, held)


def truncated_store_shard(d: Path) -> Row:
    store = d / "store"
    prepared = run("prepare", "configs/tiny.yaml", f"data.store={store}")
    shard = sorted(store.rglob("train/*.tokens"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2 + 1])
    result = train(d, "train.steps=20", f"data.store={store}")
    held = prepared.returncode == 0 and result.returncode == 2 and shard.name in result.stderr
    return Row("a truncated token-store shard", result.returncode, message(result), [], steps(d), 0, held)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(d: Path, *overrides: str) -> list[subprocess.CompletedProcess]:
    port = free_port()
    cluster = ["runtime.cpu_devices=4", f"runtime.coordinator_address=127.0.0.1:{port}", "runtime.num_processes=2"]
    args = ["configs/tiny.yaml", f"run.dir={d}", *BASE, *overrides, *cluster]
    procs = [
        subprocess.Popen(
            command("train", *args, f"runtime.process_id={i}"),
            cwd=REPO,
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        return [subprocess.CompletedProcess(p.args, p.wait(timeout=600), *p.communicate()) for p in procs]
    finally:
        for p in procs:
            p.kill()


def corrupt_on_one_of_two_processes(d: Path) -> Row:
    layout = ["mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1"]
    two_processes(d, *layout, "train.steps=20")
    damage(d / "checkpoints" / "20", only="process_1")
    before = steps(d)
    started = time.monotonic()
    results = two_processes(d, *layout, "train.steps=30")
    seconds = time.monotonic() - started
    held = all(r.returncode == 0 for r in results) and start_step(d) == 10 and seconds < 120
    aside = next((line for line in results[0].stderr.splitlines() if "set aside as" in line), None)
    aside = aside or " / ".join(message(r) for r in results)
    text = f"both resumed from step 10 in {seconds:.0f} s; {aside}"
    return Row("a corrupt file read by 1 of 2 processes", results[0].returncode, text, before, steps(d), 10, held)


SCENARIOS = {
    "dtype": dtype_change,
    "set-aside-rerun": rerun_after_set_aside,
    "keep-zero": keep_zero,
    "off-sigterm": checkpoints_off_sigterm,
    "resume-false": resume_false_on_used_dir,
    "export-live": export_beside_live_run,
    "transient": transient_restore_under_supervise,
    "sigterm-compile": sigterm_while_compiling,
    "sigterm-close": sigterm_after_last_step,
    "rope-theta": rope_theta_changed,
    "store-shard": truncated_store_shard,
    "two-processes": corrupt_on_one_of_two_processes,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None, help="where runs go (default: a temporary directory)")
    parser.add_argument("--only", default="", help=f"comma-separated scenarios of: {', '.join(SCENARIOS)}")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args()
    chosen = [name.strip() for name in args.only.split(",") if name.strip()] or list(SCENARIOS)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="jaxscale-faults-"))
    rows = []
    for name in chosen:
        started = time.monotonic()
        try:
            row = SCENARIOS[name](workdir / name)
        except Exception as e:  # a scenario that cannot even run is a failed row, not a traceback
            row = Row(name, -1, f"{type(e).__name__}: {str(e)[:200]}", [], [], "?", False)
        rows.append(row)
        print(f"{'ok  ' if row.held else 'FAIL'} {row.scenario} ({time.monotonic() - started:.0f} s)", flush=True)
    header = ["scenario", "exit", "message", "checkpoints before", "after", "steps lost", "held"]
    table = [
        [r.scenario, str(r.code), r.message, " ".join(r.before) or "-", " ".join(r.after) or "-", str(r.steps_lost)]
        + ["yes" if r.held else "NO"]
        for r in rows
    ]
    if args.markdown:
        print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        for cells in table:
            short = [c if len(c) <= 220 else c[:217] + "..." for c in cells]
            print("| " + " | ".join(c.replace("|", "/") for c in short) + " |")
    else:
        for cells in [header, *table]:
            print("  ".join(cells))
    return 0 if all(r.held for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
