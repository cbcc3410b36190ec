"""Packed token windows, indexed by (step, row): the batch of a step is a pure function of seed, step and data config.

Documents are tokenized once at startup and joined into one stream with eos after each document (packing: no
padding inside the stream). Window k holds tokens [k * seq_len, (k + 1) * seq_len] inclusive, so neighbouring
windows share one token and every token but the first is a target exactly once per epoch. A grain shuffle
over window ids, reseeded each epoch, maps example index `step * global_batch + row` to a window, so any host
can compute any row without reading the others, and resuming at step s needs no saved iterator state.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import grain
import numpy as np

from jaxscale.config import DataConfig
from jaxscale.data.sources import iter_documents
from jaxscale.data.tokenizers import Tokenizer, build_tokenizer
from jaxscale.errors import UserError

# Documents handed to the tokenizer at once: enough for a parallel tokenizer to use every core, few enough
# that the untokenized text of one chunk stays small.
_ENCODE_CHUNK_DOCS = 1024


def pack_documents(texts: Iterable[str], tokenizer: Tokenizer) -> np.ndarray:
    """One token stream [sum(len(doc) + 1)]: each document followed by eos. uint16 when the vocabulary fits.

    Documents with no tokens (empty files) are dropped rather than left as a lone eos.
    """
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    chunks = []
    for texts_chunk in itertools.batched(texts, _ENCODE_CHUNK_DOCS):
        encoded = tokenizer.encode_batch(texts_chunk)
        pieces = [piece for ids in encoded if ids.size for piece in (ids.astype(dtype), eos)]
        if pieces:
            chunks.append(np.concatenate(pieces))
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)


class _PackedWindows:
    """Random-access view of a token stream as windows of seq_len + 1 tokens (a grain data source).

    The last window may run past the stream's end; it is padded with id 0 and reports how many of its
    targets are real.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        self._tokens = tokens
        self._seq_len = seq_len
        self._count = -(-(tokens.size - 1) // seq_len)  # ceil: the tail of the stream is kept, padded

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        start = index * self._seq_len
        window = np.zeros(self._seq_len + 1, dtype=np.int32)
        real = self._tokens[start : start + self._seq_len + 1]
        window[: real.size] = real
        return window, real.size - 1


class TokenBatches:
    """Rows of the batches of one split, each row a window of seq_len + 1 packed tokens.

    Args:
      cfg: where documents come from, the tokenizer, the shuffle seed and the eval share.
      split: "train" or "eval".
      seq_len: tokens per row of `inputs` and `targets`.
      global_batch: rows per step over all hosts; row r of step s is example s * global_batch + r.
    """

    def __init__(self, cfg: DataConfig, split: str, seq_len: int, global_batch: int) -> None:
        if seq_len < 1 or global_batch < 1:
            raise ValueError(f"seq_len and global_batch must be positive, got {seq_len} and {global_batch}")
        if not 0 <= cfg.seed < 2**32:
            raise UserError(f"data.seed={cfg.seed} must be in [0, 2**32); set data.seed to a non-negative integer.")
        tokenizer = build_tokenizer(cfg)
        self._tokens = pack_documents(iter_documents(cfg, split), tokenizer)
        if self._tokens.size < 2:
            raise UserError(
                f"The {split} split of data.source='{cfg.source}' holds no documents with text. Add data to "
                "data.paths, or change data.eval_fraction (it must be above 0 for an eval split and below 1 "
                "to leave documents for training)."
            )
        self.vocab_size: int = tokenizer.vocab_size
        self.eos_id: int = tokenizer.eos_id
        self.seq_len = seq_len
        self.global_batch = global_batch
        windows = _PackedWindows(self._tokens, seq_len)
        self.num_windows: int = len(windows)
        # shuffle() seeds epoch e with seed + e, so each pass over the data has its own order.
        self._examples = grain.MapDataset.source(windows).shuffle(seed=cfg.seed).repeat()

    @property
    def tokens_per_epoch(self) -> int:
        """Tokens in the packed stream of this split, eos included."""
        return int(self._tokens.size)

    def rows(self, step: int, row_ids: np.ndarray | Sequence[int]) -> dict[str, np.ndarray]:
        """Rows `row_ids` of the batch of `step`.

        Returns:
          inputs: int32 [n, seq_len] token ids.
          targets: int32 [n, seq_len], inputs shifted left by one: targets[:, t] follows inputs[:, t].
          loss_mask: float32 [n, seq_len], 1 where the target is a real token, 0 where it is padding.
        """
        row_ids = np.asarray(row_ids, dtype=np.int64).reshape(-1)
        if step < 0 or np.any((row_ids < 0) | (row_ids >= self.global_batch)):
            raise ValueError(f"step must be >= 0 and rows in [0, {self.global_batch}), got {step} and {row_ids}")
        windows = np.zeros((row_ids.size, self.seq_len + 1), dtype=np.int32)
        num_targets = np.zeros((row_ids.size, 1), dtype=np.int64)
        for i, row in enumerate(row_ids):
            windows[i], num_targets[i] = self._examples[step * self.global_batch + int(row)]
        loss_mask = np.arange(self.seq_len) < num_targets
        return {
            "inputs": np.ascontiguousarray(windows[:, :-1]),
            "targets": np.ascontiguousarray(windows[:, 1:]),
            "loss_mask": loss_mask.astype(np.float32),
        }
