"""The frozen base of a LoRA run: where it comes from, what a checkpoint holds of it, and its fingerprint.

A LoRA checkpoint holds the adapters and the optimizer state only, plus a reference to the base in
its metadata: where it came from (`lora.base`, or the seeded initial model) and a content hash, the
SHA-256 of every base array's exact checksum (jaxscale.checkpoint's, identical on any mesh). A
resume rebuilds the base the same way, compares the hash, and refuses a checkpoint trained on
another base. Without LoRA nothing changes: the checkpoint holds the whole state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from jaxscale.checkpoint import Checkpointer
from jaxscale.checkpoint.manager import checksums_json, fingerprint
from jaxscale.config import LoraConfig
from jaxscale.errors import UserError
from jaxscale.models.lora import set_base
from jaxscale.storage import run_path
from jaxscale.training.setup import RunSetup, setup_run


def is_frozen_base(path: tuple, variable: nnx.Variable) -> bool:
    """A filter of the (model, optimizer) state: the model's variables that LoRA does not train."""
    return path[0] == 0 and not isinstance(variable, nnx.LoRAParam)


def saved_part(setup: RunSetup, state: Any) -> Any:
    """What a checkpoint of `state` holds: all of it, or with LoRA all but the frozen base."""
    if setup.shape.adapters is None:
        return state
    return nnx.split_state(state, is_frozen_base, ...)[1]


def with_saved(state: nnx.State, saved: nnx.State) -> nnx.State:
    """`state`'s frozen base with the adapters and optimizer state of `saved` (a restored `saved_part`)."""
    return nnx.merge_state(nnx.split_state(state, is_frozen_base, ...)[0], saved)


def initial_state(setup: RunSetup) -> nnx.State:
    """A fresh state: seeded adapters and optimizer, and the base `lora.base` names (default: the run's initial
    model, seeded or model.init_from's)."""
    state = setup.init_state()
    if setup.shape.adapters is None or not setup.cfg.lora.base:
        return state  # the seeded model, or model.init_from's (jaxscale.hf.load reads it into the base's storage)
    params = base_checkpoint_params(setup, setup.cfg.lora.base)

    def load(state: nnx.State, params: nnx.State) -> nnx.State:
        model, optimizer = nnx.merge(setup.graphdef, state)
        set_base(model, params)
        return nnx.state((model, optimizer))

    return jax.jit(load, out_shardings=setup.state_shardings, donate_argnums=0)(state, params)


def base_checkpoint_params(setup: RunSetup, directory: str | os.PathLike) -> nnx.State:
    """The model parameters of the newest checkpoint of a full (lora.rank=0) run of the same model under `directory`
    (a run directory or its checkpoints/, local or a bucket URL), placed on this run's mesh."""
    directory = run_path(directory)
    checkpoints = directory / "checkpoints" if (directory / "checkpoints").is_dir() else directory
    steps = sorted(int(p.name) for p in checkpoints.glob("*") if p.name.isdigit()) if checkpoints.is_dir() else []
    if not steps:
        raise UserError(
            f"lora.base={directory} holds no checkpoint; point it at the run directory of a full training run "
            f"of this model (one with checkpoints/<step>), or set lora.base='' to adapt the seeded initial model."
        )
    plain_cfg = dataclasses.replace(setup.cfg, lora=LoraConfig())
    plain = setup_run(plain_cfg, list(setup.mesh.devices.flat), tokenizer_vocab=setup.shape.vocab_size)
    ckpt = Checkpointer(checkpoints, plain_cfg.checkpoint, read_only=True)
    try:
        ckpt.check_compatible(steps[-1], plain.state_structs)
        state = ckpt.restore(steps[-1], plain.state_structs)
    finally:
        ckpt.close()
    return nnx.state(nnx.merge(plain.graphdef, state)[0], nnx.Param)


def base_reference(setup: RunSetup, state: nnx.State) -> dict[str, str] | None:
    """Where the run's frozen base came from and its content hash; None without LoRA."""
    if setup.shape.adapters is None:
        return None
    base = nnx.to_pure_dict(nnx.split_state(state, is_frozen_base, ...)[0])
    sums = checksums_json(fingerprint(base)[0])
    shapes = {jax.tree_util.keystr(p): list(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(base)}
    digest = hashlib.sha256(json.dumps([sorted(sums.items()), sorted(shapes.items())]).encode()).hexdigest()
    lora = setup.cfg.lora
    if lora.base:
        source = str(run_path(lora.base))
    elif setup.cfg.model.init_from:
        source = setup.cfg.model.init_from
    else:
        source = f"initial model, train.seed={setup.cfg.train.seed}"
    return {"source": source, "base_quant": lora.base_quant, "sha256": digest}


def check_same_base(saved: dict[str, str] | None, current: dict[str, str] | None, directory: Path) -> None:
    """UserError unless a checkpoint's base reference (`saved`, from its metadata) is this run's base."""
    if current is None or (saved and saved.get("sha256") == current["sha256"]):
        return
    was = f"{saved['source']} (sha256 {saved['sha256'][:12]})" if saved else "no recorded base (a full training run)"
    raise UserError(
        f"The checkpoints under {directory} were trained on the base {was}, but this run's base is "
        f"{current['source']} (sha256 {current['sha256'][:12]}); adapters trained on one base are wrong on another. "
        f"Resume with the base they were trained on (lora.base, train.seed, lora.base_quant), or point run.dir at a "
        f"new directory to start fresh."
    )
