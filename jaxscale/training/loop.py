"""The training run, top to bottom: config -> runtime -> run setup -> data -> state -> compiled step -> loop."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from jaxscale import runtime
from jaxscale.checkpoint import Checkpointer
from jaxscale.config import Config, save_config, step_window, to_dict
from jaxscale.data import (
    DocumentRows,
    ExampleBatches,
    GlobalBatchLoader,
    StepRows,
    TokenBatches,
    build_tokenizer,
    eval_batches,
)
from jaxscale.data.finetune import FINETUNE_SOURCES, FineTuneBatches
from jaxscale.data.mixture import MixtureBatches
from jaxscale.data.segments import carries_documents
from jaxscale.hardware import peak_flops
from jaxscale.models.flops import train_flops_per_token
from jaxscale.storage import run_path
from jaxscale.training.base import saved_part
from jaxscale.training.metrics import IntervalMeter, MetricsWriter
from jaxscale.training.preemption import PreemptionWatcher
from jaxscale.training.restore import Restored, refuse_to_start_over, restore_run, tokenizer_sha256
from jaxscale.training.rundir import check_run_dir, state_bytes
from jaxscale.training.setup import RunSetup, setup_run
from jaxscale.training.supervise import Heartbeat, describe_layout_change, layout_change
from jaxscale.training.trace import StepTrace
from jaxscale.training.wandb_log import WandbRows
from jaxscale.units import human_bytes

# What a run reads its examples from: anything grain can index (see jaxscale.data.ExampleBatches), or
# an ExampleBatches itself.
DataSource = Sequence[Any] | ExampleBatches
Callback = Callable[[dict[str, Any]], None]


class NonFiniteLossError(Exception):
    """Training produced a NaN or Inf loss under train.on_nan=stop."""


def train(
    cfg: Config,
    train_source: DataSource | None = None,
    eval_source: DataSource | None = None,
    callbacks: Sequence[Callback] = (),
) -> dict[str, Any]:
    """Run (or resume) training as `cfg` says; returns the end-of-run summary.

    `train_source` / `eval_source` replace the corpus `cfg.data` names (with a train source and no
    eval source, the run evaluates nothing). Each of `callbacks` sees every row the run logs, on the
    main process. A preemption notice (SIGTERM) at any moment ends the run with its last save committed
    (summary `preempted_at`, and `resumable_step`: the newest committed step, None with checkpoints off).
    """
    started_at = time.time()
    runtime.initialize(cfg.runtime, deterministic=cfg.train.deterministic)
    with PreemptionWatcher(cfg.checkpoint.on_preemption) as preemption:
        run = _start(cfg, train_source, eval_source, callbacks, started_at)
        try:
            # A notice that came while restoring or compiling: the restored step is already saved.
            done = run.restored.step if preemption.note(run.restored.step) else _loop(run, preemption)
        finally:
            run.close(preemption)
    return _finish(run, done, preemption.stopped_at)


@dataclass
class _Run:
    """What the loop works with, built by `_start` before the first step."""

    cfg: Config
    setup: RunSetup
    run_dir: epath.Path
    ckpt: Checkpointer | None
    restored: Restored
    train_step: Any  # the compiled step
    evaluate: Callable[[Any], float] | None
    writer: MetricsWriter
    reporter: StepReporter
    loader: GlobalBatchLoader
    trace: StepTrace
    meta: dict[str, Any]  # saved with every checkpoint
    compile_s: float
    heartbeat: Heartbeat  # progress, for jaxscale supervise's hang watchdog
    last_eval: float | None = None
    loop_started: float = 0.0

    def close(self, preemption: PreemptionWatcher) -> None:
        """Stop the loader and the trace, write the end row, and wait for the last save to commit."""
        self.trace.close()
        self.loader.close()
        self.writer.write({"step": self.reporter.done, "event": "end", "time": time.time()})
        self.writer.close()
        if self.ckpt is not None:
            self.ckpt.close()
        preemption.note(self.reporter.done)  # a notice during the final close: the last save is committed by now


def _start(
    cfg: Config,
    train_source: DataSource | None,
    eval_source: DataSource | None,
    callbacks: Sequence[Callback],
    started_at: float,
) -> _Run:
    """Set up, open the data, restore (or start fresh), compile, and log the start."""
    run_dir = run_path(cfg.run.dir)  # a local directory or a bucket URL
    setup = setup_run(cfg)
    train_data, eval_data = open_data(cfg, train_source, eval_source)
    heartbeat = Heartbeat()
    ckpt, restored, restore_s = _restore_or_start(setup, run_dir)
    heartbeat.beat()
    compile_started = time.perf_counter()
    train_step = setup.lower_train_step().compile()
    compile_s = time.perf_counter() - compile_started
    heartbeat.beat()
    is_main = runtime.is_main_process()
    sinks = [WandbRows(cfg, run_dir)] if cfg.log.wandb and is_main else []
    writer = MetricsWriter(run_dir, cfg.train.steps, restored.step, is_main, cfg.log, callbacks, sinks)
    reporter = StepReporter(setup, writer, ckpt, train_step.memory_analysis(), train_data, restored.step)
    startup_s = time.time() - started_at - compile_s - restore_s
    writer.write(
        {"step": restored.step, "event": "start", "time": started_at}
        | {"startup_s": startup_s, "restore_s": restore_s, "compile_s": compile_s}
        | train_data.describe()
        | setup.loop.log_row()
        | {"sequence_parallel": setup.layout.sequence_parallel}
    )
    _log_start(setup, writer, reporter, restored, compile_s, configured_grad_accum=cfg.train.grad_accum)
    return _Run(
        cfg=cfg,
        setup=setup,
        run_dir=run_dir,
        ckpt=ckpt,
        restored=restored,
        train_step=train_step,
        evaluate=_evaluator(setup, eval_data),
        writer=writer,
        reporter=reporter,
        loader=GlobalBatchLoader(train_data, setup.batch_sharding, restored.step, prefetch=cfg.data.prefetch),
        trace=StepTrace(step_window(cfg.log.profile_steps), run_dir / "profile", is_main),
        meta=_checkpoint_meta(setup, restored),
        compile_s=compile_s,
        heartbeat=heartbeat,
    )


def _restore_or_start(setup: RunSetup, run_dir: epath.Path) -> tuple[Checkpointer | None, Restored, float]:
    """The run directory checked, its checkpointer (None with checkpoints off), where the run starts from, and the
    seconds restoring took. The run's config.yaml is written only once all of that passed."""
    cfg = setup.cfg
    saves = cfg.checkpoint.every > 0 or cfg.checkpoint.every_minutes > 0
    check_run_dir(run_dir, state_bytes(saved_part(setup, setup.state_structs)) if saves else 0)
    refuse_to_start_over(run_dir / "checkpoints", cfg, saves)
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint) if saves else None
    started = time.perf_counter()
    restored = restore_run(setup, ckpt)
    seconds = time.perf_counter() - started
    if runtime.is_main_process():  # only now: a run refused above leaves the previous run's config in place
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        where = f"restored step {restored.step} in {seconds:.1f} s" if restored.meta else "starting from step 0"
        print(f"jaxscale: {where}; compiling the train step", flush=True)
    return ckpt, restored, seconds


