"""Text -> token ids. Two kinds: raw UTF-8 bytes (no files needed) and Hugging Face `tokenizer.json` files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from jaxscale.config import DataConfig
from jaxscale.errors import UserError

# Names that tokenizer families use for their end-of-document token, most common first.
_EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]", "<|im_end|>")


class Tokenizer(Protocol):
    """What the pipeline needs from a tokenizer. Ids lie in [0, vocab_size); eos_id is one of them."""

    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text`, int32 [num_tokens], without eos."""
        ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode` of each text; a tokenizer may run these in parallel."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """The text of token ids (without eos), as `jaxscale generate` prints it."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, and 256 for end of document."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text`, int32 [num_utf8_bytes]."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode` of each text."""
        return [self.encode(text) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of byte ids; bytes that are not valid UTF-8 (a character cut short) become U+FFFD."""
        return bytes(int(i) for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizer.json`. Without a known eos token, one id past the vocabulary is used as eos."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as _RustTokenizer

        self._tokenizer = _RustTokenizer.from_file(str(path))
        size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        known = (self._tokenizer.token_to_id(name) for name in _EOS_CANDIDATES)
        eos = next((token_id for token_id in known if token_id is not None), None)
        self.eos_id: int = size if eos is None else eos
        self.vocab_size: int = max(size, self.eos_id + 1)

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text`, int32 [num_tokens]. Special tokens such as BOS are not added."""
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode` of each text, run on all cores by the Rust library."""
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(encoding.ids, dtype=np.int32) for encoding in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of token ids, special tokens left out."""
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def build_tokenizer(cfg: DataConfig) -> Tokenizer:
    """The tokenizer named by `data.tokenizer`: "byte", or the path of a tokenizer.json file."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    path = Path(cfg.tokenizer).expanduser()
    if not path.is_file():
        raise UserError(
            f"data.tokenizer='{cfg.tokenizer}' is neither 'byte' nor an existing file. Set data.tokenizer=byte, "
            "or to the path of a Hugging Face tokenizer.json file."
        )
    try:
        return HFTokenizer(path)
    except Exception as e:  # the Rust library raises a bare Exception for unreadable files
        raise UserError(
            f"data.tokenizer='{cfg.tokenizer}' could not be read as a Hugging Face tokenizer.json ({e}). "
            "Point data.tokenizer at a tokenizer.json file, or set data.tokenizer=byte."
        ) from None
