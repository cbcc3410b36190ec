"""jaxscale: train transformer language models with JAX on any device mesh.

The Python API, for training entrypoints of your own:

    import jaxscale

    cfg = jaxscale.load_config("configs/tiny.yaml", ["train.steps=50"])
    jaxscale.train(cfg, train_source=my_rows, callbacks=[print])
    jaxscale.plan(cfg, "v5p-256")                  # rank meshes on hardware you do not have
    jaxscale.compile(cfg, topology="v5e:4x4")      # XLA's memory and FLOPs of the real step
    setup = jaxscale.setup_run(cfg)                # mesh, layout, shardings, the step itself

Extension points: `train_source` / `eval_source`, any random-access sequence of examples (anything
grain can index; see jaxscale.data.ExampleBatches for the example format), and `callbacks`,
functions that receive every row the run logs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from jaxscale.config import Config, load_config
from jaxscale.errors import UserError

if TYPE_CHECKING:
    from jaxscale.aot import CompileReport
    from jaxscale.planning.search import Plan
    from jaxscale.training.setup import RunSetup

__all__ = ["Config", "UserError", "compile", "load_config", "plan", "setup_run", "train"]


def train(
    cfg: Config,
    train_source: Sequence[Any] | None = None,
    eval_source: Sequence[Any] | None = None,
    callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """Run (or resume) training as `cfg` says; returns the summary (steps, final losses, wall time, ...).

    `train_source` / `eval_source` replace the corpus cfg.data names: random-access sequences whose
    items are 1-D arrays of train.seq_len + 1 token ids, or dicts of `inputs`, `targets` and an
    optional `loss_mask` ([seq_len] each). With a train source and no eval source nothing is
    evaluated. Each callback gets every logged row (a dict with `step`) on the main process.
    """
    from jaxscale.training.loop import train as run

    return run(cfg, train_source, eval_source, callbacks)


def plan(cfg: Config, hardware: str) -> Plan:
    """Rank every mesh of `hardware` (e.g. "v5p-256", "h100x64", "cpu-8") for the run of `cfg`, no devices used."""
    from jaxscale.hardware import parse_cluster
    from jaxscale.planning.search import plan as rank

    return rank(cfg, parse_cluster(hardware))


def compile(  # noqa: A001 - the verb of the CLI command it mirrors
    cfg: Config, topology: str | None = None, cpu_devices: int | None = None, hbm_gib: float | None = None
) -> CompileReport:
    """Compile the train step of `cfg` ahead of time for a TPU topology ("v5e:4x4") or N CPU devices.

    Returns XLA's per-device memory and FLOPs beside the planner's; a UserError when it cannot fit.
    """
    from jaxscale.aot import compile_for_target

    return compile_for_target(cfg, topology, cpu_devices, hbm_gib)


def setup_run(cfg: Config, devices: Sequence[Any] | None = None) -> RunSetup:
    """The run setup of `cfg` on `devices` (default: all): mesh, layout, model shape, abstract state, shardings."""
    from jaxscale.training.setup import setup_run as build

    return build(cfg, devices)
