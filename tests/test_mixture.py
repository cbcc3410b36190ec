"""Mixtures: rows drawn from several corpora by weight, counted in the log, resumed bit for bit."""

import json

import numpy as np
import pytest

import jaxscale
from jaxscale.config import DataConfig, load_config
from jaxscale.data.mixture import MixtureBatches
from jaxscale.errors import UserError
from jaxscale.training.goodput import read_rows


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Two corpora told apart by their letters: every document of `a` is a's, of `b` is b's."""
    root = tmp_path_factory.mktemp("corpora")
    for letter in "ab":
        (root / letter).mkdir()
        for i in range(60):  # enough that a 0.2 eval share of either is never empty (0.8**60 ~ 1e-6)
            (root / letter / f"{i}.txt").write_text(letter * 300)
    return root


def mixture(corpora, weight_a=0.75, weight_b=0.25) -> list[dict]:
    return [
        {"name": "a", "source": "text", "paths": str(corpora / "a" / "*.txt"), "weight": weight_a},
        {"name": "b", "source": "text", "paths": str(corpora / "b" / "*.txt"), "weight": weight_b},
    ]


def test_rows_come_from_each_source_by_weight_and_are_counted(corpora):
    batches = MixtureBatches(DataConfig(mixture=mixture(corpora), eval_fraction=0.0), "train", 16, 8)
    counted = {"a": 0, "b": 0}
    for step in range(50):
        rows = batches.rows(step, range(8))["inputs"]
        letters = ["a" if (row == ord("a")).any() else "b" for row in rows]
        by_source = batches.tokens_by_source(step)
        assert by_source == {name: letters.count(name) * 16 for name in "ab"}, step
        for name in "ab":
            counted[name] += by_source[name]
    assert counted["a"] / (counted["a"] + counted["b"]) == pytest.approx(0.75, abs=0.02)


def small_run(corpora, run_dir, steps: int) -> list[str]:
    overrides = ["model.compute_dtype=float32", "model.d_model=32", "model.n_layers=2", "model.d_ff=64"]
    overrides += ["model.head_dim=8", "train.global_batch=8", "train.seq_len=16", "optim.decay_steps=6"]
    overrides += ["log.every=1", "log.progress=false", "log.tensorboard=false", "checkpoint.every=3"]
    overrides += ["train.eval_every=0", "train.eval_batches=1", "data.eval_fraction=0.2", f"run.dir={run_dir}"]
    overrides += [f"train.steps={steps}", f"data.mixture={json.dumps(mixture(corpora))}"]
    return overrides


@pytest.mark.slow  # 20-45 s on 2 busy cores; the default suite outgrew 15 min (sequence parallelism compiles slower)
def test_a_mixture_run_resumes_bit_for_bit_and_logs_tokens_by_source(corpora, tmp_path):
    jaxscale.train(load_config("configs/tiny.yaml", small_run(corpora, tmp_path / "straight", 6)))
    jaxscale.train(load_config("configs/tiny.yaml", small_run(corpora, tmp_path / "resumed", 3)))
    jaxscale.train(load_config("configs/tiny.yaml", small_run(corpora, tmp_path / "resumed", 6)))

    def losses(run: str) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in read_rows(tmp_path / run) if "loss" in r}

    assert losses("resumed") == losses("straight")
    rows = [r for r in read_rows(tmp_path / "straight") if "loss" in r]
    assert all(r["data_tokens_a"] + r["data_tokens_b"] == 8 * 16 for r in rows)
    assert sum(r["data_tokens_a"] for r in rows) > sum(r["data_tokens_b"] for r in rows) > 0


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"source": "text", "paths": "x", "weight": 0}, r"data.mixture\[1\] has weight 0; give every source a weight"),
        ({"source": "text", "paths": "x", "weight": -1}, r"data.mixture\[1\] has weight -1"),
        ({"source": "text", "paths": "x", "weight": 1, "seed": 3}, r"data.mixture\[1\] has seed; an entry may set"),
    ],
)
def test_a_bad_mixture_entry_is_refused_with_the_fix(corpora, entry, message):
    entries = [mixture(corpora)[0], entry]
    with pytest.raises(UserError, match=message):
        MixtureBatches(DataConfig(mixture=entries), "train", 16, 8)


def test_mixture_config_is_read_from_an_override(corpora):
    cfg = load_config(None, [f"data.mixture={json.dumps(mixture(corpora, 2, 1))}"])
    assert [e["weight"] for e in cfg.data.mixture] == [2, 1]
    assert np.isclose(sum(e["weight"] for e in cfg.data.mixture), 3)
