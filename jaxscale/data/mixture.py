"""Mixtures of corpora: `data.mixture` lists sources with weights, and each step's rows are drawn from them.

The interleaving is grain's weighted mix of the sources, each shuffled on its own, so the batch of
step s stays a pure function of (seed, s, data config) and a run resumes bit for bit. Which source
row r of step s comes from is known without reading any row, so the log can count the tokens taken
from each source.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from jaxscale.config import DataConfig
from jaxscale.data.packing import ExampleBatches, TokenBatches
from jaxscale.data.sources import FINETUNE_SOURCES
from jaxscale.errors import UserError

ENTRY_KEYS = ("source", "paths", "text_field", "name", "weight")


@dataclasses.dataclass(frozen=True)
class MixturePart:
    name: str
    weight: float
    data: DataConfig


def mixture_parts(cfg: DataConfig) -> list[MixturePart]:
    """The sources `cfg.mixture` names, each a full data config (the section's other keys), or a UserError."""
    parts = []
    for i, entry in enumerate(cfg.mixture):
        where = f"data.mixture[{i}]"
        unknown = set(entry) - set(ENTRY_KEYS) if isinstance(entry, dict) else {"(not a mapping)"}
        if unknown:
            raise UserError(f"{where} has {', '.join(sorted(unknown))}; an entry may set {', '.join(ENTRY_KEYS)}.")
        weight = entry.get("weight")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise UserError(f"{where} has weight {weight!r}; give every source a weight above 0, e.g. weight: 0.3.")
        fields = {k: entry[k] for k in ("source", "paths", "text_field") if k in entry}
        data = dataclasses.replace(cfg, mixture=[], **fields)
        if data.source in FINETUNE_SOURCES:
            raise UserError(
                f"{where} has source {data.source}: a mixture draws windows of pretraining text, and fine-tuning "
                "examples are packed with their loss masks. Train on one fine-tuning source at a time."
            )
        parts.append(MixturePart(str(entry.get("name", f"{data.source}{i}")), float(weight), data))
    if len({p.name for p in parts}) != len(parts):
        raise UserError("data.mixture names two sources alike; give each entry its own `name`.")
    return parts


class MixtureBatches(ExampleBatches):
    """Rows drawn from several sources by weight (see the module docstring)."""

    def __init__(self, cfg: DataConfig, split: str, seq_len: int, global_batch: int) -> None:
        self.parts = mixture_parts(cfg)
        self._sources = [TokenBatches(p.data, split, seq_len, global_batch) for p in self.parts]
        weights = [p.weight for p in self.parts]
        # The same mix over each source's index alone: which source an example index draws from.
        tags = [grain.MapDataset.range(1).repeat().map(lambda _, k=k: k) for k in range(len(self.parts))]
        self._source_of = grain.MapDataset.mix(tags, weights)
        super().__init__(self._sources, seq_len, global_batch, cfg.seed)

    def _dataset(self, sources: Sequence[Any], seed: int) -> grain.MapDataset:
        return grain.MapDataset.mix([s._examples for s in sources], [p.weight for p in self.parts])

    def describe(self) -> dict[str, int]:
        return {
            f"data_examples_{p.name}": s.describe()["data_examples"]
            for p, s in zip(self.parts, self._sources, strict=True)
        }

    def tokens_by_source(self, step: int) -> dict[str, int]:
        """Tokens the batch of `step` takes from each source (all rows, every host's)."""
        first = step * self.global_batch
        sources = np.array([self._source_of[first + r] for r in range(self.global_batch)])
        return {p.name: int(np.sum(sources == k)) * self.seq_len for k, p in enumerate(self.parts)}
