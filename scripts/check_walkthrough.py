"""The "Fine-tune Llama 3.1 Instruct" walk-through of docs/fine-tuning.md, run as written on a stand-in for the
model, and checked against transformers and peft.

The stand-in is laid out as `hf download meta-llama/Llama-3.1-8B-Instruct` leaves it, only small: a
LlamaForCausalLM made by transformers (2 layers, width 128, GQA, Llama 3 rope scaling, untied head, bf16,
max_position_embeddings 131072) with config.json in the Hub file's layout, and the Llama-3.1-like tokenizer of
tests/hf_tokenizers.py (`llama31_instruct`: Llama 3.1's 256 special tokens in their order after a small byte-level
BPE, Meta's Llama 3.1 Instruct chat template, eos_token <|eot_id|>, generation_config.json's eos list
[<|end_of_text|>, <|eom_id|>, <|eot_id|>]). Beside it, data/chat/train.jsonl: 480 conversations asking 16
questions with fixed answers (some with a system message, some of two exchanges).

In a work directory holding `models/`, `data/`, and links to this checkout's `.venv` and `configs/`, every
`.venv/bin/jaxscale` line of the section's bash blocks runs as written, in order, except that `prepare` and the
first `train` get SCALE's overrides (8 emulated CPU devices, rows of 256 tokens, --steps steps at --lr: the
model is 2 layers, not 32); later `train` lines (variants: W&B) are only loaded as configs. The section's
yaml block must be configs/llama3.1-8b-instruct-qlora.yaml as it is, its json row a valid chat row, and its
python block runs as written (with this interpreter: torch, transformers, peft). Then:

- tokens: every example in the token store equals transformers' `apply_chat_template(messages, tokenize=True)`
  of one row of the file (each row once), and its learned tokens are exactly those of each assistant message
  and its <|eot_id|>, found from transformers' own renderings (the conversation up to the message with the
  generation prompt, and through it);
- generate: the walk-through's greedy `--chat` command, again with --json: the reply ends at <|eot_id|> (the id, not
  another of the eos list), and transformers' greedy `generate` of the merged export gives the same tokens;
- the PEFT adapter directory, loaded by `peft.PeftModel.from_pretrained` onto the original base (bf16 weights
  in float32), against jaxscale's logits of the same adapters on that base (float32), and onto the NF4 base the
  run trained beside (dequantized by jaxscale, written as an HF directory) against jaxscale's trained model
  (float32 compute): both within --tolerance;
- the `--merge` export loads in transformers as LlamaForCausalLM in bf16; each tensor against peft's
  `merge_and_unload()` of the adapter on the original base in float32, rounded to bf16 (count of elements a
  bf16 step apart); the same export with `--dtype float32` against that merge within --merge-tolerance, and
  its logits in transformers against the peft model's.

Needs torch, transformers and peft beside jaxscale (`pip install -e '.[hf-parity]'`, or a side environment with
them and jaxscale's site-packages on PYTHONPATH). Prints the figures; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import ml_dtypes

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
import peft  # noqa: E402
import safetensors.numpy  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO / "tests"))  # the Llama-3.1-like tokenizer the tests build
from hf_tokenizers import llama31_instruct  # noqa: E402

from jaxscale.checkpoint import Checkpointer  # noqa: E402
from jaxscale.config import load_config  # noqa: E402
from jaxscale.data.chat import check_messages  # noqa: E402
from jaxscale.data.store import open_store  # noqa: E402
from jaxscale.hf.export import write_model  # noqa: E402
from jaxscale.hf_config import hf_directory, read_hf_config  # noqa: E402
from jaxscale.models.lora import stored_base, stored_value  # noqa: E402
from jaxscale.sharding import use_rules  # noqa: E402
from jaxscale.training.base import initial_state, saved_part, with_saved  # noqa: E402
from jaxscale.training.setup import setup_run  # noqa: E402

SECTION = "## Fine-tune Llama 3.1 Instruct"
CONFIG = "configs/llama3.1-8b-instruct-qlora.yaml"
MODEL = "models/Llama-3.1-8B-Instruct"
DATA = "data/chat/train.jsonl"
# The stand-in's size: a Llama 3.1 8B config.json with these numbers in place of the real ones.
STANDIN = {
    "hidden_size": 128,
    "intermediate_size": 448,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "initializer_range": 0.05,
}
FACTS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid."),
    ("What is the capital of Egypt?", "The capital of Egypt is Cairo."),
    ("What is the capital of Canada?", "The capital of Canada is Ottawa."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("How many days are in a week?", "A week has seven days."),
    ("What color is the sky on a clear day?", "On a clear day the sky is blue."),
    ("What do bees make?", "Bees make honey."),
    ("What is 2 + 2?", "2 + 2 = 4."),
    ("What is 3 x 3?", "3 x 3 = 9."),
    ("Which planet is closest to the Sun?", "Mercury is the closest planet to the Sun."),
    ("What is the boiling point of water at sea level?", "Water boils at 100 °C at sea level."),
    ("Say hello in Spanish.", "¡Hola!"),
    ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
]
SYSTEMS = ["You are a helpful assistant.", "Answer in one sentence.", "You are a concise assistant. 😀"]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "The city's name"}},
                "required": ["city"],
            },
        },
    }
]
CITIES = ["Paris", "Tokyo", "São Paulo", "Zürich", "Cairo"]


def relative(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want|."""
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


