"""`jaxscale profile`: each component of a training run measured alone, then the real loop, and a verdict.

On the run's own config and mesh: (a) the input pipeline alone (this process's rows of a step, as the
loader reads them); (b) the host-to-device copy of one global batch; (c) the compiled step on a batch
already on the devices, with achieved FLOP/s, MFU against the device's peak for the compute dtype and
achieved memory bandwidth (XLA's bytes accessed over step time) against its HBM bandwidth; (d) one
checkpoint save, the time it blocks the loop and its total; (e) the compile; (f) the training loop
itself (`jaxscale.training.loop.train` in a scratch run directory), with its step-time breakdown. The
verdict names the component that bounds the run and the change to make.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
from etils import epath

from jaxscale import runtime
from jaxscale.checkpoint import Checkpointer
from jaxscale.config import Config
from jaxscale.data.loader import process_row_ids, to_global_batch
from jaxscale.hardware import accelerator_of, peak_flops
from jaxscale.models.flops import train_flops_per_token
from jaxscale.storage import run_path, written_locally
from jaxscale.training.goodput import read_rows
from jaxscale.training.loop import DataSource, open_data, train
from jaxscale.training.metrics import COMPONENTS
from jaxscale.training.setup import setup_run

INPUT_BATCHES = 20  # batches the input pipeline is timed over (fewer if they take over INPUT_SECONDS)
INPUT_SECONDS = 5.0
REPEATS = 5  # of the host-to-device copy and the checkpoint save
# A component that takes more than this share of the loop's step is what bounds it.
BOUND_SHARE = 0.10


@dataclass(frozen=True)
class Profile:
    """Every measurement of `jaxscale profile`; seconds, bytes and FLOPs; per device where it says so."""

    mesh: dict[str, int]
    tokens_per_step: int
    input_batches_per_s: float  # (a)
    input_tokens_per_s: float
    transfer_s: float  # (b) one global batch, this process's share
    transfer_gb_per_s: float
    compile_s: float  # (e)
    step_s: float  # (c) median, batch already on the devices
    tflops_per_device: float
    mfu: float | None  # None: the device's peak for the compute dtype is unknown (CPU)
    bytes_accessed_per_device: float  # XLA's cost analysis; it counts a loop body (the layer scan) once
    memory_gb_per_s: float
    hbm_gb_per_s: float | None
    checkpoint_blocked_s: float  # (d)
    checkpoint_total_s: float
    checkpoint_every: int
    loop_step_s: float  # (f) wall time per step in the loop, and its breakdown (seconds per step)
    loop_breakdown: dict[str, float]
    supply_ratio: float  # tokens/s the input pipeline supplies over tokens/s the loop consumes
    bound: str  # input | transfer | checkpoint | compute
    verdict: str
    trace_dir: str | None


def profile_run(cfg: Config, train_source: DataSource | None = None, steps: int = 10, trace: bool = False) -> Profile:
    """Measure every component of the run `cfg` describes (see the module docstring); `steps` timed steps each.

    `train_source` replaces cfg.data's corpus, as for `jaxscale.train`. With `trace`, the timed steps of (c)
    are captured by jax.profiler under <run.dir>/profile.
    """
    runtime.initialize(cfg.runtime, deterministic=cfg.train.deterministic)
    if jax.config.jax_compilation_cache_dir is None:
        # The loop (f) compiles the same step again: from this cache, not from scratch.
        jax.config.update("jax_compilation_cache_dir", str(run_path(cfg.run.dir) / "profile" / "xla-cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    with tempfile.TemporaryDirectory(prefix="jaxscale-profile-") as scratch:
        setup = setup_run(cfg)
        data, _ = open_data(cfg, train_source, None)
        shape = (cfg.train.global_batch, cfg.train.seq_len)
        row_ids = process_row_ids(setup.batch_sharding, shape)
        batches_per_s = _input_rate(data, row_ids)
        host_rows = data.rows(0, row_ids)
        transfer_s = _median_time(
            lambda: jax.block_until_ready(to_global_batch(host_rows, row_ids, setup.batch_sharding, shape))
        )
        batch = to_global_batch(host_rows, row_ids, setup.batch_sharding, shape)

        started = time.perf_counter()
        compiled = setup.lower_train_step().compile()
        compile_s = time.perf_counter() - started
        state = setup.init_state()
        trace_dir = run_path(cfg.run.dir) / "profile" if trace else None
        step_s, state = _step_time(compiled, state, batch, steps, trace_dir)
        blocked_s, total_s = _checkpoint_times(state, cfg, Path(scratch) / "checkpoints")
        loop_step_s, breakdown = _loop(cfg, train_source, steps, Path(scratch) / "run")

    tokens = cfg.train.global_batch * cfg.train.seq_len
    devices = setup.layout.num_devices
    tflops = train_flops_per_token(setup.shape, cfg.train.seq_len) * tokens / step_s / devices / 1e12
    peak = peak_flops(jax.devices()[0].device_kind, cfg.model.compute_dtype)
    accelerator = accelerator_of(jax.devices()[0].device_kind)
    cost = compiled.cost_analysis()
    bytes_accessed = float((cost[0] if isinstance(cost, list) else cost).get("bytes accessed", 0.0))
    result = Profile(
        mesh=dict(setup.mesh.shape),
        tokens_per_step=tokens,
        input_batches_per_s=batches_per_s,
        input_tokens_per_s=batches_per_s * tokens,
        transfer_s=transfer_s,
        transfer_gb_per_s=sum(v.nbytes for v in host_rows.values()) / transfer_s / 1e9,
        compile_s=compile_s,
        step_s=step_s,
        tflops_per_device=tflops,
        mfu=tflops * 1e12 / peak if peak else None,
        bytes_accessed_per_device=bytes_accessed,
        memory_gb_per_s=bytes_accessed / step_s / 1e9,
        hbm_gb_per_s=accelerator.hbm_bandwidth / 1e9 if accelerator else None,
        checkpoint_blocked_s=blocked_s,
        checkpoint_total_s=total_s,
        checkpoint_every=cfg.checkpoint.every,
        loop_step_s=loop_step_s,
        loop_breakdown=breakdown,
        supply_ratio=batches_per_s * loop_step_s,
        bound="",
        verdict="",
        trace_dir=str(trace_dir) if trace_dir else None,
    )
    bound, verdict = judge(result)
    return dataclasses.replace(result, bound=bound, verdict=verdict)


def _input_rate(data: Any, row_ids: Any) -> float:
    """Batches per second this process's rows are read at, the way the loader reads them."""
    started, count = time.perf_counter(), 0
    while count < INPUT_BATCHES and (count < 2 or time.perf_counter() - started < INPUT_SECONDS):
        data.rows(count, row_ids)
        count += 1
    return count / (time.perf_counter() - started)


