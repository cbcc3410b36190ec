"""The command line: help text, and every user mistake stops with one paragraph and exit code 2."""

import re

import pytest
from cli_runner import run_cli

TINY = "configs/tiny.yaml"


def test_help_lists_commands_and_explains_overrides():
    top = run_cli("--help")
    assert top.returncode == 0 and "train" in top.stdout
    train = run_cli("train", "--help")
    assert train.returncode == 0
    assert "section.key=value" in train.stdout and "mesh.fsdp=4" in train.stdout


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.stpes=3"], r"Unknown config key 'train.stpes'. Did you mean train.steps"),
        (["train.steps=ten"], r"Config key 'train.steps' expects int, got 'ten' \(str\)"),
        (["mesh.data=3"], r"mesh.data=3, mesh.fsdp=2, mesh.tensor=2 has 12 devices per slice but there are 8"),
        (["train.global_batch=6"], r"train.global_batch=6 .* does not split over the 4 batch shards"),
        (["data.source=text", "data.paths=/nonexistent/*.txt"], r"data.paths"),
        (["optim.lr=-1"], r"optim.lr=-1.0 is out of range; set it within \(0.0, inf\), e.g. optim.lr=0.003"),
        (["run.dir=/proc/x"], r"run.dir=/proc/x cannot be created \(No such file or directory\). Point run.dir at"),
        (["run.dir=/sys"], r"run.dir=/sys is not writable \(Permission denied\). Give this user write permission"),
    ],
    ids=[
        "unknown_key",
        "wrong_type",
        "mesh_product",
        "batch_not_divisible",
        "missing_data",
        "optim_out_of_range",
        "run_dir_cannot_be_created",
        "run_dir_not_writable",
    ],
)
def test_user_error_is_one_paragraph_with_exit_code_2(overrides, message, tmp_path):
    result = run_cli("train", TINY, f"run.dir={tmp_path}", *overrides)  # a run.dir override replaces this one
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("jaxscale: error:")]
    assert len(error_lines) == 1, result.stderr
    assert re.search(message, error_lines[0]), error_lines[0]
