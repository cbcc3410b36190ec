"""Decoding with a KV cache (jaxscale.models.decode) and `jaxscale generate`: cached greedy decoding is argmax
decoding by full forward passes (dense and mixture-of-experts, on one device and split meshes), sampling follows
its temperature, top-k and top-p in transformers' order, rows end at any eos id and at stop strings, chat prompts
are rendered as the data path renders them, the context reaches max_position_embeddings, bad input exits 2."""

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
from jaxscale.data.examples import ExampleEncoder
from jaxscale.generate import (
    Conversation,
    chat_template,
    encode_prompt,
    encode_prompts,
    find_stop,
    generate,
    prompt_text,
    read_prompts,
)
from jaxscale.models.decode import Sampling, choose_tokens, filtered_logits, generate_tokens, prefill
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
# Mixture of experts: 4 experts of which each token takes 2, in every layer.
MOE = ["model.num_experts=4", "model.experts_per_token=2"]
MESHES = {
    "data2_fsdp2_tensor2": (8, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]),
    "one_device": (1, ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"]),
    "fsdp2_expert2_tensor2": (8, ["mesh.data=1", "mesh.fsdp=2", "mesh.expert=2", "mesh.tensor=2"]),
    "data2_pipeline2_tensor2": (8, ["mesh.data=2", "mesh.fsdp=1", "mesh.pipeline=2", "mesh.tensor=2"]),
    "data2_fsdp2_context2": (8, ["mesh.data=2", "mesh.fsdp=2", "mesh.context=2", "mesh.tensor=1"]),
}


def tiny_model(mesh_name: str, extra: tuple[str, ...] = ()):
    """A random tiny model's setup and state on the named mesh (`extra`: more model keys)."""
    devices, mesh = MESHES[mesh_name]
    run = ["mesh.strategy=fsdp_tp", "train.global_batch=8", "train.grad_accum=2" if "pipeline" in mesh_name else ""]
    cfg = load_config(None, [*MODEL, *extra, *mesh, *filter(None, run), "train.seed=3"])
    setup = setup_run(cfg, jax.devices()[:devices], tokenizer_vocab=VOCAB)
    return setup, setup.init_state()


def cached_decode(
    setup, state, prompts: list[np.ndarray], new: int, sampling: Sampling, seed: int = 0, eos_ids=(EOS,)
) -> np.ndarray:
    """generate_tokens on left-padded prompts, under jit on the setup's mesh."""
    longest = max(len(p) for p in prompts)
    pad_B = np.array([longest - len(p) for p in prompts], np.int32)
    prompt_BP = np.stack([np.concatenate([np.full(n, 7, np.int32), p]) for n, p in zip(pad_B, prompts, strict=True)])
    batch = NamedSharding(setup.mesh, PartitionSpec(setup.batch_sharding.spec[0]))

    @jax.jit
    def run(state, prompt_BP, pad_B, key):
        with use_rules(setup.rules, setup.mesh):
            model, _ = nnx.merge(setup.graphdef, state)
            return generate_tokens(model, prompt_BP, pad_B, new, sampling, key, eos_ids, VOCAB)

    out = run(state, jax.device_put(prompt_BP, batch), jax.device_put(pad_B, batch), jax.random.key(seed))
    return np.asarray(jax.device_get(out))


def full_forward_greedy(graphdef, state, prompts: list[np.ndarray], new: int, eos_ids=(EOS,)) -> np.ndarray:
    """The reference: each step runs the whole sequence so far through the model (no cache, no mesh), right-padded
    to one length (causal attention: padding after a token cannot change its logits) and takes the argmax over
    the tokenizer's vocabulary at each row's last token; after an eos id a row holds the first eos id."""
    length = max(len(p) for p in prompts) + new
    forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)[0](tokens))
    rows = [list(p) for p in prompts]
    done = [False] * len(rows)
    out = np.full((len(rows), new), eos_ids[0], np.int32)
    for step in range(new):
        tokens = np.array([r + [0] * (length - len(r)) for r in rows], np.int32)
        logits = np.asarray(forward(state, tokens))
        for b, row in enumerate(rows):
            if done[b]:
                continue
            out[b, step] = int(np.argmax(logits[b, len(row) - 1, :VOCAB]))
            row.append(int(out[b, step]))
            done[b] = out[b, step] in eos_ids
    return out


PROMPT_LENGTHS = (7, 1, 11, 4)


