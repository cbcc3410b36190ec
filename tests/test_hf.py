"""Hugging Face import and export, against an independent numpy forward of the Llama and Mixtral models.

The test writes small models as transformers' `save_pretrained` would (tensor names, [out, in]
Linear layouts, one file or shards with an index) with random weights, imports them on 8 devices
(data=2, fsdp=2, tensor=2) and compares the logits with `hf_forward` (tests/hf_reference.py, written
from the transformers modeling code in float64 numpy, never calling jaxscale's model). The other
families are tests/test_families.py's.
"""

import json
import math
import socket
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from cli_runner import run_cli, start_cli, stopped_at_exit
from flax import nnx
from hf_reference import hf_forward, random_hf_weights, write_hf_model
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import jaxscale
from jaxscale.checkpoint import Checkpointer
from jaxscale.config import load_config, save_config
from jaxscale.errors import UserError
from jaxscale.hf.export import byte_tokenizer_json, export_hf
from jaxscale.hf.load import SafetensorsDir, tensor_files
from jaxscale.models.quant import dequantize, quantize
from jaxscale.sharding import use_rules
from jaxscale.training.base import base_reference, saved_part
from jaxscale.training.setup import setup_run

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 300,  # not a multiple of 128: the import keeps it exactly
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    # Llama 3.1's scaling, with a short original context so that 16 positions see all three bands.
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "max_position_embeddings": 256,
    "torch_dtype": "float32",
}
MIXTRAL = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "vocab_size": 260,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "sliding_window": None,
    "max_position_embeddings": 256,
}
MESH = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
RUN = ["model.compute_dtype=float32", "train.seq_len=16", "train.global_batch=8"]


def imported(directory: Path, overrides: tuple[str, ...] = ()) -> tuple:
    """(state, setup) of the model imported from `directory` on the 8-device mesh."""
    setup = setup_run(load_config(None, [f"model.init_from=hf:{directory}", *MESH, *RUN, *overrides]))
    return setup.init_state(), setup


def imported_logits(directory: Path, tokens_BL: np.ndarray, overrides: tuple[str, ...] = ()) -> tuple:
    """(logits [B, L, V], state, setup) of the model imported from `directory` on the 8-device mesh."""
    state, setup = imported(directory, overrides)

    @jax.jit
    def logits(state: nnx.State, tokens_BL: jax.Array) -> jax.Array:
        with use_rules(setup.rules, setup.mesh):
            model, _ = nnx.merge(setup.graphdef, state)
            return model(tokens_BL)

    return np.asarray(logits(state, jax.device_put(tokens_BL, setup.batch_sharding))), state, setup


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def tokens(vocab: int) -> np.ndarray:
    return np.random.default_rng(1).integers(0, vocab, (8, 16)).astype(np.int32)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    weights = random_hf_weights(LLAMA, seed=0)
    return write_hf_model(tmp_path_factory.mktemp("llama"), LLAMA, weights), weights


@pytest.mark.parametrize(
    "shards, dtype", [(1, np.float32), (3, ml_dtypes.bfloat16)], ids=["one_file", "sharded_with_index_bf16"]
)
def test_imported_llama_logits_equal_the_hf_forward(tmp_path, shards, dtype):
    """bf16 files (as Llama checkpoints are) import into the float32 parameters exactly: the reference uses them too."""
    weights = {k: v.astype(dtype) for k, v in random_hf_weights(LLAMA, seed=0).items()}
    directory = write_hf_model(tmp_path / "llama", LLAMA, weights, shards)
    got, _, setup = imported_logits(directory, tokens(LLAMA["vocab_size"]))
    assert setup.shape.vocab_size == 300 and setup.shape.rope_type == "llama3"
    assert got.shape == (8, 16, 300)
    assert relative_error(got, hf_forward(LLAMA, weights, tokens(LLAMA["vocab_size"]))) < 1e-5


