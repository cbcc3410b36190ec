"""Documents from disk, in a fixed order, split into train and eval by a hash of each document's identity.

A document's identity (its key) is its file path, plus the line or row number for jsonl and parquet. Hashing
the key, rather than counting documents, keeps the split fixed when files are added, reordered or read by a
different number of hosts. The seed plays no part, so every run on the same data evaluates on the same documents.

Files are cut into pieces (byte ranges of jsonl files, row groups of parquet files, whole text files) that can
be read independently and in any order, so tokenizer workers each read their own part of a large file.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxscale.config import DataConfig
from jaxscale.errors import UserError

# Fine-tuning sources give rows (a prompt and completion, or a chat) where the others give texts.
FINETUNE_SOURCES = ("prompt_completion", "chat", "stdlib_functions")
SOURCES = ("stdlib", "text", "jsonl", "parquet", *FINETUNE_SOURCES)
SPLITS = ("train", "eval")


@dataclass(frozen=True)
class SourceFile:
    """A file of the corpus. `key` names its documents (the path as matched, or stdlib/<relative path>)."""

    path: str  # absolute
    key: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Piece:
    """A part of one file, readable alone: bytes [start, stop) of a text or jsonl file (`first` = the 1-based line
    number at `start`), or row groups [start, stop) of a parquet file (`first` = the row index at `start`)."""

    path: str
    key: str
    start: int
    stop: int
    first: int
    nbytes: int  # about how much text it holds, for sizing work


def jsonl_lines(text: str, first: int = 1) -> list[tuple[int, str]]:
    """(line number, line) of each line of JSON Lines text, numbered from `first`.

    Split on "\n" only, as the JSON Lines format says: str.splitlines would also split on U+2028, U+2029,
    U+0085 and others, which are valid inside JSON strings and which json.dumps(ensure_ascii=False) leaves
    raw. A "\r" before the "\n" (a file written on Windows) is dropped.
    """
    return [(number, line.removesuffix("\r")) for number, line in enumerate(text.split("\n"), start=first)]


def in_eval_split(key: str, eval_fraction: float) -> bool:
    """Whether the document with identity `key` is held out. Stable across machines and Python versions."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < eval_fraction


def check_source(cfg: DataConfig) -> None:
    """Refuse data settings that cannot name a corpus: an unknown source, an eval share out of range, paths that a
    source would ignore."""
    if cfg.source not in SOURCES:
        raise UserError(
            f"data.source='{cfg.source}' is not a known source. Set data.source to one of {', '.join(SOURCES)}."
        )
    if not 0.0 <= cfg.eval_fraction < 1.0:
        raise UserError(
            f"data.eval_fraction={cfg.eval_fraction} must be at least 0 and below 1; 0.05 holds out 5% of documents."
        )
    if cfg.source == "stdlib" and cfg.paths.strip():
        raise UserError(
            f"data.paths='{cfg.paths}' is set, but data.source=stdlib reads Python's standard library and would "
            "ignore it. Set data.source to text, jsonl or parquet to train on those files, or remove data.paths."
        )
    if cfg.source == "stdlib_functions" and cfg.paths.strip():
        raise UserError(
            f"data.paths='{cfg.paths}' is set, but data.source=stdlib_functions makes its examples from Python's "
            "standard library and would ignore it. Remove data.paths, or set data.source=prompt_completion."
        )


def list_files(cfg: DataConfig) -> list[SourceFile]:
    """The files of the corpus `cfg` names, sorted, with their sizes and modification times.

    Config mistakes (unknown source, empty or unmatched paths, paths with source=stdlib), empty files and parquet
    files without the text column raise a UserError naming the key or the file.
    """
    check_source(cfg)
    if cfg.source in ("stdlib", "stdlib_functions"):
        # Python's own standard library: tens of MB of real text on every machine, no download needed. Keys are
        # relative to the library's root so that machines with different install prefixes split alike.
        root = library_root(cfg.source)
        names = sorted(path.relative_to(root).as_posix() for path in root.rglob("*.py"))
        matched = [(str(root / name), f"stdlib/{name}") for name in names if not name.startswith("site-packages/")]
    else:
        matched = [(str(Path(path).resolve()), path) for path in match_paths(cfg)]
    files = []
    for path, key in matched:
        try:
            stat = Path(path).stat()
        except OSError as e:
            raise _unreadable(path, e) from None
        files.append(SourceFile(path, key, stat.st_size, stat.st_mtime_ns))
    if cfg.source not in ("stdlib", "stdlib_functions"):
        for file in files:
            if file.size == 0:
                raise UserError(f"{file.path} is empty. Remove it, or narrow data.paths so that it does not match it.")
    if cfg.source == "parquet":
        for file in files:
            _check_parquet(file.path, cfg.text_field)
    return files


def library_root(source: str) -> Path:
    """The standard library that data.source=stdlib (or stdlib_functions) reads."""
    if source == "stdlib_functions":
        from jaxscale.data.stdlib_task import stdlib_root  # it splits by in_eval_split, from here

        return stdlib_root()
    return Path(sysconfig.get_paths()["stdlib"])


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


def _unreadable(path: str, error: OSError) -> UserError:
    """The error for a corpus file the system refuses to read."""
    return UserError(f"{path} cannot be read ({error.strerror}). Fix its permissions, or drop it from data.paths.")


