"""Text -> token ids. Two kinds: raw UTF-8 bytes (no files needed) and Hugging Face tokenizer files.

A Hugging Face tokenizer is its `tokenizer.json` read by the `tokenizers` library, with the files that
transformers reads beside it: tokenizer_config.json (the special tokens by name; `add_bos_token` and
`add_eos_token`), generation_config.json and config.json (the ids that end a generation). Special tokens
come from those files, never from a guess by name, whenever the files name them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from jaxscale.config import DataConfig
from jaxscale.errors import UserError

# Names that tokenizer families use for their end-of-document token, most common first: the last resort for a
# tokenizer.json without a tokenizer_config.json that names its eos_token.
_EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]", "<|im_end|>")
# tokenizer_config.json keys that name special tokens; chat templates see them as variables of these names.
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclass(frozen=True)
class Encoding:
    """Token ids of one text with where each token lies in it.

    ids: int32 [n]. offsets: int64 [n, 2], the characters [start, end) of the text each token covers.
    added: bool [n], True for the tokens the tokenizer adds around the text (BOS, EOS), which cover none.
    """

    ids: np.ndarray
    offsets: np.ndarray
    added: np.ndarray


class Tokenizer(Protocol):
    """What the pipeline needs from a tokenizer. Ids lie in [0, vocab_size).

    eos_id is the token that ends a document in pretraining (each document is followed by it);
    eos_ids are all the ids that end a generation (eos_id among them); bos_id is the token the tokenizer
    puts before a text when asked to add special tokens, or None; adds_eos whether it also puts an eos
    after it; eos_token and special_tokens are the text forms of the special tokens (for chat templates;
    None or absent where the tokenizer has none).
    """

    vocab_size: int
    eos_id: int
    eos_ids: tuple[int, ...]
    bos_id: int | None
    adds_eos: bool
    eos_token: str | None
    special_tokens: dict[str, str]

    def encode(self, text: str, add_special_tokens: bool = False) -> np.ndarray:
        """Token ids of `text`, int32 [num_tokens]; with `add_special_tokens`, BOS/EOS as the tokenizer adds them
        (what transformers' `tokenizer(text)` gives)."""
        ...

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[np.ndarray]:
        """`encode` of each text; a tokenizer may run these in parallel."""
        ...

    def encode_offsets(self, text: str, add_special_tokens: bool) -> Encoding:
        """`encode` of one text, with the characters each token covers."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """The text of token ids (special tokens left out), as `jaxscale generate` prints it."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, and 256 for end of document. It adds no special tokens to a text."""

    vocab_size = 257
    eos_id = 256
    eos_ids = (256,)
    bos_id = None
    adds_eos = False
    eos_token = None
    special_tokens: dict[str, str] = {}

    def encode(self, text: str, add_special_tokens: bool = False) -> np.ndarray:
        """Token ids of `text`, int32 [num_utf8_bytes]."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[np.ndarray]:
        """`encode` of each text."""
        return [self.encode(text) for text in texts]

    def encode_offsets(self, text: str, add_special_tokens: bool) -> Encoding:
        """Each byte with the character it belongs to: offsets [num_utf8_bytes, 2]."""
        ids = self.encode(text)
        char_of_byte = np.repeat(np.arange(len(text)), [len(c.encode("utf-8")) for c in text])
        offsets = np.stack([char_of_byte, char_of_byte + 1], axis=1).reshape(-1, 2)
        return Encoding(ids, offsets.astype(np.int64), np.zeros(ids.size, bool))

    def decode(self, ids: Sequence[int]) -> str:
        """The text of byte ids; bytes that are not valid UTF-8 (a character cut short) become U+FFFD."""
        return bytes(int(i) for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizer.json`, with tokenizer_config.json, generation_config.json and config.json
    read from its directory where they exist (see the module docstring).

    eos_id: tokenizer_config.json's `eos_token` (what transformers calls `tokenizer.eos_token_id`); without
    one, the first of a few common names the vocabulary holds; without any, one id past the vocabulary.
    eos_ids: generation_config.json's `eos_token_id` (an id or a list; else config.json's), then eos_id.
    BOS and EOS around a text: the tokenizer.json post-processor's, unless tokenizer_config.json sets
    `add_bos_token` / `add_eos_token` otherwise; then those decide, as transformers' Llama and Gemma
    tokenizers rebuild their post-processor from them.
    """

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as _RustTokenizer

        self.path = Path(path)
        self._tokenizer = _RustTokenizer.from_file(str(path))
        # special_tokens_map.json is where older repositories name them; tokenizer_config.json comes first.
        config = _read_config(self.path.parent / "special_tokens_map.json")
        config |= _read_config(self.path.parent / "tokenizer_config.json")
        self.special_tokens = {k: v for k in SPECIAL_TOKEN_KEYS if (v := token_text(config.get(k))) is not None}
        size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        named = self.special_tokens.get("eos_token")
        known = [named] if named is not None else list(_EOS_CANDIDATES)
        eos = next((i for i in map(self._tokenizer.token_to_id, known) if i is not None), None)
        self.eos_id: int = size if eos is None else eos
        self.eos_token: str | None = self._tokenizer.id_to_token(eos) if eos is not None else None
        self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys([*self._generation_eos_ids(), self.eos_id]))
        self.vocab_size: int = max(size, *(i + 1 for i in self.eos_ids))
        self._follow_config(config)
        probe = self._tokenizer.encode("a", add_special_tokens=True)
        added = [sequence is None for sequence in probe.sequence_ids]
        self.bos_id: int | None = probe.ids[0] if added and added[0] else None
        self.adds_eos: bool = len(added) > 1 and added[-1]

    def _generation_eos_ids(self) -> list[int]:
        """generation_config.json's eos ids, else config.json's (as transformers' GenerationConfig takes them)."""
        for name in ("generation_config.json", "config.json"):
            value = _read_config(self.path.parent / name).get("eos_token_id")
            if value is not None:
                ids = value if isinstance(value, list) else [value]
                if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                    raise UserError(
                        f"{self.path.parent / name}: eos_token_id={value!r} must be a token id or a list of them."
                    )
                return ids
        return []

    def _follow_config(self, config: dict[str, Any]) -> None:
        """Make BOS/EOS around a text follow tokenizer_config.json's add_bos_token / add_eos_token where it sets
        them and the post-processor does otherwise."""
        from tokenizers import processors

        probe = self._tokenizer.encode("a", add_special_tokens=True)
        added = [sequence is None for sequence in probe.sequence_ids]
        adds_bos, adds_eos = bool(added and added[0]), bool(len(added) > 1 and added[-1])
        set_bos, set_eos = (config.get(k) for k in ("add_bos_token", "add_eos_token"))
        want_bos = adds_bos if not isinstance(set_bos, bool) else set_bos
        want_eos = adds_eos if not isinstance(set_eos, bool) else set_eos
        if (want_bos, want_eos) == (adds_bos, adds_eos):
            return
        tokens = {}
        for wanted, key in ((want_bos, "bos_token"), (want_eos, "eos_token")):
            token = self.special_tokens.get(key)
            token_id = self._tokenizer.token_to_id(token) if token is not None else None
            if wanted and token_id is not None:  # a tokenizer without that token adds none, as transformers
                tokens[key] = (token, token_id)

        def sequence(name: str, type_id: int) -> str:  # transformers' template: [bos] $A [eos], and so for $B
            ends = [f"{tokens[k][0]}:{type_id}" if k in tokens else "" for k in ("bos_token", "eos_token")]
            return " ".join(filter(None, [ends[0], f"${name}:{type_id}", ends[1]]))

        self._tokenizer.post_processor = processors.TemplateProcessing(
            single=sequence("A", 0),
            pair=f"{sequence('A', 0)} {sequence('B', 1)}",
            special_tokens=list(tokens.values()),
        )

    def encode(self, text: str, add_special_tokens: bool = False) -> np.ndarray:
        """Token ids of `text`, int32 [num_tokens]."""
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[np.ndarray]:
        """`encode` of each text, run on all cores by the Rust library."""
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [np.asarray(encoding.ids, dtype=np.int32) for encoding in encodings]

    def encode_offsets(self, text: str, add_special_tokens: bool) -> Encoding:
        """`encode` of one text with character offsets (the library's, in characters of `text`)."""
        encoding = self._tokenizer.encode(text, add_special_tokens=add_special_tokens)
        offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        added = np.array([sequence is None for sequence in encoding.sequence_ids], dtype=bool)
        return Encoding(np.asarray(encoding.ids, dtype=np.int32), offsets, added)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of token ids, special tokens left out."""
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def tokenizer_files(cfg: DataConfig) -> list[Path]:
    """The files of `data.tokenizer` that decide its tokens (none for the byte tokenizer): what a token store
    records, so that a change of any of them asks for the store to be prepared again."""
    if cfg.tokenizer == "byte":
        return []
    path = tokenizer_path(cfg)
    beside = [path.parent / name for name in ("tokenizer_config.json", "generation_config.json", "config.json")]
    return [path, *(p for p in beside if p.is_file())]


def tokenizer_path(cfg: DataConfig) -> Path:
    """The tokenizer.json of `data.tokenizer`: the path itself, or tokenizer.json in that directory."""
    path = Path(cfg.tokenizer).expanduser()
    return path / "tokenizer.json" if path.is_dir() else path


def build_tokenizer(cfg: DataConfig) -> Tokenizer:
    """The tokenizer named by `data.tokenizer`: "byte", or a Hugging Face tokenizer.json (or its directory)."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    path = tokenizer_path(cfg)
    if not path.is_file():
        raise UserError(
            f"data.tokenizer='{cfg.tokenizer}' is neither 'byte' nor an existing tokenizer.json or directory "
            "holding one. Set data.tokenizer=byte, or to the path of a Hugging Face tokenizer.json file."
        )
    try:
        return HFTokenizer(path)
    except UserError:
        raise
    except Exception as e:  # the Rust library raises a bare Exception for unreadable files
        raise UserError(
            f"data.tokenizer='{cfg.tokenizer}' could not be read as a Hugging Face tokenizer.json ({e}). "
            "Point data.tokenizer at a tokenizer.json file, or set data.tokenizer=byte."
        ) from None


def _read_config(path: Path) -> dict[str, Any]:
    """A JSON object file beside the tokenizer; {} where there is none."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} cannot be read as JSON ({e}). Fix or remove it.") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} holds {type(value).__name__}, not a JSON object. Fix or remove it.")
    return value


def token_text(token: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string, or a dict with its `content`."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None
