"""Fine-tuning examples: prompt/completion pairs or chat conversations, trained on the answers only.

`data.source=prompt_completion` reads jsonl rows `{"prompt": ..., "completion": ...}`;
`data.source=stdlib_functions` makes such pairs from the standard library (jaxscale.data.stdlib_task);
`data.source=chat` reads rows `{"messages": [{"role": ..., "content": ...}, ...], "tools": [...]}` (tools
optional) and renders them with a chat template (jaxscale.data.chat).

An example is rendered to one string and tokenized once, as Hugging Face does, and the trained tokens are
found from character offsets:

- chat: the ids of `tokenizer.apply_chat_template(messages, tokenize=True)`: the rendered text encoded
  without added special tokens (the template writes BOS and each turn's end token itself; nothing is
  appended). Trained: the tokens that overlap the assistant's spans (chat.ChatTemplate.render_with_spans),
  from the first such token to the last of each span.
- prompt/completion, as TRL's SFTTrainer: the completion gets the tokenizer's eos_token text appended
  unless it ends with it already (or the tokenizer appends an eos itself: then TRL's would be a second
  one, which jaxscale leaves out), and the ids are `tokenizer(prompt + completion)`: BOS/EOS as the
  tokenizer adds them. Trained: the tokens that overlap the completion, and an EOS the tokenizer adds.

The byte tokenizer has no eos text, so its examples (and those of a tokenizer with no eos token) end with
its eos id, trained when the example ends with an answer. An example longer than train.seq_len + 1 tokens
is cut to that length and counted (`data_truncated_examples`), never dropped. Rows are split into train and
eval by a hash of `file:line` (of the function's name for stdlib_functions), as documents are.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jaxscale.config import DataConfig
from jaxscale.data.chat import ChatTemplate, Span, check_messages
from jaxscale.data.packing import ExampleBatches
from jaxscale.data.sources import in_eval_split, jsonl_lines, match_paths
from jaxscale.data.stdlib_task import stdlib_function_examples
from jaxscale.data.tokenizers import Encoding, Tokenizer, build_tokenizer
from jaxscale.errors import UserError

FINETUNE_SOURCES = ("prompt_completion", "chat", "stdlib_functions")


class ExampleEncoder:
    """Fine-tuning rows -> (token ids int32 [n], trained bool [n]): `trained[t]` says whether token t is
    learned, i.e. carries loss where it is the target (see the module docstring)."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer) -> None:
        self.source = cfg.source
        self.tokenizer = tokenizer
        self.template = ChatTemplate.load(cfg, tokenizer) if cfg.source == "chat" else None

    def row(self, row: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
        """The example of one jsonl row (its file:line is `where`, for messages)."""
        if self.template is None:
            fields = [row.get(k) if isinstance(row, dict) else None for k in ("prompt", "completion")]
            if not all(isinstance(f, str) for f in fields):
                raise UserError(
                    f"{where} needs string fields 'prompt' and 'completion' (data.source=prompt_completion); "
                    f"fix that row, or use data.source=chat for rows of 'messages'."
                )
            return self.prompt_completion(*fields)
        messages, tools = check_messages(row, where)
        return self.chat(messages, tools, where)

    def prompt_completion(self, prompt: str, completion: str) -> tuple[np.ndarray, np.ndarray]:
        """`tokenizer(prompt + completion + eos_token)` and its completion tokens."""
        tokenizer = self.tokenizer
        eos = tokenizer.eos_token
        if eos is not None and not tokenizer.adds_eos and not completion.endswith(eos):
            completion += eos
        encoding = tokenizer.encode_offsets(prompt + completion, add_special_tokens=True)
        trained = covering(encoding, [(len(prompt), len(prompt) + len(completion))])
        after_text = np.arange(encoding.ids.size) > _last_text_token(encoding)
        return self._closed(encoding.ids, trained | (encoding.added & after_text), trained_end=True)

    def chat(self, messages: list[dict[str, Any]], tools: list | None, where: str) -> tuple[np.ndarray, np.ndarray]:
        """`apply_chat_template(messages, tokenize=True)` and its assistant tokens."""
        assert self.template is not None
        text, spans = self.template.render_with_spans(messages, tools, where)
        encoding = self.tokenizer.encode_offsets(text, add_special_tokens=False)
        return self._closed(encoding.ids, covering(encoding, spans), messages[-1]["role"] == "assistant")

    def _closed(self, ids: np.ndarray, trained: np.ndarray, trained_end: bool) -> tuple[np.ndarray, np.ndarray]:
        """A tokenizer with no eos text (the byte tokenizer) ends the example with its eos id."""
        if self.tokenizer.eos_token is not None:
            return ids, trained
        return np.append(ids, np.int32(self.tokenizer.eos_id)), np.append(trained, trained_end)


def covering(encoding: Encoding, spans: list[Span]) -> np.ndarray:
    """bool [n]: for each span of characters, the tokens from the first to the last that overlap it (as
    transformers' return_assistant_tokens_mask marks the tokens from the one holding a span's first character
    to the one holding its last)."""
    starts, ends = encoding.offsets[:, 0], encoding.offsets[:, 1]
    trained = np.zeros(encoding.ids.size, bool)
    for start, end in spans:
        hit = np.flatnonzero((starts < end) & (ends > start) & ~encoding.added)
        if hit.size:
            trained[hit[0] : hit[-1] + 1] = True
    return trained


def _last_text_token(encoding: Encoding) -> int:
    text_tokens = np.flatnonzero(~encoding.added)
    return int(text_tokens[-1]) if text_tokens.size else -1


class FineTuneBatches(ExampleBatches):
    """Rows of fine-tuning examples, one example per row padded with loss-free eos; `truncated` counts
    examples cut at seq_len + 1 tokens."""

    def __init__(self, cfg: DataConfig, split: str, seq_len: int, global_batch: int) -> None:
        tokenizer = build_tokenizer(cfg)
        encoder = ExampleEncoder(cfg, tokenizer) if cfg.source != "stdlib_functions" else None
        self.truncated = 0
        rows = [
            self._row(ids, trained, tokenizer.eos_id, seq_len)
            for ids, trained in _examples(cfg, split, seq_len, encoder, tokenizer)
        ]
        if not rows:
            raise UserError(
                f"The {split} split of data.source='{cfg.source}' (data.paths='{cfg.paths}') holds no examples. Add "
                f"rows to data.paths or change data.eval_fraction."
            )
        super().__init__(rows, seq_len, global_batch, cfg.seed)

    def describe(self) -> dict[str, int]:
        return super().describe() | {"data_truncated_examples": self.truncated}

    def _row(self, tokens: np.ndarray, trained: np.ndarray, eos_id: int, seq_len: int) -> dict[str, np.ndarray]:
        if len(tokens) > seq_len + 1:
            self.truncated += 1
            tokens, trained = tokens[: seq_len + 1], trained[: seq_len + 1]
        pad = seq_len + 1 - len(tokens)
        tokens = np.concatenate([tokens, np.full(pad, eos_id, np.int32)])
        trained = np.concatenate([trained, np.zeros(pad, bool)])
        return {"inputs": tokens[:-1], "targets": tokens[1:], "loss_mask": trained[1:].astype(np.float32)}


def _examples(
    cfg: DataConfig, split: str, seq_len: int, encoder: ExampleEncoder | None, tokenizer: Tokenizer
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each example of the split as (ids, trained)."""
    if encoder is not None:
        return (encoder.row(row, where) for row, where in read_rows(cfg, split))
    if cfg.paths.strip():
        raise UserError(
            f"data.paths='{cfg.paths}' is set, but data.source=stdlib_functions makes its examples from Python's "
            "standard library and would ignore it. Remove data.paths, or set data.source=prompt_completion."
        )
    encoder = ExampleEncoder(DataConfig(source="prompt_completion"), tokenizer)
    # At most seq_len bytes: with the closing eos, an example fills at most one row of the byte tokenizer.
    examples = stdlib_function_examples(split, cfg.eval_fraction, max_bytes=seq_len)
    return (encoder.prompt_completion(e.prompt, e.completion) for e in examples)


def read_rows(cfg: DataConfig, split: str) -> Iterator[tuple[Any, str]]:
    """Each JSON row of the split, with its `file:line`, from the jsonl files of data.paths."""
    for path in match_paths(cfg):
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{path} cannot be read ({e}). Fix the file or remove it from data.paths.") from None
        for number, line in jsonl_lines(text):
            where = f"{path}:{number}"
            if not line.strip() or in_eval_split(where, cfg.eval_fraction) != (split == "eval"):
                continue
            try:
                yield json.loads(line), where
            except json.JSONDecodeError as e:
                raise UserError(f"{where} is not valid JSON ({e}). Fix or remove that line.") from None
