"""`jaxscale generate`: complete prompts with a run's newest checkpoint, on the run's mesh.

The run directory's `config.yaml` (plus overrides, e.g. a smaller mesh for fewer devices) rebuilds
the run setup; the newest usable checkpoint is read straight into its shardings, read-only (a corrupt
step is passed over and reported, never renamed), so a run that is still training can be sampled
from. Prompts are tokenized with the run's tokenizer, left-padded into one batch (padded with copies
of the last prompt to a multiple of the batch shards), and decoded with a key/value cache (jaxscale.models.decode).

Context rule: the longest prompt's tokens plus `max_new_tokens` must fit `train.seq_len`, the
longest sequence the model was trained on (override train.seq_len to go further at your own risk).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxscale import runtime
from jaxscale.data import Tokenizer, build_tokenizer
from jaxscale.data.sources import jsonl_lines
from jaxscale.errors import UserError
from jaxscale.models.decode import Sampling, generate_tokens
from jaxscale.sharding import batch_axes, logical_to_spec, use_rules
from jaxscale.training.restore import open_run, run_config


@dataclass(frozen=True)
class Completion:
    prompt: str
    text: str  # the completion alone, without its eos
    tokens: int  # new tokens, eos included when it came
    stopped_at_eos: bool

    def as_json(self) -> str:
        return json.dumps(
            {"prompt": self.prompt, "completion": self.text, "tokens": self.tokens, "eos": self.stopped_at_eos}
        )


def read_prompts(prompt: str | None, prompts_file: str | None) -> list[str]:
    """The prompts of `--prompt` or of `--prompts FILE`: a `.jsonl` file holds one JSON object with a string
    `prompt` per line (other fields, such as a completion, are ignored), any other file one prompt per line."""
    if prompts_file is None:
        prompts = [prompt or ""]
    else:
        path = Path(prompts_file)
        try:
            lines = jsonl_lines(path.read_text(encoding="utf-8"))  # "\n" only, as every jsonl reader
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--prompts {prompts_file} cannot be read ({e}). Give a text or .jsonl file.") from None
        lines = [(number, line) for number, line in lines if line.strip()]
        if path.suffix != ".jsonl":
            prompts = [line for _, line in lines]
        else:
            prompts = [_jsonl_prompt(line, f"{prompts_file}:{number}") for number, line in lines]
        if not prompts:
            raise UserError(f"--prompts {prompts_file} holds no prompts; write one per line.")
    for i, text in enumerate(prompts, start=1):
        if not text:
            raise UserError(f"Prompt {i} is empty; give the text to continue with --prompt TEXT or --prompts FILE.")
    return prompts


def _jsonl_prompt(line: str, where: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where} is not valid JSON ({e}); fix that line.") from None
    text = row.get("prompt") if isinstance(row, dict) else None
    if not isinstance(text, str):
        raise UserError(f'{where} needs a string field "prompt"; fix that line.')
    return text


def generate(
    run_dir: str,
    prompts: Sequence[str],
    max_new_tokens: int,
    sampling: Sampling,
    seed: int = 0,
    overrides: Sequence[str] = (),
) -> tuple[int, list[Completion]]:
    """The completion of each prompt by the newest checkpoint of `run_dir`; returns (its step, completions)."""
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens} must be at least 1.")
    if not (sampling.temperature >= 0 and 0 < sampling.top_p <= 1):
        raise UserError(
            f"--temperature must be >= 0 and --top-p in (0, 1]; got {sampling.temperature}, {sampling.top_p}."
        )
    cfg = run_config(run_dir, list(overrides))
    runtime.initialize(cfg.runtime)
    tokenizer = build_tokenizer(cfg.data)
    encoded = [tokenizer.encode(text) for text in prompts]
    for i, ids in enumerate(encoded, start=1):
        if len(ids) == 0:
            raise UserError(f"Prompt {i} has no tokens; give some text to continue.")
    longest = max(len(ids) for ids in encoded)
    if longest + max_new_tokens > cfg.train.seq_len:
        raise UserError(
            f"The longest prompt ({longest} tokens) plus --max-new-tokens {max_new_tokens} exceeds the "
            f"{cfg.train.seq_len} tokens the model was trained on (train.seq_len). Ask for at most "
            f"{max(cfg.train.seq_len - longest, 0)} new tokens, or shorten the prompt."
        )
    if cfg.model.num_experts:
        raise UserError(
            f"jaxscale generate decodes dense models only; this run has mixture-of-experts layers "
            f"(model.num_experts={cfg.model.num_experts})."
        )
    setup, restored = open_run(run_dir, cfg)
    step = restored.step
    graphdef, state = nnx.split(nnx.merge(setup.graphdef, restored.state)[0])

    batch_shards = math.prod(setup.mesh.shape[a] for a in batch_axes(setup.rules, setup.mesh.shape))
    rows = -(-len(encoded) // batch_shards) * batch_shards
    padded = encoded + [encoded[-1]] * (rows - len(encoded))  # rows that fill the batch shards; dropped after
    pad_B = np.array([longest - len(ids) for ids in padded], np.int32)
    prompt_BP = np.stack(
        [np.concatenate([np.full(p, tokenizer.eos_id, np.int32), ids]) for p, ids in zip(pad_B, padded, strict=True)]
    )
    sharding = NamedSharding(setup.mesh, logical_to_spec(("batch", None), prompt_BP.shape, setup.rules, setup.mesh))

    @jax.jit
    def decode(state: nnx.State, prompt_BP: jax.Array, pad_B: jax.Array, key: jax.Array) -> jax.Array:
        with use_rules(setup.rules, setup.mesh):
            model = nnx.merge(graphdef, state)
            return generate_tokens(
                model, prompt_BP, pad_B, max_new_tokens, sampling, key, tokenizer.eos_id, tokenizer.vocab_size
            )

    started = time.perf_counter()
    new_BG = jax.device_get(
        decode(
            state,
            jax.device_put(prompt_BP, sharding),
            jax.device_put(pad_B, NamedSharding(setup.mesh, PartitionSpec(sharding.spec[0]))),
            jax.random.key(seed),
        )
    )
    seconds = time.perf_counter() - started
    kept_BG = new_BG[: len(prompts)]
    completions = [_completion(text, new_G, tokenizer) for text, new_G in zip(prompts, kept_BG, strict=True)]
    if runtime.is_main_process():
        count, plural = sum(c.tokens for c in completions), "s" if len(prompts) > 1 else ""
        print(
            f"jaxscale generate: step {step} of {run_dir}, mesh {dict(setup.mesh.shape)}, "
            f"{len(prompts)} prompt{plural}, {count} new tokens in {seconds:.1f} s (compile included)",
            file=sys.stderr,
            flush=True,
        )
    return step, completions


def _completion(prompt: str, new_G: np.ndarray, tokenizer: Tokenizer) -> Completion:
    """A prompt's new tokens [G] cut after the first eos, decoded."""
    ends = np.flatnonzero(new_G == tokenizer.eos_id)
    kept = new_G[: ends[0]] if len(ends) else new_G
    return Completion(prompt, tokenizer.decode(kept), len(kept) + (1 if len(ends) else 0), bool(len(ends)))
