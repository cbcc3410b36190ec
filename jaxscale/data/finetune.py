"""Fine-tuning rows: examples from the token store, packed several to a row, trained on the answers only.

`data.source=prompt_completion` reads jsonl rows `{"prompt": ..., "completion": ...}`;
`data.source=stdlib_functions` makes such pairs from the standard library (jaxscale.data.stdlib_task);
`data.source=chat` reads rows `{"messages": [...], "tools": [...]}` and renders them with a chat template.
`jaxscale prepare` (or the first run) tokenizes them once into the token store (jaxscale.data.examples says
how: one string, tokenized as Hugging Face does, learned tokens from character offsets), with a flag per
token saying whether it is learned. Rows are split into train and eval by a hash of `file:line` (of the
function's name for stdlib_functions), as documents are.

Rows of seq_len + 1 tokens are made from the examples by a table built once per split and seq_len and
kept in the store (rows-<seq_len>-<packing>.*):

- `data.packing=segmented`: first-fit decreasing. Examples are taken longest first (ties in store order)
  and each goes into the first row with room for it, so rows end up nearly full (`data_fill_ratio` in the
  run's start row: example tokens / (rows x (seq_len + 1)); 0.99 for the stdlib task at seq_len 1024).
  Within a row its examples stay in store order. Each row carries `segment_ids` (one per example; the
  padding after the last one gets its own) and `positions` (0 at each example's first token), so
  attention stays within an example and positions restart: each example's loss is what it would be
  alone. No loss crosses from one example to the next or onto padding.
- `data.packing=concat`: one example per row, padded (no segment ids).

An example longer than a row (seq_len + 1 tokens) is cut to a row and counted
(`data_truncated_examples`), never dropped; except that stdlib_functions leaves such functions out
(`data_left_out_examples`), as its task is whole functions. The grain shuffle then orders the rows,
reshuffled each epoch, so the batch of a step is a pure function of (seed, step, data config and store):
resuming is bitwise, and each host reads only its own rows' bytes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from jaxscale.config import DataConfig
from jaxscale.data.packing import ExampleBatches
from jaxscale.data.sources import FINETUNE_SOURCES
from jaxscale.data.store import TokenStore, open_store, store_lock, write_atomic
from jaxscale.errors import UserError

__all__ = ["FINETUNE_SOURCES", "FineTuneBatches", "first_fit_decreasing", "pack_rows"]


def first_fit_decreasing(sizes: np.ndarray, capacity: int) -> np.ndarray:
    """The row of each item (int64 [n]) when items of `sizes` (each <= capacity) are taken largest first (ties
    by index) and each put into the first row with room. A max-tree over the rows' free room finds that row
    in O(log n)."""
    count = len(sizes)
    leaves = 1 << max(1, (count - 1).bit_length())
    free = [capacity] * (2 * leaves)  # free[node]: the most room of any row under node; rows are leaves
    row_of = np.zeros(count, np.int64)
    for item in np.argsort(-np.asarray(sizes), kind="stable").tolist():
        size = int(sizes[item])
        node = 1
        while node < leaves:
            node = 2 * node if free[2 * node] >= size else 2 * node + 1
        row_of[item] = node - leaves
        free[node] -= size
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return row_of


def pack_rows(
    spans_Ex2: np.ndarray, row_tokens: int, segmented: bool, leave_out_long: bool
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Rows of examples: (row_starts int64 [rows + 1], member spans int64 [members, 2], figures).

    Row r holds the examples whose [start, end) stream spans are members[row_starts[r] : row_starts[r + 1]], in
    store order; a span longer than `row_tokens` is cut to it (or, with `leave_out_long`, its example left out).
    """
    lengths = spans_Ex2[:, 1] - spans_Ex2[:, 0]
    long = lengths > row_tokens
    kept = ~long if leave_out_long else np.ones(len(lengths), bool)
    spans = spans_Ex2[kept].copy()
    spans[:, 1] = np.minimum(spans[:, 1], spans[:, 0] + row_tokens)
    sizes = spans[:, 1] - spans[:, 0]
    row_of = first_fit_decreasing(sizes, row_tokens) if segmented else np.arange(len(sizes))
    order = np.lexsort((np.arange(len(sizes)), row_of))  # by row, then store order
    rows = int(row_of.max()) + 1 if len(sizes) else 0
    row_starts = np.concatenate([[0], np.cumsum(np.bincount(row_of, minlength=rows))]).astype(np.int64)
    figures = {
        "examples": int(len(lengths)),
        "rows": rows,
        "members": int(len(sizes)),
        "truncated": 0 if leave_out_long else int(long.sum()),
        "left_out": int(long.sum()) if leave_out_long else 0,
        "fill_ratio": float(sizes.sum() / max(rows * row_tokens, 1)),
    }
    return row_starts, spans[order].astype(np.int64), figures