@pytest.mark.parametrize("top_k", [2, 1], ids=["top2", "top1_weighs_1"])
def test_imported_mixtral_logits_equal_the_hf_forward(tmp_path, top_k):
    """Mixtral renormalizes the top-k probabilities, so a top-1 Mixtral weighs its expert by 1."""
    config = MIXTRAL | {"num_experts_per_tok": top_k}
    weights = random_hf_weights(config, seed=2)
    directory = write_hf_model(tmp_path / "mixtral", config, weights)
    got, _, setup = imported_logits(directory, tokens(MIXTRAL["vocab_size"]), ("mesh.expert=2", "mesh.data=1"))
    assert setup.shape.num_experts == 4 and setup.shape.capacity_factor == 0.0
    assert relative_error(got, hf_forward(config, weights, tokens(MIXTRAL["vocab_size"]))) < 1e-5


def test_each_device_slice_is_read_once_and_nothing_more(llama, monkeypatch):
    """Every element read from the files lands in exactly one distinct shard: no process reads whole tensors."""
    directory, weights = llama
    read_elements = []
    original = SafetensorsDir.slice

    class CountingSlice:
        def __init__(self, inner):
            self.inner = inner

        def get_shape(self):
            return self.inner.get_shape()

        def get_dtype(self):
            return self.inner.get_dtype()

        def __getitem__(self, index):
            array = self.inner[index]
            read_elements.append(array.size)
            return array

    monkeypatch.setattr(SafetensorsDir, "slice", lambda self, name: CountingSlice(original(self, name)))
    setup = setup_run(load_config(None, [f"model.init_from=hf:{directory}", *MESH, *RUN]))
    setup.init_state()
    assert sum(read_elements) == sum(v.size for v in weights.values())  # sharded: each tensor read in parts
    assert len(read_elements) > len(weights)


def test_a_lora_run_imports_the_base_frozen_and_starts_at_its_logits(llama):
    directory, weights = llama
    got, state, setup = imported_logits(directory, tokens(LLAMA["vocab_size"]), ("lora.rank=4",))
    assert setup.trainable_count < setup.parameter_count
    assert relative_error(got, hf_forward(LLAMA, weights, tokens(LLAMA["vocab_size"]))) < 1e-5


def test_a_qlora_run_quantizes_the_imported_base_in_its_shards(tmp_path):
    """NF4 codes and scales of the imported base equal those of quantizing the HF weights on one host."""
    config = LLAMA | {"intermediate_size": 128}  # quantization blocks of 64 along every width
    weights = random_hf_weights(config, seed=3)
    directory = write_hf_model(tmp_path / "llama", config, weights)
    state, _ = imported(directory, ("lora.rank=4", "lora.base_quant=nf4"))
    blocks = nnx.to_pure_dict(state)[0]["blocks"]
    layers = range(config["num_hidden_layers"])
    q_SDNH = np.stack(
        [weights[f"model.layers.{i}.self_attn.q_proj.weight"].reshape(4, 16, 64).transpose(2, 0, 1) for i in layers]
    )
    down_SFD = np.stack([weights[f"model.layers.{i}.mlp.down_proj.weight"].T for i in layers])
    for got, weight in ((blocks["attn"]["wq"], q_SDNH), (blocks["mlp"]["w_down"], down_SFD)):
        codes, scales = jax.vmap(lambda w: quantize(w, 0, "nf4"))(weight)
        np.testing.assert_array_equal(np.asarray(got["codes"]), np.asarray(codes))
        np.testing.assert_array_equal(np.asarray(got["scales"]), np.asarray(scales))