def _log_start(
    setup: RunSetup,
    writer: MetricsWriter,
    reporter: StepReporter,
    restored: Restored,
    compile_s: float,
    configured_grad_accum: int,
) -> None:
    """The start line, and the rows of what changed since the checkpoint (devices, grad_accum, dtypes) and of
    the pipeline schedule. `configured_grad_accum` is the config's, before an elastic layout raised it."""
    step, layout = restored.step, setup.layout
    if runtime.is_main_process():
        trained = setup.trainable_count
        sp = ", the tokens between blocks split over tensor (sequence parallel)" if layout.sequence_parallel else ""
        print(
            f"jaxscale: {layout.num_devices} devices, mesh {dict(setup.mesh.shape)}{sp}, "
            f"{setup.parameter_count:,} parameters ({trained:,} trainable, {trained / setup.parameter_count:.2%}), "
            f"{human_bytes(reporter.xla_bytes)} per device (XLA's memory analysis of the step), "
            f"{layout.per_device_batch} sequences per device per microbatch, compiled in {compile_s:.1f} s, "
            f"starting at step {step}",
            flush=True,
        )
        print(f"jaxscale: layer loop {setup.loop.reason}", flush=True)
    now = {"devices": layout.num_devices, "processes": jax.process_count(), "grad_accum": layout.grad_accum}
    change = layout_change(configured_grad_accum, now, restored.meta) or {}
    if restored.dtype_changes:
        change["dtype_changes"] = restored.dtype_changes
    if change:
        writer.write({"step": step, "event": "layout_change", "time": time.time()} | change)
        if runtime.is_main_process():
            print(describe_layout_change(step, change, layout.per_device_batch), flush=True)
    if layout.schedule is not None:  # known before the first step: counted in the schedule's table
        writer.write({"step": step} | layout.schedule.log_row())