def random_prompts(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, EOS, size=n).astype(np.int32) for n in PROMPT_LENGTHS]


@pytest.mark.parametrize(
    "mesh_name, extra",
    [
        ("data2_fsdp2_tensor2", ()),
        ("one_device", ()),
        ("data2_pipeline2_tensor2", ()),
        ("data2_fsdp2_context2", ()),
        ("one_device", (*MOE, "model.moe_every=2")),  # layer 0 dense, layer 1 MoE: both stacks
        ("fsdp2_expert2_tensor2", tuple(MOE)),
    ],
    ids=lambda value: value if isinstance(value, str) else ("moe" if value else "dense"),
)
def test_cached_greedy_decoding_equals_argmax_of_full_forward_passes(mesh_name, extra):
    """On every kind of mesh a run trains on (a pipeline run's layers split over `pipeline`, a context-parallel
    one's), MoE layers included: on the expert mesh the experts are split over `expert` and tokens travel by
    all-to-all, one token per row at each step."""
    setup, state = tiny_model(mesh_name, extra)
    prompts = random_prompts()
    cached = cached_decode(setup, state, prompts, new=10, sampling=Sampling())
    np.testing.assert_array_equal(cached, full_forward_greedy(setup.graphdef, state, prompts, new=10))
    assert cached.max() < VOCAB


def test_a_capacity_routed_moe_model_decodes_as_its_dropless_forward():
    """Capacity is counted per sequence and first choices take slots before second ones, so whether a token
    reaches an expert depends on later tokens; decoding routes every token (the full forward of the same weights
    with capacity_factor=0 is the reference), on experts split over `expert`."""
    capacity = (*MOE, "model.capacity_factor=0.5")
    setup, state = tiny_model("fsdp2_expert2_tensor2", capacity)
    dropless_setup, _ = tiny_model("fsdp2_expert2_tensor2", tuple(MOE))
    prompts = random_prompts(1)
    cached = cached_decode(setup, state, prompts, new=8, sampling=Sampling())
    np.testing.assert_array_equal(cached, full_forward_greedy(dropless_setup.graphdef, state, prompts, new=8))
    # The capacity would have dropped tokens: its own full forward is another model.
    dropping = full_forward_greedy(setup.graphdef, state, prompts, new=8)
    assert not np.array_equal(cached, dropping)


def test_a_row_ends_at_any_of_several_eos_ids():
    setup, state = tiny_model("one_device")
    prompts = random_prompts(2)
    free = full_forward_greedy(setup.graphdef, state, prompts, new=10, eos_ids=(VOCAB,))  # no eos ever comes
    # Two more eos ids: row 0's fourth new token and row 2's sixth (not appearing before them in those rows).
    extra = (int(free[0, 3]), int(free[2, 5]))
    assert extra[0] not in free[0, :3] and extra[1] not in free[2, :5] and len(set(extra)) == 2
    eos_ids = (EOS, *extra)
    cached = cached_decode(setup, state, prompts, new=10, sampling=Sampling(), eos_ids=eos_ids)
    for b, row in enumerate(free):  # each row as the free run, through its first eos id, then the first id
        ends = [i for i, t in enumerate(row) if t in eos_ids]
        want = row.copy() if not ends else np.concatenate([row[: ends[0] + 1], [EOS] * (len(row) - ends[0] - 1)])
        np.testing.assert_array_equal(cached[b], want)
    assert EOS not in free[0, :4] and cached[0, 3] == extra[0] and np.all(cached[0, 4:] == EOS)


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


