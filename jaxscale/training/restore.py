"""A run restored: its newest usable checkpoint, the frozen LoRA base rebuilt and checked, the math compared.

Every caller restores through `restore_run`: the training run (whose Checkpointer may set corrupt steps
aside) and the read-only ones (`jaxscale export`, `jaxscale generate`, which open the run with
`open_run` and never rename or delete anything, so they may run beside a run that is training).

A resume continues the same math or stops: a checkpoint trained with another rope, norm epsilon,
vocabulary or adapter scale is refused naming each key and both values, unless the key is listed in
checkpoint.allow_config_change. Keys that only say how the math runs (mesh, batch split, remat,
kernels, dtypes, logging) change freely; a dtype change is a cast, logged as a layout change.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from etils import epath
from flax import nnx

from jaxscale import runtime
from jaxscale.checkpoint import Checkpointer, step_directories
from jaxscale.config import Config, flatten, load_config, to_dict
from jaxscale.errors import UserError
from jaxscale.storage import run_path
from jaxscale.training.base import base_reference, check_same_base, initial_state, saved_part, with_saved
from jaxscale.training.setup import RunSetup, setup_run

# Sections whose keys define the function the weights were trained for; the keys of them listed in
# _HOW_IT_RUNS only say how it is computed or stored, and may change on resume.
_MATH_SECTIONS = ("model", "lora")
_HOW_IT_RUNS = {
    "model.preset",  # a name: the shape keys it fills are compared one by one
    "model.init_from",  # where the first weights came from; a LoRA base is checked by its content hash instead
    "model.param_dtype",  # restored as a cast (see Checkpointer.restore), logged
    "model.compute_dtype",
    "model.remat",
    "model.attention",
    "model.logits_chunk",
    "model.scan_unroll",
    "model.expert_exchange",
    "model.ragged_buffer",
    "lora.dropout",  # a training regularizer: the adapted model computes the same
    "lora.base",  # checked by the base's content hash (training.base.check_same_base)
}
TOKENIZER_KEY = "data.tokenizer"  # compared by the content hash of its file, saved in each checkpoint's metadata


@dataclass(frozen=True)
class Restored:
    """Where a run starts: `step` (0 when fresh) and the whole train state (model with its frozen base, optimizer)."""

    step: int
    state: nnx.State
    meta: dict[str, Any] | None  # the restored checkpoint's metadata; None on a fresh start
    base: dict[str, str] | None  # the frozen LoRA base's source and content hash; None without LoRA
    dtype_changes: list[str]  # `name: float32 -> bfloat16` for each array cast on restore


def tokenizer_sha256(cfg: Config) -> str:
    """The content hash of data.tokenizer's file ("byte" for the byte tokenizer), as saved in checkpoint metadata."""
    if cfg.data.tokenizer == "byte":
        return "byte"
    return hashlib.sha256(epath.Path(cfg.data.tokenizer).expanduser().read_bytes()).hexdigest()


def math_changes(meta: dict[str, Any], cfg: Config) -> list[str]:
    """`key: checkpoint value -> this run's value` for each key that changes what the weights compute, except those
    checkpoint.allow_config_change lists. Keys the checkpoint's config lacks (written by an older jaxscale) are taken
    as unchanged."""
    saved, now = flatten(meta.get("config", {})), flatten(to_dict(cfg))
    allowed = set(cfg.checkpoint.allow_config_change)
    changes = [
        f"{key}: {saved[key]!r} -> {now[key]!r}"
        for key in sorted(saved.keys() & now.keys())
        if key.split(".")[0] in _MATH_SECTIONS
        and key not in _HOW_IT_RUNS
        and key not in allowed
        and saved[key] != now[key]
    ]
    saved_tokenizer = meta.get("tokenizer_sha256")
    if TOKENIZER_KEY not in allowed and saved_tokenizer and saved_tokenizer != tokenizer_sha256(cfg):
        changes.append(
            f"{TOKENIZER_KEY}: a tokenizer with sha256 {saved_tokenizer[:12]} -> {now[TOKENIZER_KEY]!r} "
            f"(sha256 {tokenizer_sha256(cfg)[:12]})"
        )
    return changes


