"""Logits of jaxscale's Hugging Face import and export against transformers itself.

For LlamaForCausalLM (Llama 3 rope scaling, GQA, untied head), MistralForCausalLM (without and with a
window shorter than the sequence), MixtralForCausalLM, Qwen2ForCausalLM (biases, yarn rope, a local
layer), Qwen3ForCausalLM (q/k norms, dynamic rope), Qwen3MoeForCausalLM, Gemma3ForCausalLM (local and
global layers, linear rope, soft-capped logits) and Gemma2ForCausalLM: random weights from a small
config (norm scales and biases random too), `save_pretrained`, import into jaxscale on 8 emulated CPU
devices (data=2 x fsdp=2 x tensor=2; the MoE models data=1 x fsdp=2 x expert=2 x tensor=2), compare
logits; then export the imported run with `jaxscale export`'s function, load that with
`AutoModelForCausalLM.from_pretrained` and compare again. Then jaxscale's own tiny model (tied
embeddings, byte tokenizer, vocabulary padded to 384), exported and run by transformers. Last, LoRA
runs on the imported Llama (plain, rsLoRA and DoRA with dropout; DoRA with rsLoRA on every projection,
the embedding and the head), Qwen2, Qwen3, Gemma 3 and (attention only) Qwen3-MoE, each exported as a
PEFT adapter directory loaded by `peft.PeftModel.from_pretrained` onto the transformers model, and with
--merge, compared tensor by tensor with peft's own `merge_and_unload()`. Prints the worst relative
difference (max |a - b| / max |b|) per model; exits 1 if a logit difference exceeds --tolerance or a
merged tensor's --merge-tolerance. Then `jaxscale generate` of an imported Llama against transformers'
`generate(do_sample=False)` (`check_generate`): the same prompt ids, the same greedy tokens, stopping at
the eos list of generation_config.json. Then the fine-tuning token ids against transformers' tokenizers
(scripts/check_hf_tokens.py, which also runs alone, without torch).

Needs the optional extra: pip install -e '.[hf-parity]' (torch, transformers and peft).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import jax

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
import peft  # noqa: E402
import safetensors.numpy  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))  # the tokenizers the tests build
from hf_tokenizers import byte_level  # noqa: E402

import jaxscale  # noqa: E402
from jaxscale.checkpoint import Checkpointer  # noqa: E402
from jaxscale.config import load_config, save_config  # noqa: E402
from jaxscale.data import build_tokenizer  # noqa: E402
from jaxscale.generate import Conversation, chat_template, encode_prompt, generate, prompt_text  # noqa: E402
from jaxscale.hf.export import byte_tokenizer_json, export_hf  # noqa: E402
from jaxscale.models.decode import Sampling  # noqa: E402
from jaxscale.sharding import use_rules  # noqa: E402
from jaxscale.training.base import initial_state, saved_part, with_saved  # noqa: E402
from jaxscale.training.setup import setup_run  # noqa: E402

SMALL = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.1,  # logits far from uniform, so a wrong weight shows
)
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,  # short, so that 32 positions meet all three bands
    "rope_theta": 500000.0,
}
MODELS = {
    "llama3": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(SMALL, rope_parameters=LLAMA3_SCALING, tie_word_embeddings=False),
        ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
    ),
    "mistral": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        dict(SMALL, sliding_window=None, tie_word_embeddings=False),
        ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
    ),
    "mixtral": (
        transformers.MixtralConfig,
        transformers.MixtralForCausalLM,
        dict(SMALL, num_local_experts=4, num_experts_per_tok=2, sliding_window=None, tie_word_embeddings=True),
        ["mesh.data=1", "mesh.fsdp=2", "mesh.expert=2", "mesh.tensor=2"],
    ),
    # Windows of 12 on sequences of 32: the local layers see less than the whole sequence.
    "mistral-window": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        dict(SMALL, sliding_window=12, tie_word_embeddings=False),
        ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
    ),
    # Qwen2.5's layout: q/k/v biases, tied, yarn rope (as its long-context configs), the last layer local.
    "qwen2": (
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        dict(
            SMALL,
            tie_word_embeddings=True,
            use_sliding_window=True,
            sliding_window=12,
            max_window_layers=1,
            rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        ),
        ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
    ),
    # Qwen3: q/k norms, head_dim 24 (not 64 / 4), dynamic (NTK) rope past 16 positions.
    "qwen3": (
        transformers.Qwen3Config,
        transformers.Qwen3ForCausalLM,
        dict(
            SMALL,
            head_dim=24,
            tie_word_embeddings=False,
            max_position_embeddings=16,
            rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1000000.0},
        ),
        ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
    ),
    # Qwen3-MoE: 8 experts of width 32, top-4 renormalized, layer 0 dense.
    "qwen3_moe": (
        transformers.Qwen3MoeConfig,
        transformers.Qwen3MoeForCausalLM,
        dict(
            SMALL,
            num_hidden_layers=3,
            head_dim=16,
            num_experts=8,
            num_experts_per_tok=4,
            moe_intermediate_size=32,
            mlp_only_layers=[0],
            norm_topk_prob=True,
            tie_word_embeddings=False,
        ),
        ["mesh.data=1", "mesh.fsdp=2", "mesh.expert=2", "mesh.tensor=2"],
    ),
    # Gemma 3: local, local, global, local, local (window 12, rope base 10k; the global 1M scaled by 8), q/k
    # norms, query_pre_attn_scalar 24, final logits soft-capped.
    "gemma3": (
        transformers.Gemma3TextConfig,
        transformers.Gemma3ForCausalLM,
        dict(
            SMALL,
            num_hidden_layers=5,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=12,
            layer_types=["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 2,
            final_logit_softcapping=5.0,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        ),
        ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
    ),
    # Gemma 2: attention logits soft-capped too, local and global layers alternating.
    "gemma2": (
        transformers.Gemma2Config,
        transformers.Gemma2ForCausalLM,
        dict(SMALL, head_dim=16, query_pre_attn_scalar=16, sliding_window=12, attn_logit_softcapping=2.0),
        ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
    ),
}
RUN = ["model.compute_dtype=float32", "train.seq_len=32", "train.global_batch=8", "checkpoint.async_save=false"]


def relative(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def hf_logits(model: torch.nn.Module, tokens_BL: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens_BL).long()).logits.float().numpy()


def jaxscale_logits(overrides: list[str], tokens_BL: np.ndarray) -> tuple[np.ndarray, object, object]:
    """(logits, state, setup) of the freshly set up (or imported) run of `overrides` on 8 devices."""
    setup = setup_run(load_config(None, [*overrides, *RUN]))
    state = setup.init_state()
    return model_logits(setup, state, tokens_BL), state, setup


def model_logits(setup: object, state: object, tokens_BL: np.ndarray) -> np.ndarray:
    """The float32 logits [B, L, V] of the model in `state` (eval: no dropout) on `setup`'s mesh."""

    @jax.jit
    def logits(state: nnx.State, tokens_BL: jax.Array) -> jax.Array:
        with use_rules(setup.rules, setup.mesh):
            return nnx.merge(setup.graphdef, state)[0](tokens_BL)

    return np.asarray(logits(state, jax.device_put(tokens_BL, setup.batch_sharding)))