def _median_time(fn: Any, repeats: int = REPEATS) -> float:
    fn()  # the first call warms up whatever it uses
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _step_time(compiled: Any, state: Any, batch: Any, steps: int, trace_dir: epath.Path | None) -> tuple[float, Any]:
    """Median seconds of the compiled step on a batch already on the devices, and the state it leaves."""
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    with contextlib.ExitStack() as tracing:
        if trace_dir is not None:
            tracing.enter_context(jax.profiler.trace(str(tracing.enter_context(written_locally(trace_dir)))))
        for step in range(steps):
            started = time.perf_counter()
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, metrics = compiled(state, batch)
                jax.block_until_ready(metrics)
            times.append(time.perf_counter() - started)
    return statistics.median(times), state


def _checkpoint_times(state: Any, cfg: Config, directory: Path) -> tuple[float, float]:
    """Median seconds one save of the state blocks the loop, and until it is committed."""
    ckpt = Checkpointer(directory, dataclasses.replace(cfg.checkpoint, keep=2))
    blocked, total = [], []
    try:
        for step in range(REPEATS + 1):
            started = time.perf_counter()
            ckpt.save(step, state, {})
            returned = time.perf_counter()
            ckpt.wait()
            if step:  # the first save warms up handlers, threads and the checksum's compile
                blocked.append(returned - started)
                total.append(time.perf_counter() - started)
    finally:
        ckpt.close()
    return statistics.median(blocked), statistics.median(total)


def _loop(cfg: Config, train_source: DataSource | None, steps: int, run_dir: Path) -> tuple[float, dict[str, float]]:
    """The training loop's wall time per step and its breakdown, from its last logged interval.

    The loop runs 2 x `steps` steps with no checkpoints (their cost is measured alone) and logs every
    `steps` steps: the first interval holds the warm-up, the second is read.
    """
    loop_cfg = dataclasses.replace(
        cfg,
        run=dataclasses.replace(cfg.run, dir=str(run_dir)),
        train=dataclasses.replace(cfg.train, steps=2 * steps, eval_every=0, eval_batches=1),
        checkpoint=dataclasses.replace(cfg.checkpoint, every=0, every_minutes=0.0),
        log=dataclasses.replace(cfg.log, every=steps, progress=False, tensorboard=False, profile_steps=""),
    )
    with contextlib.redirect_stdout(io.StringIO()):  # its log lines are not this command's output
        train(loop_cfg, train_source)
    last = [row for row in read_rows(run_dir) if "interval_steps" in row][-1]
    breakdown = {k: last[f"time_{k}_s"] for k in COMPONENTS}
    return last["wall_s"] / last["interval_steps"], breakdown


