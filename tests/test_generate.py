"""Decoding with a KV cache (jaxscale.models.decode) and `jaxscale generate`: cached greedy decoding is argmax
decoding by full forward passes, sampling follows its temperature and top-p, bad input exits 2."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import jaxscale
from jaxscale.checkpoint import Checkpointer
from jaxscale.cli import main
from jaxscale.config import load_config, save_config
from jaxscale.data import build_tokenizer
from jaxscale.generate import generate
from jaxscale.models.decode import Sampling, choose_tokens, generate_tokens, prefill
from jaxscale.sharding import use_rules
from jaxscale.training.setup import setup_run

VOCAB = 100  # the tokenizer's; the model's vocabulary is padded to 128, and ids >= 100 must never come out
EOS = 99
# GQA (4 query heads share 2 kv heads); a wide init spreads the logits, so argmax has no near-ties that the
# order of float32 sums could flip.
MODEL = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.head_dim=8",
    "model.d_ff=64",
    "model.init_std=0.5",
    "model.compute_dtype=float32",
]
MESHES = {
    "data2_fsdp2_tensor2": (8, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]),
    "one_device": (1, ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"]),
}


def tiny_model(mesh_name: str):
    """A random tiny model's setup and state on the named mesh."""
    devices, mesh = MESHES[mesh_name]
    cfg = load_config(None, [*MODEL, *mesh, "mesh.strategy=fsdp_tp", "train.global_batch=8", "train.seed=3"])
    setup = setup_run(cfg, jax.devices()[:devices], tokenizer_vocab=VOCAB)
    return setup, setup.init_state()


def cached_decode(setup, state, prompts: list[np.ndarray], new: int, sampling: Sampling, seed: int = 0) -> np.ndarray:
    """generate_tokens on left-padded prompts, under jit on the setup's mesh."""
    longest = max(len(p) for p in prompts)
    pad_B = np.array([longest - len(p) for p in prompts], np.int32)
    prompt_BP = np.stack([np.concatenate([np.full(n, 7, np.int32), p]) for n, p in zip(pad_B, prompts, strict=True)])
    batch = NamedSharding(setup.mesh, PartitionSpec(("data", "fsdp")))

    @jax.jit
    def run(state, prompt_BP, pad_B, key):
        with use_rules(setup.rules, setup.mesh):
            model, _ = nnx.merge(setup.graphdef, state)
            return generate_tokens(model, prompt_BP, pad_B, new, sampling, key, EOS, VOCAB)

    out = run(state, jax.device_put(prompt_BP, batch), jax.device_put(pad_B, batch), jax.random.key(seed))
    return np.asarray(jax.device_get(out))


def full_forward_greedy(setup, state, prompts: list[np.ndarray], new: int) -> np.ndarray:
    """The reference: each step runs the whole sequence so far through the model (no cache), right-padded to one
    length (causal attention: padding after a token cannot change its logits) and takes the argmax over the
    tokenizer's vocabulary at each row's last token; after eos a row stays eos."""
    length = max(len(p) for p in prompts) + new
    forward = jax.jit(lambda state, tokens: nnx.merge(setup.graphdef, state)[0](tokens))
    rows = [list(p) for p in prompts]
    done = [False] * len(rows)
    out = np.full((len(rows), new), EOS, np.int32)
    for step in range(new):
        tokens = np.array([r + [0] * (length - len(r)) for r in rows], np.int32)
        logits = np.asarray(forward(state, tokens))
        for b, row in enumerate(rows):
            if done[b]:
                continue
            out[b, step] = int(np.argmax(logits[b, len(row) - 1, :VOCAB]))
            row.append(int(out[b, step]))
            done[b] = out[b, step] == EOS
    return out


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_cached_greedy_decoding_equals_argmax_of_full_forward_passes(mesh_name):
    setup, state = tiny_model(mesh_name)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, EOS, size=n).astype(np.int32) for n in (7, 1, 11, 4)]
    cached = cached_decode(setup, state, prompts, new=10, sampling=Sampling())
    np.testing.assert_array_equal(cached, full_forward_greedy(setup, state, prompts, new=10))
    assert cached.max() < VOCAB


def test_sampling_with_a_seed_is_reproducible_and_the_seed_matters():
    logits_BV = jax.random.normal(jax.random.key(0), (64, 50))
    hot = Sampling(temperature=1.0, top_p=0.9)
    first = np.asarray(choose_tokens(logits_BV, hot, jax.random.key(5)))
    np.testing.assert_array_equal(first, choose_tokens(logits_BV, hot, jax.random.key(5)))
    assert not np.array_equal(first, choose_tokens(logits_BV, hot, jax.random.key(6)))