@pytest.mark.parametrize(
    "temperature, top_p, top_k",
    [(1.0, 1.0, 0), (0.5, 1.0, 0), (2.0, 1.0, 0), (1.0, 0.6, 0), (2.0, 1.0, 2), (1.0, 0.8, 3)],
)
def test_samples_follow_the_tempered_top_k_and_nucleus_cut_distribution(temperature, top_p, top_k):
    """transformers' order: temperature, then top-k, then top-p on what top-k kept, renormalized. At top-k 3 and
    top-p 0.8 the order shows: the nucleus of the three kept tokens (0.47, 0.35, 0.18) is two of them, where a
    nucleus taken first (0.4, 0.3, 0.15 of all five) would keep three."""
    logits = np.log(np.array([0.05, 0.4, 0.1, 0.3, 0.15]))
    draws = 40_000
    chosen = choose_tokens(
        jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (draws, 5)),
        Sampling(temperature=temperature, top_p=top_p, top_k=top_k),
        jax.random.key(1),
    )
    # numpy reference: softmax(logits / T) over the k most likely, then the smallest most-likely set reaching top_p
    p = np.exp(logits / temperature)
    if top_k:
        p[np.argsort(-p)[top_k:]] = 0
    p /= p.sum()
    order = np.argsort(-p)
    before = np.cumsum(p[order]) - p[order]
    kept = np.zeros(5, bool)
    kept[order[(before < top_p) & (p[order] > 0)]] = True
    expected = np.where(kept, p, 0) / p[kept].sum()
    frequency = np.bincount(np.asarray(chosen), minlength=5) / draws
    np.testing.assert_allclose(frequency, expected, atol=0.01)
    if (top_p, top_k) == (0.8, 3):
        assert kept.sum() == 2


def test_top_k_1_is_greedy_and_top_k_keeps_the_k_most_likely():
    logits_BV = jax.random.normal(jax.random.key(0), (64, 50)) * 3
    for seed in range(3):
        chosen = choose_tokens(logits_BV, Sampling(temperature=1.5, top_k=1), jax.random.key(seed))
        np.testing.assert_array_equal(chosen, np.argmax(logits_BV, axis=-1))
    filtered = np.asarray(filtered_logits(logits_BV, Sampling(temperature=2.0, top_k=5)))
    five_best = np.argsort(-np.asarray(logits_BV), axis=-1)[:, :5]
    finite = np.isfinite(filtered)
    assert np.all(finite.sum(-1) == 5) and np.all(np.take_along_axis(finite, five_best, axis=-1))
    np.testing.assert_allclose(filtered[finite], np.asarray(logits_BV)[finite] / 2.0, rtol=1e-6)
    # Drawn many times, every token is one of its row's five most likely, and each of those comes out.
    draws = np.stack(
        [choose_tokens(logits_BV, Sampling(temperature=5.0, top_k=5), jax.random.key(s)) for s in range(200)], 1
    )
    assert all(set(row) == set(best) for row, best in zip(draws, five_best, strict=True))


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
    """A model jaxscale trained itself has seen train.seq_len tokens at most: that is its context."""
    line = error_of(capsys, "generate", run_without_checkpoints, "--prompt", "0123456789", "--max-new-tokens", "23")
    assert (
        "The longest prompt (10 tokens) plus --max-new-tokens 23 is 33 tokens, beyond the model's context of 32 "
        in line
    )
    assert "(train.seq_len, the longest sequence the model was trained on). Ask for at most 22 new tokens" in line


@pytest.mark.parametrize(
    "args, message",
    [
        (["--top-k", "5"], "--top-k 5 / --top-p 1.0 cut the distribution a token is sampled from, but --temperature 0"),
        (["--top-p", "0.9"], "Give --temperature > 0 (e.g. 0.7) to sample, or drop them."),
        (["--temperature", "1", "--top-k", "-1"], "--top-k >= 0 (0: no cut)"),
        (["--stop", ""], "--stop takes a non-empty string"),
        (["--chat"], "--chat renders prompts with the run's chat template, but this run has none (data.tokenizer=byte"),
    ],
    ids=["top_k_greedy", "top_p_greedy", "negative_top_k", "empty_stop", "chat_without_template"],
)
def test_sampling_and_stop_options_that_do_nothing_sensible_are_refused(capsys, run_without_checkpoints, args, message):
    assert message in error_of(capsys, "generate", run_without_checkpoints, "--prompt", "x", *args)


def test_an_unknown_prompts_file_is_refused(capsys, run_without_checkpoints, tmp_path):
    line = error_of(capsys, "generate", run_without_checkpoints, "--prompts", str(tmp_path / "nope.txt"))
    assert f"--prompts {tmp_path / 'nope.txt'} cannot be read" in line


