"""Documents from disk, in a fixed order, split into train and eval by a hash of each document's identity.

A document's identity (its key) is its file path, plus the line or row number for jsonl and parquet. Hashing
the key, rather than counting documents, keeps the split fixed when files are added, reordered or read by a
different number of hosts. The seed plays no part, so every run on the same data evaluates on the same documents.
"""

from __future__ import annotations

import glob
import hashlib
import json
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

from jaxscale.config import DataConfig
from jaxscale.errors import UserError

SOURCES = ("stdlib", "text", "jsonl", "parquet")
SPLITS = ("train", "eval")

Reader = Callable[[list[str], str], Iterator[tuple[str, str]]]


def in_eval_split(key: str, eval_fraction: float) -> bool:
    """Whether the document with identity `key` is held out. Stable across machines and Python versions."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < eval_fraction


def iter_documents(cfg: DataConfig, split: str) -> Iterator[str]:
    """Texts of the `split` ("train" or "eval") documents of `cfg.source`, in a fixed order.

    Config mistakes (unknown source, empty or unmatched paths, missing parquet column) raise here, before the
    first document; a jsonl line without `text_field` raises when it is reached.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 <= cfg.eval_fraction < 1.0:
        raise UserError(
            f"data.eval_fraction={cfg.eval_fraction} must be at least 0 and below 1; 0.05 holds out 5% of documents."
        )
    if cfg.source == "stdlib":
        documents = _read_stdlib()
    elif cfg.source in _READERS:
        files = match_paths(cfg)
        if cfg.source == "parquet":
            _check_parquet_columns(files, cfg.text_field)
        documents = _READERS[cfg.source](files, cfg.text_field)
    else:
        raise UserError(
            f"data.source='{cfg.source}' is not a known source. Set data.source to one of {', '.join(SOURCES)}."
        )
    want_eval = split == "eval"
    return (text for key, text in documents if in_eval_split(key, cfg.eval_fraction) == want_eval)


def _read_stdlib() -> Iterator[tuple[str, str]]:
    # Python's own standard library: tens of MB of real text on every machine, no download needed. Keys are
    # relative to the library's root so that machines with different install prefixes split alike.
    root = Path(sysconfig.get_paths()["stdlib"])
    relative = sorted(path.relative_to(root).as_posix() for path in root.rglob("*.py"))
    for name in relative:
        if not name.startswith("site-packages/"):
            yield f"stdlib/{name}", (root / name).read_text(encoding="utf-8", errors="replace")


def match_paths(cfg: DataConfig) -> list[str]:
    patterns = [pattern.strip() for pattern in cfg.paths.split(",") if pattern.strip()]
    if not patterns:
        raise UserError(
            f"data.paths is empty, but data.source='{cfg.source}' reads files. Set data.paths to comma-separated "
            "file globs, e.g. data.paths='corpus/*.jsonl', or set data.source=stdlib to train on Python's own "
            "standard library."
        )
    files: set[str] = set()
    for pattern in patterns:
        matched = [path for path in glob.glob(str(Path(pattern).expanduser()), recursive=True) if Path(path).is_file()]
        if not matched:
            raise UserError(
                f"data.paths pattern '{pattern}' matches no files (searched from {Path.cwd()}). Fix the glob in "
                "data.paths, or use an absolute path."
            )
        files.update(matched)
    return sorted(files)


def _read_text(files: list[str], text_field: str) -> Iterator[tuple[str, str]]:
    del text_field  # one file is one document; there are no fields
    for path in files:
        yield path, Path(path).read_text(encoding="utf-8", errors="replace")


def _read_jsonl(files: list[str], text_field: str) -> Iterator[tuple[str, str]]:
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as lines:
            for line_number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{line_number} is not valid JSON ({e}). Fix or remove that line.") from None
                text = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise UserError(
                        f"{path}:{line_number} has no string field data.text_field='{text_field}'. Set "
                        "data.text_field to the key that holds each document's text."
                    )
                yield f"{path}:{line_number}", text


def _check_parquet_columns(files: list[str], text_field: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in files:
        schema = pq.read_schema(path)
        if text_field not in schema.names:
            raise UserError(
                f"{path} has no column data.text_field='{text_field}'; its columns are {', '.join(schema.names)}. "
                "Set data.text_field to the column that holds each document's text."
            )
        column_type = schema.field(text_field).type
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
            raise UserError(
                f"{path} column data.text_field='{text_field}' holds {column_type}, not text. Set data.text_field "
                "to a string column."
            )


def _read_parquet(files: list[str], text_field: str) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq

    for path in files:
        row = 0
        for batch in pq.ParquetFile(path).iter_batches(columns=[text_field]):
            for text in batch.column(0).to_pylist():
                if text is not None:  # a null cell is a missing document, not an empty one
                    yield f"{path}:{row}", text
                row += 1


_READERS: dict[str, Reader] = {"text": _read_text, "jsonl": _read_jsonl, "parquet": _read_parquet}