def random_model(name: str, seed: int) -> torch.nn.Module:
    """A transformers model of MODELS[name] with random weights, its norm scales and biases random too (they start
    at ones or zeros: a norm or bias read into the wrong place would not show)."""
    config_class, model_class, kwargs, _ = MODELS[name]
    torch.manual_seed(seed)
    model = model_class(config_class(**kwargs)).float().eval()
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if "norm" in key or key.endswith(".bias"):
                value.add_(torch.randn_like(value) * 0.2)
    return model


def save_with_tokenizer(model: torch.nn.Module, source: Path) -> Path:
    """The model saved with a byte-level tokenizer.json, and a tokenizer_config.json naming its class, as a model
    directory has one (else AutoTokenizer takes the model type's class, e.g. Gemma's, which wants an <unk>)."""
    model.save_pretrained(source)
    (source / "tokenizer.json").write_text(byte_tokenizer_json())
    (source / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return source


def check(name: str, work: Path) -> tuple[float, float]:
    """Worst relative logit difference of jaxscale's import, and of transformers loading jaxscale's export."""
    _, model_class, _, mesh = MODELS[name]
    model = random_model(name, seed=0)
    source = save_with_tokenizer(model, work / name)
    tokens_BL = np.random.default_rng(0).integers(0, SMALL["vocab_size"], (8, 32)).astype(np.int32)
    want = hf_logits(model, tokens_BL)

    imported, state, setup = jaxscale_logits([f"model.init_from=hf:{source}", *mesh], tokens_BL)
    reloaded = export_and_load(state, setup, work / name)
    assert type(reloaded) is model_class, f"{name}: exported as {type(reloaded).__name__}"
    return relative(imported, want), relative(hf_logits(reloaded, tokens_BL), want)


def export_and_load(state: object, setup: object, work: Path) -> torch.nn.Module:
    """`state` saved as a run's checkpoint, exported by jaxscale, loaded by transformers' Auto class."""
    run_dir = work.with_name(f"{work.name}-run")
    run_dir.mkdir()
    save_config(setup.cfg, run_dir / "config.yaml")
    checkpoints = Checkpointer(run_dir / "checkpoints", setup.cfg.checkpoint)
    checkpoints.save(0, state, {})
    checkpoints.close()
    exported = work.with_name(f"{work.name}-exported")
    export_hf(run_dir, exported, shard_bytes=200_000)  # several shards and an index
    text = "def f(x):\n    return x * 2  # héllo"
    assert transformers.AutoTokenizer.from_pretrained(exported)(text).input_ids == list(text.encode())
    return transformers.AutoModelForCausalLM.from_pretrained(exported).float().eval()


def check_native(work: Path) -> float:
    """A model jaxscale initialized itself (tiny preset: tied embeddings, byte tokenizer, vocabulary padded to 384),
    exported: worst relative difference of transformers' logits from jaxscale's."""
    tokens_BL = np.random.default_rng(0).integers(0, 257, (8, 32)).astype(np.int32)
    cfg = ["model.init_std=0.1", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
    logits, state, setup = jaxscale_logits(cfg, tokens_BL)
    reloaded = export_and_load(state, setup, work / "native")
    assert type(reloaded) is transformers.LlamaForCausalLM
    return relative(hf_logits(reloaded, tokens_BL), logits)


PEFT_VARIANTS = {
    "lora": ["lora.dropout=0.1"],
    "rslora": ["lora.rslora=true", "lora.dropout=0.1"],
    "dora": ["lora.dora=true", "lora.dropout=0.1"],
    "dora+rslora, embed_tokens and lm_head too": [
        "lora.dora=true",
        "lora.rslora=true",
        "lora.targets=[q,k,v,o,gate,up,down,embed_tokens,lm_head]",
    ],
}


def check_peft(work: Path, name: str, variant: list[str], family: str = "llama3") -> tuple[float, float, float]:
    """A LoRA run (with `variant`'s lora.* keys) on an imported model of MODELS[family], exported as a PEFT adapter
    directory and with --merge.

    Returns the worst relative logit difference of the PEFT model (the adapter loaded by
    `peft.PeftModel.from_pretrained` onto transformers' Llama) from jaxscale's adapter model; the worst
    relative difference of the merged export's tensors from peft's own `merge_and_unload()` of that adapter;
    and how far the adapters moved the logits from the base's (so the figures are seen to measure something).
    """
    mesh = MODELS[family][3]
    tag = f"{family}-" + name.split(",")[0].replace("+", "-")
    source = save_with_tokenizer(random_model(family, seed=1), work / f"peft-base-{tag}")
    run, adapter, merged = work / f"peft-run-{tag}", work / f"peft-adapter-{tag}", work / f"peft-merged-{tag}"
    lora = ["lora.rank=4", "lora.alpha=8", *variant]  # B (and DoRA's magnitudes) move in training
    steps = ["train.steps=4", "optim.lr=3e-2", "optim.warmup_steps=0", "checkpoint.every=4", "train.eval_every=0"]
    logs = ["log.tensorboard=false", "log.progress=false", f"run.dir={run}"]
    cfg = load_config(None, [f"model.init_from=hf:{source}", *mesh, *RUN, *lora, *steps, *logs])
    rows = np.random.default_rng(1).integers(0, SMALL["vocab_size"], (64, cfg.train.seq_len + 1))
    jaxscale.train(cfg, train_source=list(rows))
    export_hf(run, adapter)  # what `jaxscale export RUN --to hf OUT` runs
    export_hf(run, merged, merge=True)  # and with --merge

    # jaxscale's adapter model as the run saved it: its adapters on the base rebuilt from the import.
    setup = setup_run(load_config(run / "config.yaml"))
    checkpoints = Checkpointer(run / "checkpoints", setup.cfg.checkpoint, read_only=True)
    _, saved = checkpoints.restore_latest(saved_part(setup, setup.state_structs))
    checkpoints.close()
    tokens_BL = np.random.default_rng(2).integers(0, SMALL["vocab_size"], (8, 32)).astype(np.int32)
    want = model_logits(setup, with_saved(initial_state(setup), saved), tokens_BL)

    base = transformers.AutoModelForCausalLM.from_pretrained(source).float().eval()
    base_logits = hf_logits(base, tokens_BL)
    adapted = peft.PeftModel.from_pretrained(base, adapter).eval()  # eval: PEFT's dropout off
    loaded = {k: v.numpy() for k, v in peft.get_peft_model_state_dict(adapted).items()}
    written = safetensors.numpy.load_file(str(adapter / "adapter_model.safetensors"))
    # PEFT's own state dict also carries a copy of an adapted embedding's and head's base weights (its
    # save_embedding_layers="auto"); jaxscale's adapter leaves them to the base it loads onto.
    assert written.keys() <= loaded.keys(), sorted(written.keys() - loaded.keys())[:4]
    assert all(".base_layer." in k for k in loaded.keys() - written.keys()), sorted(loaded.keys() - written.keys())
    assert all(np.array_equal(loaded[k], written[k]) for k in written)  # every tensor found its module
    peft_config = adapted.peft_config["default"]
    assert (peft_config.use_dora, peft_config.use_rslora) == (cfg.lora.dora, cfg.lora.rslora)
    assert peft_config.lora_dropout == cfg.lora.dropout
    adapted_error = relative(hf_logits(adapted, tokens_BL), want)

    # peft's own merge of the adapter into the base, in float32, against jaxscale's --merge export; both as
    # transformers saves them (transformers 5 holds a MoE's experts fused in memory, one tensor each on disk).
    adapted.merge_and_unload().save_pretrained(work / f"peft-unloaded-{tag}")
    unloaded = safetensors.numpy.load_file(str(work / f"peft-unloaded-{tag}" / "model.safetensors"))
    ours = safetensors.numpy.load_file(str(merged / "model.safetensors"))
    assert ours.keys() <= unloaded.keys(), sorted(ours.keys() - unloaded.keys())[:4]
    merge_error = max(relative(ours[k], unloaded[k]) for k in ours)
    return adapted_error, merge_error, relative(want, base_logits)


GENERATE_PROMPTS = [
    "def add(a, b):",
    "The answer is",
    Conversation([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]),
]


def check_generate(work: Path, new_tokens: int = 40) -> bool:
    """`jaxscale generate` of a Llama built by transformers (Llama 3 rope scaling, context 128) with the Llama-3-like
    tokenizer of tests/hf_tokenizers.py (BOS added, Llama 3's chat template), imported and saved as a run trained on
    16 tokens, against transformers' `model.generate(do_sample=False)` of each prompt alone.

    generation_config.json holds the eos list [<|end_of_text|>, <|eot_id|>, t], t the fourth new token of the
    first prompt's free greedy run (first seen there), so that a row is seen to stop at an id of that list.
    Prints, per prompt, whether jaxscale's prompt ids equal transformers' (`tokenizer(text)`, and
    `apply_chat_template(..., add_generation_prompt=True, tokenize=True)` for the conversation), its new tokens
    and why they ended. Then a stop string made of the last character of one new token of the second prompt and
    the whole text of the next: jaxscale's `--stop` must end at the same token as transformers'
    `generate(stop_strings=...)`, its text cut before the string. Returns whether all of it is equal.
    """
    source = work / "generate-llama"
    byte_level(source)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    vocab = len(hf_tokenizer)
    eos_ids = hf_tokenizer.convert_tokens_to_ids(["<|end_of_text|>", "<|eot_id|>"])
    config = dict(
        SMALL,
        vocab_size=vocab,
        rope_parameters=LLAMA3_SCALING,
        tie_word_embeddings=False,
        max_position_embeddings=128,
        bos_token_id=hf_tokenizer.bos_token_id,
        eos_token_id=eos_ids,
    )
    torch.manual_seed(2)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).float().save_pretrained(source)

    def hf_ids(prompt: str | Conversation) -> list[int]:
        if isinstance(prompt, Conversation):
            encoded = hf_tokenizer.apply_chat_template(
                prompt.messages, add_generation_prompt=True, tokenize=True, return_dict=True
            )
            return list(encoded["input_ids"])
        return list(hf_tokenizer(prompt)["input_ids"])

    def hf_generate(ids: list[int], **options: object) -> list[int]:
        model = transformers.AutoModelForCausalLM.from_pretrained(source).float().eval()  # its generation_config
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]), do_sample=False, max_new_tokens=new_tokens, pad_token_id=eos_ids[0], **options
            )
        return out[0, len(ids) :].tolist()

    free = hf_generate(hf_ids(GENERATE_PROMPTS[0]))
    extra = next(t for i, t in enumerate(free) if i >= 3 and t not in free[:i] and t not in eos_ids)
    generation = json.loads((source / "generation_config.json").read_text())
    generation["eos_token_id"] = [*eos_ids, extra]
    (source / "generation_config.json").write_text(json.dumps(generation))

    run_dir = work / "generate-llama-run"
    cfg = load_config(None, [f"model.init_from=hf:{source}", *MODELS["llama3"][3], *RUN, "train.seq_len=16"])
    run_dir.mkdir()
    save_config(cfg, run_dir / "config.yaml")
    checkpoints = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    checkpoints.save(0, setup_run(cfg).init_state(), {})
    checkpoints.close()
    _, completions = generate(str(run_dir), GENERATE_PROMPTS, new_tokens, Sampling())

    tokenizer = build_tokenizer(cfg.data)
    template = chat_template(cfg, tokenizer)
    print(f"generate: eos ids {tokenizer.eos_ids} (generation_config.json), train.seq_len 16, context 128")
    ok = True
    for prompt, completion in zip(GENERATE_PROMPTS, completions, strict=True):
        ids = hf_ids(prompt)
        ours = encode_prompt(prompt_text(prompt, template, "prompt"), tokenizer, isinstance(prompt, Conversation))
        want = hf_generate(ids)
        same_ids, same_tokens = ours.tolist() == ids, completion.token_ids == want
        ended = f"eos {want[-1]}" if want[-1] in generation["eos_token_id"] else "max_new_tokens"
        ok &= same_ids and same_tokens and completion.finish == ("eos" if ended != "max_new_tokens" else "length")
        shown = "chat" if isinstance(prompt, Conversation) else repr(prompt)
        print(
            f"  {shown}: prompt ids {'==' if same_ids else '!='} transformers' ({len(ids)}, BOS {ids[0]}); "
            f"{len(completion.token_ids)} greedy tokens {'==' if same_tokens else '!='} transformers' "
            f"generate(do_sample=False) ({len(want)}, ended at {ended}; jaxscale: {completion.finish}); "
            f"prompt + new = {len(ids) + len(want)} tokens"
        )

    prompt = GENERATE_PROMPTS[1]
    free = completions[1].token_ids
    texts = [hf_tokenizer.decode(free[:n], skip_special_tokens=True) for n in range(len(free) + 1)]

    # From the third new token on, the first whose text follows the one before it: the stop string is the last
    # character before it and its whole text (none of them a broken character).
    def stop_at(n: int) -> str:
        before, after = texts[n - 1], texts[n]
        if not (len(after) > len(before) > 0 and after.startswith(before)):
            return ""
        stop = before[-1] + after[len(before) :]
        return stop if "\ufffd" not in stop and after.find(stop) == len(before) - 1 else ""

    k = next(n for n in range(3, len(free)) if stop_at(n))
    stop = stop_at(k)
    _, (stopped,) = generate(str(run_dir), [prompt], new_tokens, Sampling(), stops=[stop])
    want = hf_generate(hf_ids(prompt), stop_strings=[stop], tokenizer=hf_tokenizer)
    same = stopped.token_ids == want and stopped.finish == "stop" and stopped.text == texts[k - 1][:-1]
    print(
        f"  {prompt!r} --stop {stop!r} (spans new tokens {k - 1} and {k}): {len(stopped.token_ids)} tokens "
        f"{'==' if stopped.token_ids == want else '!='} transformers' generate(stop_strings=...) ({len(want)}); "
        f"text cut before it: {stopped.text!r}"
    )
    return ok and same


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tolerance", type=float, default=1e-5, help="largest relative logit difference accepted")
    parser.add_argument(
        "--merge-tolerance", type=float, default=1e-6, help="largest relative difference of a merged tensor accepted"
    )
    parser.add_argument("--generate-only", action="store_true", help="run only the generate check")
    args = parser.parse_args()
    versions = f"transformers {transformers.__version__}, torch {torch.__version__}, peft {peft.__version__}"
    print(f"{versions}, jax {jax.__version__}")
    if args.generate_only:
        with tempfile.TemporaryDirectory() as work:
            return 0 if check_generate(Path(work)) else 1
    worst = 0.0
    with tempfile.TemporaryDirectory() as work:
        for name in MODELS:
            imported, exported = check(name, Path(work))
            worst = max(worst, imported, exported)
            print(f"{name:8s} import vs transformers: {imported:.2e}   export loaded by transformers: {exported:.2e}")
        native = check_native(Path(work))
        worst = max(worst, native)
        print(f"jaxscale's own tiny model, exported, in transformers vs jaxscale: {native:.2e}")
        worst_merge = 0.0
        runs = [(name, variant, "llama3") for name, variant in PEFT_VARIANTS.items()]
        runs += [("lora", ["lora.dropout=0.1"], family) for family in ("qwen2", "qwen3", "gemma3")]
        # Experts take no adapters (jaxscale refuses MLP targets on MoE models): attention only.
        runs += [("lora on attention", ["lora.targets=[q,k,v,o]"], "qwen3_moe")]
        for name, variant, family in runs:
            adapted, merged, moved = check_peft(Path(work), name, variant, family)
            worst, worst_merge = max(worst, adapted), max(worst_merge, merged)
            print(
                f"{family} {name}: PEFT adapter loaded by peft vs jaxscale: {adapted:.2e}   --merge export vs "
                f"peft's merge_and_unload(): {merged:.2e}   (the adapters moved the logits by {moved:.2e})"
            )
        generated = check_generate(Path(work))
    tokens_failed = subprocess.run([sys.executable, str(Path(__file__).with_name("check_hf_tokens.py"))]).returncode
    passed = worst <= args.tolerance and worst_merge <= args.merge_tolerance and generated and not tokens_failed
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