def test_a_stop_string_across_tokens_is_found_at_the_token_that_completes_it(tmp_path):
    """The text of all the tokens so far is searched, so a stop string that starts inside one token and ends inside
    the next is found at the second, and the text is cut where the string starts."""
    from tokenizers import ByteLevelBPETokenizer

    trained = ByteLevelBPETokenizer()
    trained.train_from_iterator(["Hello world! The stop\n\nis here."] * 20, vocab_size=300, show_progress=False)
    trained.save(str(tmp_path / "tokenizer.json"))
    tokenizer = build_tokenizer(load_config(None, [f"data.tokenizer={tmp_path / 'tokenizer.json'}"]).data)
    text = "Hello world! The stop\n\nis here."
    ids = tokenizer.encode(text)
    assert [tokenizer.decode(ids[:n]) for n in (1, 2)] == ["Hello", "Hello world"]  # "lo wor" spans both
    assert find_stop(ids, tokenizer, ["lo wor"], 0) == (2, 3, "lo wor")
    newlines = [i for i in range(len(ids)) if tokenizer.decode(ids[i : i + 1]) == "\n"]
    assert len(newlines) == 2  # "\n\n" is two tokens
    assert find_stop(ids, tokenizer, ["\n\n"], 0) == (newlines[1] + 1, text.index("\n\n"), "\n\n")
    assert find_stop(ids, tokenizer, ["here", "\n\n", "stop"], 2) == (newlines[0], text.index("stop"), "stop")
    assert find_stop(ids, tokenizer, ["absent"], 0) == (0, 0, "")
    # Bytes of a character split over tokens: the stop string is seen once its last byte has come.
    cafe = build_tokenizer(load_config(None, []).data).encode("café!")
    assert find_stop(cafe, build_tokenizer(load_config(None, []).data), ["é!"], 0) == (6, 3, "é!")


def test_chat_prompts_are_rendered_as_the_data_path_renders_them_with_the_generation_prompt(tmp_path):
    """Llama 3's template on the Llama-3-like tokenizer: the text is what transformers' apply_chat_template(...,
    add_generation_prompt=True) writes, its ids those of encoding it without added tokens, and they are the very
    ids a training example of the same conversation with an answer starts with, up to the answer's first token."""
    from hf_tokenizers import byte_level
    from tokenizers import Tokenizer

    path = byte_level(tmp_path / "tokenizer")
    cfg = load_config(None, [f"data.tokenizer={path}"])
    tokenizer = build_tokenizer(cfg.data)
    rows = tmp_path / "prompts.jsonl"
    system = {"role": "system", "content": "Be brief."}
    rows.write_text(
        json.dumps({"messages": [system, {"role": "user", "content": "What is 2+2?"}]})
        + "\n"
        + json.dumps({"prompt": "  hi there  "})
        + "\n"
    )
    prompts = read_prompts(None, str(rows), chat=True)
    assert prompts[1] == Conversation([{"role": "user", "content": "  hi there  "}])
    header = "<|start_header_id|>{}<|end_header_id|>\n\n"
    want = [
        "<|begin_of_text|>"
        + header.format("system")
        + "Be brief.<|eot_id|>"
        + header.format("user")
        + "What is 2+2?<|eot_id|>"
        + header.format("assistant"),
        "<|begin_of_text|>" + header.format("user") + "hi there<|eot_id|>" + header.format("assistant"),
    ]
    template = chat_template(cfg, tokenizer)
    reference = Tokenizer.from_file(str(path))
    for prompt, text in zip(prompts, want, strict=True):
        assert prompt_text(prompt, template, "prompt") == text
        ids = encode_prompt(text, tokenizer, rendered=True)
        assert ids.tolist() == reference.encode(text, add_special_tokens=False).ids
        assert ids[0] == reference.token_to_id("<|begin_of_text|>") and (ids == ids[0]).sum() == 1  # BOS once
        answer = {"role": "assistant", "content": "Four."}
        data_cfg = load_config(None, [f"data.tokenizer={path}", "data.source=chat"]).data
        example, trained = ExampleEncoder(data_cfg, tokenizer).chat([*prompt.messages, answer], None, "row")
        assert example[: len(ids)].tolist() == ids.tolist() and np.flatnonzero(trained)[0] == len(ids)
    # A text prompt (no --chat) is encoded as tokenizer(text): BOS first, as training's prompt/completion rows; so
    # too beside a conversation in one call.
    plain = encode_prompt("hi there", tokenizer, rendered=False)
    assert plain.tolist() == reference.encode("hi there").ids and plain[0] == tokenizer.bos_id
    texts, ids = encode_prompts(["hi there", prompts[1]], tokenizer, template)
    assert texts == ["hi there", want[1]] and ids[0].tolist() == plain.tolist()
    assert ids[1].tolist() == reference.encode(want[1], add_special_tokens=False).ids


