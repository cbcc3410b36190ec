"""Every Hugging Face family jaxscale imports, against an independent float64 numpy forward (tests/hf_reference.py).

For each family a small model is written as safetensors with the family's real tensor names and
config.json, with random weights, and imported on data=2 x fsdp=2 x tensor=2 (Qwen3-MoE on fsdp=2 x
expert=2 x tensor=2). Its logits are compared with the reference's for a batch whose first rows are one
sequence each and whose last rows pack several documents (attention and rope per document); every
family with local layers has a window shorter than the sequence. The same on data=1 x fsdp=2 x
context=2 x tensor=2, the sequence split over two devices. Export then import gives the files' tensors
back bitwise, under the same architecture. Each family exercises another rope variant.

fp32 throughout; tolerance 1e-5 relative to the largest logit.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_reference import hf_forward, inv_freq, load_balancing_loss, random_hf_weights, write_hf_model
from safetensors import safe_open

from jaxscale.checkpoint import Checkpointer
from jaxscale.config import load_config, save_config
from jaxscale.errors import UserError
from jaxscale.families import FAMILIES as FAMILY_TABLE
from jaxscale.families import family_for, family_switches
from jaxscale.hardware import parse_cluster
from jaxscale.hf.export import export_hf
from jaxscale.hf.load import tensor_files
from jaxscale.hf.tensors import stack_sizes, tensor_maps
from jaxscale.models.decode import Sampling, generate_tokens
from jaxscale.models.transformer import Decoder, Documents, LayerKind, Segment, decoder_shape, segments
from jaxscale.planning.search import evaluate_config, plan
from jaxscale.planning.shards import state_arrays
from jaxscale.sharding import context_order, use_rules
from jaxscale.training.setup import setup_run, state_builder
from jaxscale.training.state import abstract_state
from jaxscale.training.step import balance_for_context

TOLERANCE = 1e-5
SMALL = {
    "vocab_size": 300,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 256,
    "torch_dtype": "float32",
}
FAMILIES = {
    # Qwen2.5: q/k/v biases, tied; the last layer local (max_window_layers) with a window of 5; yarn rope.
    "qwen2": SMALL
    | {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "tie_word_embeddings": True,
        "use_sliding_window": True,
        "sliding_window": 5,
        "max_window_layers": 1,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    },
    # Qwen3: q/k norms, head_dim 24 (not 64 / 4), untied; dynamic (NTK) rope past 8 positions.
    "qwen3": SMALL
    | {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "head_dim": 24,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "use_sliding_window": False,
        "max_position_embeddings": 8,
        "rope_theta": 1000000.0,
        "rope_scaling": {"rope_type": "dynamic", "factor": 2.0},
    },
    # Qwen3-MoE: 8 small experts, top-4 renormalized, layer 0 dense (mlp_only_layers), the router loss on.
    "qwen3_moe": SMALL
    | {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "num_hidden_layers": 3,
        "head_dim": 16,
        "tie_word_embeddings": False,
        "num_experts": 8,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 32,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [0],
        "norm_topk_prob": True,
        "output_router_logits": True,
        "router_aux_loss_coef": 0.01,
        "rope_theta": 10000.0,
    },
    # Gemma 3: (1 + w) norms, sandwich norms, GeGLU, sqrt(D) embeddings, query_pre_attn_scalar 24, q/k norms;
    # sliding_window_pattern 3 over 5 layers (local, local, global, local, local) with a window of 5, the local
    # rope base 10000 and the global 1e6 scaled linearly by 8 (as gemma-3-12b); final logits soft-capped.
    "gemma3": SMALL
    | {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "num_hidden_layers": 5,
        "head_dim": 16,
        "tie_word_embeddings": True,
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 24,
        "sliding_window": 5,
        "sliding_window_pattern": 3,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "final_logit_softcapping": 5.0,
        "attn_logit_softcapping": None,
    },
    # Gemma 2: attention and final logits soft-capped, local and global layers alternating.
    "gemma2": SMALL
    | {
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        "head_dim": 16,
        "tie_word_embeddings": True,
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 16,
        "sliding_window": 5,
        "rope_theta": 10000.0,
        "attn_logit_softcapping": 2.0,
        "final_logit_softcapping": 5.0,
    },
    # Mistral with a window (5) shorter than the sequence, on every layer.
    "mistral": SMALL
    | {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "tie_word_embeddings": False,
        "sliding_window": 5,
        "rope_theta": 10000.0,
    },
}
MESH = {
    "dense": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
    "moe": ["mesh.data=1", "mesh.fsdp=2", "mesh.expert=2", "mesh.tensor=2"],
    "context": ["mesh.data=1", "mesh.fsdp=2", "mesh.context=2", "mesh.tensor=2"],
}
RUN = ["model.compute_dtype=float32", "train.seq_len=16", "train.global_batch=8"]


def mesh_of(family: str) -> list[str]:
    """The family's mesh: the MoE one with experts, else data=2 x fsdp=2 x tensor=2."""
    return MESH["moe" if "moe" in family else "dense"]


