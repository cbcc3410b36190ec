"""The stdlib-functions task: prompt = a function's signature and docstring, completion = its body."""

import ast
import hashlib
import inspect
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

import jaxscale
from jaxscale.cli import main
from jaxscale.config import DataConfig, load_config
from jaxscale.data import stdlib_task
from jaxscale.data.finetune import FineTuneBatches
from jaxscale.data.stdlib_task import function_examples, stdlib_function_examples, stdlib_root
from jaxscale.errors import UserError
from jaxscale.training.setup import setup_run

EOS = 256  # the byte tokenizer's

MODULE = '''\
import functools


def no_docstring(x):
    return x


def only_pass():
    """Nothing to complete."""
    pass


def same_line():
    """Doc."""; return 1


class Box:
    """A box."""

    @functools.cache
    def area(self, scale=1):
        """The area,
        times scale."""
        text = """
not indented"""
        return self.w * self.h * scale

    if True:
        def later(self):
            """Defined under an if."""
            return 2


def long_one():
    """Too long."""
    return "%s"
''' % ("x" * 300)


@pytest.fixture
def library(monkeypatch):
    """The task made from a small part of the real library (the email package), quickly."""
    monkeypatch.setattr(stdlib_task, "stdlib_root", lambda: stdlib_root() / "email")
    stdlib_task._stdlib_examples.cache_clear()
    yield
    stdlib_task._stdlib_examples.cache_clear()


def test_examples_are_functions_with_docstrings_cut_after_the_docstring(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(MODULE)
    (tmp_path / "pkg" / "test").mkdir()
    (tmp_path / "pkg" / "test" / "test_mod.py").write_text(MODULE)  # test suites are left out
    examples = function_examples(tmp_path, max_bytes=200)
    assert [e.name for e in examples] == ["pkg/mod.py:Box.area", "pkg/mod.py:Box.later"]
    area, later = examples
    assert area.prompt == '@functools.cache\ndef area(self, scale=1):\n    """The area,\n    times scale."""\n'
    assert area.completion == '    text = """\nnot indented"""\n    return self.w * self.h * scale\n'
    assert later.prompt == 'def later(self):\n    """Defined under an if."""\n'
    assert later.completion == "    return 2\n"
    assert [e.name for e in function_examples(tmp_path, max_bytes=400)][-1] == "pkg/mod.py:long_one"


@pytest.mark.parametrize("function", [json.decoder.JSONDecoder.raw_decode, json.encoder.JSONEncoder.default, json.dump])
def test_prompt_and_completion_are_the_functions_source(function):
    source = textwrap.dedent(inspect.getsource(function))  # the reference: the source as Python itself finds it
    name = f"{Path(inspect.getsourcefile(function)).name}:{function.__qualname__}"
    (example,) = [e for e in function_examples(stdlib_root() / "json", 10**6) if e.name == name]
    assert example.prompt + example.completion == source
    docstring = ast.parse(source).body[0].body[0]
    assert example.prompt.count("\n") == docstring.end_lineno


def test_each_body_parses_with_its_signature_and_begins_after_the_prompt(library):
    examples = stdlib_function_examples("train", 0.2, 512) + stdlib_function_examples("eval", 0.2, 512)
    assert len(examples) > 50
    for example in examples:
        (function,) = ast.parse(example.prompt + example.completion).body
        assert isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef), example.name
        prompt_lines = example.prompt.count("\n")
        assert example.prompt.endswith("\n") and function.body[0].end_lineno == prompt_lines, example.name
        assert function.body[1].lineno > prompt_lines, example.name
        assert len((example.prompt + example.completion).encode()) <= 512


def test_the_split_is_deterministic_disjoint_and_by_a_hash_of_the_name(library):
    train = [e.name for e in stdlib_function_examples("train", 0.2, 512)]
    held_out = [e.name for e in stdlib_function_examples("eval", 0.2, 512)]
    stdlib_task._stdlib_examples.cache_clear()
    assert [e.name for e in stdlib_function_examples("eval", 0.2, 512)] == held_out
    assert not set(train) & set(held_out) and held_out

    def hashed_out(name: str) -> bool:  # independent of jaxscale.data.sources.in_eval_split
        return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") < 0.2 * 2**64

    assert [n for n in train + held_out if hashed_out(n)] == held_out


