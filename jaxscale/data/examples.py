"""Fine-tuning examples -> token ids and the tokens learned: one string, tokenized once, masks from offsets.

An example is rendered to one string and tokenized once, as Hugging Face does, and the trained tokens are
found from character offsets:

- chat (`{"messages": [{"role": ..., "content": ...}, ...], "tools": [...]}`, tools optional): the ids of
  `tokenizer.apply_chat_template(messages, tokenize=True)`: the rendered text (jaxscale.data.chat) encoded
  without added special tokens (the template writes BOS and each turn's end token itself; nothing is
  appended). Trained: the tokens that overlap the assistant's spans (chat.ChatTemplate.render_with_spans),
  from the first such token to the last of each span.
- prompt/completion (`{"prompt": ..., "completion": ...}`), as TRL's SFTTrainer: the completion gets the
  tokenizer's eos_token text appended unless it ends with it already (or the tokenizer appends an eos
  itself: then TRL's would be a second one, which jaxscale leaves out), and the ids are
  `tokenizer(prompt + completion)`: BOS/EOS as the tokenizer adds them. Trained: the tokens that overlap
  the completion, and an EOS the tokenizer adds.

The byte tokenizer has no eos text, so its examples (and those of a tokenizer with no eos token) end with
its eos id, trained when the example ends with an answer.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxscale.config import DataConfig
from jaxscale.data.chat import ChatTemplate, Span, check_messages
from jaxscale.data.sources import FINETUNE_SOURCES
from jaxscale.data.tokenizers import Encoding, Tokenizer
from jaxscale.errors import UserError

__all__ = ["FINETUNE_SOURCES", "ExampleEncoder", "covering"]


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