def batch() -> dict[str, np.ndarray]:
    """8 rows of 16 tokens: rows 0-3 one sequence each, rows 4-7 documents packed (cut at different places)."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, SMALL["vocab_size"], (8, 16)).astype(np.int32)
    cuts = [[], [], [], [], [7], [3, 9], [12], [2, 5, 11]]
    segments = np.stack([np.searchsorted(np.asarray(c, int), np.arange(16), side="right") for c in cuts])
    starts = [np.concatenate([[0], c]) for c in cuts]
    positions = np.stack([np.arange(16) - np.asarray(s)[seg] for s, seg in zip(starts, segments, strict=True)])
    return {"inputs": tokens, "segment_ids": segments.astype(np.int32), "positions": positions.astype(np.int32)}


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def imported_logits(directory: Path, mesh: list[str]) -> tuple[np.ndarray, dict, object, object]:
    """(logits [8, 16, V] of `batch()` in row order, the MoE scalars, state, setup) of the model imported from
    `directory` on `mesh`; with a context axis the rows are split and reordered as training does."""
    setup = setup_run(load_config(None, [f"model.init_from=hf:{directory}", *mesh, *RUN]))
    state = setup.init_state()
    context = setup.layout.axis_sizes["context"]

    @jax.jit
    def forward(state: nnx.State, b: dict) -> tuple[jax.Array, dict]:
        with use_rules(setup.rules, setup.mesh):
            model, _ = nnx.merge(setup.graphdef, state)
            b = balance_for_context(b, context)
            return model.forward(b["inputs"], Documents(b["segment_ids"], b["positions"]))

    logits, aux = forward(state, jax.device_put(batch(), setup.batch_sharding))
    order = context_order(16, context)
    return np.asarray(logits)[:, np.argsort(order)], aux, state, setup


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory) -> tuple[str, Path, dict, dict]:
    name = request.param
    config = FAMILIES[name]
    weights = random_hf_weights(config, seed=len(name))
    return name, write_hf_model(tmp_path_factory.mktemp(name), config, weights), config, weights


def reference(config: dict, weights: dict, router_logits: list | None = None) -> np.ndarray:
    b = batch()
    return hf_forward(config, weights, b["inputs"], b["segment_ids"], b["positions"], router_logits)


def test_imported_logits_equal_the_reference_forward(family):
    """One sequence per row and packed documents, local layers' windows shorter than the sequence."""
    name, directory, config, weights = family
    router_logits = []
    want = reference(config, weights, router_logits)
    got, aux, _, setup = imported_logits(directory, mesh_of(name))
    assert got.shape == want.shape
    assert relative_error(got, want) < TOLERANCE
    if router_logits:  # Qwen3-MoE's router loss: transformers' load_balancing_loss_func, its coefficient
        assert float(aux["moe_aux_loss"]) == pytest.approx(load_balancing_loss(config, router_logits), rel=1e-5)
        assert setup.shape.aux_loss_weight == 0.01 and setup.shape.z_loss_weight == 0.0


def test_logits_with_the_sequence_split_over_a_context_axis(family):
    """By ring attention (the default): key/value blocks pass around the context devices, masked per tile by
    document, position and the local layers' window."""
    name, directory, config, weights = family
    if "moe" in name:
        with pytest.raises(Exception, match="mesh.context=2 with a mixture-of-experts model is not supported yet"):
            imported_logits(directory, MESH["context"])
        return
    got, _, _, _ = imported_logits(directory, MESH["context"])
    assert relative_error(got, reference(config, weights)) < TOLERANCE