def check_same_math(meta: dict[str, Any], cfg: Config, directory: epath.Path, step: int) -> None:
    """UserError naming every key whose change would continue training on weights made for other math."""
    changes = math_changes(meta, cfg)
    if changes:
        keys = [change.split(":")[0] for change in changes]
        raise UserError(
            f"The checkpoint at {directory / str(step)} was trained with other model math: {'; '.join(changes)}. "
            f"Resuming would train those weights for a model they were not trained as. Set the checkpoint's values "
            f"again, or accept the change on purpose with checkpoint.allow_config_change=[{','.join(keys)}], or "
            f"point run.dir at a new directory to start fresh."
        )


def refuse_to_start_over(directory: epath.Path, cfg: Config, saves: bool) -> None:
    """UserError when `directory` (a run's checkpoints/) holds any step, committed, set aside or half-written, and
    this run would not resume from it (checkpoints off, or checkpoint.resume=false): it would train from step 0 over a
    run whose steps, metrics and config it then mixes with its own."""
    found = step_directories(directory)
    if not found or (saves and cfg.checkpoint.resume):
        return
    why = (
        "checkpoint.resume=false"
        if saves
        else "this run saves no checkpoints (checkpoint.every=0, checkpoint.every_minutes=0)"
    )
    shown = ", ".join(found[:8]) + (f" and {len(found) - 8} more" if len(found) > 8 else "")
    raise UserError(
        f"run.dir={directory.parent} holds checkpoints ({shown}), but {why}, so this run would start over at step 0 "
        f"in a directory of another run. Point run.dir at a new directory, or resume from them (checkpoint.resume=true "
        f"with checkpoint.every > 0)."
    )


def restore_run(setup: RunSetup, checkpoints: Checkpointer | None, fresh: bool = True) -> Restored | None:
    """The state a run continues from: its newest usable checkpoint, else (with `fresh`) a new state at step 0.

    Without `fresh`, None when there is no checkpoint. A LoRA checkpoint holds the adapters and optimizer only:
    its frozen base is rebuilt as the first run built it and must hash the same (UserError otherwise).
    """
    saved_structs = saved_part(setup, setup.state_structs)  # with LoRA: all but the frozen base
    found = checkpoints.restore_latest(saved_structs) if checkpoints is not None else None
    if found is None and not fresh:
        return None
    meta = checkpoints.read_meta(found[0]) if found else None
    changes = checkpoints.check_compatible(found[0], saved_structs) if found else []
    if meta is not None:
        check_same_math(meta, setup.cfg, checkpoints.directory, found[0])
    if setup.shape.adapters is None:
        step, state = found if found else (0, setup.init_state())
        return Restored(step, state, meta, None, changes)
    state = initial_state(setup)  # the frozen base is rebuilt, never restored
    base = base_reference(setup, state)
    if not found:
        return Restored(0, state, None, base, [])
    check_same_base(meta.get("lora_base"), base, checkpoints.directory)
    return Restored(found[0], with_saved(state, found[1]), meta, base, changes)


def run_config(run_dir: str | Path | epath.Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The config of the run in `run_dir` (its config.yaml) with `overrides`.

    A full run's checkpoint holds every weight, so the Hugging Face directory it was imported from
    (model.init_from) is not read again and need not exist any more; a LoRA run's base is read from it again.
    """
    path = run_path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"'{run_dir}' is not a run directory: it has no config.yaml. Pass the run.dir of a run.")
    cfg = load_config(path, ["model.init_from=", *overrides])
    return load_config(path, list(overrides)) if cfg.lora.rank else cfg


def open_run(run_dir: str | Path | epath.Path, cfg: Config) -> tuple[RunSetup, Restored]:
    """The run setup of `cfg` (the run's config, see `run_config`) and the newest usable checkpoint of `run_dir`,
    opened read-only: a corrupt step is reported and passed over, never renamed. UserError when there is none."""
    runtime.initialize(cfg.runtime)
    setup = setup_run(cfg)
    directory = run_path(run_dir) / "checkpoints"
    checkpoints = Checkpointer(directory, cfg.checkpoint, read_only=True) if directory.is_dir() else None
    try:
        restored = restore_run(setup, checkpoints, fresh=False)
    finally:
        if checkpoints is not None:
            checkpoints.close()
    if restored is None:
        raise UserError(
            f"'{run_dir}' has no checkpoint (looked in {directory}); train it with checkpoint.every > 0, or point at "
            f"the run.dir of a run that saved."
        )
    return setup, restored
