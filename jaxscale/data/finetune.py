"""Fine-tuning examples: prompt/completion pairs or chat conversations, trained on the answers only.

`data.source=prompt_completion` reads jsonl rows `{"prompt": ..., "completion": ...}`;
`data.source=stdlib_functions` makes such pairs from the standard library (jaxscale.data.stdlib_task);
`data.source=chat` reads rows `{"messages": [{"role": ..., "content": ...}, ...]}` and renders them
with the chat template of a tokenizer_config.json (`data.chat_template`, default: the one beside
data.tokenizer), in a sandboxed Jinja environment as Hugging Face does. Only completion tokens,
or the assistant's turns, carry loss. Each example is one row: prompt and answer then eos, cut at
train.seq_len + 1 tokens (counted as truncated, never dropped) and padded with loss-free eos.
Rows are split into train and eval by a hash of `file:line` (of the function's name for stdlib_functions), as
documents are.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jaxscale.config import DataConfig
from jaxscale.data.packing import ExampleBatches
from jaxscale.data.sources import in_eval_split, jsonl_lines, match_paths
from jaxscale.data.stdlib_task import stdlib_function_examples
from jaxscale.data.tokenizers import Tokenizer, build_tokenizer
from jaxscale.errors import UserError

FINETUNE_SOURCES = ("prompt_completion", "chat", "stdlib_functions")
Segment = tuple[str, bool]  # a piece of an example's text, and whether it carries loss


class FineTuneBatches(ExampleBatches):
    """Rows of fine-tuning examples (see the module docstring); `truncated` counts examples cut at seq_len."""

    def __init__(self, cfg: DataConfig, split: str, seq_len: int, global_batch: int) -> None:
        tokenizer = build_tokenizer(cfg)
        self.truncated = 0
        examples = [self._tokenized(segments, tokenizer, seq_len) for segments in _examples(cfg, split, seq_len)]
        if not examples:
            raise UserError(
                f"The {split} split of data.source='{cfg.source}' (data.paths='{cfg.paths}') holds no examples. Add "
                f"rows to data.paths or change data.eval_fraction."
            )
        super().__init__(examples, seq_len, global_batch, cfg.seed)

    def describe(self) -> dict[str, int]:
        return super().describe() | {"data_truncated_examples": self.truncated}

    def _tokenized(self, segments: list[Segment], tokenizer: Tokenizer, seq_len: int) -> dict[str, np.ndarray]:
        pieces = [tokenizer.encode(text) for text, _ in segments]
        tokens = np.concatenate([*pieces, [tokenizer.eos_id]]).astype(np.int32)
        # A token carries loss where it is predicted as part of an answer; the closing eos with the last answer.
        flags = [np.full(len(piece), trained, bool) for piece, (_, trained) in zip(pieces, segments, strict=True)]
        trained = np.concatenate([*flags, [segments[-1][1]]])
        if len(tokens) > seq_len + 1:
            self.truncated += 1
            tokens, trained = tokens[: seq_len + 1], trained[: seq_len + 1]
        pad = seq_len + 1 - len(tokens)
        tokens = np.concatenate([tokens, np.full(pad, tokenizer.eos_id, np.int32)])
        trained = np.concatenate([trained, np.zeros(pad, bool)])
        return {"inputs": tokens[:-1], "targets": tokens[1:], "loss_mask": trained[1:].astype(np.float32)}


def _examples(cfg: DataConfig, split: str, seq_len: int) -> Iterator[list[Segment]]:
    """Each example of the split as its text segments."""
    if cfg.source != "stdlib_functions":
        return read_segments(cfg, split)
    if cfg.paths.strip():
        raise UserError(
            f"data.paths='{cfg.paths}' is set, but data.source=stdlib_functions makes its examples from Python's "
            "standard library and would ignore it. Remove data.paths, or set data.source=prompt_completion."
        )
    # At most seq_len bytes: with the closing eos, an example fills at most one row of the byte tokenizer.
    examples = stdlib_function_examples(split, cfg.eval_fraction, max_bytes=seq_len)
    return iter([[(e.prompt, False), (e.completion, True)] for e in examples])


def read_segments(cfg: DataConfig, split: str) -> Iterator[list[Segment]]:
    """Each example of the split as its text segments, from the jsonl files of data.paths."""
    template = ChatTemplate.load(cfg) if cfg.source == "chat" else None
    for path in match_paths(cfg):
        try:
            lines = jsonl_lines(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{path} cannot be read ({e}). Fix the file or remove it from data.paths.") from None
        for number, line in lines:
            if not line.strip() or in_eval_split(f"{path}:{number}", cfg.eval_fraction) != (split == "eval"):
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where} is not valid JSON ({e}). Fix or remove that line.") from None
            if template is None:
                yield _prompt_completion(row, where)
            else:
                yield template.segments(_messages(row, where), where)


def _prompt_completion(row: Any, where: str) -> list[Segment]:
    fields = [row.get(k) if isinstance(row, dict) else None for k in ("prompt", "completion")]
    if not all(isinstance(f, str) for f in fields):
        raise UserError(
            f"{where} needs string fields 'prompt' and 'completion' (data.source=prompt_completion); "
            f"fix that row, or use data.source=chat for rows of 'messages'."
        )
    return [(fields[0], False), (fields[1], True)]


def _messages(row: Any, where: str) -> list[dict[str, str]]:
    messages = row.get("messages") if isinstance(row, dict) else None
    turns_ok = isinstance(messages, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    )
    if not (turns_ok and messages):
        raise UserError(
            f'{where} needs a field \'messages\': a list of {{"role": ..., "content": ...}} (data.source=chat); '
            f"fix that row."
        )
    return messages


class ChatTemplate:
    """A tokenizer_config.json's `chat_template`, rendered in a sandbox (no file or attribute access)."""

    def __init__(self, source: str, config: dict[str, Any], path: Path) -> None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.path = path
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self._template = environment.from_string(source)
        # Templates name the special tokens by these variables.
        self._tokens = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token")}

    @classmethod
    def load(cls, cfg: DataConfig) -> ChatTemplate:
        path = Path(cfg.chat_template or Path(cfg.tokenizer).parent / "tokenizer_config.json").expanduser()
        if cfg.tokenizer == "byte" and not cfg.chat_template:
            raise UserError(
                "data.source=chat needs a chat template; set data.chat_template to a tokenizer_config.json that "
                "holds one (data.tokenizer=byte has none)."
            )
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"data.chat_template: {path} cannot be read as JSON ({e}).") from None
        source = config.get("chat_template") if isinstance(config, dict) else None
        if not isinstance(source, str):
            raise UserError(f"{path} has no string 'chat_template'; point data.chat_template at one that has.")
        return cls(source, config, path)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self._tokens)

    def segments(self, messages: list[dict[str, str]], where: str) -> list[Segment]:
        """The rendered conversation cut at each turn; the assistant's turns carry loss, the rest (and the
        prompt that opens an assistant turn) do not."""
        out: list[Segment] = []
        done = ""
        for i, message in enumerate(messages):
            opened = self.render(messages[:i], add_generation_prompt=True) if message["role"] == "assistant" else done
            full = self.render(messages[: i + 1])
            if not (opened.startswith(done) and full.startswith(opened)):
                raise UserError(
                    f"{where}: the chat template of {self.path} does not render this conversation turn by turn "
                    f"(an earlier turn changes when a later one is added), so the answers cannot be told apart."
                )
            out += [(opened[len(done) :], False), (full[len(opened) :], message["role"] == "assistant")]
            done = full
        return [(text, trained) for text, trained in out if text]


def _token_text(token: Any) -> str:
    """A special token as tokenizer_config.json spells it: a string, or a dict with its `content`."""
    if isinstance(token, dict):
        return str(token.get("content", ""))
    return token if isinstance(token, str) else ""