def test_local_layers_split_over_a_context_axis_by_allgather(tmp_path):
    """The other context attention: the whole sequence's keys gathered, local layers masked by position (Gemma 2:
    local and global layers alternating, attention logits soft-capped)."""
    config = FAMILIES["gemma2"]
    weights = random_hf_weights(config, seed=len("gemma2"))
    directory = write_hf_model(tmp_path, config, weights)
    got, _, _, _ = imported_logits(directory, [*MESH["context"], "parallel.context_attention=allgather"])
    assert relative_error(got, reference(config, weights)) < TOLERANCE


def test_export_then_import_is_bitwise(family, tmp_path):
    """The export writes the files' own tensors, names and architecture; importing it gives the same state."""
    name, directory, config, weights = family
    setup = setup_run(load_config(None, [f"model.init_from=hf:{directory}", *mesh_of(name), *RUN]))
    state = setup.init_state()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(setup.cfg, run_dir / "config.yaml")
    checkpoints = Checkpointer(run_dir / "checkpoints", setup.cfg.checkpoint)
    checkpoints.save(1, state, {})
    checkpoints.close()
    out = tmp_path / "exported"
    export_hf(run_dir, out)
    files = tensor_files(out)
    assert set(files) == set(weights)
    for tensor, want in weights.items():
        with safe_open(files[tensor], framework="numpy") as f:
            np.testing.assert_array_equal(f.get_tensor(tensor), want, err_msg=tensor)
    exported = json.loads((out / "config.json").read_text())
    assert exported["architectures"] == config["architectures"]
    again = setup_run(load_config(None, [f"model.init_from=hf:{out}", *mesh_of(name), *RUN]))
    assert again.shape == setup.shape
    for a, b in zip(jax.tree.leaves(state[0]), jax.tree.leaves(again.init_state()[0]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "rope_scaling, max_positions, seq_len",
    [
        (None, 32768, 16),
        ({"rope_type": "linear", "factor": 8.0}, 131072, 16),
        ({"rope_type": "dynamic", "factor": 4.0}, 4096, 10000),  # past max_position_embeddings: the base grows
        ({"rope_type": "dynamic", "factor": 4.0}, 4096, 100),  # within it: the default frequencies
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, 131072, 16),  # Qwen2.5
        ({"rope_type": "yarn", "factor": 8.0, "beta_fast": 16, "beta_slow": 2, "attention_factor": 1.3}, 4096, 16),
        ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}, 8192, 16),
    ],
    ids=["default", "linear", "dynamic_grown", "dynamic_within", "yarn_qwen", "yarn_betas", "llama3"],
)
def test_rope_frequencies_are_transformers(tmp_path, rope_scaling, max_positions, seq_len):
    """Each rope variant's frequencies and cos/sin scale, imported from a config.json, equal modeling_rope_utils'
    (head_dim 128, base 1e6), within float32 rounding."""
    config = FAMILIES["qwen3"] | {"head_dim": 128, "max_position_embeddings": max_positions}
    config |= {"rope_scaling": rope_scaling, "rope_theta": 1e6}
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "tokenizer.json").write_text("{}")
    shape = decoder_shape(load_config(None, [f"model.init_from=hf:{directory}"]).model, 0)
    rope = shape.rope(local=False)
    want, scaling = inv_freq(config, "full_attention", seq_len)
    np.testing.assert_allclose(np.asarray(rope.inv_freq(jnp.int32(seq_len))), want, rtol=2e-6)
    assert rope.scaling == pytest.approx(scaling, rel=1e-12)


def test_layers_are_scanned_in_periodic_segments():
    """Gemma 3's 26 layers (five local, one global): four groups of six, then two local layers; Qwen2's local
    last layers: two runs; one kind: one scan; Qwen3-MoE with two dense first layers: two runs."""
    G, L, M = LayerKind(), LayerKind(local=True), LayerKind(moe=True)
    gemma = tuple(L if (i + 1) % 6 else G for i in range(26))
    assert [(s.start, len(s.period), s.repeats) for s in segments(gemma)] == [(0, 6, 4), (24, 1, 2)]
    assert [(s.start, s.period, s.repeats) for s in segments((G,) * 28 + (L,) * 4)] == [(0, (G,), 28), (28, (L,), 4)]
    assert segments((G,) * 32) == (Segment(0, (G,), 32),)
    assert [(s.start, s.period, s.repeats) for s in segments((G, G) + (M,) * 46)] == [(0, (G,), 2), (2, (M,), 46)]


