"""Document-aware packing: which packed document each token belongs to, and where in it.

A packed row holds the tail of one document, whole documents, and the head of another, each
followed by eos. With `data.packing=segmented` every row also carries `segment_ids` (tokens of one
document share an id; a document ends with its eos) and `positions` (0 at each document's first
token), so attention stays within a document and rotary positions restart at each one; and the
target after an eos (the next document's first token, which nothing in the row can predict) is
left out of the loss. The row's first document starts at position 0 whatever came before it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxscale.config import DataConfig
from jaxscale.data.loader import StepRows


def carries_documents(cfg: DataConfig) -> bool:
    """Whether the rows of this data config carry segment_ids and positions (see the module docstring; packed
    fine-tuning examples carry them too, jaxscale.data.finetune)."""
    return cfg.packing == "segmented"


def document_segments(inputs_NL: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Segment ids and per-document positions of packed rows: int [n, L] token ids -> two int32 [n, L]."""
    n, length = inputs_NL.shape
    ends_NL = inputs_NL == eos_id  # an eos is its document's last token
    segment_ids_NL = np.cumsum(ends_NL, axis=1) - ends_NL
    starts_NL = np.zeros((n, length), dtype=bool)
    starts_NL[:, 0] = True
    starts_NL[:, 1:] = ends_NL[:, :-1]
    index_L = np.arange(length)
    start_index_NL = np.maximum.accumulate(np.where(starts_NL, index_L, 0), axis=1)
    return segment_ids_NL.astype(np.int32), (index_L - start_index_NL).astype(np.int32)


class DocumentRows:
    """The rows of `rows` with `segment_ids` and `positions` added, and no loss on targets across documents."""

    def __init__(self, rows: StepRows, eos_id: int) -> None:
        self._rows = rows
        self.eos_id = eos_id
        self.seq_len = rows.seq_len
        self.global_batch = rows.global_batch

    def describe(self) -> dict[str, int]:
        return self._rows.describe()

    def tokens_by_source(self, step: int) -> dict[str, int]:
        return self._rows.tokens_by_source(step)

    def rows(self, step: int, row_ids: np.ndarray | Sequence[int]) -> dict[str, np.ndarray]:
        """`rows.rows(step, row_ids)` plus segment_ids and positions, int32 [n, seq_len] each. Rows that say where
        their documents are already (packed fine-tuning examples, whose chat turns may hold eos) pass as they
        are."""
        out = dict(self._rows.rows(step, row_ids))
        if "segment_ids" in out:
            return out
        out["segment_ids"], out["positions"] = document_segments(out["inputs"], self.eos_id)
        out["loss_mask"] = np.where(out["inputs"] == self.eos_id, 0.0, out["loss_mask"]).astype(np.float32)
        return out