def judge(p: Profile) -> tuple[str, str]:
    """Which component bounds the run, and a sentence naming it and the change to make."""
    step = p.loop_step_s
    data_share = (p.loop_breakdown["data_wait"] + p.loop_breakdown["transfer"]) / step
    if p.supply_ratio < 1.0 or data_share > BOUND_SHARE:
        return "input", (
            f"input-bound: the pipeline supplies {p.supply_ratio:.2g}x what the step consumes and the loop waits "
            f"for data {data_share:.0%} of its time; make the data source faster (tokenize once ahead of "
            f"training, keep per-example work out of __getitem__) or raise data.prefetch to ride out bursts."
        )
    if p.transfer_s > BOUND_SHARE * step and p.transfer_s > p.step_s:
        return "transfer", (
            f"transfer-bound: copying one batch to the devices takes {p.transfer_s:.3g} s, longer than the "
            f"{p.step_s:.3g} s step it overlaps with; send fewer bytes (int32 token ids only, no host-side "
            f"padding) or give the host faster links."
        )
    per_step = p.checkpoint_blocked_s / p.checkpoint_every if p.checkpoint_every else 0.0
    if per_step > BOUND_SHARE * step:
        return "checkpoint", (
            f"checkpoint-bound: each save blocks the loop {p.checkpoint_blocked_s:.3g} s, {per_step / step:.0%} of "
            f"every step at checkpoint.every={p.checkpoint_every}; raise checkpoint.every or keep "
            f"checkpoint.async_save=true."
        )
    utilization = f"MFU {p.mfu:.0%}" if p.mfu is not None else f"{p.tflops_per_device:.3g} TFLOP/s per device"
    return "compute", (
        f"compute-bound: the step itself takes {p.step_s:.3g} s ({utilization}) and the input pipeline supplies "
        f"{p.supply_ratio:.2g}x what it consumes; to go faster change the step: a faster mesh "
        f"(`jaxscale plan`), a lighter model.remat policy, or bfloat16 compute."
    )


def format_profile(p: Profile) -> str:
    """The measurements as a table, then the verdict."""
    gb = "GB/s"
    mfu = f"{p.mfu:.1%}" if p.mfu is not None else "n/a (no known peak for this device)"
    hbm = f" of {p.hbm_gb_per_s:.0f} {gb}" if p.hbm_gb_per_s else ""
    rows = [
        ("(a) input pipeline", f"{p.input_batches_per_s:.3g} batches/s, {p.input_tokens_per_s:.3g} tokens/s"),
        ("(b) host-to-device", f"{p.transfer_s * 1e3:.3g} ms per batch, {p.transfer_gb_per_s:.3g} {gb}"),
        ("(c) step on device", f"{p.step_s * 1e3:.4g} ms, {p.tflops_per_device:.3g} TFLOP/s per device, MFU {mfu}"),
        ("    memory traffic", f"{p.memory_gb_per_s:.3g} {gb}{hbm} (XLA's bytes accessed; a loop body counted once)"),
        (
            "(d) checkpoint save",
            f"blocks {p.checkpoint_blocked_s * 1e3:.4g} ms, {p.checkpoint_total_s * 1e3:.4g} ms total",
        ),
        ("(e) compile", f"{p.compile_s:.3g} s"),
        ("(f) training loop", f"{p.loop_step_s * 1e3:.4g} ms per step"),
    ]
    rows += [(f"    {name}", f"{seconds * 1e3:.4g} ms") for name, seconds in p.loop_breakdown.items()]
    mesh = " ".join(f"{a}={n}" for a, n in p.mesh.items() if n > 1) or "one device"
    lines = [f"jaxscale profile: mesh {mesh}, {p.tokens_per_step:,} tokens per step"]
    lines += [f"{name:<22} {value}" for name, value in rows]
    if p.trace_dir:
        lines.append(f"trace of the timed steps: {p.trace_dir}")
    return "\n".join([*lines, "", p.verdict])