class PackedRows:
    """The rows of one split of a fine-tuning store at one seq_len (a grain data source; see the module
    docstring). Row r is read from the store when asked for: its table entries, then its examples' bytes."""

    def __init__(self, store: TokenStore, split: str, seq_len: int, segmented: bool, leave_out_long: bool) -> None:
        self.seq_len = seq_len
        self.segmented = segmented
        self._stream = store.stream(split)
        self._eos = store.eos_id
        base = store.path / split / f"rows-{seq_len}-{'segmented' if segmented else 'single'}"
        self._starts_path, self._spans_path = base.with_suffix(".starts"), base.with_suffix(".spans")
        figures_path = base.with_suffix(".json")
        if not self._complete(figures_path):
            with store_lock(store.path.parent):  # one process builds, the others on this machine wait and read it
                if not self._complete(figures_path):
                    starts, spans, figures = pack_rows(
                        store.document_spans(split), seq_len + 1, segmented, leave_out_long
                    )
                    write_atomic(self._starts_path, starts.tobytes())
                    write_atomic(self._spans_path, spans.tobytes())
                    write_atomic(figures_path, json.dumps(figures).encode())  # last: the table is complete
        self.figures: dict[str, Any] = json.loads(figures_path.read_text())

    def _complete(self, figures_path: Path) -> bool:
        """Whether the table is written whole (its figures last, and its arrays of the sizes they say)."""
        if not figures_path.is_file():
            return False
        figures = json.loads(figures_path.read_text())
        sizes = {self._starts_path: 8 * (figures["rows"] + 1), self._spans_path: 16 * figures["members"]}
        return all(path.is_file() and path.stat().st_size == size for path, size in sizes.items())

    def __len__(self) -> int:
        return int(self.figures["rows"])

    def __getitem__(self, row: int) -> dict[str, np.ndarray]:
        first, last = _pread_int64(self._starts_path, row, 2)
        spans = _pread_int64(self._spans_path, 2 * int(first), 2 * int(last - first)).reshape(-1, 2)
        length = self.seq_len + 1
        tokens = np.full(length, self._eos, np.int32)
        learned = np.zeros(length, bool)
        segment = np.full(length, len(spans), np.int32)  # the padding is a segment of its own
        position = np.arange(length, dtype=np.int32)
        at = 0
        for number, (start, end) in enumerate(spans.tolist()):
            tokens[at : at + end - start] = self._stream.read(start, end)
            learned[at : at + end - start] = self._stream.read(start, end, "mask") > 0
            segment[at : at + end - start] = number
            position[at : at + end - start] -= at
            at += end - start
        position[at:] -= at
        # Target t + 1 is learned when it is, and when it follows t within the same example.
        loss_mask = learned[1:] & (segment[1:] == segment[:-1])
        row = {"inputs": tokens[:-1], "targets": tokens[1:], "loss_mask": loss_mask.astype(np.float32)}
        if self.segmented:
            row |= {"segment_ids": segment[:-1], "positions": position[:-1]}
        return row


def _pread_int64(path: Path, first: int, count: int) -> np.ndarray:
    with open(path, "rb", buffering=0) as f:
        return np.frombuffer(os.pread(f.fileno(), 8 * count, 8 * first), dtype=np.int64)


class FineTuneBatches(ExampleBatches):
    """Rows of fine-tuning examples from the token store (see the module docstring). `truncated` counts the
    examples cut to a row; with data.packing=segmented the rows also carry segment_ids and positions."""

    def __init__(self, cfg: DataConfig, split: str, seq_len: int, global_batch: int) -> None:
        store = open_store(cfg)
        if store.documents(split) == 0:
            raise UserError(
                f"The {split} split of data.source='{cfg.source}' (data.paths='{cfg.paths}') holds no examples. Add "
                f"rows to data.paths or change data.eval_fraction."
            )
        segmented = cfg.packing == "segmented"
        self.packed = PackedRows(store, split, seq_len, segmented, leave_out_long=cfg.source == "stdlib_functions")
        self.truncated = int(self.packed.figures["truncated"])
        if len(self.packed) == 0:
            raise UserError(
                f"Every example of the {split} split of data.source={cfg.source} is longer than train.seq_len + 1 = "
                f"{seq_len + 1} tokens and left out. Raise train.seq_len."
            )
        super().__init__(self.packed, seq_len, global_batch, cfg.seed)

    def rows(self, step: int, row_ids: np.ndarray | list[int]) -> dict[str, np.ndarray]:
        """Rows `row_ids` of the batch of `step`: inputs, targets, loss_mask and, when packed, segment_ids and
        positions, [n, seq_len] each."""
        row_ids = np.asarray(row_ids, dtype=np.int64).reshape(-1)
        if step < 0 or np.any((row_ids < 0) | (row_ids >= self.global_batch)):
            raise ValueError(f"step must be >= 0 and rows in [0, {self.global_batch}), got {step} and {row_ids}")
        records = [self._examples[step * self.global_batch + int(row)] for row in row_ids]
        keys = ["inputs", "targets", "loss_mask", *(["segment_ids", "positions"] if self.packed.segmented else [])]
        empty = np.zeros((0, self.seq_len), np.float32)
        return {key: np.stack([record[key] for record in records]) if records else empty for key in keys}

    def describe(self) -> dict[str, Any]:
        figures = self.packed.figures
        return {
            "data_examples": int(figures["examples"]),
            "data_truncated_examples": self.truncated,
            "data_left_out_examples": int(figures["left_out"]),
            "data_rows": len(self.packed),
            "data_fill_ratio": round(float(figures["fill_ratio"]), 4),
        }