def test_a_tiny_top_p_is_greedy():
    logits_BV = jax.random.normal(jax.random.key(0), (64, 50)) * 3
    for seed in range(3):
        chosen = choose_tokens(logits_BV, Sampling(temperature=1.5, top_p=1e-6), jax.random.key(seed))
        np.testing.assert_array_equal(chosen, np.argmax(logits_BV, axis=-1))


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.5, 1.0), (2.0, 1.0), (1.0, 0.6)])
def test_samples_follow_the_tempered_and_nucleus_cut_distribution(temperature, top_p):
    logits = np.log(np.array([0.05, 0.4, 0.1, 0.3, 0.15]))
    draws = 40_000
    chosen = choose_tokens(
        jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (draws, 5)),
        Sampling(temperature, top_p),
        jax.random.key(1),
    )
    # numpy reference: softmax(logits / T), then the smallest most-likely set reaching top_p, renormalized
    p = np.exp(logits / temperature)
    p /= p.sum()
    order = np.argsort(-p)
    before = np.cumsum(p[order]) - p[order]
    kept = np.zeros(5, bool)
    kept[order[before < top_p]] = True
    expected = np.where(kept, p, 0) / p[kept].sum()
    frequency = np.bincount(np.asarray(chosen), minlength=5) / draws
    np.testing.assert_allclose(frequency, expected, atol=0.01)


def error_of(capsys, *args: str) -> str:
    """`jaxscale ARGS` in this process: asserts exit code 2 and returns the one error line."""
    assert main(list(args)) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("jaxscale: error:")]
    return line


@pytest.fixture
def run_without_checkpoints(tmp_path):
    cfg = load_config("configs/tiny.yaml", ["train.seq_len=32", f"run.dir={tmp_path}"])
    save_config(cfg, tmp_path / "config.yaml")
    return str(tmp_path)


def test_a_run_without_checkpoints_is_refused(capsys, run_without_checkpoints):
    line = error_of(capsys, "generate", run_without_checkpoints, "--prompt", "def f():", "--max-new-tokens", "4")
    assert f"'{run_without_checkpoints}' has no checkpoint (looked in" in line and "checkpoint.every > 0" in line


def test_a_directory_that_is_no_run_is_refused(capsys, tmp_path):
    line = error_of(capsys, "generate", str(tmp_path), "--prompt", "x")
    assert f"'{tmp_path}' is not a run directory: it has no config.yaml. Pass the run.dir of a run" in line


def test_an_empty_prompt_is_refused(capsys, run_without_checkpoints, tmp_path):
    assert "Prompt 1 is empty" in error_of(capsys, "generate", run_without_checkpoints, "--prompt", "")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": ""}\n')
    assert "Prompt 2 is empty" in error_of(capsys, "generate", run_without_checkpoints, "--prompts", str(prompts))


def test_more_tokens_than_the_trained_context_are_refused(capsys, run_without_checkpoints):
    line = error_of(capsys, "generate", run_without_checkpoints, "--prompt", "0123456789", "--max-new-tokens", "23")
    assert "The longest prompt (10 tokens) plus --max-new-tokens 23 exceeds the 32 tokens" in line
    assert "Ask for at most 22 new tokens" in line


def test_an_unknown_prompts_file_is_refused(capsys, run_without_checkpoints, tmp_path):
    line = error_of(capsys, "generate", run_without_checkpoints, "--prompts", str(tmp_path / "nope.txt"))
    assert f"--prompts {tmp_path / 'nope.txt'} cannot be read" in line