def test_export_then_import_is_bitwise(llama, tmp_path):
    directory, weights = llama
    _, state, setup = imported_logits(directory, tokens(LLAMA["vocab_size"]))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(setup.cfg, run_dir / "config.yaml")
    checkpoints = Checkpointer(run_dir / "checkpoints", setup.cfg.checkpoint)
    checkpoints.save(7, state, {})
    checkpoints.close()

    out = tmp_path / "exported"
    assert export_hf(run_dir, out, shard_bytes=40_000) == 7
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(weights) and len(set(index["weight_map"].values())) > 1
    for name, want in weights.items():
        with safe_open(out / index["weight_map"][name], framework="numpy") as f:
            np.testing.assert_array_equal(f.get_tensor(name), want, err_msg=name)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["rope_scaling"] == LLAMA["rope_scaling"]
    assert config["tie_word_embeddings"] is False and config["torch_dtype"] == "float32"
    assert (out / "tokenizer.json").read_text() == (directory / "tokenizer.json").read_text()

    _, again, _ = imported_logits(out, tokens(LLAMA["vocab_size"]))
    for a, b in zip(jax.tree.leaves(state[0]), jax.tree.leaves(again[0]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_lora_run_on_an_import_exports_onto_the_base_it_names(llama, tmp_path):
    """A LoRA checkpoint holds no base: export reads it from model.init_from again, and PEFT's config names it. The
    adapter directory also holds the tokenizer and the chat template the run trained with."""
    directory, weights = llama
    trained = tmp_path / "trained.jinja"
    trained.write_text("{% for m in messages %}<{{ m['content'] }}>{% endfor %}")
    state, setup = imported(directory, ("lora.rank=4", f"data.chat_template={trained}"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(setup.cfg, run_dir / "config.yaml")
    checkpoints = Checkpointer(run_dir / "checkpoints", setup.cfg.checkpoint)
    checkpoints.save(3, saved_part(setup, state), {"lora_base": base_reference(setup, state)})
    checkpoints.close()

    assert export_hf(run_dir, tmp_path / "adapter") == 3
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(directory)
    assert (tmp_path / "adapter" / "tokenizer.json").read_text() == (directory / "tokenizer.json").read_text()
    assert (tmp_path / "adapter" / "chat_template.jinja").read_text() == trained.read_text()
    assert not (tmp_path / "adapter" / "generation_config.json").exists()  # the base has none to copy
    export_hf(run_dir, tmp_path / "merged", merge=True)
    with safe_open(tmp_path / "merged" / "model.safetensors", framework="numpy") as f:
        for name, want in weights.items():  # B is zero: the base, bitwise (float32 compute)
            np.testing.assert_array_equal(f.get_tensor(name), want, err_msg=name)


@pytest.mark.slow  # two train-step compiles: about 25 s
def test_training_starts_from_the_imported_weights_and_a_resume_from_the_checkpoint(llama, tmp_path):
    """The first step's loss is the HF forward's; a second run resumes from its checkpoint, not from init_from,
    even with the directory's weights now unreadable."""
    directory, weights = llama
    source = write_hf_model(tmp_path / "source", LLAMA, weights)
    window = np.random.default_rng(3).integers(0, LLAMA["vocab_size"], 17).astype(np.int32)  # every row: this
    run = [f"model.init_from=hf:{source}", *MESH, *RUN, f"run.dir={tmp_path / 'run'}", "data.packing=concat"]
    quiet = ["checkpoint.every=1", "log.every=1", "log.progress=false", "log.tensorboard=false"]
    first = jaxscale.train(load_config(None, [*run, *quiet, "train.steps=1"]), train_source=[window] * 32)

    logits_LV = hf_forward(LLAMA, weights, window[None, :-1])[0]
    log_z = np.log(np.sum(np.exp(logits_LV - logits_LV.max(-1, keepdims=True)), -1)) + logits_LV.max(-1)
    want = float(np.mean(log_z - logits_LV[np.arange(16), window[1:]]))
    assert first["start_step"] == 0 and abs(first["final_loss"] - want) < 1e-5 * want

    save_file({"model.embed_tokens.weight": np.zeros((1, 1), np.float32)}, source / "model.safetensors")
    second = jaxscale.train(load_config(None, [*run, *quiet, "train.steps=2"]), train_source=[window] * 32)
    assert second["start_step"] == 1 and np.isfinite(second["final_loss"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(*args: str) -> None:
    """`jaxscale ARGS` as two processes x 4 emulated devices joined by jax.distributed; both must succeed."""
    port = free_port()
    cluster = ["runtime.cpu_devices=4", f"runtime.coordinator_address=127.0.0.1:{port}", "runtime.num_processes=2"]
    procs = [start_cli(*args, *cluster, f"runtime.process_id={i}") for i in range(2)]
    with stopped_at_exit(*procs):
        outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]


@pytest.mark.slow  # two pairs of processes: about 90 s
def test_two_processes_import_and_export_the_weights_bitwise(llama, tmp_path):
    """Each process reads its devices' slices and the export gathers them: a step too small to change a weight
    (lr 1e-30) in between, the exported tensors are the HF originals bit for bit."""
    directory, weights = llama
    run_dir, out = tmp_path / "run", tmp_path / "exported"
    two_processes(
        "train",
        "configs/tiny.yaml",
        f"model.init_from=hf:{directory}",
        f"run.dir={run_dir}",
        *RUN,
        "train.steps=1",
        "optim.lr=1e-30",
        "checkpoint.every=1",
        "log.progress=false",
        "log.tensorboard=false",
        "train.eval_batches=1",
    )
    two_processes("export", str(run_dir), "--to", "hf", str(out))
    files = tensor_files(out)
    assert set(files) == set(weights)
    for name, want in weights.items():
        with safe_open(files[name], framework="numpy") as f:
            np.testing.assert_array_equal(f.get_tensor(name), want, err_msg=name)


def write_config(directory: Path, **changes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(LLAMA | changes))
    return directory


def test_bad_hf_directories_are_refused_by_name(llama, tmp_path):
    directory, weights = llama
    with pytest.raises(UserError, match=r"no config.json in '.*empty'. Point model.init_from=hf:DIR"):
        (tmp_path / "empty").mkdir()
        load_config(None, [f"model.init_from=hf:{tmp_path / 'empty'}"])
    gpt2 = write_config(tmp_path / "gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(UserError, match=r"is a GPT2LMHeadModel; jaxscale imports only LlamaForCausalLM"):
        load_config(None, [f"model.init_from=hf:{gpt2}"])
    with pytest.raises(UserError, match=r"model.d_model=128 contradicts .*config.json, which makes it 64.*drop"):
        load_config(None, [f"model.init_from=hf:{directory}", "model.d_model=128"])
    with pytest.raises(UserError, match=r"model.init_from='llama' is not a weight source; write model.init_from=hf:"):
        load_config(None, ["model.init_from=llama"])

    misshapen = dict(weights)
    misshapen["model.layers.1.self_attn.k_proj.weight"] = weights["model.layers.1.self_attn.q_proj.weight"]
    bad = write_hf_model(tmp_path / "misshapen", LLAMA, misshapen)
    with pytest.raises(UserError, match=r"wrong shape: model.layers.1.self_attn.k_proj.weight is \(64, 64\), config"):
        setup_run(load_config(None, [f"model.init_from=hf:{bad}", *MESH, *RUN])).init_state()
    missing = {k: v for k, v in weights.items() if k != "lm_head.weight"}
    bad = write_hf_model(tmp_path / "missing", LLAMA, missing)
    with pytest.raises(UserError, match=r"lacks 1 tensor\(s\) its config.json needs: lm_head.weight"):
        setup_run(load_config(None, [f"model.init_from=hf:{bad}", *MESH, *RUN])).init_state()


GEMMA3 = LLAMA | {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "rope_scaling": None}
UNKNOWN_ROPE = {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"mlp_bias": True}, r"sets mlp_bias=True, which jaxscale's LlamaForCausalLM does not compute"),
        ({"hidden_act": "gelu"}, r"sets hidden_act=gelu \(jaxscale's LlamaForCausalLM uses silu\)"),
        (
            {"rope_scaling": UNKNOWN_ROPE},
            r"uses rope of type 'longrope'; jaxscale implements default, linear, dynamic, yarn, llama3",
        ),
        ({"partial_rotary_factor": 0.5}, r"sets partial_rotary_factor=0.5, which jaxscale's LlamaForCausalLM"),
        (
            GEMMA3 | {"layer_types": ["sliding_attention"] * 3},
            r"layer_types of 3 layers \(sliding_attention\) for num_hidden_layers=2; it needs one full_attention or",
        ),
        (
            GEMMA3 | {"use_bidirectional_attention": True},
            r"use_bidirectional_attention=True, which jaxscale's Gemma3ForCausalLM does not compute",
        ),
        (
            {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}},
            r"quantized by bitsandbytes .* Import the unquantized checkpoint .* lora.base_quant=nf4",
        ),
    ],
    ids=["mlp_bias", "activation", "unknown_rope", "partial_rotary", "layer_pattern", "bidirectional", "quantized"],
)
def test_what_jaxscale_cannot_compute_exactly_is_refused(tmp_path, changes, message):
    directory = write_config(tmp_path / "model", **changes)
    (directory / "tokenizer.json").write_text(byte_tokenizer_json())
    with pytest.raises(UserError, match=message):
        load_config(None, [f"model.init_from=hf:{directory}", "train.seq_len=16"])


def test_a_config_json_missing_a_key_names_it(tmp_path):
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({k: v for k, v in LLAMA.items() if k != "intermediate_size"}))
    (directory / "tokenizer.json").write_text(byte_tokenizer_json())
    with pytest.raises(
        UserError, match=r"lacks `intermediate_size`, which LlamaForCausalLM needs; restore config.json"
    ):
        load_config(None, [f"model.init_from=hf:{directory}"])


def test_an_unsupported_architecture_exits_2_naming_the_supported_ones(tmp_path):
    directory = write_config(tmp_path / "phi", architectures=["Phi3ForCausalLM"])
    (directory / "tokenizer.json").write_text(byte_tokenizer_json())
    result = run_cli("plan", "configs/tiny.yaml", "--hardware", "v5e-8", f"model.init_from=hf:{directory}")
    supported = "LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, "
    supported += "Qwen3MoeForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM"
    assert result.returncode == 2
    assert f"is a Phi3ForCausalLM; jaxscale imports only {supported}." in result.stderr


def test_import_reads_every_tensor_or_refuses_by_name(llama, tmp_path):
    """Strict import: an extra tensor, an int8 weight, a missing shard and an index pointing outside the
    directory each stop before anything is read, naming what to fix."""
    directory, weights = llama

    def init(model: Path) -> None:
        setup_run(load_config(None, [f"model.init_from=hf:{model}", *MESH, *RUN])).init_state()

    extra = write_hf_model(tmp_path / "extra", LLAMA, weights | {"model.layers.0.mlp.gate_proj.bias": np.ones(96)})
    with pytest.raises(
        UserError,
        match=r"holds 1 tensor\(s\) a LlamaForCausalLM of this config.json does not have: "
        r"model.layers.0.mlp.gate_proj.bias",
    ):
        init(extra)
    int8 = dict(weights) | {"model.layers.0.self_attn.q_proj.weight": np.ones((64, 64), np.int8)}
    with pytest.raises(UserError, match=r"integers or 8-bit floats: model.layers.0.self_attn.q_proj.weight \(I8\)"):
        init(write_hf_model(tmp_path / "int8", LLAMA, int8))
    sharded = write_hf_model(tmp_path / "sharded", LLAMA, weights, shards=3)
    (sharded / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(UserError, match=r"names shard\(s\) that are not in .*: model-00002-of-00003.safetensors"):
        init(sharded)
    outside = write_hf_model(tmp_path / "outside", LLAMA, weights, shards=3)
    index = json.loads((outside / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "../sharded/model-00001-of-00003.safetensors"
    (outside / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=r"points outside .*outside'.*sharded/model-00001-of-00003.safetensors"):
        init(outside)


def test_a_directory_without_tokenizer_or_weights_names_the_fix(tmp_path):
    directory = write_config(tmp_path / "model")
    with pytest.raises(UserError, match=r"no tokenizer.json in '.*model'. Add the model's tokenizer.json there"):
        load_config(None, [f"model.init_from=hf:{directory}"])
    cfg = load_config(None, [f"model.init_from=hf:{directory}", "data.tokenizer=byte", *MESH, *RUN])
    with pytest.raises(UserError, match=r"no model.safetensors or model.safetensors.index.json in .*pickled \*.bin"):
        setup_run(cfg).init_state()
    with pytest.raises(UserError, match=r"model.rope_scaling_factor=0.5 must be at least 1"):
        load_config(None, ["model.rope_scaling_factor=0.5"])


def test_export_refuses_what_it_cannot_export_with_exit_2(tmp_path):
    result = run_cli("export", str(tmp_path), "--to", "hf", str(tmp_path / "out"))
    assert result.returncode == 2 and "is not a run directory: it has no config.yaml" in result.stderr
    save_config(load_config("configs/tiny.yaml", []), tmp_path / "config.yaml")
    with pytest.raises(UserError, match=r"--merge folds LoRA adapters into the base, but .* trained none"):
        export_hf(tmp_path, tmp_path / "out", merge=True)
    with pytest.raises(UserError, match=r"export takes runtime.\* and mesh.\* overrides only .*, not model.d_model=32"):
        export_hf(tmp_path, tmp_path / "out", overrides=["model.d_model=32"])


def with_random_adapters(setup, state: nnx.State, seed: int) -> nnx.State:
    """`state` with every adapter tensor (A, B, DoRA's magnitude shift) drawn at random: a trained run's stand-in."""
    rng = np.random.default_rng(seed)
    values = nnx.to_pure_dict(state)

    def draw(path, x):
        return rng.normal(0, 0.1, x.shape).astype(x.dtype) if "_lora" in jax.tree_util.keystr(path) else np.asarray(x)

    values[0] = jax.tree_util.tree_map_with_path(draw, values[0])
    placed = jax.tree.map(lambda x: x, setup.state_structs)
    nnx.replace_by_pure_dict(placed, values)
    return jax.device_put(placed, setup.state_shardings)


def lora_run(directory: Path, run_dir: Path, overrides: tuple[str, ...], seed: int = 0) -> tuple:
    """A LoRA run on the model in `directory` whose checkpoint (step 3) holds random adapters: (setup, state)."""
    state, setup = imported(directory, overrides)
    state = with_random_adapters(setup, state, seed)
    run_dir.mkdir()
    save_config(setup.cfg, run_dir / "config.yaml")
    checkpoints = Checkpointer(run_dir / "checkpoints", setup.cfg.checkpoint)
    checkpoints.save(3, saved_part(setup, state), {"lora_base": base_reference(setup, state)})
    checkpoints.close()
    return setup, state


def peft_merge(w_OI: np.ndarray, a_RI: np.ndarray, b_OR: np.ndarray, scale: float, m_O=None) -> np.ndarray:
    """peft's merge of a lora.Linear (and its DoRA variant) in float64: W + s B A, times m / ||W + s B A|| per row."""
    merged = w_OI + scale * b_OR @ a_RI
    return merged if m_O is None else (m_O / np.linalg.norm(merged, axis=1))[:, None] * merged


def peft_merged_weights(weights: dict, adapter: dict, scale: float) -> dict[str, np.ndarray]:
    """The base `weights` with the PEFT `adapter` (adapter_model.safetensors' tensors) merged as peft 0.21's
    merge_and_unload does, in float64; lora_embedding_* merged as its lora.Embedding (DoRA: norms per column)."""
    merged = {k: v.astype(np.float64) for k, v in weights.items()}
    for key in adapter:
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            prefix = key.removesuffix(".lora_A.weight")
            a, b = adapter[key].astype(np.float64), adapter[f"{prefix}.lora_B.weight"].astype(np.float64)
            m = adapter.get(f"{prefix}.lora_magnitude_vector")
            merged[f"{module}.weight"] = peft_merge(merged[f"{module}.weight"], a, b, scale, m)
        elif key.endswith(".lora_embedding_A"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_embedding_A")
            prefix = key.removesuffix(".lora_embedding_A")
            a_RV, b_DR = adapter[key].astype(np.float64), adapter[f"{prefix}.lora_embedding_B"].astype(np.float64)
            m_D = adapter.get(f"{prefix}.lora_magnitude_vector")  # [D], embedding_dim
            # transpose(B A, fan_in_fan_out=True) is the embedding's [V, D]; DoRA's norm runs over V.
            merged[f"{module}.weight"] = peft_merge(merged[f"{module}.weight"].T, a_RV, b_DR, scale, m_D).T
    return merged


M = "lora_magnitude_vector"
ADAPTED = ("lora.rank=4", "lora.alpha=8", "lora.targets=[q,v,down,embed_tokens,lm_head]")


@pytest.mark.parametrize(
    "variant", [("lora.rslora=true",), ("lora.dora=true", "lora.rslora=true")], ids=["rslora", "dora"]
)
def test_a_merged_export_is_peft_merge_and_unload_of_its_adapter_export(llama, tmp_path, variant):
    """Both exports of one run: the merged weights equal PEFT's formulas applied in float64 to the adapter files
    and the original base (within float32 rounding), and the merged model gives the adapter model's logits."""
    directory, weights = llama
    setup, state = lora_run(directory, tmp_path / "run", (*ADAPTED, *variant))
    export_hf(tmp_path / "run", tmp_path / "adapter")
    export_hf(tmp_path / "run", tmp_path / "merged", merge=True)

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["use_dora"] is ("lora.dora=true" in variant)
    assert config["target_modules"] == ["down_proj", "embed_tokens", "lm_head", "q_proj", "v_proj"]
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    embedding = "base_model.model.model.embed_tokens"
    assert adapter[f"{embedding}.lora_embedding_A"].shape == (4, 300)  # [r, V]
    assert adapter[f"{embedding}.lora_embedding_B"].shape == (64, 4)  # [D, r]
    assert adapter["base_model.model.lm_head.lora_B.weight"].shape == (300, 4)
    if "lora.dora=true" in variant:
        assert adapter["base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector"].shape == (64,)
        assert adapter[f"{embedding}.lora_magnitude_vector"].shape == (64,)
        assert len(adapter) == 3 * (2 * 3 + 2)
    else:
        assert len(adapter) == 2 * (2 * 3 + 2)

    want = peft_merged_weights(weights, adapter, scale=8 / math.sqrt(4))
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert merged.keys() == want.keys()
    for name in want:  # float64 on the host, rounded once to the base's float32
        np.testing.assert_allclose(
            merged[name], want[name], rtol=2e-7, atol=1e-7 * np.abs(want[name]).max(), err_msg=name
        )
    moved = [n for n in want if not np.array_equal(merged[n], weights[n])]
    assert len(moved) == 2 * 3 + 2  # q, v, down of both layers, the embedding and the head

    tokens_BL = tokens(LLAMA["vocab_size"])
    adapted = model_logits(setup, state, tokens_BL)
    reloaded, _, _ = imported_logits(tmp_path / "merged", tokens_BL)
    assert relative_error(reloaded, adapted) < 1e-5


def model_logits(setup, state, tokens_BL: np.ndarray) -> np.ndarray:
    @jax.jit
    def logits(state: nnx.State, tokens_BL: jax.Array) -> jax.Array:
        with use_rules(setup.rules, setup.mesh):
            return nnx.merge(setup.graphdef, state)[0](tokens_BL)

    return np.asarray(logits(state, jax.device_put(tokens_BL, setup.batch_sharding)))


@pytest.mark.slow  # 20-45 s on 2 busy cores; the default suite outgrew 15 min (sequence parallelism compiles slower)
def test_a_qlora_dora_run_merges_into_the_original_base_unless_asked_for_the_quantized_one(tmp_path):
    config = LLAMA | {"intermediate_size": 128}  # quantization blocks of 64 along every width
    weights = random_hf_weights(config, seed=4)
    directory = write_hf_model(tmp_path / "llama", config, weights)
    lora_run(directory, tmp_path / "run", ("lora.rank=4", "lora.alpha=8", "lora.base_quant=nf4", "lora.dora=true"))
    export_hf(tmp_path / "run", tmp_path / "adapter")
    export_hf(tmp_path / "run", tmp_path / "merged", merge=True)
    export_hf(tmp_path / "run", tmp_path / "merged-nf4", merge=True, merge_into_quantized=True)
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    q, layer = "model.layers.1.self_attn.q_proj", 1

    # DoRA's magnitude started at the NF4 base's row norms, as PEFT's bitsandbytes 4-bit DoRA starts it.
    state, _ = imported(directory, ("lora.rank=4", "lora.base_quant=nf4"))
    wq = nnx.to_pure_dict(state)[0]["blocks"]["attn"]["wq"]
    nf4_q = np.asarray(dequantize(wq["codes"][layer], wq["scales"][layer], 0, "nf4", np.float32), np.float64)
    nf4_q_OI = nf4_q.reshape(64, 64).T
    shift = adapter[f"base_model.model.{q}.{M}"] - np.linalg.norm(nf4_q_OI, axis=1)
    assert 0.01 < np.max(np.abs(shift)) < 0.5  # the random shift of `with_random_adapters`, std 0.1

    a, b, m = (adapter[f"base_model.model.{q}.{k}"].astype(np.float64) for k in ("lora_A.weight", "lora_B.weight", M))
    original = load_file(tmp_path / "merged" / "model.safetensors")[f"{q}.weight"]
    quantized = load_file(tmp_path / "merged-nf4" / "model.safetensors")[f"{q}.weight"]
    want = peft_merge(weights[f"{q}.weight"].astype(np.float64), a, b, 2.0, m)
    np.testing.assert_allclose(original, want, rtol=2e-7, atol=1e-7 * np.abs(want).max())
    want = peft_merge(nf4_q_OI, a, b, 2.0, m)
    np.testing.assert_allclose(quantized, want, rtol=2e-7, atol=1e-7 * np.abs(want).max())
    assert np.max(np.abs(original - quantized)) > 1e-3  # NF4 rounding, gone from the default merge


def test_export_writes_the_base_dtype_the_source_generation_config_and_the_trained_chat_template(llama, tmp_path):
    directory, weights = llama
    source = tmp_path / "bf16-llama"
    write_hf_model(source, LLAMA | {"torch_dtype": None, "dtype": "bfloat16"}, weights)
    (source / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2], "temperature": 0.6}))
    (source / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    trained = tmp_path / "trained_config.json"  # the template the run was trained with wins over the model's
    trained.write_text(json.dumps({"chat_template": "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"}))
    state, setup = imported(source, (f"data.chat_template={trained}",))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(setup.cfg, run_dir / "config.yaml")
    checkpoints = Checkpointer(run_dir / "checkpoints", setup.cfg.checkpoint)
    checkpoints.save(1, state, {})
    checkpoints.close()

    export_hf(run_dir, tmp_path / "default")
    export_hf(run_dir, tmp_path / "float16", dtype="float16")
    name = "model.layers.0.mlp.up_proj.weight"
    for out, dtype in (("default", ml_dtypes.bfloat16), ("float16", np.float16)):
        with safe_open(tmp_path / out / "model.safetensors", framework="numpy") as f:
            np.testing.assert_array_equal(f.get_tensor(name), weights[name].astype(dtype))
        assert (tmp_path / out / "chat_template.jinja").read_text() == json.loads(trained.read_text())["chat_template"]
        generation = json.loads((tmp_path / out / "generation_config.json").read_text())
        assert generation == {"eos_token_id": [1, 2], "temperature": 0.6}
    assert json.loads((tmp_path / "default" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_export_refuses_a_non_empty_or_source_directory_and_overwrite_removes_only_old_weights(llama, tmp_path):
    directory, _ = llama
    lora_run(directory, tmp_path / "run", ("lora.rank=4",))
    out = tmp_path / "out"
    out.mkdir()
    stale = ["model-00001-of-00003.safetensors", "model.safetensors.index.json", "pytorch_model.bin"]
    stale += ["chat_template.jinja", "special_tokens_map.json"]  # an old template would win over the new one's
    for name in [*stale, "generation_config.json", "README.md", "notes.txt"]:
        (out / name).write_text("old")
    listed = r"\(README.md, chat_template.jinja, generation_config.json, model-00001-of-00003.safetensors.*pass "
    with pytest.raises(UserError, match=r"'.*out' is not empty " + listed):
        export_hf(tmp_path / "run", out, merge=True)
    result = run_cli("export", str(tmp_path / "run"), "--to", "hf", str(out), "--merge", timeout=120)
    assert result.returncode == 2 and "or pass --overwrite to replace an earlier export" in result.stderr

    export_hf(tmp_path / "run", out, merge=True, overwrite=True)
    assert not any((out / name).exists() for name in stale)
    assert (out / "generation_config.json").read_text() != "old"  # this export's, made from its config.json
    assert (out / "README.md").read_text() == "old" and (out / "notes.txt").read_text() == "old"
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert tensor_files(out).keys() == load_file(directory / "model.safetensors").keys()

    link = tmp_path / "link-to-base"
    link.symlink_to(directory)
    for target in (directory, link):
        with pytest.raises(UserError, match=r"is the directory of the run's model.init_from .* Export into a new"):
            export_hf(tmp_path / "run", target, merge=True, overwrite=True)
    with pytest.raises(UserError, match=r"--merge-into-quantized .* has no quantized base \(lora.base_quant=none\)"):
        export_hf(tmp_path / "run", tmp_path / "new", merge=True, merge_into_quantized=True)
    with pytest.raises(UserError, match=r"--merge-into-quantized .* is not exported with --merge; drop it"):
        export_hf(tmp_path / "run", tmp_path / "new", merge_into_quantized=True)
    with pytest.raises(UserError, match=r"--dtype float64 is not written; choose one of float32, bfloat16, float16"):
        export_hf(tmp_path / "run", tmp_path / "new", dtype="float64")
    assert not (tmp_path / "new").exists()
