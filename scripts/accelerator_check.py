"""One command that checks an accelerator node (one H100/H200, or a TPU VM) in a few minutes, and tables it.

Sections, each timed, each failing on its own (its error is recorded and the others still run):
  attention      a Llama 3.2 1B bf16 train step on one device with each attention implementation
                 the backend runs (xla and cudnn on GPU, xla and splash on TPU): ms/step, tokens/s,
                 MFU, the step's peak memory by XLA's memory analysis (scripts/bench_gpu.py)
  flags          the same step with the default attention, runtime.performance_flags on (this
                 process) vs off (a fresh process: XLA reads its flags when its backend starts)
  deterministic  train.deterministic=true, in a fresh process: a run of N steps against a run
                 stopped at N/2 and resumed to N, same parameters bit for bit and same losses
  checkpoint     the training loop's step time with an async save every 10 steps vs never
                 (target overhead <= 2%; scripts/bench_checkpoint.py)
  lora           LoRA r16 and QLoRA (NF4) r16 on a Llama 3 8B shape, one device: memory and
                 step time (scripts/bench_lora.py)

The loop sections train on synthetic tokens (no corpus to prepare) on all of the host's devices.
`--small` runs every section with tiny shapes, so the script itself is checked on a CPU (the test
suite does). At the end one table; `--out FILE` also writes it as JSON.

    .venv/bin/python scripts/accelerator_check.py --out accelerator.json
    .venv/bin/python scripts/accelerator_check.py --small --out /tmp/check.json   # on a CPU
    .venv/bin/python scripts/accelerator_check.py --sections attention,lora
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

# What the backend of a fresh process must start from: this process adds its performance flags below.
ORIGINAL_ENV = dict(os.environ)

import bench_checkpoint  # noqa: E402 - scripts/ is on sys.path when this file is run
import bench_gpu  # noqa: E402
import bench_lora  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from kill_harness import final_state_equal  # noqa: E402

from jaxscale import runtime  # noqa: E402
from jaxscale.config import RuntimeConfig, load_config  # noqa: E402
from jaxscale.models import attention  # noqa: E402
from jaxscale.training.loop import train  # noqa: E402
from jaxscale.units import human_bytes  # noqa: E402

# bench_lora sets libtpu's compile-only variables for its TPU topology; a real TPU VM must not see them.
os.environ.clear()
os.environ.update(ORIGINAL_ENV)

REPO = Path(__file__).resolve().parent.parent
CONFIG = "configs/tiny.yaml"
SECTIONS = ("attention", "flags", "deterministic", "checkpoint", "lora")
FRESH_PROCESS = ("flags", "deterministic")  # sections whose backend starts with other XLA flags
CHECKPOINT_TARGET = 0.02

# Loop sections (deterministic, checkpoint): the run's own devices, whatever the config file names;
# `{rows}` is global batch rows per device, filled in once the devices are known.
LOOP = [
    "runtime.cpu_devices=0",
    "mesh.data=1",
    "mesh.fsdp=-1",
    "mesh.tensor=1",
    "data.packing=concat",
    "model.compute_dtype=bfloat16",
    "log.progress=false",
    "log.tensorboard=false",
]
# --small: one layer of the tiny preset, so that the whole check runs in seconds on a CPU.
TINY = ["model.preset=tiny", "model.n_layers=1", "model.vocab_size=512", "model.remat=none"]
LOOP_1B = ["model.preset=llama3.2-1b", "model.n_layers=4", "model.vocab_size=32768", "model.remat=full"]
SHAPES = {  # (accelerator, --small)
    "attention": (bench_gpu.ONE_B, [*TINY, "train.seq_len=128", "train.global_batch=2"]),
    # A quarter of Llama 3.2 1B's layers and a 32k vocabulary: the checkpoint is written four times. Layers
    # rematerialized, so that the activations of 32k tokens a step fit beside the logits on one device.
    "deterministic": (
        [*LOOP_1B, "train.seq_len=2048"],
        [*TINY, "train.seq_len=32"],
    ),
    # 32k tokens a step, so ten steps take about as long as writing the 3.7 GB state.
    "checkpoint": (
        [*LOOP_1B, "train.seq_len=4096"],
        [*TINY, "train.seq_len=32"],
    ),
    "lora": (
        ["model.preset=llama3-8b", "model.remat=full", "train.seq_len=2048", "train.global_batch=2"],
        [*TINY, "train.seq_len=32", "train.global_batch=2"],
    ),
}
ROWS_PER_DEVICE = {"deterministic": (4, 2), "checkpoint": (8, 2)}
STEPS = {"attention": ((3, 10), (1, 2)), "deterministic": (20, 4), "checkpoint": (40, 30), "lora": (5, 2)}
# --small: XLA's CPU backend with its LLVM optimizations off compiles the tiny steps about twice as fast.
SMALL_XLA_FLAGS = ("--xla_backend_optimization_level=0",)
LORA_VARIANTS = ("LoRA r16", "QLoRA nf4 r16")
SINGLE_DEVICE = ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", "data.packing=concat"]


def pick(section: str, small: bool, table: dict[str, tuple[Any, Any]] | None = None) -> Any:
    return (table or SHAPES)[section][1 if small else 0]


def row(case: str, **figures: Any) -> dict[str, Any]:
    """One line of the table: `case`, then step_ms, tokens_per_s, mfu, memory_bytes, result, ok and extras."""
    return {"case": case, "step_ms": None, "tokens_per_s": None, "mfu": None, "memory_bytes": None} | figures


def step_row(case: str, bench: dict[str, float], **extra: Any) -> dict[str, Any]:
    """A row of scripts/bench_gpu.py's figures."""
    return row(
        case,
        step_ms=1e3 * bench["step_s"],
        tokens_per_s=bench["tokens_per_s"],
        mfu=bench["mfu"],
        memory_bytes=bench["peak_bytes"],
        **extra,
    )


