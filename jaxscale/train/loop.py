"""The training run, top to bottom: config -> runtime -> mesh -> data -> state -> compiled step -> loop."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxscale import runtime
from jaxscale.checkpoint import Checkpointer
from jaxscale.config import Config, save_config, to_dict
from jaxscale.data import GlobalBatchLoader, TokenBatches, eval_batches
from jaxscale.errors import UserError
from jaxscale.flops import train_flops_per_token
from jaxscale.hardware import peak_flops
from jaxscale.mesh import build_mesh
from jaxscale.parallel.pipeline import check_pipeline, describe
from jaxscale.sharding import batch_axes, make_rules
from jaxscale.train.metrics import IntervalMeter, MetricsWriter
from jaxscale.train.preemption import PreemptionWatcher
from jaxscale.train.state import abstract_state, create_state, decoder_shape
from jaxscale.train.step import lower_train_step, make_eval_step


class NonFiniteLossError(Exception):
    """Training produced a NaN or Inf loss under train.on_nan=stop."""


@dataclass
class Derived:
    """Values that follow from the config and the mesh, computed here and nowhere else."""

    num_devices: int
    batch_shards: int  # devices the batch dimension is split over
    microbatch: int  # sequences per microbatch, global
    per_device_batch: int  # sequences per device per microbatch
    tokens_per_step: int


def derive(cfg: Config, mesh: Mesh, batch_mesh_axes: tuple[str, ...]) -> Derived:
    """Per-device and per-microbatch sizes; a UserError when the batch does not split evenly."""
    shards = math.prod(mesh.shape[a] for a in batch_mesh_axes)
    micro = cfg.train.global_batch // cfg.train.grad_accum
    if micro % shards:
        axes = " x ".join(f"mesh.{a}={mesh.shape[a]}" for a in batch_mesh_axes)
        raise UserError(
            f"train.global_batch={cfg.train.global_batch} over train.grad_accum={cfg.train.grad_accum} microbatches "
            f"gives {micro} sequences per microbatch, which does not split over the {shards} batch shards ({axes}); "
            f"make train.global_batch a multiple of {shards * cfg.train.grad_accum}."
        )
    return Derived(
        num_devices=mesh.size,
        batch_shards=shards,
        microbatch=micro,
        per_device_batch=micro // shards,
        tokens_per_step=cfg.train.global_batch * cfg.train.seq_len,
    )


def train(cfg: Config) -> dict[str, Any]:
    """Run (or resume) training as `cfg` says; returns the end-of-run summary."""
    runtime.initialize(cfg.runtime)
    mesh = build_mesh(cfg.mesh)
    rules = make_rules(cfg.mesh.strategy, cfg.mesh.rules)
    batch_axes_used = batch_axes(rules, mesh)
    derived = derive(cfg, mesh, batch_axes_used)
    pipeline = check_pipeline(cfg, mesh.shape["pipeline"])
    is_main = runtime.is_main_process()

    train_data = TokenBatches(cfg.data, split="train", seq_len=cfg.train.seq_len, global_batch=cfg.train.global_batch)
    eval_data = TokenBatches(cfg.data, split="eval", seq_len=cfg.train.seq_len, global_batch=cfg.train.global_batch)
    shape = decoder_shape(cfg.model, train_data.vocab_size)
    if shape.vocab_size < train_data.vocab_size:
        raise UserError(
            f"model.vocab_size={shape.vocab_size} is smaller than the tokenizer's {train_data.vocab_size} tokens; "
            f"set model.vocab_size=0 to size it from the tokenizer."
        )

    run_dir = Path(cfg.run.dir)

    graphdef, structs, shardings = abstract_state(cfg, shape, mesh, rules)
    saves = cfg.checkpoint.every > 0 or cfg.checkpoint.every_minutes > 0
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint) if saves else None
    restored = ckpt.restore_latest(structs) if ckpt is not None and cfg.checkpoint.resume else None
    start_step, state = restored if restored else (0, create_state(cfg, shape, mesh, rules).state)
    if is_main:  # only now: a run refused above leaves the previous run's config in place
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")

    compile_started = time.perf_counter()
    lowered, batch_sharding = lower_train_step(cfg, graphdef, structs, shardings, mesh, rules, derived.microbatch)
    compiled_step = lowered.compile()
    compile_s = time.perf_counter() - compile_started

    eval_step = make_eval_step(graphdef, mesh, rules, shardings, batch_sharding)
    held_out = eval_batches(eval_data, batch_sharding, cfg.train.eval_batches)

    def evaluate(state: Any) -> float:
        sums = [eval_step(state, b) for b in held_out]
        loss_sum, count = np.sum(jax.device_get(sums), axis=0)
        return float(loss_sum / max(count, 1.0))

    meter = IntervalMeter(
        train_flops_per_token(shape, cfg.train.seq_len), derived.num_devices, peak_flops(jax.devices()[0].device_kind)
    )
    writer = MetricsWriter(run_dir, cfg.train.steps, start_step, is_main, cfg.log.progress, cfg.log.tensorboard)
    meta = {"mesh": dict(mesh.shape), "process_count": jax.process_count(), "config": to_dict(cfg)}
    if is_main:
        print(
            f"jaxscale: {mesh.size} devices, mesh {dict(mesh.shape)}, {_param_count(structs):,} parameters, "
            f"{derived.per_device_batch} sequences per device per microbatch, compiled in {compile_s:.1f} s, "
            f"starting at step {start_step}",
            flush=True,
        )
    if pipeline is not None:
        # Known before the first step: the bubble is counted in the schedule's own table.
        writer.write({"step": start_step} | describe(pipeline))

    loader = GlobalBatchLoader(train_data, batch_sharding, start_step=start_step, prefetch=cfg.data.prefetch)
    run_started = last_save = time.perf_counter()
    pending: tuple[int, dict[str, jax.Array], float] | None = None
    last_ready = time.perf_counter()
    last_loss = last_eval = None
    skipped_steps = 0
    preempted_at = None
    nan_steps = _injected_nan_steps()

    def report(step: int, metrics: dict[str, jax.Array], data_wait_s: float) -> None:
        # Blocks on step `step` while the next step is already queued on the devices.
        nonlocal last_ready, last_loss, skipped_steps
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        meter.add(values["tokens"], now - last_ready, data_wait_s)
        last_ready = now
        done = step + 1
        if values.pop("nonfinite"):
            if cfg.train.on_nan == "stop":
                good = ckpt.steps()[-1] if ckpt is not None and ckpt.steps() else None
                raise NonFiniteLossError(
                    f"Step {done} gave a non-finite loss or gradient (loss={values['loss']}); training stopped. "
                    f"The last good checkpoint is {f'step {good}' if good else 'none'}. Lower optim.lr or raise "
                    f"optim.warmup_steps, or set train.on_nan=skip to drop such updates and go on."
                )
            skipped_steps += 1
        last_loss = values["loss"]
        writer.advance()
        if done % cfg.log.every == 0 or done == cfg.train.steps:
            # Every scalar the step returns is logged (models may add their own, e.g. MoE balance).
            row = {"step": done} | {k: v for k, v in values.items() if k != "tokens"}
            writer.write(row | {"skipped_steps": skipped_steps} | meter.summary())
            meter.reset()

    def flush() -> None:
        nonlocal pending
        if pending is not None:
            report(*pending)
            pending = None

    try:
        with PreemptionWatcher(cfg.checkpoint.on_preemption) as preemption:
            for step in range(start_step, cfg.train.steps):
                _, batch = next(loader)
                if step in nan_steps:
                    batch = batch | {"loss_mask": batch["loss_mask"] * np.float32("nan")}
                data_wait_s = loader.last_wait_s
                state, metrics = compiled_step(state, batch)
                flush()
                pending = (step, metrics, data_wait_s)
                done = step + 1
                stop = preemption.should_stop(done)
                if ckpt is not None and (stop or done == cfg.train.steps or _save_due(cfg, done, last_save)):
                    flush()  # never save past a non-finite step that `stop` mode must refuse
                    ckpt.save(done, state, meta, wait=stop)
                    last_save = time.perf_counter()
                if stop:
                    preempted_at = done
                    break
                if (cfg.train.eval_every and done % cfg.train.eval_every == 0) or done == cfg.train.steps:
                    flush()
                    last_eval = evaluate(state)
                    writer.write({"step": done, "eval_loss": last_eval})
                    last_ready = time.perf_counter()  # eval time is not step time
            flush()
    finally:
        loader.close()
        writer.close()
        if ckpt is not None:
            ckpt.close()

    summary = {
        "steps": cfg.train.steps,
        "start_step": start_step,
        "final_loss": last_loss,
        "final_eval_loss": last_eval,
        "skipped_steps": skipped_steps,
        "preempted_at": preempted_at,
        "wall_s": time.perf_counter() - run_started,
        "compile_s": compile_s,
        "parameters": _param_count(structs),
        "mesh": dict(mesh.shape),
    }
    if is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print("summary: " + " ".join(f"{k}={v}" for k, v in summary.items()), flush=True)
    return summary


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


def _injected_nan_steps() -> set[int]:
    """Steps whose loss the test hook JAXSCALE_TEST_NAN_STEPS (comma-separated, 0-based) turns into NaN."""
    raw = os.environ.get("JAXSCALE_TEST_NAN_STEPS", "")
    return {int(s) for s in raw.split(",") if s.strip()}


def _param_count(structs: Any) -> int:
    model_state = structs[0]
    return sum(math.prod(x.shape) for x in jax.tree.leaves(model_state))