# Parameters of the models the presets stand for, as their model cards give them (Qwen: "8.2B", "7.61B",
# "30.5B"); Gemma 3 12B's text model alone is not given on its card and is checked by the count alone.
PUBLISHED = {"qwen3-8b": 8.19e9, "qwen2.5-7b": 7.62e9, "qwen3-30b-a3b": 30.5e9}


def hf_parameter_count(model: dict) -> int:
    """Parameters of a model of these `model.*` keys counted as its Hugging Face tensors are (by hand, here)."""
    D, F, V, L = model["d_model"], model["d_ff"], model["vocab_size"], model["n_layers"]
    N, K, H, E = model["n_heads"], model["n_kv_heads"], model["head_dim"], model["num_experts"]
    attention = D * H * (2 * N + 2 * K) + 2 * D
    attention += {"none": 0, "qkv": (N + 2 * K) * H, "qkvo": (N + 2 * K) * H + D}[model["attention_bias"]]
    attention += 2 * H * model["qk_norm"] + 2 * D * model["sandwich_norms"]
    mlp = 3 * D * (model["expert_d_ff"] or F) * E + D * E if E else 3 * D * F
    return V * D * (1 if model["tie_embeddings"] else 2) + D + L * (attention + mlp)


@pytest.mark.parametrize("preset", ["qwen2.5-7b", "qwen3-8b", "qwen3-30b-a3b", "gemma3-12b"])
def test_presets_plan_the_models_they_name_without_weights(preset):
    """The planner's parameter count of each preset is its Hugging Face tensors' (and the model card's), and a
    plan for a v5p-64 slice finds a mesh it fits."""
    cfg = load_config(
        None, [f"model.preset={preset}", "model.remat=full", "train.seq_len=4096", "train.global_batch=64"]
    )
    shape = decoder_shape(cfg.model, 0)
    count = sum(math.prod(a.shape) for a in state_arrays(abstract_state(state_builder(cfg, shape))[1]) if a.is_param)
    assert count == hf_parameter_count(dataclasses.asdict(cfg.model))
    if preset in PUBLISHED:
        assert count == pytest.approx(PUBLISHED[preset], rel=0.01)
    assert plan(cfg, parse_cluster("v5p-64")).ranked[0].fits


@pytest.mark.parametrize("name", ["gemma3", "qwen3_moe"])
def test_cached_decoding_follows_the_reference_forward(name, tmp_path):
    """Greedy decoding with the key/value cache (prompts of 10 and 7 tokens, left-padded; 6 new tokens, past the
    window of 5 on Gemma 3's local layers) gives the tokens the reference forward picks step by step, each row
    on its own prompt; Qwen3-MoE decodes its experts on the expert mesh."""
    config = FAMILIES[name]
    weights = random_hf_weights(config, seed=len(name))
    directory = write_hf_model(tmp_path / name, config, weights)
    setup = setup_run(load_config(None, [f"model.init_from=hf:{directory}", *mesh_of(name), *RUN]))
    state = setup.init_state()
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, SMALL["vocab_size"], 10 if row % 2 else 7) for row in range(8)]
    pad_B = np.asarray([10 - len(p) for p in prompts], np.int32)
    prompt_BP = np.stack([np.concatenate([np.zeros(10 - len(p), int), p]) for p in prompts]).astype(np.int32)

    @jax.jit
    def decode(state: nnx.State, prompt_BP: jax.Array, pad_B: jax.Array) -> jax.Array:
        with use_rules(setup.rules, setup.mesh):
            model, _ = nnx.merge(setup.graphdef, state)
            return generate_tokens(model, prompt_BP, pad_B, 6, Sampling(), jax.random.key(0), [-1], SMALL["vocab_size"])

    got = np.asarray(decode(state, prompt_BP, pad_B))
    for row, prompt in enumerate(prompts):
        sequence = list(prompt)
        for _ in range(6):
            sequence.append(int(np.argmax(hf_forward(config, weights, np.asarray([sequence]))[0, -1])))
        assert got[row].tolist() == sequence[len(prompt) :], row