def _checkpoint_meta(setup: RunSetup, restored: Restored) -> dict[str, Any]:
    """What every checkpoint of the run holds beside its arrays (jaxscale.training.restore reads it back)."""
    meta = {
        "mesh": dict(setup.mesh.shape),
        "process_count": jax.process_count(),
        "grad_accum": setup.layout.grad_accum,
        "config": to_dict(setup.cfg),
        "tokenizer_sha256": tokenizer_sha256(setup.cfg),
    }
    if restored.base is not None:
        meta["lora_base"] = restored.base
    return meta


def _loop(run: _Run, preemption: PreemptionWatcher) -> int:
    """Train from the restored step to train.steps (or a preemption's step), saving and evaluating as configured;
    returns the number of steps done."""
    cfg, state, reporter = run.cfg, run.restored.state, run.reporter
    if run.evaluate and cfg.train.eval_at_start and run.restored.step == 0:
        run.last_eval = run.evaluate(state)
        run.writer.write({"step": 0, "eval_loss": run.last_eval, "time": time.time()})
    run.loop_started = last_save = time.perf_counter()
    for step in range(run.restored.step, cfg.train.steps):
        _, batch = next(run.loader)
        reporter.data_arrived(run.loader.last_wait_s, run.loader.last_transfer_s)
        with run.trace.step(step, reporter.flush), reporter.timing("compute"):
            state, metrics = run.train_step(state, batch)
        reporter.queue(step, metrics, run.loader.last_wait_s)  # reads the previous step's metrics
        run.heartbeat.beat()
        run.trace.after(step, reporter.flush)
        done = step + 1
        stop = preemption.should_stop(done)
        if run.ckpt is not None and (stop or done == cfg.train.steps or _save_due(cfg, done, last_save)):
            reporter.flush()  # never save past a non-finite step that `stop` mode must refuse
            with reporter.timing("checkpoint"):
                run.ckpt.save(done, saved_part(run.setup, state), run.meta, wait=stop)
            last_save = time.perf_counter()
        if stop:
            break
        if run.evaluate and ((cfg.train.eval_every and done % cfg.train.eval_every == 0) or done == cfg.train.steps):
            reporter.flush()
            with reporter.timing("eval"):
                run.last_eval = run.evaluate(state)
            run.heartbeat.beat()
            run.writer.write({"step": done, "eval_loss": run.last_eval, "time": time.time()})
            reporter.restart_clock()  # eval time is not step time
    reporter.flush()
    return reporter.done