@pytest.mark.slow  # trains a tiny run first: about 30 s
def test_generate_completes_prompts_from_a_trained_runs_checkpoint(capsys, tmp_path):
    cfg = jaxscale.load_config(
        "configs/tiny.yaml",
        [f"run.dir={tmp_path}", "train.steps=2", "checkpoint.every=2", "train.eval_every=0", "train.seq_len=32"],
    )
    jaxscale.train(cfg)
    capsys.readouterr()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def add(a, b):\nimport o\n")
    assert main(["generate", str(tmp_path), "--prompts", str(prompts), "--max-new-tokens", "5", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["def add(a, b):", "import o"]
    assert all(1 <= r["tokens"] <= 5 for r in rows)


@pytest.mark.slow  # imports a Llama on 8 devices and compiles the decoder: about 25 s
def test_a_model_imported_from_hf_generates_the_hf_forwards_greedy_tokens(tmp_path):
    """Llama 3 rope scaling, GQA and an untied head, imported by model.init_from and saved as a run's checkpoint:
    `generate` greedy gives what argmax decoding with test_hf's independent numpy forward gives."""
    from test_hf import LLAMA, MESH, RUN, hf_forward, random_hf_weights, write_hf_model

    weights = random_hf_weights(LLAMA, seed=0)
    directory = write_hf_model(tmp_path / "llama", LLAMA, weights)
    run_dir = tmp_path / "run"
    cfg = load_config(None, [f"model.init_from=hf:{directory}", *MESH, *RUN, f"run.dir={run_dir}"])
    setup = setup_run(cfg)
    run_dir.mkdir()
    save_config(cfg, run_dir / "config.yaml")
    checkpoints = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    checkpoints.save(1, setup.init_state(), {}, wait=True)
    checkpoints.close()

    prompts, new = ["def f(", "x", "import os"], 6
    step, completions = generate(str(run_dir), prompts, new, Sampling())
    tokenizer = build_tokenizer(cfg.data)  # the directory's byte-level tokenizer.json: 257 tokens, eos 256
    for prompt, completion in zip(prompts, completions, strict=True):
        ids = list(tokenizer.encode(prompt))
        for _ in range(new):
            logits_V = hf_forward(LLAMA, weights, np.array([ids]))[0, -1, : tokenizer.vocab_size]
            ids.append(int(np.argmax(logits_V)))
            if ids[-1] == tokenizer.eos_id:
                break
        want = ids[len(tokenizer.encode(prompt)) :]
        assert completion.tokens == len(want) and completion.stopped_at_eos == (want[-1] == tokenizer.eos_id)
        assert completion.text == tokenizer.decode([t for t in want if t != tokenizer.eos_id])
    assert step == 1


@pytest.mark.slow  # trains a LoRA run first: about 30 s
def test_generate_on_a_lora_run_rebuilds_the_base_and_uses_the_trained_adapters(tmp_path):
    """A LoRA checkpoint holds the adapters only: generate rebuilds the frozen base as training resumes it, and its
    greedy completion is not the base's (the adapters' B start at zero, so an untrained run gives the base's)."""
    quiet = ["log.progress=false", "log.tensorboard=false", "train.eval_every=0", "checkpoint.every=4"]
    lora = ["lora.rank=4", "optim.lr=0.05", "optim.warmup_steps=0", "train.steps=4", "train.seq_len=32"]
    cfg = load_config("configs/tiny.yaml", [f"run.dir={tmp_path}", *lora, *quiet])
    pattern = np.frombuffer(b"abcdefgh" * 5, np.uint8)[:33].astype(np.int32)
    jaxscale.train(cfg, train_source=[pattern] * 16)
    _, (trained,) = generate(str(tmp_path), ["abcd"], 8, Sampling())

    setup = setup_run(cfg)

    @jax.jit
    def untrained(state, prompt_BP):
        with use_rules(setup.rules, setup.mesh):
            model, _ = nnx.merge(setup.graphdef, state)
            return generate_tokens(
                model, prompt_BP, jnp.zeros(4, jnp.int32), 8, Sampling(), jax.random.key(0), 256, 257
            )

    prompt_BP = jnp.broadcast_to(jnp.frombuffer(b"abcd", jnp.uint8).astype(jnp.int32), (4, 4))
    base_ids = [t for t in np.asarray(untrained(setup.init_state(), prompt_BP))[0] if t != 256]
    assert trained.text != bytes(base_ids).decode("utf-8", errors="replace")


def test_prefill_splits_the_cache_over_batch_and_kv_heads_and_gives_each_rows_last_logits():
    setup, state = tiny_model("data2_fsdp2_tensor2")
    prompts = [np.arange(1, n + 1, dtype=np.int32) * 3 for n in (5, 2, 8, 1)]
    pad_B = np.array([8 - len(p) for p in prompts], np.int32)
    prompt_BP = np.stack([np.concatenate([np.zeros(n, np.int32), p]) for n, p in zip(pad_B, prompts, strict=True)])

    @jax.jit
    def run(state, prompt_BP, pad_B):
        with use_rules(setup.rules, setup.mesh):
            return prefill(nnx.merge(setup.graphdef, state)[0], prompt_BP, pad_B, 4)

    batch = NamedSharding(setup.mesh, PartitionSpec(("data", "fsdp")))
    logits_BV, (k_cache, v_cache) = run(state, jax.device_put(prompt_BP, batch), jax.device_put(pad_B, batch))
    for cache in (k_cache, v_cache):  # [layers, batch, slots, kv_heads, head_dim]
        assert cache.shape == (2, 4, 12, 2, 8)
        want = NamedSharding(setup.mesh, PartitionSpec(None, ("data", "fsdp"), None, "tensor", None))
        assert cache.sharding.is_equivalent_to(want, cache.ndim), cache.sharding
    forward = jax.jit(lambda state, tokens: nnx.merge(setup.graphdef, state)[0](tokens))
    for b, prompt in enumerate(prompts):  # each row alone, unpadded, through the plain forward
        want = np.asarray(forward(state, prompt[None]))[0, -1]
        np.testing.assert_allclose(np.asarray(logits_BV[b]), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