@pytest.mark.slow  # four 8B/12B steps compiled for a TPU topology: several minutes each on 2 cores
@pytest.mark.parametrize("preset", ["qwen3-8b", "gemma3-12b"])
@pytest.mark.parametrize("quant", ["none", "nf4"], ids=["lora_bf16", "qlora"])
def test_the_planner_is_within_15_percent_of_xla_for_lora_on_the_presets(preset, quant):
    """LoRA r16 (bf16 or NF4 base) on v5e:2x2, fsdp=4, 2048 tokens per device, remat full, the layers scanned: the
    planner's memory per device within 15% of XLA:TPU's (scripts/bench_families.py prints the same figures)."""
    pytest.importorskip("libtpu", reason="the optional `tpu` extra (libtpu) is not installed")
    from jaxscale.aot import compile_train_step, topology_accelerator, topology_devices
    from jaxscale.hardware import Cluster

    devices = topology_devices("v5e:2x2")
    cfg = load_config(
        None,
        [f"model.preset={preset}", "lora.rank=16", f"lora.base_quant={quant}", "model.remat=full"]
        + ["model.scan_unroll=1", "train.seq_len=2048", "train.global_batch=4", "mesh.data=1", "mesh.fsdp=4"]
        + ["data.tokenizer=byte"],
    )
    step = compile_train_step(cfg, devices)
    sizes = {axis: step.mesh[axis] for axis in step.mesh}
    planned = evaluate_config(cfg, sizes, Cluster("v5e:2x2", topology_accelerator("v5e:2x2"), 4)).memory.total
    assert 0.85 <= planned / step.total_bytes <= 1.15


@pytest.mark.parametrize("architecture", list(FAMILY_TABLE))
def test_each_familys_tensor_map_covers_exactly_the_models_state(architecture):
    """Every parameter of a model with the family's switches (its variable ones on, both dense and MoE stacks
    where it has experts) has one tensor map of its shape, and every map a parameter; the family names them all."""
    fam = FAMILY_TABLE[architecture]
    values = family_switches(architecture) | {"vocab_size": 300, "tie_embeddings": False}
    if "attention_bias" in fam.variable:
        values["attention_bias"] = "qkvo"
    if fam.experts != "none":
        values |= {"num_experts": 4, "experts_per_token": 2, "mlp_only_layers": [0], "expert_d_ff": 48}
    cfg = load_config(None, [f"model.{key}={json.dumps(value)}" for key, value in values.items()])
    shape = decoder_shape(cfg.model, 0)
    state = nnx.eval_shape(lambda: nnx.state(Decoder(shape, nnx.Rngs(params=0))))
    params = {tuple(str(k) for k in path): leaf.shape for path, leaf in nnx.to_flat_state(state)}
    maps = tensor_maps(shape, fam)
    assert set(maps) == set(params)
    for path, m in maps.items():
        assert params[path] == (*stack_sizes(m, shape), *(m.view[a] for a in m.perm)), path
    names = [m.hf_name(index) for m in maps.values() for index in itertools.product(*map(range, stack_sizes(m, shape)))]
    assert len(names) == len(set(names))  # no two parameters claim one HF tensor


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"capacity_factor": 1.25}, "MixtralForCausalLM: capacity_factor=1.25"),
        ({"num_shared_experts": 1}, "MixtralForCausalLM: capacity_factor=0.0, num_shared_experts=1"),
        ({"moe_every": 2, "n_layers": 4}, "MixtralForCausalLM: moe_every=2"),
    ],
    ids=["capacity_factor", "shared_expert", "moe_every"],
)
def test_a_model_no_hf_class_computes_is_refused_by_name(changes, reason):
    """jaxscale MoE layouts that no Hugging Face architecture has: Mixtral's routing is dropless, without shared
    experts, every layer MoE; Qwen3-MoE's too, with q/k norms. The refusal names each family's reason."""
    model = dataclasses.asdict(load_config(None, ["model.preset=tiny-moe", "model.capacity_factor=0"]).model)
    with pytest.raises(
        UserError,
        match=r"No Hugging Face architecture computes this model, so it cannot be exported: "
        r"LlamaForCausalLM: num_experts=4 \(it has no experts\)",
    ) as refusal:
        family_for(model | changes)
    assert reason in str(refusal.value) and "Qwen3MoeForCausalLM: qk_norm=False (it has True)" in str(refusal.value)
    assert family_for(model).architecture == "MixtralForCausalLM"  # dropless, every layer, no shared expert
