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
from typing import Any

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

    The last window may run past the stream's end; it is padded with id 0 and its loss mask covers
    only the real targets.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        self._tokens = tokens
        self._seq_len = seq_len
        self._count = -(-(tokens.size - 1) // seq_len)  # ceil: the tail of the stream is kept, padded

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        start = index * self._seq_len
        window = np.zeros(self._seq_len + 1, dtype=np.int32)
        real = self._tokens[start : start + self._seq_len + 1]
        window[: real.size] = real
        mask = (np.arange(self._seq_len) < real.size - 1).astype(np.float32)
        return {"inputs": window[:-1], "targets": window[1:], "loss_mask": mask}


class ExampleBatches:
    """Rows of the batches of one split, from any random-access source of examples (anything grain can index).

    Row r of step s is example `s * global_batch + r` of the source shuffled by `seed` (reshuffled each
    epoch), so any host computes any row without reading the others and resuming at step s needs no
    iterator state. An example is either a 1-D array of seq_len + 1 token ids (inputs, then targets
    shifted by one, every target counted) or a dict of `inputs` and `targets` ([seq_len] ints) with an
    optional float `loss_mask` ([seq_len], 0 where a target is not trained on).

    Args:
      examples: a sequence with `__len__` and `__getitem__(int)`, e.g. a grain data source.
      seq_len: tokens per row of `inputs` and `targets`.
      global_batch: rows per step over all hosts.
      seed: the shuffle seed.
    """

    def __init__(self, examples: Sequence[Any], seq_len: int, global_batch: int, seed: int = 0) -> None:
        if seq_len < 1 or global_batch < 1:
            raise ValueError(f"seq_len and global_batch must be positive, got {seq_len} and {global_batch}")
        if not 0 <= seed < 2**32:
            raise UserError(f"data.seed={seed} must be in [0, 2**32); set data.seed to a non-negative integer.")
        if len(examples) == 0:
            raise UserError("The data source holds no examples; give it at least one row of seq_len + 1 tokens.")
        self.seq_len = seq_len
        self.global_batch = global_batch
        self._examples = self._dataset(examples, seed)
        self._size = len(examples)

    def _dataset(self, examples: Sequence[Any], seed: int) -> grain.MapDataset:
        """Example index -> example, for every index: the source shuffled, each epoch in its own order."""
        return grain.MapDataset.source(examples).shuffle(seed=seed).repeat()  # epoch e is seeded with seed + e

    def rows(self, step: int, row_ids: np.ndarray | Sequence[int]) -> dict[str, np.ndarray]:
        """Rows `row_ids` of the batch of `step`.

        Returns:
          inputs: int32 [n, seq_len] token ids.
          targets: int32 [n, seq_len], inputs shifted left by one: targets[:, t] follows inputs[:, t].
          loss_mask: float32 [n, seq_len], 1 where the target is trained on, 0 where it is not (padding).
        """
        row_ids = np.asarray(row_ids, dtype=np.int64).reshape(-1)
        if step < 0 or np.any((row_ids < 0) | (row_ids >= self.global_batch)):
            raise ValueError(f"step must be >= 0 and rows in [0, {self.global_batch}), got {step} and {row_ids}")
        out = {
            "inputs": np.zeros((row_ids.size, self.seq_len), np.int32),
            "targets": np.zeros((row_ids.size, self.seq_len), np.int32),
            "loss_mask": np.zeros((row_ids.size, self.seq_len), np.float32),
        }
        for i, row in enumerate(row_ids):
            index = step * self.global_batch + int(row)
            for key, value in self._example(index).items():
                out[key][i] = value
        return out

    def describe(self) -> dict[str, int]:
        """Figures about the data for the run's log: how many examples the source holds."""
        return {"data_examples": self._size}

    def tokens_by_source(self, step: int) -> dict[str, int]:
        """One source: nothing to split (see jaxscale.data.mixture)."""
        return {}

    def _example(self, index: int) -> dict[str, np.ndarray]:
        record = self._examples[index]
        if isinstance(record, dict):
            example = {k: np.asarray(record[k]) for k in ("inputs", "targets") if k in record}
            mask = record.get("loss_mask")
            example["loss_mask"] = np.ones(self.seq_len, np.float32) if mask is None else np.asarray(mask)
        else:
            window = np.asarray(record)
            example = (
                {"inputs": window[:-1], "targets": window[1:], "loss_mask": np.ones(self.seq_len, np.float32)}
                if window.shape == (self.seq_len + 1,)
                else {}
            )
        if len(example) != 3 or any(v.shape != (self.seq_len,) for v in example.values()):
            raise UserError(
                f"Example {index % self._size} of the data source is not a row of this run: expected a 1-D array "
                f"of train.seq_len + 1 = {self.seq_len + 1} token ids, or a dict of 'inputs' and 'targets' "
                f"({self.seq_len} token ids each) with an optional 'loss_mask'; got {_describe_record(record)}."
            )
        return example


def _describe_record(record: Any) -> str:
    if isinstance(record, dict):
        return "a dict of " + ", ".join(f"{k} {np.shape(v)}" for k, v in record.items())
    return f"{type(record).__name__} of shape {np.shape(record)}"


class TokenBatches(ExampleBatches):
    """The packed corpus a data config names: documents -> one token stream -> windows of seq_len + 1 tokens.

    Args:
      cfg: where documents come from, the tokenizer, the shuffle seed and the eval share.
      split: "train" or "eval".
      seq_len: tokens per row of `inputs` and `targets`.
      global_batch: rows per step over all hosts.
    """

    def __init__(self, cfg: DataConfig, split: str, seq_len: int, global_batch: int) -> None:
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
        windows = _PackedWindows(self._tokens, seq_len)
        self.num_windows: int = len(windows)
        super().__init__(windows, seq_len, global_batch, cfg.seed)

    @property
    def tokens_per_epoch(self) -> int:
        """Tokens in the packed stream of this split, eos included."""
        return int(self._tokens.size)
