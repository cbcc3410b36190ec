"""One run setup and one layout validator: the Python API, plan vs compile vs train, and the package's layers."""

import ast
import json
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxscale
from jaxscale.aot import compile_train_step
from jaxscale.config import PIPELINE_SCHEDULES, REMAT_POLICIES
from jaxscale.mesh import AXES
from jaxscale.models.transformer import CHECKPOINT_POLICIES
from jaxscale.parallel.schedules import build_schedule

PACKAGE = Path(jaxscale.__file__).parent
SMALL = [
    "model.compute_dtype=float32",
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.head_dim=8",
    "model.d_ff=64",
    "train.global_batch=8",
    "train.grad_accum=2",
    "train.seq_len=16",
]
QUIET = ["log.progress=false", "log.tensorboard=false", "checkpoint.every=0"]


class CountingRows:
    """A user's own data source: random windows of seq_len + 1 token ids, indexable like a grain source."""

    def __init__(self, count: int, seq_len: int, seed: int) -> None:
        self.windows = np.random.default_rng(seed).integers(0, 257, (count, seq_len + 1), dtype=np.int32)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.windows[index]


def test_python_api_trains_from_a_user_source_and_a_callback_sees_every_logged_row(tmp_path):
    cfg = jaxscale.load_config(
        "configs/tiny.yaml",
        [*SMALL, *QUIET, f"run.dir={tmp_path}", "train.steps=5", "log.every=1", "train.eval_every=5"],
    )
    seen = []
    summary = jaxscale.train(
        cfg,
        train_source=CountingRows(64, 16, seed=0),
        eval_source=CountingRows(16, 16, seed=1),
        callbacks=[seen.append],
    )
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert seen == logged
    assert [row["step"] for row in seen if "loss" in row] == [1, 2, 3, 4, 5]
    assert [row["step"] for row in seen if "eval_loss" in row] == [5]
    assert summary["final_loss"] == [row for row in seen if "loss" in row][-1]["loss"]
    assert np.isfinite(summary["final_eval_loss"])


def test_a_source_whose_rows_do_not_fit_the_run_is_refused_by_name(tmp_path):
    cfg = jaxscale.load_config("configs/tiny.yaml", [*SMALL, *QUIET, f"run.dir={tmp_path}", "train.steps=2"])
    with pytest.raises(jaxscale.UserError, match=r"Example \d+ of the data source is not a row of this run: expected "):
        jaxscale.train(cfg, train_source=CountingRows(64, 8, seed=0))


@pytest.mark.slow
def test_plan_and_train_accept_exactly_the_same_layouts(tmp_path):
    """8 devices: each mesh `plan` ranks (or finds too big) compiles; each one it rejects, `train` refuses alike."""
    cfg = jaxscale.load_config("configs/tiny.yaml", SMALL)
    result = jaxscale.plan(cfg, "cpu-8")
    assert result.ranked and result.rejected
    for candidate in result.ranked + result.too_big:
        mesh = [f"mesh.{axis}={size}" for axis, size in candidate.mesh.items()]
        step = compile_train_step(jaxscale.load_config("configs/tiny.yaml", [*SMALL, *mesh]), jax.devices())
        assert step.mesh == candidate.mesh
    for label, message in result.rejected.items():
        sizes = dict(part.split("=") for part in label.split()) if label != "one device" else {}
        mesh = [f"mesh.{axis}={sizes.get(axis, 1)}" for axis in AXES]
        refused = jaxscale.load_config("configs/tiny.yaml", [*SMALL, *QUIET, *mesh, f"run.dir={tmp_path}"])
        with pytest.raises(jaxscale.UserError) as caught:
            jaxscale.train(refused)
        assert str(caught.value) == message, label
    assert not (tmp_path / "config.yaml").exists()  # each was refused before anything ran


def test_setup_is_the_steps_own_and_needs_no_allocation():
    cfg = jaxscale.load_config("configs/tiny.yaml", [*SMALL, "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"])
    setup = jaxscale.setup_run(cfg)
    assert dict(setup.mesh.shape) == {"data": 1, "pipeline": 1, "fsdp": 4, "expert": 1, "context": 1, "tensor": 2}
    assert setup.layout.microbatch == 4 and setup.layout.per_device_batch == 1
    assert setup.batch_structs()["inputs"].shape == (8, 16)
    assert setup.parameter_count == sum(x.size for x in jax.tree.leaves(setup.state_structs[0]))
    assert setup.lower_train_step().compile().memory_analysis().temp_size_in_bytes > 0


def test_the_names_the_config_accepts_are_the_ones_the_code_acts_on():
    assert set(CHECKPOINT_POLICIES) == set(REMAT_POLICIES)
    for name in PIPELINE_SCHEDULES:
        assert build_schedule(name, stages=2, microbatches=4, virtual=2 if name == "interleaved" else 1).name == name


# Lower layers never import higher ones. Modules in one layer may import each other. A package whose modules
# sit on different floors names them: hf's import (weights read into a model's shardings) is a floor below the
# training run that calls it; its export (which restores a run) is on the run's floor. The run setup (training)
# asks the planner for model.remat / model.scan_unroll=auto, and the planner reads the setup's tables.
LAYERS = [
    {"errors", "units", "families", "presets", "hf_config", "config", "config_reference", "storage"},
    {"runtime", "mesh", "sharding", "hardware"},
    {"data", "models", "hf.load", "hf.tensors"},
    {"parallel"},
    {"checkpoint", "training", "hf", "planning"},
    {"aot", "generate", "profile", "report"},
    {"cli", "__init__"},
]


def layer_of(name: str) -> int:
    """The layer of a jaxscale module named by its first two parts ("hf.load") or its top-level name."""
    for key in (name, name.split(".")[0]):
        found = [i for i, names in enumerate(LAYERS) if key in names]
        if found:
            return found[0]
    raise KeyError(f"{name} is in no layer of LAYERS: add it")


def imported_tops(tree: ast.Module) -> list[str]:
    """The jaxscale modules a module imports, at any depth of its code, named by their first two parts."""
    tops = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "jaxscale":
            tops += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxscale."):
            tops.append(".".join(node.module.split(".")[1:3]))
        elif isinstance(node, ast.Import):
            tops += [
                ".".join(a.name.split(".")[1:3]) if "." in a.name else "__init__"
                for a in node.names
                if a.name.startswith("jaxscale")
            ]
    return tops


def test_imports_point_down_the_layers():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        importer = f"{parts[0]}.{path.stem}" if len(parts) > 1 else path.stem
        upward += [
            ("/".join(parts), top)
            for top in imported_tops(ast.parse(path.read_text()))
            if layer_of(top) > layer_of(importer)
        ]
    assert not upward, f"imports that point up the layers: {upward}"