def default_attention(platform: str) -> str:
    """What model.attention=auto runs for the bf16 step on `platform`."""
    return attention.resolve("auto", platform, "bfloat16")


def attention_section(small: bool) -> list[dict[str, Any]]:
    rows, reference = [], None
    for implementation in bench_gpu.implementations(jax.devices()[0].platform):
        measured = bench_gpu.bench(pick("attention", small), implementation, *pick("attention", small, STEPS))
        reference = reference or measured
        speed = measured["tokens_per_s"] / reference["tokens_per_s"]
        rows.append(step_row(implementation, measured, result=f"{speed:.2f}x xla's tokens/s"))
    return rows


def flags_off_section(small: bool) -> list[dict[str, Any]]:
    """Run in a fresh process whose backend started without the performance flags."""
    chosen = default_attention(jax.devices()[0].platform)
    measured = bench_gpu.bench(pick("attention", small), chosen, *pick("attention", small, STEPS))
    return [step_row("off", measured, attention=chosen)]


def flags_section(small: bool, done: dict[str, Any]) -> list[dict[str, Any]]:
    """Flags on: this process's step with the default attention (the attention section's row when it ran)."""
    chosen = default_attention(jax.devices()[0].platform)
    earlier = [r for r in done.get("attention", {}).get("rows", []) if r["case"] == chosen]
    if earlier:
        on = earlier[0]
    else:
        on = step_row("on", bench_gpu.bench(pick("attention", small), chosen, *pick("attention", small, STEPS)))
    off = fresh_process("flags", small)[0]
    ratio = on["tokens_per_s"] / off["tokens_per_s"]
    return [on | {"case": "on", "attention": chosen, "result": f"{ratio:.3f}x off's tokens/s"}, off]


def synthetic_tokens(cfg_overrides: list[str], rows: int) -> np.ndarray:
    """`rows` examples of seq_len + 1 random byte-tokenizer ids (the loop sections' data)."""
    seq_len = load_config(CONFIG, cfg_overrides).train.seq_len
    return np.random.default_rng(0).integers(0, 257, (rows, seq_len + 1), dtype=np.int32)


def loop_overrides(section: str, small: bool) -> list[str]:
    rows = pick(section, small, ROWS_PER_DEVICE) * jax.device_count()
    return [*LOOP, *pick(section, small), f"train.global_batch={rows}"]