def test_only_completion_tokens_carry_loss(library):
    cfg = DataConfig(source="stdlib_functions", eval_fraction=0.2, packing="concat")  # one example per row
    batches = FineTuneBatches(cfg, "eval", seq_len=512, global_batch=1)
    expected = sorted((e.prompt, e.completion) for e in stdlib_function_examples("eval", 0.2, 512))
    seen = []
    for step in range(len(expected)):  # one epoch: every example once, in shuffled order
        row = {k: v[0] for k, v in batches.rows(step, [0]).items()}
        tokens = np.concatenate([row["inputs"][:1], row["targets"]])  # targets[t] is token t + 1
        trained = np.flatnonzero(row["loss_mask"])
        first, last = trained[0], trained[-1]
        assert np.array_equal(trained, np.arange(first, last + 1))  # one block: the completion, then its eos
        assert row["targets"][last] == EOS and np.all(tokens[last + 2 :] == EOS)  # after it, loss-free padding
        seen.append(
            (bytes(tokens[: first + 1].tolist()).decode(), bytes(tokens[first + 1 : last + 1].tolist()).decode())
        )
    assert sorted(seen) == expected
    assert batches.describe()["data_truncated_examples"] == 0 and batches.describe()["data_left_out_examples"] > 0


def test_data_paths_with_stdlib_functions_are_refused():
    cfg = DataConfig(source="stdlib_functions", paths="x/*.jsonl")
    with pytest.raises(UserError, match="data.paths='x/\\*.jsonl' is set, but data.source=stdlib_functions"):
        FineTuneBatches(cfg, "train", seq_len=64, global_batch=1)


def test_make_task_writes_jsonl_of_the_same_examples(library, tmp_path, capsys):
    assert main(["make-task", "stdlib-functions", str(tmp_path), "--eval-fraction", "0.2"]) == 0
    for split in ("train", "eval"):
        rows = [json.loads(line) for line in (tmp_path / f"{split}.jsonl").read_text().splitlines()]
        expected = stdlib_function_examples(split, 0.2, 512)
        assert rows == [{"name": e.name, "prompt": e.prompt, "completion": e.completion} for e in expected]
    assert "train and" in capsys.readouterr().out
    assert main(["make-task", "stdlib-functions", str(tmp_path), "--eval-fraction", "0"]) == 2
    assert "--eval-fraction 0.0 must be above 0 and below 1" in capsys.readouterr().err


def test_the_finetune_config_logs_the_held_out_loss_before_the_first_step(tmp_path):
    """configs/finetune_stdlib.yaml (here without its init_from) evaluates the starting model at step 0
    (train.eval_at_start): the masked mean cross entropy of the seeded model's logits on the eval rows."""
    quick = ["train.steps=1", "train.seq_len=32", "train.global_batch=8", "train.eval_batches=1", "checkpoint.every=0"]
    quiet = ["log.progress=false", "log.tensorboard=false", f"run.dir={tmp_path}"]
    cfg = load_config(
        "configs/finetune_stdlib.yaml", ["model.init_from=", "model.compute_dtype=float32", *quick, *quiet]
    )
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (8, 33)).astype(np.int32)
    mask = (rng.random((8, 32)) < 0.5).astype(np.float32)
    rows = [{"inputs": t[:-1], "targets": t[1:], "loss_mask": m} for t, m in zip(tokens, mask, strict=True)]
    logged = []
    jaxscale.train(cfg, train_source=rows, eval_source=rows, callbacks=[logged.append])
    (at_start,) = [r["eval_loss"] for r in logged if "eval_loss" in r and r["step"] == 0]

    setup = setup_run(cfg)
    logits = np.asarray(nnx.merge(setup.graphdef, setup.init_state())[0](tokens[:, :-1]), np.float64)
    top = logits.max(-1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    losses = log_z - np.take_along_axis(logits, tokens[:, 1:, None], -1)[..., 0]
    assert abs(at_start - (losses * mask).sum() / mask.sum()) < 1e-5 * at_start