# ---- the walk-through section of docs/fine-tuning.md ----


def section(readme: str) -> str:
    """The walk-through's text, from its heading to the next one."""
    start = readme.index(SECTION)
    end = readme.find("\n## ", start + len(SECTION))
    return readme[start : end if end >= 0 else len(readme)]


def blocks(text: str, language: str) -> list[str]:
    """The fenced code blocks of `language`, in order."""
    parts = text.split("```")
    return [part.removeprefix(language + "\n") for part in parts[1::2] if part.startswith(language + "\n")]


def jaxscale_lines(bash_blocks: list[str]) -> list[list[str]]:
    """Each `.venv/bin/jaxscale` command of the blocks as argv (continuations joined, comments dropped)."""
    commands = []
    for block in bash_blocks:
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                argv = shlex.split(part, comments=True)
                if argv and argv[0] == ".venv/bin/jaxscale":
                    commands.append(argv)
    return commands


# ---- the stand-in model and data ----


def conversations(count: int = 480, seed: int = 0) -> list[dict]:
    """Rows of data/chat/train.jsonl: one or two questions of FACTS each, 40% after a system message; and one row
    in ten a call of TOOLS' function (the template's tool branches: tools in the first user message, the call as
    JSON, its result under the ipython header)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        if rng.random() < 0.1:
            city, degrees = rng.choice(CITIES), rng.randint(-5, 35)
            call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}
            messages = [
                {"role": "user", "content": f"What is the weather in {city}?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": rng.choice(["tool", "ipython"]), "content": json.dumps({"temperature_c": degrees})},
                {"role": "assistant", "content": f"It is {degrees} °C in {city}."},
            ]
            rows.append({"messages": messages, "tools": TOOLS})
            continue
        messages = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.4 else []
        for _ in range(1 if rng.random() < 0.7 else 2):
            question, answer = rng.choice(FACTS)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        rows.append({"messages": messages})
    return rows


def build_standin(directory: Path, rows: list[dict]) -> dict:
    """The stand-in for `hf download meta-llama/Llama-3.1-8B-Instruct`; returns its generation_config.json."""
    llama31_instruct(directory, [m["content"] for row in rows for m in row["messages"] if m["content"]])
    generation = json.loads((directory / "generation_config.json").read_text())
    vocab = len(transformers.AutoTokenizer.from_pretrained(directory))
    hub = {  # the Hub's config.json of Llama-3.1-8B-Instruct, less the sizes of STANDIN
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": generation["bos_token_id"],
        "eos_token_id": generation["eos_token_id"],
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "model_type": "llama",
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.43.0.dev0",
        "use_cache": True,
        "vocab_size": vocab,
        **STANDIN,
    }
    (directory / "config.json").write_text(json.dumps(hub, indent=2))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(directory))
    model.to(torch.bfloat16).save_pretrained(directory)
    (directory / "config.json").write_text(json.dumps(hub, indent=2))  # the Hub's layout, not transformers 5's
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return generation


# ---- jaxscale's side ----


def run_state(run: Path, overrides: list[str]) -> tuple[object, nnx.State]:
    """The run's setup with `overrides` and its newest checkpoint's adapters on the base that setup builds (read
    again from model.init_from, as export and generate do; not checked against the run's base hash, so that the
    same adapters can be put on another storage of the base)."""
    setup = setup_run(load_config(run / "config.yaml", overrides))
    checkpoints = Checkpointer(run / "checkpoints", setup.cfg.checkpoint, read_only=True)
    _, saved = checkpoints.restore_latest(saved_part(setup, setup.state_structs))
    checkpoints.close()
    return setup, with_saved(initial_state(setup), saved)


def model_logits(setup: object, state: nnx.State, tokens_BL: np.ndarray) -> np.ndarray:
    """float32 logits [B, L, V] of the model in `state` (eval: no dropout)."""

    @jax.jit
    def logits(state: nnx.State, tokens_BL: jax.Array) -> jax.Array:
        with use_rules(setup.rules, setup.mesh):
            return nnx.merge(setup.graphdef, state)[0](tokens_BL)

    return np.asarray(logits(state, jax.device_put(tokens_BL, setup.batch_sharding)), np.float32)


def write_base(setup: object, state: nnx.State, out: Path) -> None:
    """The base the run computes with (the NF4 codes dequantized; the rest as stored) as a float32 HF directory."""
    model = nnx.merge(setup.graphdef, state)[0]
    base = stored_base(model)

    def value(t, m) -> np.ndarray:
        return m.to_hf(np.asarray(jax.device_get(stored_value(base[t.path], t.stack_index)), np.float64))

    plain = dataclasses.replace(setup.shape, adapters=None)
    source = read_hf_config(hf_directory(setup.cfg.model.init_from))
    write_model(value, plain, setup.cfg, source, out, 2**31, "float32")


# ---- transformers' side ----


def exact_merge(base_dir: Path, adapter_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of the merged model in float64: the base's file values, plus (alpha / r) B A of each adapted
    module from the PEFT adapter directory (no DoRA, no rsLoRA: the walk-through's run)."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert not (config["use_dora"] or config["use_rslora"])
    scale = config["lora_alpha"] / config["r"]
    adapters = safetensors.numpy.load_file(str(adapter_dir / "adapter_model.safetensors"))
    merged = {}
    for path in sorted(base_dir.glob("*.safetensors")):
        for name, value in safetensors.numpy.load_file(str(path)).items():
            merged[name] = value.astype(np.float64)
    for name, a_RI in adapters.items():
        if name.endswith(".lora_A.weight"):
            module = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b_OR = adapters[name.replace(".lora_A.", ".lora_B.")]
            merged[f"{module}.weight"] += scale * (b_OR.astype(np.float64) @ a_RI.astype(np.float64))
    return merged


def hf_logits(model: torch.nn.Module, tokens_BL: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens_BL).long()).logits.float().numpy()


def load(directory: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()


def chat_ids(tokenizer: object, messages: list[dict], generation_prompt: bool = False, tools=None) -> list[int]:
    encoded = tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=generation_prompt, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


# ---- the checks ----


def check_tokens(tokenizer: object, rows: list[dict], overrides: list[str]) -> tuple[bool, str]:
    """The store's examples against transformers' ids of the rows, and their learned tokens against the
    assistant messages' spans in transformers' renderings."""
    want = collections.Counter()
    for row in rows:
        messages, tools = row["messages"], row.get("tools")
        ids = chat_ids(tokenizer, messages, tools=tools)
        learned = np.zeros(len(ids), bool)
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                opened = chat_ids(tokenizer, messages[:i], True, tools)
                through = chat_ids(tokenizer, messages[: i + 1], tools=tools)
                assert ids[: len(through)] == through and through[: len(opened)] == opened, "not a prefix"
                learned[len(opened) : len(through)] = True
        want[(tuple(ids), tuple(learned))] += 1
    store = open_store(load_config(CONFIG, overrides).data)
    got = collections.Counter()
    for split in ("train", "eval"):
        stream = store.stream(split)
        for start, end in store.document_spans(split).tolist():
            ids, mask = stream.read(start, end), stream.read(start, end, "mask") > 0
            got[(tuple(ids.tolist()), tuple(mask.tolist()))] += 1
    same = got == want
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    ends = sum(1 for ids, mask in got.elements() if ids[-1] == eot and mask[-1])
    total = sum(got.values())
    calls = sum(1 for row in rows if row.get("tools"))
    return same, (
        f"tokens: {total} stored examples (of {len(rows)} rows, {calls} with a tool call) {'==' if same else '!='} "
        f"transformers' apply_chat_template ids, learned tokens those of its assistant turns; {ends} end with a "
        f"learned <|eot_id|>; {sum(sum(m) for _, m in got.elements())} learned of "
        f"{sum(len(i) for i, _ in got.elements())} tokens"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="train.steps of the stand-in run (default 150)")
    parser.add_argument("--lr", type=float, default=3e-3, help="optim.lr of the stand-in run (default 3e-3)")
    parser.add_argument("--tolerance", type=float, default=1e-5, help="largest relative logit difference")
    parser.add_argument("--merge-tolerance", type=float, default=1e-6, help="largest relative merged-tensor diff")
    parser.add_argument("--work", help="the work directory (default: a temporary one, removed after)")
    args = parser.parse_args()
    print(
        f"transformers {transformers.__version__}, torch {torch.__version__}, peft {peft.__version__}, "
        f"jax {jax.__version__}"
    )
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        return walk(Path(args.work).resolve(), args)
    with tempfile.TemporaryDirectory() as work:
        return walk(Path(work), args)


def walk(work: Path, args: argparse.Namespace) -> int:
    text = section((REPO / "docs" / "fine-tuning.md").read_text())
    (config_block,) = blocks(text, "yaml")
    assert config_block == (REPO / CONFIG).read_text(), f"the walk-through's yaml block is not {CONFIG}"
    for row in blocks(text, "json"):
        check_messages(json.loads(row), "the walk-through's json row")
    (snippet,) = blocks(text, "python")
    commands = jaxscale_lines(blocks(text, "bash"))

    rows = conversations()
    (work / "data/chat").mkdir(parents=True, exist_ok=True)
    (work / DATA).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    generation = build_standin(work / MODEL, rows)
    for name in (".venv", "configs"):
        if not (work / name).exists():
            (work / name).symlink_to(REPO / name)
    os.chdir(work)
    env = os.environ | {"JAXSCALE_CACHE": str(work / "cache")}
    env.pop("PYTHONPATH", None)  # the commands run in jaxscale's own environment
    scale = [
        "runtime.cpu_devices=8",
        "train.seq_len=256",
        f"train.steps={args.steps}",
        f"optim.lr={args.lr}",
        "log.progress=false",
    ]
    print(f"work directory {work}; the stand-in run's overrides: {' '.join(scale)}")

    ok, outputs, trained = True, {}, False
    for argv in commands:
        verb = argv[1]
        if verb == "train" and trained:
            load_config(argv[2], [*argv[3:], *scale])  # a variant of the run: its keys must be valid
            print(f"$ {shlex.join(argv)}  (loaded, not run)")
            continue
        extra = scale if verb in ("prepare", "train") else []
        print(f"$ {shlex.join(argv + extra)}", flush=True)
        done = subprocess.run(argv + extra, env=env, capture_output=True, text=True)
        if done.returncode:
            print(done.stdout[-3000:], done.stderr[-3000:])
            return 1
        outputs.setdefault(verb, []).append(done.stdout)
        trained |= verb == "train"
        shown = [line for line in done.stdout.splitlines() if line.strip()]
        print("  " + "\n  ".join(shown[-3:] if verb != "train" else shown[:3] + ["..."] + shown[-3:]))

    tokenizer = transformers.AutoTokenizer.from_pretrained(work / MODEL)
    same, line = check_tokens(tokenizer, rows, scale)
    ok &= same
    print(line)

    run = work / "runs/llama3.1-8b-qlora"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    start = next(m for m in metrics if m.get("event") == "start")
    print(
        f"train: loss {losses[0]:.3f} (step {metrics[0]['step']} to the first log) -> {losses[-1]:.3f}, eval_loss "
        f"{evals[0]:.3f} (step 0) -> "
        f"{evals[-1]:.3f}; data_fill_ratio {start['data_fill_ratio']}, {start['data_rows']} rows"
    )

    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    greedy = next(a for a in commands if a[1] == "generate" and "--temperature" not in a)
    done = subprocess.run([*greedy, "--json"], env=env, capture_output=True, text=True, check=True)
    reply = json.loads(done.stdout.splitlines()[-1])
    question = greedy[greedy.index("--prompt") + 1]
    at_eot = reply["finish"] == "eos" and reply["token_ids"][-1] == eot
    ok &= at_eot
    print(
        f"generate --chat {question!r}: {reply['completion']!r}, {reply['tokens']} tokens, finish {reply['finish']} "
        f"at id {reply['token_ids'][-1]} ({'<|eot_id|>' if at_eot else 'not <|eot_id|>'}; eos list "
        f"{generation['eos_token_id']}); the training answer: {dict(FACTS)[question]!r}"
    )

    # Logits: the 8 longest training conversations, cut to the shortest of them.
    ids = sorted((chat_ids(tokenizer, r["messages"], tools=r.get("tools")) for r in rows), key=len)[-8:]
    tokens_BL = np.array([i[: min(map(len, ids))] for i in ids], np.int32)
    adapter_dir, merged_dir = work / "exports/llama3.1-8b-chat-adapter", work / "exports/llama3.1-8b-chat"

    setup, state = run_state(run, ["lora.base_quant=none", "model.compute_dtype=float32"])
    ours_bf16_base = model_logits(setup, state, tokens_BL)
    base = load(work / MODEL)
    base_logits = hf_logits(base, tokens_BL)
    adapted = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    theirs = hf_logits(adapted, tokens_BL)
    error = relative(theirs, ours_bf16_base)
    ok &= error <= args.tolerance
    print(
        f"PEFT adapter in peft on the original base (bf16 weights in float32) vs jaxscale's adapters on it: "
        f"{error:.2e} (the adapters moved the logits by {relative(theirs, base_logits):.2e})"
    )

    setup, state = run_state(run, ["model.compute_dtype=float32"])
    ours_nf4 = model_logits(setup, state, tokens_BL)
    write_base(setup, state, work / "nf4-base")
    on_nf4 = peft.PeftModel.from_pretrained(load(work / "nf4-base"), adapter_dir).eval()
    error_nf4 = relative(hf_logits(on_nf4, tokens_BL), ours_nf4)
    ok &= error_nf4 <= args.tolerance
    print(
        f"PEFT adapter in peft on the NF4 base the run trained beside (dequantized) vs jaxscale's trained model: "
        f"{error_nf4:.2e} (NF4 vs bf16 base, same adapters: {relative(ours_nf4, ours_bf16_base):.2e})"
    )

    # Merges: peft's own in float32 on the original base, against jaxscale's --merge exports.
    unloaded = {k: v.numpy() for k, v in adapted.merge_and_unload().state_dict().items()}
    exported = safetensors.numpy.load_file(str(merged_dir / "model.safetensors"))
    exact = exact_merge(work / MODEL, adapter_dir)
    loaded = load(merged_dir, dtype=None)
    exported_ok = type(loaded) is transformers.LlamaForCausalLM and loaded.dtype == torch.bfloat16
    exported_ok &= exported.keys() == exact.keys()
    elements, unequal, apart = sum(v.size for v in exported.values()), 0, 0
    for name, value in exported.items():
        unequal += int(np.count_nonzero(value != exact[name].astype(ml_dtypes.bfloat16)))
        apart += int(np.count_nonzero(value != unloaded[name].astype(ml_dtypes.bfloat16)))
    exported_ok &= unequal == 0
    print(
        f"--merge export: {type(loaded).__name__} in {loaded.dtype}; {elements - unequal} of {elements} elements "
        f"equal the float64 merge (bf16 base from its files, B A from the adapter files) rounded once to bf16; "
        f"peft's float32 merge_and_unload() rounded to bf16 differs from it in {apart} (rounded twice)"
    )
    ok &= exported_ok
    f32_dir = work / "exports/llama3.1-8b-chat-f32"
    subprocess.run(
        [".venv/bin/jaxscale", "export", str(run), "--to", "hf", str(f32_dir), "--merge", "--dtype", "float32"],
        env=env,
        capture_output=True,
        check=True,
    )
    f32 = safetensors.numpy.load_file(str(f32_dir / "model.safetensors"))
    merge_error = max(relative(f32[k], unloaded[k]) for k in f32)
    merged_logits = hf_logits(load(f32_dir), tokens_BL)
    merged_error = relative(merged_logits, theirs)
    ok &= merge_error <= args.merge_tolerance and merged_error <= args.tolerance
    print(
        f"--merge --dtype float32 export vs peft's merge_and_unload(): {merge_error:.2e} (worst tensor); its logits "
        f"in transformers vs the peft model's: {merged_error:.2e}"
    )

    prompt = chat_ids(tokenizer, [{"role": "user", "content": question}], True)
    with torch.no_grad():
        out = loaded.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32)
    hf_new = out[0, len(prompt) :].tolist()
    print(
        f"transformers' greedy generate of the bf16 merged export: {tokenizer.decode(hf_new[:-1])!r}, ends at "
        f"id {hf_new[-1]}; {'the same tokens as' if hf_new == reply['token_ids'] else 'other tokens than'} "
        f"jaxscale generate (NF4 base)"
    )

    done = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True)
    print(f"the walk-through's python block: exit {done.returncode}, printed {done.stdout.splitlines()}")
    ok &= done.returncode == 0
    print("all checks passed" if ok else "A CHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