def loss_rows(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def deterministic_section(small: bool) -> list[dict[str, Any]]:
    """Run in a fresh process: train.deterministic's XLA flags must be set before the backend starts."""
    runtime.initialize(RuntimeConfig(), deterministic=True)
    steps = pick("deterministic", small, STEPS)
    half = steps // 2
    overrides = [
        *loop_overrides("deterministic", small),
        "train.deterministic=true",
        f"optim.decay_steps={steps}",  # the schedule of the stopped run is the straight run's
        "optim.warmup_steps=2",
        "log.every=1",
        f"checkpoint.every={half}",
    ]
    tokens = synthetic_tokens(overrides, steps * load_config(CONFIG, overrides).train.global_batch)
    with tempfile.TemporaryDirectory() as tmp:
        straight, resumed = Path(tmp, "straight"), Path(tmp, "resumed")
        train(load_config(CONFIG, [*overrides, f"run.dir={straight}", f"train.steps={steps}"]), tokens)
        for stop in (half, steps):
            summary = train(load_config(CONFIG, [*overrides, f"run.dir={resumed}", f"train.steps={stop}"]), tokens)
        bitwise = final_state_equal(straight, resumed, steps)
        same_losses = all(loss == loss_rows(straight)[step] for step, loss in loss_rows(resumed).items())
        resumed_at = summary["start_step"]
    ok = bitwise and same_losses and resumed_at == half
    result = (
        f"resumed at {resumed_at}: parameters {'bitwise equal' if bitwise else 'DIFFER'}, "
        f"losses {'equal' if same_losses else 'DIFFER'}"
    )
    return [row(f"{steps} steps vs {half} + {steps - half} resumed", result=result, ok=ok)]


def checkpoint_section(small: bool) -> list[dict[str, Any]]:
    overrides = loop_overrides("checkpoint", small)
    cfg = load_config(CONFIG, overrides)
    steps = pick("checkpoint", small, STEPS)
    tokens = synthetic_tokens(overrides, steps * cfg.train.global_batch)
    seconds = {every: bench_checkpoint.step_time(CONFIG, overrides, every, steps, tokens) for every in (0, 10)}
    overhead = seconds[10] / seconds[0] - 1
    step_tokens = cfg.train.global_batch * cfg.train.seq_len
    ok = overhead <= CHECKPOINT_TARGET
    return [
        row("never", step_ms=1e3 * seconds[0], tokens_per_s=step_tokens / seconds[0]),
        row(
            "every 10 steps",
            step_ms=1e3 * seconds[10],
            tokens_per_s=step_tokens / seconds[10],
            result=f"overhead {overhead:+.1%} (target <= {CHECKPOINT_TARGET:.0%})",
            ok=ok,
            overhead=overhead,
        ),
    ]


def lora_section(small: bool) -> list[dict[str, Any]]:
    overrides = [*SINGLE_DEVICE, *pick("lora", small), "model.compute_dtype=bfloat16"]
    shape = load_config(None, overrides).train
    rows = []
    for name in LORA_VARIANTS:
        measured = bench_lora.measure(
            [*overrides, *bench_lora.VARIANTS[name]], jax.devices()[:1], pick("lora", small, STEPS)
        )
        rows.append(
            row(
                name,
                step_ms=1e3 * measured["step_s"],
                tokens_per_s=shape.global_batch * shape.seq_len / measured["step_s"],
                memory_bytes=measured["step"],
                result=f"base weights {human_bytes(measured['base'])}, {measured['trainable']:,} trained",
                base_bytes=measured["base"],
                trainable=measured["trainable"],
            )
        )
    return rows


def fresh_process(section: str, small: bool) -> list[dict[str, Any]]:
    """The rows of `section` computed by a new process of this script, its backend started from ORIGINAL_ENV."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "rows.json")
        command = [sys.executable, __file__, "--child", section, "--out", str(out), *(["--small"] if small else [])]
        done = subprocess.run(command, cwd=REPO, env=child_env(small))
        if done.returncode != 0:
            raise RuntimeError(f"the {section} process exited with {done.returncode} (its output is above)")
        return json.loads(out.read_text())


def child_env(small: bool) -> dict[str, str]:
    """ORIGINAL_ENV, with this run's compilation cache (and --small's XLA flags)."""
    env = ORIGINAL_ENV | {
        "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    if small:
        env["XLA_FLAGS"] = runtime.with_flags(env.get("XLA_FLAGS", ""), SMALL_XLA_FLAGS)
    return env


def run_section(section: str, small: bool, done: dict[str, Any]) -> dict[str, Any]:
    """{rows, seconds} of one section, or {error, seconds} if it failed."""
    started = time.perf_counter()
    print(f"accelerator_check: {section} ...", file=sys.stderr, flush=True)
    try:
        if section == "attention":
            rows = attention_section(small)
        elif section == "flags":
            rows = flags_section(small, done)
        elif section == "deterministic":
            rows = fresh_process("deterministic", small)
        elif section == "checkpoint":
            rows = checkpoint_section(small)
        else:
            rows = lora_section(small)
        return {"rows": rows, "seconds": time.perf_counter() - started}
    except Exception as e:  # noqa: BLE001 - a section that fails (out of memory, a kernel missing) is reported
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300], "seconds": time.perf_counter() - started}


def table(report: dict[str, Any]) -> str:
    """The report as one markdown table."""

    def cell(value: Any, fmt: str) -> str:
        return "" if value is None else format(value, fmt)

    lines = [
        f"{report['device']} ({report['platform']}), {report['devices']} device(s), jax {report['jax']}"
        + (", --small" if report["small"] else ""),
        "",
        "| section | case | ms/step | tokens/s | MFU | memory | result | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, section in report["sections"].items():
        seconds = f"{section['seconds']:.0f}"
        if "error" in section:
            lines.append(f"| {name} | | | | | | FAILED: {section['error']} | {seconds} |")
            continue
        for r in section["rows"]:
            memory = human_bytes(r["memory_bytes"]) if r["memory_bytes"] is not None else ""
            verdict = {True: " (ok)", False: " (NOT MET)"}.get(r.get("ok"), "")
            lines.append(
                f"| {name} | {r['case']} | {cell(r['step_ms'], '.1f')} | {cell(r['tokens_per_s'], ',.0f')} | "
                f"{cell(r['mfu'], '.1%')} | {memory} | {r.get('result', '')}{verdict} | {seconds} |"
            )
            seconds = ""
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny shapes: checks the script on a CPU")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {','.join(SECTIONS)}")
    parser.add_argument("--out", type=Path, help="also write the report as JSON here")
    parser.add_argument("--child", choices=FRESH_PROCESS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = args.out.resolve() if args.out else None
    os.chdir(REPO)  # the scripts read configs/ relative to the repository
    if args.child:
        if args.child == "flags":
            runtime.initialize(RuntimeConfig(performance_flags=False))
        rows = flags_off_section(args.small) if args.child == "flags" else deterministic_section(args.small)
        out.write_text(json.dumps(rows))
        return 0
    sections = args.sections.split(",")
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: {', '.join(unknown)} not among {', '.join(SECTIONS)}")
    with tempfile.TemporaryDirectory(prefix="accelerator-check-xla-cache-") as cache:
        report = check(sections, args.small, cache)
    print(table(report))
    print(f"\n{report['seconds']:.0f} s in all")
    if out:
        out.write_text(json.dumps(report, indent=1))
    return 1 if any("error" in s for s in report["sections"].values()) else 0


def check(sections: list[str], small: bool, cache: str) -> dict[str, Any]:
    """The report of `sections`. The runs of one program (a resumed run, the loop with and without saves) compile
    once: every process of the check shares the persistent compilation cache `cache`."""
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if small:
        os.environ["XLA_FLAGS"] = runtime.with_flags(os.environ.get("XLA_FLAGS", ""), SMALL_XLA_FLAGS)
    runtime.initialize(RuntimeConfig())  # the performance flags, as a training run sets them
    device = jax.devices()[0]
    report: dict[str, Any] = {
        "device": device.device_kind,
        "platform": device.platform,
        "devices": jax.device_count(),
        "jax": jax.__version__,
        "small": small,
        "load_average": os.getloadavg(),
        "sections": {},
    }
    started = time.perf_counter()
    for section in sections:
        report["sections"][section] = run_section(section, small, report["sections"])
    report["seconds"] = time.perf_counter() - started
    return report


if __name__ == "__main__":
    sys.exit(main())
