"""`jaxscale generate`: complete prompts with a run's newest checkpoint, on the run's mesh.

The run directory's `config.yaml` (plus overrides, e.g. a smaller mesh for fewer devices) rebuilds
the run setup; the newest usable checkpoint is read straight into its shardings, read-only (a corrupt
step is passed over and reported, never renamed), so a run that is still training can be sampled
from. Dense and mixture-of-experts models alike, on any mesh the run trains on.

Prompts are tokenized as the model's tokenizer does for inference, the way training data is: a text
prompt as `tokenizer(prompt)` (BOS where the tokenizer adds one; an EOS it would append is left off,
as a prompt is continued, not ended), and with `chat` a conversation rendered by the run's chat
template with the generation prompt (jaxscale.data.chat, as `apply_chat_template(messages,
add_generation_prompt=True, tokenize=True)`). They are left-padded into one batch (padded with copies
of the last prompt to a multiple of the batch shards) and decoded with a key/value cache
(jaxscale.models.decode).

A row ends at any of the model's eos ids (the tokenizer's `eos_ids`: generation_config.json's list, and
tokenizer_config.json's eos), at a stop string, or after `max_new_tokens`. Stop strings are looked for
in the completion's text, decoded from all its tokens so far, so one that spans several tokens (or
starts inside one) is found at the token that completes it; the text is cut before it, as vLLM does.
The decoder runs STOP_CHECK_EVERY steps at a time when there are stop strings, and the text is read
between; at most that many tokens past a stop are computed and dropped.

Context rule: the longest prompt's tokens plus `max_new_tokens` must fit the model's context
(`context_limit`): an imported model's `max_position_embeddings`, else `train.seq_len`. The cache
holds what is asked for, not the longest context.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxscale import runtime
from jaxscale.config import Config, flatten
from jaxscale.data import Tokenizer, build_tokenizer
from jaxscale.data.chat import ChatTemplate, check_messages
from jaxscale.data.sources import jsonl_lines
from jaxscale.errors import UserError
from jaxscale.families import FAMILIES
from jaxscale.hf_config import hf_directory, read_hf_config
from jaxscale.models.decode import Sampling, continue_decoding, start_decoding
from jaxscale.sharding import batch_axes, logical_to_spec, use_rules
from jaxscale.storage import run_path
from jaxscale.training.restore import open_run, run_config

STOP_CHECK_EVERY = 16  # decoding steps between two looks for stop strings


@dataclass(frozen=True)
class Conversation:
    """A chat prompt: the messages so far ({"role", "content"} dicts), and the tools the template may show."""

    messages: list[dict[str, Any]]
    tools: list | None = None


Prompt = str | Conversation


@dataclass(frozen=True)
class Completion:
    prompt: str  # the text the model continued: the prompt, or the conversation as the chat template renders it
    text: str  # the completion alone: without its eos, cut before a stop string
    tokens: int  # new tokens, through the eos or the token that completed the stop string
    finish: str  # "eos", "stop" (a stop string) or "length" (max_new_tokens)
    token_ids: list[int]  # the `tokens` new token ids
    stop: str | None = None  # the stop string found
    messages: list[dict[str, Any]] | None = None  # the conversation of a chat prompt

    def as_json(self) -> str:
        row: dict[str, Any] = {"prompt": self.prompt}
        if self.messages is not None:
            row["messages"] = self.messages
        row |= {"completion": self.text, "tokens": self.tokens, "finish": self.finish, "stop": self.stop}
        return json.dumps(row | {"token_ids": self.token_ids})


def read_prompts(prompt: str | None, prompts_file: str | None, chat: bool = False) -> list[Prompt]:
    """The prompts of `--prompt` or of `--prompts FILE`: a `.jsonl` file holds one JSON object per line, with a
    string `prompt` (other fields, such as a completion, are ignored) or, with `chat`, `messages` (and `tools`)
    as data.source=chat rows have them; any other file holds one prompt per line. With `chat` a text prompt is
    one user message."""
    if prompts_file is None:
        prompts: list[Prompt] = [prompt or ""]
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
            prompts = [_jsonl_prompt(line, f"{prompts_file}:{number}", chat) for number, line in lines]
        if not prompts:
            raise UserError(f"--prompts {prompts_file} holds no prompts; write one per line.")
    for i, text in enumerate(prompts, start=1):
        if isinstance(text, str) and not text:
            raise UserError(f"Prompt {i} is empty; give the text to continue with --prompt TEXT or --prompts FILE.")
    return [Conversation([{"role": "user", "content": p}]) if chat and isinstance(p, str) else p for p in prompts]


def _jsonl_prompt(line: str, where: str, chat: bool) -> Prompt:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where} is not valid JSON ({e}); fix that line.") from None
    if chat and isinstance(row, dict) and "messages" in row:
        return Conversation(*check_messages(row, where))
    text = row.get("prompt") if isinstance(row, dict) else None
    if not isinstance(text, str):
        wanted = 'a list "messages" or a string "prompt"' if chat else 'a string field "prompt"'
        raise UserError(f"{where} needs {wanted}; fix that line.")
    return text


def check_sampling(max_new_tokens: int, sampling: Sampling) -> None:
    """UserError for a request that samples nothing sensible."""
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens} must be at least 1.")
    if not (sampling.temperature >= 0 and sampling.top_k >= 0 and 0 < sampling.top_p <= 1):
        raise UserError(
            f"--temperature must be >= 0, --top-k >= 0 (0: no cut) and --top-p in (0, 1]; got {sampling.temperature}, "
            f"{sampling.top_k}, {sampling.top_p}."
        )
    if sampling.greedy and (sampling.top_k or sampling.top_p < 1):
        raise UserError(
            f"--top-k {sampling.top_k} / --top-p {sampling.top_p} cut the distribution a token is sampled from, but "
            "--temperature 0 (the default) decodes greedily, where they change nothing. Give --temperature > 0 "
            "(e.g. 0.7) to sample, or drop them."
        )


def context_limit(run_dir: str | Path, cfg: Config) -> tuple[int, str]:
    """The most tokens a row (prompt and new tokens) may have, and where that number comes from: a model
    imported by model.init_from has its config.json's max_position_embeddings (its family's default where the
    file has none); any other, train.seq_len, the longest sequence it was trained on."""
    saved = yaml.safe_load((run_path(run_dir) / "config.yaml").read_text()) or {}
    init_from = flatten(saved).get("model.init_from")
    where = "train.seq_len, the longest sequence the model was trained on"
    if init_from:
        directory = hf_directory(str(init_from))
        try:
            hf = read_hf_config(directory)
        except UserError:  # the imported directory is gone or changed since: the run's own context
            return cfg.train.seq_len, f"{where} ({directory / 'config.json'}, where the model came from, is unreadable)"
        family = FAMILIES[hf["architectures"][0]]
        limit = hf.get("max_position_embeddings", family.defaults.get("max_position_embeddings"))
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            return limit, f"max_position_embeddings in {directory / 'config.json'}"
    return cfg.train.seq_len, where


def prompt_text(prompt: Prompt, template: ChatTemplate | None, where: str) -> str:
    """The text the model continues: the prompt, or the conversation as `template` renders it with the
    generation prompt (`apply_chat_template(..., add_generation_prompt=True, tokenize=False)`)."""
    if isinstance(prompt, Conversation):
        assert template is not None
        return template.render(prompt.messages, add_generation_prompt=True, tools=prompt.tools, where=where)
    return prompt


def encode_prompt(text: str, tokenizer: Tokenizer, rendered: bool) -> np.ndarray:
    """A prompt's token ids, int32 [n], as the model's tokenizer makes them for inference: a chat template's
    `rendered` text without added tokens (the template writes its own), as `apply_chat_template(...,
    tokenize=True)`; any other text as `tokenizer(text)`, BOS included where the tokenizer adds one, less an EOS
    it appends (the text is to be continued, not ended)."""
    if rendered:
        return tokenizer.encode(text, add_special_tokens=False)
    encoding = tokenizer.encode_offsets(text, add_special_tokens=True)
    appended_eos = tokenizer.adds_eos and encoding.ids.size > 0 and encoding.added[-1]
    return encoding.ids[:-1] if appended_eos else encoding.ids


def encode_prompts(
    prompts: Sequence[Prompt], tokenizer: Tokenizer, template: ChatTemplate | None
) -> tuple[list[str], list[np.ndarray]]:
    """The text each prompt gives the model (`prompt_text`) and its token ids (`encode_prompt`); a UserError for a
    prompt of no tokens."""
    texts = [prompt_text(p, template, f"prompt {i}") for i, p in enumerate(prompts, start=1)]
    encoded = [encode_prompt(t, tokenizer, isinstance(p, Conversation)) for t, p in zip(texts, prompts, strict=True)]
    for i, ids in enumerate(encoded, start=1):
        if len(ids) == 0:
            raise UserError(f"Prompt {i} has no tokens; give some text to continue.")
    return texts, encoded


def chat_template(cfg: Config, tokenizer: Tokenizer) -> ChatTemplate:
    """The run's chat template (data.chat_template, else its tokenizer's directory), for `--chat`."""
    if cfg.data.tokenizer == "byte" and not cfg.data.chat_template:
        raise UserError(
            "--chat renders prompts with the run's chat template, but this run has none (data.tokenizer=byte, no "
            "data.chat_template). Give one after the run directory, e.g. data.chat_template=chat_template.jinja, "
            "or drop --chat."
        )
    return ChatTemplate.load(cfg.data, tokenizer)


def find_stop(new_G: np.ndarray, tokenizer: Tokenizer, stops: Sequence[str], checked: int) -> tuple[int, int, str]:
    """Where the first stop string lies in the text of tokens `new_G` [G], none lying in that of their first
    `checked`: (the tokens through the one that completes it, the characters of text before it, the stop string),
    or (0, 0, "") when the text holds none."""
    if not stops or not _earliest(tokenizer.decode(new_G), stops)[1]:
        return 0, 0, ""
    for count in range(checked + 1, len(new_G) + 1):
        at, stop = _earliest(tokenizer.decode(new_G[:count]), stops)
        if stop:
            return count, at, stop
    raise AssertionError("unreachable: the whole text holds a stop string")


def _earliest(text: str, stops: Sequence[str]) -> tuple[int, str]:
    """(where, which) of the stop string that starts first in `text` (the longest of those starting there), or
    (len(text), "") for none."""
    found = [(i, -len(s), s) for s in stops if (i := text.find(s)) >= 0]
    return (min(found)[0], min(found)[2]) if found else (len(text), "")


def generate(
    run_dir: str,
    prompts: Sequence[Prompt],
    max_new_tokens: int,
    sampling: Sampling,
    seed: int = 0,
    overrides: Sequence[str] = (),
    stops: Sequence[str] = (),
) -> tuple[int, list[Completion]]:
    """The completion of each prompt (a text, or a Conversation for the chat template) by the newest checkpoint of
    `run_dir`, ending at an eos id, a stop string of `stops` or `max_new_tokens`; returns (its step, completions)."""
    check_sampling(max_new_tokens, sampling)
    if any(not stop for stop in stops):
        raise UserError("--stop takes a non-empty string; drop the empty one.")
    cfg = run_config(run_dir, list(overrides))
    runtime.initialize(cfg.runtime)
    tokenizer = build_tokenizer(cfg.data)
    chat = any(isinstance(p, Conversation) for p in prompts)
    template = chat_template(cfg, tokenizer) if chat else None
    texts, encoded = encode_prompts(prompts, tokenizer, template)
    longest = max(len(ids) for ids in encoded)
    limit, where = context_limit(run_dir, cfg)
    if longest + max_new_tokens > limit:
        raise UserError(
            f"The longest prompt ({longest} tokens) plus --max-new-tokens {max_new_tokens} is "
            f"{longest + max_new_tokens} tokens, beyond the model's context of {limit} tokens ({where}). Ask for at "
            f"most {max(limit - longest, 0)} new tokens, or shorten the prompt."
        )
    setup, restored = open_run(run_dir, cfg)
    graphdef, state = nnx.split(nnx.merge(setup.graphdef, restored.state)[0])

    batch_shards = math.prod(setup.mesh.shape[a] for a in batch_axes(setup.rules, setup.mesh.shape))
    rows = -(-len(encoded) // batch_shards) * batch_shards
    padded = encoded + [encoded[-1]] * (rows - len(encoded))  # rows that fill the batch shards; dropped after
    pad_B = np.array([longest - len(ids) for ids in padded], np.int32)
    prompt_BP = np.stack(
        [np.concatenate([np.full(p, tokenizer.eos_id, np.int32), ids]) for p, ids in zip(pad_B, padded, strict=True)]
    )
    sharding = NamedSharding(setup.mesh, logical_to_spec(("batch", None), prompt_BP.shape, setup.rules, setup.mesh))
    replicated = NamedSharding(setup.mesh, PartitionSpec())  # what every host reads back
    eos_ids, key = tuple(tokenizer.eos_ids), jax.random.key(seed)

    def shared(decoding):  # the new tokens and the rows done, whole on every host
        return decoding._replace(
            tokens_BG=jax.lax.with_sharding_constraint(decoding.tokens_BG, replicated),
            done_B=jax.lax.with_sharding_constraint(decoding.done_B, replicated),
        )

    @jax.jit
    def start(state: nnx.State, prompt_BP: jax.Array, pad_B: jax.Array):
        with use_rules(setup.rules, setup.mesh):
            model = nnx.merge(graphdef, state)
            return shared(
                start_decoding(model, prompt_BP, pad_B, max_new_tokens, sampling, key, eos_ids, tokenizer.vocab_size)
            )

    @functools.partial(jax.jit, donate_argnums=1)  # the cache is updated in place
    def resume(state: nnx.State, decoding, until: jax.Array):
        with use_rules(setup.rules, setup.mesh):
            model = nnx.merge(graphdef, state)
            return shared(continue_decoding(model, decoding, until, sampling, key, eos_ids, tokenizer.vocab_size))

    started = time.perf_counter()
    decoding = start(
        state,
        jax.device_put(prompt_BP, sharding),
        jax.device_put(pad_B, NamedSharding(setup.mesh, PartitionSpec(sharding.spec[0]))),
    )
    stopped: dict[int, tuple[int, int, str]] = {}  # row -> find_stop's answer
    ended: set[int] = set()  # rows whose eos had come at the last look
    checked = 0  # tokens whose text has been looked at for stop strings
    chunk = STOP_CHECK_EVERY if stops else max_new_tokens
    while True:
        step = int(jax.device_get(decoding.step))
        if stops:
            new_BG, done_B = (np.asarray(jax.device_get(x)) for x in (decoding.tokens_BG, decoding.done_B))
            for b in set(range(len(prompts))) - stopped.keys() - ended:
                found = find_stop(_before_eos(new_BG[b, :step], eos_ids), tokenizer, stops, checked)
                if found[2]:
                    stopped[b] = found
                elif done_B[b]:
                    ended.add(b)
            checked = step
            finished = len(stopped) + len(ended) == len(prompts)
        else:
            finished = bool(np.all(jax.device_get(decoding.done_B)))
        if finished or step >= max_new_tokens:
            break
        decoding = resume(state, decoding, np.int32(min(step + chunk, max_new_tokens)))
    seconds = time.perf_counter() - started
    new_BG = np.asarray(jax.device_get(decoding.tokens_BG))
    completions = [
        _completion(texts[b], new_BG[b], tokenizer, eos_ids, stopped.get(b), prompts[b]) for b in range(len(prompts))
    ]
    if runtime.is_main_process():
        count, plural = sum(c.tokens for c in completions), "s" if len(prompts) > 1 else ""
        print(
            f"jaxscale generate: step {restored.step} of {run_dir}, mesh {dict(setup.mesh.shape)}, "
            f"{len(prompts)} prompt{plural}, {count} new tokens in {seconds:.1f} s (compile included)",
            file=sys.stderr,
            flush=True,
        )
    return restored.step, completions


def _before_eos(new_G: np.ndarray, eos_ids: Sequence[int]) -> np.ndarray:
    """A row's new tokens [G] before its first eos id."""
    ends = np.flatnonzero(np.isin(new_G, eos_ids))
    return new_G[: ends[0]] if len(ends) else new_G


def _completion(
    prompt: str,
    new_G: np.ndarray,
    tokenizer: Tokenizer,
    eos_ids: Sequence[int],
    stopped: tuple[int, int, str] | None,
    request: Prompt,
) -> Completion:
    """A prompt's new tokens [G] cut after the first eos or stop string, decoded."""
    messages = request.messages if isinstance(request, Conversation) else None
    if stopped is not None:
        count, at, stop = stopped
        ids = new_G[:count].tolist()
        return Completion(prompt, tokenizer.decode(ids)[:at], count, "stop", ids, stop, messages)
    kept = _before_eos(new_G, eos_ids)
    count = len(kept) + (len(kept) < len(new_G))
    finish = "eos" if count > len(kept) else "length"
    return Completion(prompt, tokenizer.decode(kept), count, finish, new_G[:count].tolist(), None, messages)
