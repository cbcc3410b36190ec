"""Config: YAML + overrides, types checked, literals only, errors that name the fix."""

import pytest
import yaml

from jaxscale import cli
from jaxscale.config import _all_keys, load_config, parse_override, save_config
from jaxscale.config_reference import reference, reference_markdown
from jaxscale.errors import UserError


def test_yaml_then_overrides_win(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: 7\n  seq_len: 64\nmesh:\n  fsdp: 4\n")
    cfg = load_config(path, ["train.steps=50", "optim.lr=1e-3", "mesh.rules={mlp: [tensor, fsdp]}"])
    assert (cfg.train.steps, cfg.train.seq_len, cfg.mesh.fsdp) == (50, 64, 4)
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.mesh.rules == {"mlp": ["tensor", "fsdp"]}


def test_model_preset_fills_shape_and_keys_beside_it_win():
    cfg = load_config(None, ["model.preset=llama3-8b", "model.n_layers=2"])
    assert (cfg.model.d_model, cfg.model.n_kv_heads, cfg.model.n_layers) == (4096, 8, 2)


def test_override_values_are_literals_never_evaluated():
    key, value = parse_override("run.dir=__import__('os').getcwd()")
    assert value == "__import__('os').getcwd()"
    assert parse_override("log.progress=false") == ("log.progress", False)


def test_unknown_key_names_the_closest_valid_keys():
    with pytest.raises(UserError, match=r"Unknown config key 'train.stpes'.*Did you mean train\.steps"):
        load_config(None, ["train.stpes=3"])


def test_unknown_section_in_yaml_is_an_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("trian:\n  steps: 3\n")
    with pytest.raises(UserError, match=r"Unknown config key 'trian.steps'.*train\.steps"):
        load_config(path)


def test_wrong_type_names_key_expected_type_and_value():
    with pytest.raises(UserError, match=r"'train.steps' expects int, got 'many' \(str\)"):
        load_config(None, ["train.steps=many"])
    with pytest.raises(UserError, match=r"'log.progress' expects bool, got 3"):
        load_config(None, ["log.progress=3"])


def test_invalid_values_are_refused_with_the_fix():
    with pytest.raises(UserError, match="model.remat='fast' is not a remat policy"):
        load_config(None, ["model.remat=fast"])
    with pytest.raises(UserError, match="not divisible by train.grad_accum=3"):
        load_config(None, ["train.global_batch=16", "train.grad_accum=3"])
    with pytest.raises(
        UserError,
        match=r"train.eval_every=-1 is out of range; set it within \[0, inf\), e.g. "
        r"train.eval_every=100 \(steps between evaluations; 0: evaluate after the last step only\)",
    ):
        load_config(None, ["train.eval_every=-1"])
    with pytest.raises(UserError, match="Config file 'nope.yaml' does not exist"):
        load_config("nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.steps=11"])
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["train"]["steps"] == 11
    assert load_config(tmp_path / "config.yaml") == cfg


def test_the_config_reference_lists_every_key_with_its_type_default_and_meaning():
    docs = {d.key: d for d in reference()}
    assert set(docs) == set(_all_keys())
    assert [key for key, d in docs.items() if not d.meaning] == []
    assert docs["model.remat"].allowed.startswith("auto \\| none \\| full")
    assert (
        docs["model.scan_unroll"].type == "int | str"
        and docs["model.scan_unroll"].allowed == "auto \\| [1, inf)"
        and "| `model.scan_unroll` | int \\| str |" in reference_markdown()
    )
    assert docs["checkpoint.keep"].allowed == "[1, inf)" and docs["checkpoint.keep"].default == "3"
    assert "| `train.steps` | int | `300` | [1, inf) | optimizer steps of the whole run" in reference_markdown()


def test_the_config_command_prints_the_resolved_config_and_the_reference(capsys, tmp_path):
    assert cli.main(["config", "configs/tiny.yaml", "train.steps=7"]) == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    assert load_config(printed) == load_config("configs/tiny.yaml", ["train.steps=7"])
    assert cli.main(["config", "--reference"]) == 0
    assert "| `lora.rank` | int | `0` |" in capsys.readouterr().out
    assert cli.main(["config"]) == 2
    assert "jaxscale config needs a CONFIG file (e.g. configs/tiny.yaml), or --reference." in capsys.readouterr().err