def _finish(run: _Run, done: int, preempted_at: int | None) -> dict[str, Any]:
    """The end-of-run summary, written to RUN_DIR/summary.json and printed on the main process."""
    summary = {
        "steps": run.cfg.train.steps,
        "start_step": run.restored.step,
        "final_loss": run.reporter.last_loss,
        "final_eval_loss": run.last_eval,
        "skipped_steps": run.reporter.skipped_steps,
        "preempted_at": preempted_at,
        # What a preempted run leaves to resume from: the newest committed step (None: nothing, checkpoints off).
        "resumable_step": (run.ckpt.steps() or [0])[-1] if run.ckpt is not None else None,
        "wall_s": time.perf_counter() - run.loop_started if run.loop_started else 0.0,
        "compile_s": run.compile_s,
        "parameters": run.setup.parameter_count,
        "mesh": dict(run.setup.mesh.shape),
    }
    if runtime.is_main_process():
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print("summary: " + " ".join(f"{k}={v}" for k, v in summary.items()), flush=True)
    return summary


def open_data(
    cfg: Config, train_source: DataSource | None, eval_source: DataSource | None
) -> tuple[StepRows, StepRows | None]:
    """The train and eval rows: the user's sources where given, else the corpus of cfg.data; with
    data.packing=segmented, each row also says which document each token belongs to."""
    eos_id = build_tokenizer(cfg.data).eos_id

    def rows(source: DataSource | None, split: str) -> StepRows:
        if isinstance(source, ExampleBatches):
            plain = source
        elif source is not None:
            plain = ExampleBatches(source, cfg.train.seq_len, cfg.train.global_batch, cfg.data.seed)
        elif cfg.data.mixture:
            plain = MixtureBatches(cfg.data, split, cfg.train.seq_len, cfg.train.global_batch)
        elif cfg.data.source in FINETUNE_SOURCES:
            plain = FineTuneBatches(cfg.data, split, cfg.train.seq_len, cfg.train.global_batch)
        else:
            plain = TokenBatches(cfg.data, split, cfg.train.seq_len, cfg.train.global_batch)
        return DocumentRows(plain, eos_id) if carries_documents(cfg.data) else plain

    if train_source is not None and eval_source is None:
        return rows(train_source, "train"), None
    return rows(train_source, "train"), rows(eval_source, "eval")


def _evaluator(setup: RunSetup, eval_data: StepRows | None) -> Callable[[Any], float] | None:
    """Mean token loss of a state on the held-out batches (fixed for the run); None without eval data."""
    if eval_data is None:
        return None
    eval_step = setup.eval_step()
    held_out = eval_batches(eval_data, setup.batch_sharding, setup.cfg.train.eval_batches)

    def evaluate(state: Any) -> float:
        loss_sum, count = np.sum(jax.device_get([eval_step(state, b) for b in held_out]), axis=0)
        return float(loss_sum / max(count, 1.0))

    return evaluate