def _parquet_file(path: str):  # -> pyarrow.parquet.ParquetFile
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"{path} cannot be read as parquet ({e}). Replace it, or drop it from data.paths.") from None


def _check_parquet(path: str, text_field: str) -> None:
    import pyarrow as pa

    parquet = _parquet_file(path)
    schema = parquet.schema_arrow
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
    if parquet.metadata.num_rows == 0:
        raise UserError(f"{path} holds no rows. Remove it, or narrow data.paths so that it does not match it.")


def plan_pieces(source: str, files: list[SourceFile], piece_bytes: float = math.inf) -> list[Piece]:
    """`files` cut into pieces of about `piece_bytes` or less where the format allows, in corpus order.

    A text file is one document and one piece. A jsonl file is cut after a line (this reads the file once, to
    count lines); a parquet file between row groups. The standard library's functions are one piece (they are
    found by parsing every file).
    """
    if source in ("jsonl", "prompt_completion", "chat"):
        return [piece for file in files for piece in _jsonl_pieces(file, piece_bytes)]
    if source == "stdlib_functions":
        return [Piece(str(library_root(source)), "stdlib", 0, 0, 1, sum(file.size for file in files))]
    if source == "parquet":
        return [piece for file in files for piece in _parquet_pieces(file, piece_bytes)]
    return [Piece(file.path, file.key, 0, file.size, 1, file.size) for file in files]


def _jsonl_pieces(file: SourceFile, piece_bytes: float) -> Iterator[Piece]:
    if file.size <= piece_bytes:
        yield Piece(file.path, file.key, 0, file.size, 1, file.size)
        return
    start, line = 0, 1
    with _open_binary(file.path) as f:
        while start < file.size:
            f.seek(start)
            block = f.read(int(piece_bytes)) + f.readline()  # end on a line break
            yield Piece(file.path, file.key, start, start + len(block), line, len(block))
            line += block.count(b"\n")
            start += len(block)


def _parquet_pieces(file: SourceFile, piece_bytes: float) -> Iterator[Piece]:
    metadata = _parquet_file(file.path).metadata
    start, row, nbytes, rows = 0, 0, 0, 0
    for group in range(metadata.num_row_groups):
        nbytes += metadata.row_group(group).total_byte_size
        rows += metadata.row_group(group).num_rows
        if nbytes >= piece_bytes or group == metadata.num_row_groups - 1:
            yield Piece(file.path, file.key, start, group + 1, row, nbytes)
            start, row, nbytes, rows = group + 1, row + rows, 0, 0


def _open_binary(path: str):  # -> BinaryIO
    try:
        return open(path, "rb")
    except OSError as e:
        raise _unreadable(path, e) from None


def read_piece(source: str, piece: Piece, text_field: str) -> Iterator[tuple[str, Any]]:
    """(key, document) of each document of `piece`, in order: its text, or for a fine-tuning source its row (the
    JSON value of a line, or a function's {"prompt", "completion"}). A jsonl line without `text_field` raises
    when reached."""
    if source == "parquet":
        yield from _read_parquet(piece, text_field)
        return
    if source == "stdlib_functions":
        from jaxscale.data.stdlib_task import function_examples  # it splits by in_eval_split, from here

        for example in function_examples(Path(piece.path), max_bytes=sys.maxsize):
            yield example.name, {"prompt": example.prompt, "completion": example.completion}
        return
    with _open_binary(piece.path) as f:
        f.seek(piece.start)
        try:
            data = f.read(piece.stop - piece.start)
        except OSError as e:
            raise _unreadable(piece.path, e) from None
    text = data.decode("utf-8", errors="replace")
    if source in ("stdlib", "text"):
        yield piece.key, text
        return
    for line_number, line in jsonl_lines(text, piece.first):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{piece.path}:{line_number} is not valid JSON ({e}). Fix or remove that line.") from None
        if source != "jsonl":
            yield f"{piece.key}:{line_number}", record
            continue
        value = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise UserError(
                f"{piece.path}:{line_number} has no string field data.text_field='{text_field}'. Set "
                "data.text_field to the key that holds each document's text, or fix that line."
            )
        yield f"{piece.key}:{line_number}", value


def _read_parquet(piece: Piece, text_field: str) -> Iterator[tuple[str, str]]:
    row = piece.first
    groups = list(range(piece.start, piece.stop))
    for batch in _parquet_file(piece.path).iter_batches(row_groups=groups, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text is not None:  # a null cell is a missing document, not an empty one
                yield f"{piece.key}:{row}", text
            row += 1


def iter_documents(cfg: DataConfig, split: str) -> Iterator[str]:
    """Texts of the `split` ("train" or "eval") documents of `cfg.source`, in a fixed order.

    Config mistakes raise here, before the first document (see `list_files`); a jsonl line without
    `text_field` raises when it is reached.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    pieces = plan_pieces(cfg.source, list_files(cfg))
    want_eval = split == "eval"
    return (
        text
        for piece in pieces
        for key, text in read_piece(cfg.source, piece, cfg.text_field)
        if in_eval_split(key, cfg.eval_fraction) == want_eval
    )
