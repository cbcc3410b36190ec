"""Packed token windows, indexed by (step, row): the batch of a step is a pure function of seed, step and data config.

Documents are tokenized once into a token store (jaxscale.data.store) and joined into one stream with eos after
each document (packing: no padding inside the stream). Window k holds tokens [k * seq_len, (k + 1) * seq_len]
inclusive, so neighbouring windows share one token and every token but the first is a target exactly once per
epoch. A grain shuffle over window ids, reseeded each epoch, maps example index `step * global_batch + row` to a
window, so any host can compute any row without reading the others, and resuming at step s needs no saved
iterator state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from jaxscale.config import DataConfig
from jaxscale.data.sources import SPLITS
from jaxscale.data.store import open_store
from jaxscale.errors import UserError


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
    """The packed corpus a data config names, read from its token store: one token stream per split, seen as
    windows of seq_len + 1 tokens.

    The store is prepared on first use (`jaxscale prepare` does it ahead, with a progress bar); a store that no
    longer matches its sources or tokenizer is refused. Start-up reads the store's manifest only, and a row reads
    only its own window's pages, so start-up time and memory do not grow with the corpus.

    Args:
      cfg: where documents come from, the tokenizer, the store, the shuffle seed and the eval share.
      split: "train" or "eval".
      seq_len: tokens per row of `inputs` and `targets`.
      global_batch: rows per step over all hosts.
    """

    def __init__(self, cfg: DataConfig, split: str, seq_len: int, global_batch: int) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 0 <= cfg.seed < 2**32:
            raise UserError(f"data.seed={cfg.seed} must be in [0, 2**32); set data.seed to a non-negative integer.")
        store = open_store(cfg)
        if store.tokens(split) < 2:
            raise UserError(
                f"The {split} split of data.source='{cfg.source}' holds no documents with text. Add data to "
                "data.paths, or change data.eval_fraction (it must be above 0 for an eval split and below 1 "
                "to leave documents for training)."
            )
        self.store_path = store.path
        self.vocab_size: int = store.vocab_size
        self.eos_id: int = store.eos_id
        self.tokens_per_epoch: int = store.tokens(split)  # tokens of the split's stream, eos included
        windows = store.windows(split, seq_len)
        self.num_windows: int = len(windows)
        super().__init__(windows, seq_len, global_batch, cfg.seed)