class StepReporter:
    """Reads each step's metrics one step late, while the next step already runs, and logs them.

    A non-finite step is refused (NonFiniteLossError) or counted, as train.on_nan says.
    """

    def __init__(
        self,
        setup: RunSetup,
        writer: MetricsWriter,
        ckpt: Checkpointer | None,
        memory: Any,
        data: StepRows,
        start_step: int,
    ) -> None:
        cfg = setup.cfg
        self._cfg, self._writer, self._ckpt = cfg, writer, ckpt
        self._data = data  # a mixture says which source each step's rows come from: the log counts them
        self._source_tokens: dict[str, int] = {}
        flops_per_token = train_flops_per_token(setup.shape, cfg.train.seq_len)
        peak = peak_flops(jax.devices()[0].device_kind, cfg.model.compute_dtype)
        self._meter = IntervalMeter(flops_per_token, setup.layout.num_devices, peak)
        # Per device: what the compiled step holds at once, by XLA's memory analysis.
        self.xla_bytes = (
            memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
        ) + memory.temp_size_in_bytes
        self._pending: tuple[int, dict[str, jax.Array], float] | None = None
        self._last_ready = time.perf_counter()
        self.last_loss: float | None = None
        self.skipped_steps = 0
        # MoE steps since start whose sized ragged buffer overflowed somewhere (jaxscale.models.ragged_dispatch)
        self.fallback_steps = 0
        self.done = start_step  # steps done and reported

    def queue(self, step: int, metrics: dict[str, jax.Array], data_wait_s: float) -> None:
        """Report the step queued before, then hold this one's (still running) metrics."""
        self.flush()
        self._pending = (step, metrics, data_wait_s)

    def flush(self) -> None:
        """Report the held step now, waiting for it to finish."""
        if self._pending is not None:
            self._report(*self._pending)
            self._pending = None

    @contextlib.contextmanager
    def timing(self, component: str) -> Iterator[None]:
        """Count the time spent in this block as `component` of the step-time breakdown."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self._meter.spend(component, time.perf_counter() - started)

    def data_arrived(self, wait_s: float, transfer_s: float) -> None:
        """The loop waited `wait_s` for a batch whose copy to the devices took `transfer_s` (in the loader's
        thread): the copy is counted as exposed for as much of the wait as it can explain."""
        exposed = min(wait_s, transfer_s)
        self._meter.spend("transfer", exposed)
        self._meter.spend("data_wait", wait_s - exposed)

    def restart_clock(self) -> None:
        """Time spent since the last step (eval) does not count as the next step's time."""
        self._last_ready = time.perf_counter()

    def _report(self, step: int, metrics: dict[str, jax.Array], data_wait_s: float) -> None:
        with self.timing("compute"):  # waits for the step to finish on the devices
            values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        self._meter.add(values["tokens"], now - self._last_ready, data_wait_s)
        self._last_ready = now
        done = self.done = step + 1
        if values.pop("nonfinite"):
            if self._cfg.train.on_nan == "stop":
                good = self._ckpt.steps()[-1] if self._ckpt is not None and self._ckpt.steps() else None
                raise NonFiniteLossError(
                    f"Step {done} gave a non-finite loss or gradient (loss={values['loss']}); training stopped. "
                    f"The last good checkpoint is {f'step {good}' if good else 'none'}. Lower optim.lr or raise "
                    f"optim.warmup_steps, or set train.on_nan=skip to drop such updates and go on."
                )
            self.skipped_steps += 1
        self.last_loss = values["loss"]
        self.fallback_steps += values.get("moe_ragged_fallback", 0.0) > 0
        for name, tokens in self._data.tokens_by_source(step).items():
            self._source_tokens[f"data_tokens_{name}"] = self._source_tokens.get(f"data_tokens_{name}", 0) + tokens
        self._writer.advance()
        if done % self._cfg.log.every == 0 or done == self._cfg.train.steps:
            # Every scalar the step returns is logged (models may add their own, e.g. MoE balance).
            row = {"step": done} | {k: v for k, v in values.items() if k != "tokens"}
            row |= {"skipped_steps": self.skipped_steps} | self._meter.summary() | self._memory() | self._source_tokens
            if "moe_ragged_fallback" in values:
                row["moe_ragged_fallback_steps"] = self.fallback_steps
            self._source_tokens = {}
            self._writer.write(row | {"time": time.time()})
            self._meter.reset()

    def _memory(self) -> dict[str, float | str]:
        """Device memory in use and at peak: the device's own counters where the backend keeps them (GPU,
        TPU), else XLA's memory analysis of the step (CPU)."""
        stats = jax.local_devices()[0].memory_stats()
        if stats and "bytes_in_use" in stats:
            in_use = stats["bytes_in_use"]
            return {"memory_in_use_bytes": in_use, "memory_peak_bytes": stats.get("peak_bytes_in_use", in_use)}
        return {"memory_peak_bytes": self.xla_bytes, "memory_source": "xla_memory_analysis"}


def _save_due(cfg: Config, done: int, last_save: float) -> bool:
    """Whether step `done` is a regular save point: every N steps, or every M minutes.

    The clock differs between hosts, so on many processes process 0's reading is broadcast, and
    only on log steps, where the loop already waits on the devices.
    """
    if cfg.checkpoint.every and done % cfg.checkpoint.every == 0:
        return True
    if not cfg.checkpoint.every_minutes:
        return False
    late = time.perf_counter() - last_save >= 60 * cfg.checkpoint.every_minutes
    if jax.process_count() == 1:
        return late
    if done % cfg.log.every:
        return False
    return bool(multihost_utils.broadcast_one_to_all(np.int32(late)))