MIXTRAL_MESH = ["mesh.data=1", "mesh.fsdp=2", "mesh.expert=2", "mesh.tensor=2"]


@pytest.fixture(scope="module")
def imported_moe_run(tmp_path_factory):
    """A Mixtral (4 experts, top 2, context 96; untied, so that a random one does not just repeat its input)
    imported by model.init_from with the Llama-3-like tokenizer of tests/hf_tokenizers.py (BOS first,
    generation_config.json's eos ids [<|end_of_text|>, <|eot_id|>], Llama 3's chat template), saved as step 1 of a
    run with train.seq_len=16 on experts split over `expert`: (run dir, model dir, config.json, weights)."""
    from hf_reference import random_hf_weights, write_hf_model
    from hf_tokenizers import byte_level
    from test_hf import MIXTRAL

    root = tmp_path_factory.mktemp("imported_moe")
    config = {**MIXTRAL, "vocab_size": 600, "max_position_embeddings": 96, "tie_word_embeddings": False}
    weights = random_hf_weights(config, seed=0)
    directory = write_hf_model(root / "mixtral", config, weights)
    byte_level(directory)  # its tokenizer.json, tokenizer_config.json and generation_config.json
    run_dir = root / "run"
    overrides = ["model.compute_dtype=float32", "train.seq_len=16", "train.global_batch=8", f"run.dir={run_dir}"]
    cfg = load_config(None, [f"model.init_from=hf:{directory}", *MIXTRAL_MESH, *overrides])
    run_dir.mkdir()
    save_config(cfg, run_dir / "config.yaml")
    checkpoints = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    checkpoints.save(1, setup_run(cfg).init_state(), {}, wait=True)
    checkpoints.close()
    return run_dir, directory, config, weights


def hf_greedy(config: dict, weights: dict, ids: list[int], new: int, eos_ids: list[int], vocab: int) -> list[int]:
    """Greedy decoding by test_hf's independent float64 numpy forward of the whole sequence at each step."""
    from hf_reference import hf_forward

    ids, out = list(ids), []
    for _ in range(new):
        out.append(int(np.argmax(hf_forward(config, weights, np.array([ids]))[0, -1, :vocab])))
        ids.append(out[-1])
        if out[-1] in eos_ids:
            break
    return out


def json_rows(capsys, *args: str) -> list[dict]:
    """`jaxscale generate ARGS --json` in this process: its rows."""
    assert main(["generate", *args, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_an_imported_moe_model_answers_chat_prompts_past_train_seq_len(capsys, imported_moe_run, tmp_path):
    """`--chat` on an imported Mixtral whose experts are split over `expert`: each conversation rendered by the
    model's template gives the greedy tokens of the numpy forward, 24 new tokens after prompts of up to 44, beyond
    the 16 tokens the run was trained on (train.seq_len) and within the model's 96 (max_position_embeddings)."""
    from tokenizers import Tokenizer

    run_dir, directory, config, weights = imported_moe_run
    reference = Tokenizer.from_file(str(directory / "tokenizer.json"))
    eos_ids = [reference.token_to_id(t) for t in ("<|end_of_text|>", "<|eot_id|>")]
    prompts = tmp_path / "chat.jsonl"
    system = {"role": "system", "content": "You write Python."}
    rows = [{"messages": [system, {"role": "user", "content": "Add two numbers."}]}, {"prompt": "hi"}]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    header = "<|start_header_id|>{}<|end_header_id|>\n\n"
    texts = [
        "<|begin_of_text|>"
        + header.format("system")
        + "You write Python.<|eot_id|>"
        + header.format("user")
        + "Add two numbers.<|eot_id|>"
        + header.format("assistant"),
        "<|begin_of_text|>" + header.format("user") + "hi<|eot_id|>" + header.format("assistant"),
    ]
    got = json_rows(capsys, str(run_dir), "--chat", "--prompts", str(prompts), "--max-new-tokens", "24")
    lengths = [len(reference.encode(text, add_special_tokens=False).ids) for text in texts]
    assert max(lengths) + 24 > 16
    for row, text in zip(got, texts, strict=True):
        ids = reference.encode(text, add_special_tokens=False).ids
        want = hf_greedy(config, weights, ids, 24, eos_ids, reference.get_vocab_size())
        assert row["prompt"] == text and row["token_ids"] == want
        assert row["finish"] == ("eos" if want[-1] in eos_ids else "length") and row["tokens"] == len(want)
        assert row["completion"] == reference.decode([t for t in want if t not in eos_ids])
    assert got[1]["messages"] == [{"role": "user", "content": "hi"}]


def test_rows_end_at_a_generation_config_eos_id_and_at_a_stop_string_spanning_two_tokens(
    capsys, imported_moe_run, tmp_path
):
    """Text prompts (BOS first, as the tokenizer adds it). Row 0 ends at an id generation_config.json adds to the
    eos list, row 1 at a stop string made of the last character of one new token and the first of the next: cut
    before it, counted through the token that completed it."""
    from tokenizers import Tokenizer

    run_dir, directory, config, weights = imported_moe_run
    reference = Tokenizer.from_file(str(directory / "tokenizer.json"))
    eos_ids = [reference.token_to_id(t) for t in ("<|end_of_text|>", "<|eot_id|>")]
    vocab, bos = reference.get_vocab_size(), reference.token_to_id("<|begin_of_text|>")
    prompts = ["def add(a, b):", "The answer is"]
    free = [hf_greedy(config, weights, [bos, *reference.encode(p).ids[1:]], 20, eos_ids, vocab) for p in prompts]
    assert all(reference.encode(p).ids[0] == bos for p in prompts)

    def text(n: int) -> str:
        return reference.decode(free[1][:n])

    def stop_after(n: int) -> str:  # the last character of n new tokens' text and the first the next one adds
        before, after = text(n), text(n + 1)
        if not (len(after) > len(before) > 0 and after.startswith(before)):
            return ""
        stop = before[-1] + after[len(before)]
        return stop if "\ufffd" not in stop and after.find(stop) == len(before) - 1 else ""

    # From the third on, the first two new tokens of row 1 whose texts join without a broken character: the stop
    # string spans them.
    k = next(n for n in range(3, 19) if stop_after(n))
    stop = stop_after(k)
    # Row 0 ends at its first new token after the third that neither row has written before: made an eos id.
    stop_at = next(i for i in range(3, 20) if free[0][i] not in free[0][:i] + free[1][: k + 1])
    extra = free[0][stop_at]
    assert stop not in text(k) and len(text(k)) > 2
    assert stop not in reference.decode(free[0][: stop_at + 1]) and not set(eos_ids) & set(free[0][:stop_at])
    tokenizer_dir = tmp_path / "tokenizer"  # the run's tokenizer with one more eos id in generation_config.json
    tokenizer_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tokenizer_dir / name).write_bytes((directory / name).read_bytes())
    (tokenizer_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [*eos_ids, extra]}))
    file = tmp_path / "prompts.txt"
    file.write_text("\n".join(prompts) + "\n")
    args = [str(run_dir), f"data.tokenizer={tokenizer_dir / 'tokenizer.json'}", "--prompts", str(file)]
    got = json_rows(capsys, *args, "--max-new-tokens", "20", "--stop", stop, "--stop", "never written")
    assert got[0]["finish"] == "eos" and got[0]["token_ids"] == free[0][: stop_at + 1]
    assert got[0]["completion"] == reference.decode(free[0][:stop_at])
    assert got[1]["finish"] == "stop" and got[1]["stop"] == stop and got[1]["tokens"] == k + 1
    assert got[1]["token_ids"] == free[1][: k + 1] and got[1]["completion"] == text(k)[:-1]


def test_a_context_beyond_max_position_embeddings_is_refused(capsys, imported_moe_run):
    from tokenizers import Tokenizer

    run_dir, directory, _, _ = imported_moe_run
    count = len(Tokenizer.from_file(str(directory / "tokenizer.json")).encode("def f(").ids)  # BOS included
    new = str(96 - count + 1)
    line = error_of(capsys, "generate", str(run_dir), "--prompt", "def f(", "--max-new-tokens", new)
    assert f"The longest prompt ({count} tokens) plus --max-new-tokens {new} is 97 tokens, beyond the model's " in line
    assert f"context of 96 tokens (max_position_embeddings in {directory / 'config.json'}). Ask for at most " in line
    assert f"Ask for at most {96 - count} new tokens" in line


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
        assert completion.token_ids == want and completion.tokens == len(want)
        assert completion.finish == ("eos" if want[-1] == tokenizer.eos_id else "length")
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
                model, prompt_BP, jnp.zeros(4, jnp.int32), 8, Sampling(), jax.random.key(0), (256,), 257
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
