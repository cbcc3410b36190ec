"""The token store: a corpus tokenized once into flat token arrays on disk, read back window by window.

A store directory holds:

    manifest.json        the complete generation readers use: recipe (sources with sizes and mtimes, tokenizer
                         files' hash, ...), counts, tokens per shard, and each file's size and sha256
    plan.json            the recipe and shards of the newest build (finished or not), and its generation
    gen-<id>/            one generation (a build) of the store:
      shards/000017.json   the ledger entry of shard 17, written once its arrays are complete
      train/000017.tokens  its train documents' tokens, each as the tokenizer encodes it (with BOS where it
                           adds one) followed by eos (raw uint16 or int32)
      train/000017.docs    int64 end offset of each of those documents in that array
      eval/...             the same for the eval split
      .readers             locked (shared) by every process reading this generation

Every file is written under a temporary name and renamed when complete, so an interrupted build leaves whole
shards only, and running `prepare` again builds just the shards without a ledger entry. An exclusive lock on the
directory lets one process build while the others (the other processes of a run on one machine) wait and then
find it ready. A store whose recipe no longer matches its sources or tokenizer is refused, never mixed.

Integrity: opening a store compares each file's size with the manifest (a stat per file) and names a file that
differs; `jaxscale prepare` rebuilds such files, and with `--verify` it also reads every file against its
sha256. A rebuild (changed sources, or damaged files) writes a new generation beside the old one (intact shards
of a damaged generation are hard-linked, not rebuilt) and then replaces manifest.json in one rename, so a
running reader keeps reading the files it opened. An old generation is deleted by a later `prepare` once no
process holds its `.readers` lock (a reader holds it until it exits; the OS drops it if the reader dies).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from jaxscale.config import DataConfig
from jaxscale.data.chat import template_file
from jaxscale.data.examples import ExampleEncoder
from jaxscale.data.sources import (
    FINETUNE_SOURCES,
    SPLITS,
    Piece,
    SourceFile,
    check_source,
    in_eval_split,
    library_root,
    list_files,
    plan_pieces,
    read_piece,
)
from jaxscale.data.tokenizers import Tokenizer, build_tokenizer, tokenizer_files
from jaxscale.errors import UserError

FORMAT_VERSION = 2  # 2: generations, file sizes and checksums; documents start with BOS where the tokenizer adds one
# Text per shard: the unit of parallel work and of resuming. Large enough that a worker's start-up (it imports
# numpy and the tokenizer) is small next to its work; small enough that a shard's tokens fit a worker's memory.
SHARD_BYTES = 64 * 2**20
# Documents handed to the tokenizer at once: enough for a parallel tokenizer to use every core, few enough
# that the untokenized text of one chunk stays small.
_ENCODE_CHUNK_DOCS = 1024
_MANIFEST, _PLAN, _LEDGER, _READERS = "manifest.json", "plan.json", "shards", ".readers"
# The `.readers` lock of each generation this process reads, held until it exits.
_READING: dict[str, Any] = {}


def cache_dir() -> Path:
    """Where default stores live: $JAXSCALE_CACHE, else $XDG_CACHE_HOME/jaxscale, else ~/.cache/jaxscale."""
    if os.environ.get("JAXSCALE_CACHE"):
        return Path(os.environ["JAXSCALE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxscale"


def store_dir(cfg: DataConfig) -> Path:
    """`data.store`, or a directory of the cache named by what decides the tokens: source, paths, tokenizer,
    text field and eval share (the seed does not: it only orders windows)."""
    if cfg.store:
        return Path(cfg.store).expanduser()
    patterns = [str(Path(p.strip()).expanduser().absolute()) for p in cfg.paths.split(",") if p.strip()]
    tokenizer = cfg.tokenizer if cfg.tokenizer == "byte" else str(Path(cfg.tokenizer).expanduser().absolute())
    identity = [cfg.source, patterns, tokenizer, _text_field(cfg), cfg.eval_fraction]
    if cfg.source == "chat":
        identity.append(str(template_file(cfg).absolute()))
    if cfg.source == "stdlib_functions":
        identity.append(str(library_root(cfg.source)))
    digest = hashlib.blake2b(json.dumps(identity).encode(), digest_size=8).hexdigest()
    return cache_dir() / "stores" / f"{cfg.source}-{digest}"


def token_dtype(tokenizer: Tokenizer) -> np.dtype:
    """uint16 when every id fits, else int32."""
    return np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32)


def encode_documents(texts: Sequence[str], tokenizer: Tokenizer, dtype: np.dtype) -> list[np.ndarray]:
    """Each text's token ids as the tokenizer encodes a text (BOS where it adds one), followed by eos unless the
    tokenizer put one there ([len(doc)] of `dtype`). Texts with no tokens of their own are dropped rather than
    left as a lone BOS/eos."""
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    added = (tokenizer.bos_id is not None) + tokenizer.adds_eos
    encoded = []
    for chunk in itertools.batched(texts, _ENCODE_CHUNK_DOCS):
        for ids in tokenizer.encode_batch(chunk, add_special_tokens=True):
            if ids.size > added:
                encoded.append(ids.astype(dtype) if tokenizer.adds_eos else np.concatenate([ids.astype(dtype), eos]))
    return encoded


@dataclass(frozen=True)
class TokenStore:
    """A complete store, checked against its sources: counts and readers of its splits."""

    path: Path
    manifest: dict[str, Any]

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.manifest["eos_id"])

    def tokens(self, split: str) -> int:
        """Tokens of `split`, eos included."""
        return int(self.manifest["splits"][split]["tokens"])

    def documents(self, split: str) -> int:
        """Documents of `split` (those with at least one token)."""
        return int(self.manifest["splits"][split]["documents"])

    def stream(self, split: str) -> SplitStream:
        """The split's tokens (and a fine-tuning store's learned-token flags), by position."""
        counts = self.manifest["splits"][split]["shard_tokens"]
        return SplitStream(self.path / split, counts, np.dtype(self.manifest["dtype"]))

    def document_spans(self, split: str) -> np.ndarray:
        """int64 [documents, 2]: each document's [start, end) in the split's stream. Reads every shard's
        document ends (8 bytes a document): for building tables once, not for each run's start-up."""
        counts = self.manifest["splits"][split]["shard_tokens"]
        offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        ends = [
            offsets[index] + np.fromfile(self.path / split / f"{index:06d}.docs", dtype=np.int64)
            for index in range(len(counts))
        ]
        ends_D = np.concatenate([np.zeros(0, np.int64), *ends])
        return (
            np.stack([np.concatenate([[0], ends_D[:-1]]), ends_D], axis=1)
            if ends_D.size
            else np.zeros((0, 2), np.int64)
        )

    def windows(self, split: str, seq_len: int) -> StoreWindows:
        """The windows of seq_len + 1 tokens of `split`, each read from disk when asked for."""
        counts = self.manifest["splits"][split]["shard_tokens"]
        return StoreWindows(self.path / split, counts, np.dtype(self.manifest["dtype"]), seq_len)


class SplitStream:
    """Random access to one split's stream, the shards joined in order: token ids, or (a fine-tuning store's)
    learned-token flags, of any range of positions, read from only the shards it touches."""

    def __init__(self, directory: Path, shard_tokens: Sequence[int], dtype: np.dtype) -> None:
        kept = [(index, count) for index, count in enumerate(shard_tokens) if count]  # empty files hold nothing
        self._directory = directory
        self._indices = [index for index, _ in kept]
        self._starts = np.concatenate([[0], np.cumsum([count for _, count in kept], dtype=np.int64)])
        self._dtype = dtype.str
        self.num_tokens = int(self._starts[-1])

    def read(self, start: int, stop: int, kind: str = "tokens") -> np.ndarray:
        """Positions [start, stop): int32 token ids (kind "tokens") or uint8 flags (kind "mask")."""
        out = np.zeros(stop - start, dtype=np.int32 if kind == "tokens" else np.uint8)
        dtype = self._dtype if kind == "tokens" else "|u1"
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        position = start
        while position < stop:
            offset = position - int(self._starts[shard])
            take = min(stop, int(self._starts[shard + 1])) - position
            path = str(self._directory / f"{self._indices[shard]:06d}.{kind}")
            out[position - start : position - start + take] = _read_tokens(path, dtype, offset, take)
            position += take
            shard += 1
        return out


class StoreWindows:
    """Random-access view of one split's token stream as windows of seq_len + 1 tokens (a grain data source).

    Window k holds tokens [k * seq_len, (k + 1) * seq_len] of the stream that joins the shards in order, so a
    window may span a shard boundary. Only the shards a window touches are read, and only its bytes.
    The last window may run past the stream's end; it is padded with id 0 and its loss mask covers only the
    real targets.
    """

    def __init__(self, directory: Path, shard_tokens: Sequence[int], dtype: np.dtype, seq_len: int) -> None:
        self._stream = SplitStream(directory, shard_tokens, dtype)
        self._seq_len = seq_len
        self.num_tokens = self._stream.num_tokens
        self._count = max(0, -(-(self.num_tokens - 1) // seq_len))  # ceil: the tail of the stream is kept, padded

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        start = index * self._seq_len
        stop = min(start + self._seq_len + 1, self.num_tokens)
        window = np.zeros(self._seq_len + 1, dtype=np.int32)
        window[: stop - start] = self._stream.read(start, stop)
        mask = (np.arange(self._seq_len) < stop - start - 1).astype(np.float32)
        return {"inputs": window[:-1], "targets": window[1:], "loss_mask": mask}


def _read_tokens(path: str, dtype: str, offset: int, count: int) -> np.ndarray:
    """Tokens offset .. offset + count - 1 of a shard file, by one positional read.

    Not a memory map: on current kernels a fault in a mapped file maps a whole large folio of the page
    cache into the process (2 MB on this machine's ext4), so resident memory grew by 2 MB with every
    random window read and, over a run, with the corpus. A read leaves those pages in the page cache,
    shared and reclaimable, and copies only the window's bytes.
    """
    itemsize = np.dtype(dtype).itemsize
    with open(path, "rb", buffering=0) as shard:
        data = os.pread(shard.fileno(), count * itemsize, offset * itemsize)
    return np.frombuffer(data, dtype=dtype)


@dataclass(frozen=True)
class Prepared:
    """What `prepare` did: `built_shards` is 0 when the store was already up to date."""

    store: TokenStore
    built_shards: int
    source_bytes: int  # text read by this call
    seconds: float
    workers: int
    damaged: tuple[str, ...] = ()  # files found damaged (and rebuilt), in words
    verified: bool = False  # every file was read against its checksum


def open_store(cfg: DataConfig) -> TokenStore:
    """The store of `cfg`, prepared now if it does not exist yet (or an earlier build was interrupted), its
    generation locked for reading by this process.

    A store prepared from other sources or another tokenizer, or with a file whose size is not the manifest's,
    is refused with a UserError that says to run `jaxscale prepare`: a run never trains on a mix of old and
    new tokens, or on a damaged store.
    """
    root, recipe, _ = _inputs(cfg)
    if _read_json(root / _MANIFEST) is None:
        prepare(cfg, progress=sys.stderr.isatty())
    store = _reading(root)
    if store.manifest["recipe"] != recipe:
        raise UserError(
            f"The token store {root} was prepared from other data: {_difference(store.manifest['recipe'], recipe)}. "
            "Run `jaxscale prepare CONFIG` with this run's data settings to tokenize it again (a store is never "
            "mixed from old and new data)."
        )
    damaged = _damaged(store, verify=False)
    if damaged:
        more = f" (and {len(damaged) - 1} more)" if damaged[1:] else ""
        raise UserError(
            f"The token store {root} is damaged: {damaged[0]}{more}. "
            "Run `jaxscale prepare CONFIG` with this run's data settings to rebuild what is damaged "
            "(`--verify` also reads every file against its checksum)."
        )
    return store


def prepare(cfg: DataConfig, shard_bytes: int = SHARD_BYTES, progress: bool = False, verify: bool = False) -> Prepared:
    """Tokenize the corpus of `cfg` into its store with `cfg.workers` processes; a no-op when it is up to date.

    A build interrupted with the same recipe resumes with the shards not yet in the ledger; a store of another
    recipe (changed sources or tokenizer) is built again as a new generation, and so are the shards of files
    whose size differs from the manifest's (with `verify`, whose contents differ from their checksum).
    `progress` shows a bar on stderr.
    """
    started = time.perf_counter()
    if cfg.workers < 0:
        raise UserError(f"data.workers={cfg.workers} must be 0 (one per CPU core) or a number of processes.")
    root, recipe, tokenizer = _inputs(cfg)
    with store_lock(root):
        manifest = _read_json(root / _MANIFEST)
        current = manifest is not None and manifest["recipe"] == recipe
        damaged = _damaged(TokenStore(root / manifest["generation"], manifest), verify) if current else []
        if current and not damaged:
            _remove_old_generations(root, keep=manifest["generation"])
            store = TokenStore(root / manifest["generation"], manifest)
            return Prepared(store, 0, 0, time.perf_counter() - started, 0, verified=verify)
        plan = _read_json(root / _PLAN)
        if plan is None or plan["recipe"] != recipe or (current and plan["generation"] == manifest["generation"]):
            _clear_unversioned(root)
            if current and plan is not None and plan["recipe"] == recipe:  # the same shards: keep the intact ones
                shards = plan["shards"]
            else:
                pieces = plan_pieces(cfg.source, [SourceFile(*file) for file in recipe["files"]], shard_bytes)
                shards = [[dataclasses.asdict(piece) for piece in shard] for shard in _group(pieces, shard_bytes)]
            plan = {"recipe": recipe, "shards": shards, "generation": f"gen-{uuid.uuid4().hex[:12]}"}
            (root / plan["generation"]).mkdir()
            (root / plan["generation"] / _READERS).touch()
            if current:
                _link_intact_shards(root / manifest["generation"], root / plan["generation"], manifest, damaged)
            _write_json(root / _PLAN, plan)
        generation = root / plan["generation"]
        _remove_temporary_files(generation)  # left by an interrupted build; the lock says none is being written now
        dtype = token_dtype(tokenizer)
        tasks = [
            _ShardTask(str(generation), index, tuple(Piece(**piece) for piece in pieces), cfg, dtype.str)
            for index, pieces in enumerate(plan["shards"])
            if not (generation / _LEDGER / f"{index:06d}.json").exists()
        ]
        source_bytes = sum(piece.nbytes for task in tasks for piece in task.pieces)
        workers = min(cfg.workers or os.cpu_count() or 1, len(tasks))
        with tqdm(total=source_bytes, unit="B", unit_scale=True, desc="jaxscale prepare", disable=not progress) as bar:
            for entry in _run(tasks, workers):
                bar.update(entry["bytes"])
        entries = [_read_json(generation / _LEDGER / f"{index:06d}.json") for index in range(len(plan["shards"]))]
        manifest = {
            "recipe": recipe,
            "generation": plan["generation"],
            "dtype": dtype.str,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "source_bytes": sum(file[2] for file in recipe["files"]),
            "splits": {
                split: {
                    "documents": sum(entry[split]["documents"] for entry in entries),
                    "tokens": sum(entry[split]["tokens"] for entry in entries),
                    "shard_tokens": [entry[split]["tokens"] for entry in entries],
                }
                for split in SPLITS
            },
            "files": {name: file for entry in entries for name, file in entry["files"].items()},
        }
        _write_json(root / _MANIFEST, manifest)  # the switch: readers opening the store from now on read this
        _remove_old_generations(root, keep=plan["generation"])
    store = TokenStore(generation, manifest)
    seconds = time.perf_counter() - started
    return Prepared(store, len(tasks), source_bytes, seconds, workers, tuple(damaged), verified=verify)


def _reading(root: Path) -> TokenStore:
    """The store's current generation, with its `.readers` lock held (shared) by this process until it exits,
    so that no later `prepare` deletes the files it reads."""
    while True:
        manifest = _read_json(root / _MANIFEST)
        generation = root / manifest["generation"]
        try:
            lock = open(generation / _READERS, "rb")
        except FileNotFoundError:
            if _read_json(root / _MANIFEST) == manifest:  # not a switch under way: the generation is gone
                raise UserError(
                    f"The token store {root} is damaged: {generation} is missing. Run `jaxscale prepare CONFIG` "
                    "with this run's data settings to rebuild it."
                ) from None
            continue
        fcntl.flock(lock, fcntl.LOCK_SH)
        if _read_json(root / _MANIFEST) == manifest:  # else a rebuild switched it meanwhile: read the new one
            _READING.setdefault(str(generation), lock)
            return TokenStore(generation, manifest)
        lock.close()


def _damaged(store: TokenStore, verify: bool) -> list[str]:
    """The files of a store whose size (with `verify`, whose sha256) is not the manifest's, in words."""
    damaged = []
    for name, want in store.manifest["files"].items():
        path = store.path / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            damaged.append(f"{path} is missing")
            continue
        if size != want["size"]:
            damaged.append(f"{path} holds {size} bytes where the manifest says {want['size']}")
        elif verify and _sha256(path) != want["sha256"]:
            damaged.append(f"{path} does not match its sha256")
    return damaged


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(2**22):
            digest.update(block)
    return digest.hexdigest()


def _link_intact_shards(old: Path, new: Path, manifest: dict[str, Any], damaged: list[str]) -> None:
    """Hard-link into a new generation the shards of `old` none of whose files is damaged."""
    bad = {int(Path(name).stem) for name in manifest["files"] if any(str(old / name) in d for d in damaged)}
    for entry_path in sorted((old / _LEDGER).glob("*.json")):
        if int(entry_path.stem) in bad:
            continue
        entry = _read_json(entry_path)
        for name in [*entry["files"], f"{_LEDGER}/{entry_path.name}"]:
            (new / name).parent.mkdir(parents=True, exist_ok=True)
            os.link(old / name, new / name)


def _remove_old_generations(root: Path, keep: str) -> None:
    """Delete the generations other than `keep` that no process reads (none holds their `.readers` lock)."""
    for generation in root.glob("gen-*"):
        if generation.name == keep:
            continue
        try:
            lock = open(generation / _READERS, "rb")
        except FileNotFoundError:
            shutil.rmtree(generation, ignore_errors=True)
            continue
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a running reader's: a later prepare removes it
            shutil.rmtree(generation, ignore_errors=True)


def format_prepared(result: Prepared) -> str:
    """What `jaxscale prepare` prints: the store, its counts, what was damaged, and the throughput when it built
    something."""
    store = result.store
    counts = ", ".join(f"{s} {store.documents(s):,} documents {store.tokens(s):,} tokens" for s in SPLITS)
    if not result.built_shards and not result.damaged:
        verified = ", every file matches its checksum" if result.verified else ""
        return f"jaxscale prepare: {store.path.parent} is up to date{verified} ({counts})"
    megabytes = result.source_bytes / 1e6
    damaged = f"damaged: {'; '.join(result.damaged)}; rebuilt as {store.path.name}: " if result.damaged else ""
    return (
        f"jaxscale prepare: {store.path.parent}: {damaged}{result.built_shards} shards, {megabytes:,.1f} MB of "
        f"text in {result.seconds:.1f} s ({megabytes / max(result.seconds, 1e-9):,.1f} MB/s, {result.workers} "
        f"workers); {counts}"
    )


def _text_field(cfg: DataConfig) -> str:
    return cfg.text_field if cfg.source in ("jsonl", "parquet") else ""  # other sources have no fields


def _inputs(cfg: DataConfig) -> tuple[Path, dict[str, Any], Tokenizer]:
    """The store's directory, the recipe the corpus of `cfg` has now, and its tokenizer."""
    check_source(cfg)
    tokenizer = build_tokenizer(cfg)
    files = tokenizer_files(cfg)
    if cfg.source == "chat":  # the template decides the tokens too; so do the special tokens beside a .jinja file
        template = template_file(cfg)
        files += [template, *([template.with_name("tokenizer_config.json")] if template.suffix == ".jinja" else [])]
        files = [path for path in dict.fromkeys(files) if path.is_file() or path == template]
    digest = hashlib.sha256()
    for path in files:  # tokenizer.json, the files beside it that decide special tokens, a chat template
        try:
            content = path.read_bytes()
        except OSError as e:
            raise UserError(
                f"{path} cannot be read ({e.strerror}); data.tokenizer and data.chat_template name it."
            ) from None
        digest.update(f"{path.name}\0{len(content)}\0".encode() + content)
    tokenizer_hash = digest.hexdigest() if files else "byte"
    recipe = {
        "format": FORMAT_VERSION,
        "source": cfg.source,
        "paths": cfg.paths,
        "text_field": _text_field(cfg),
        "eval_fraction": cfg.eval_fraction,
        "tokenizer": cfg.tokenizer,
        "tokenizer_sha256": tokenizer_hash,
        "files": [[f.path, f.key, f.size, f.mtime_ns] for f in list_files(cfg)],
    }
    return store_dir(cfg), recipe, tokenizer


def _difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What changed between two recipes, in words (at most a few files named)."""
    if old["format"] != new["format"]:
        return f"it is in store format {old['format']}, and this jaxscale reads format {new['format']}"
    if old["tokenizer_sha256"] != new["tokenizer_sha256"]:
        return f"the tokenizer data.tokenizer='{new['tokenizer']}' (or a file beside it) has changed"
    settings = [key for key in ("format", "source", "paths", "text_field", "eval_fraction") if old[key] != new[key]]
    if settings:
        return ", ".join(f"data.{key} was {old[key]!r}, is {new[key]!r}" for key in settings)
    before, now = ({path: (size, mtime) for path, _, size, mtime in r["files"]} for r in (old, new))
    changes = [f"{path} is new" for path in now if path not in before]
    changes += [f"{path} is gone" for path in before if path not in now]
    changes += [f"{path} has changed" for path in now if path in before and before[path] != now[path]]
    more = f" and {len(changes) - 3} more" if len(changes) > 3 else ""
    return ", ".join(changes[:3]) + more


def _group(pieces: list[Piece], shard_bytes: int) -> list[list[Piece]]:
    """Consecutive pieces gathered into shards of at least `shard_bytes` (the last may hold less)."""
    shards: list[list[Piece]] = [[]]
    size = 0
    for piece in pieces:
        if size >= shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(piece)
        size += piece.nbytes
    return [shard for shard in shards if shard]


@dataclass(frozen=True)
class _ShardTask:
    root: str
    index: int
    pieces: tuple[Piece, ...]
    cfg: DataConfig
    dtype: str


def _run(tasks: list[_ShardTask], workers: int) -> Iterator[dict[str, Any]]:
    """The ledger entry of each task as it completes: in this process for one worker, else in a process pool."""
    if workers <= 1:
        yield from map(_build_shard, tasks)
        return
    # spawn, not fork: the parent may run JAX's threads, which a forked child would inherit half-copied.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        for future in as_completed([pool.submit(_build_shard, task) for task in tasks]):
            yield future.result()
    finally:
        pool.shutdown(cancel_futures=True)


@functools.cache
def _worker_tokenizer(spec: str) -> Tokenizer:
    """One tokenizer per worker process, loaded by its first shard."""
    return build_tokenizer(DataConfig(tokenizer=spec))


@functools.cache
def _worker_encoder(source: str, tokenizer: str, chat_template: str) -> ExampleEncoder:
    """One example encoder (tokenizer and chat template) per worker process, made by its first shard."""
    cfg = DataConfig(source=source, tokenizer=tokenizer, chat_template=chat_template)
    return ExampleEncoder(cfg, _worker_tokenizer(tokenizer))


def _build_shard(task: _ShardTask) -> dict[str, Any]:
    """Tokenize one shard's pieces; write its arrays, then its ledger entry ({split: counts, "bytes": text read,
    "files": each file's size and sha256}). A fine-tuning source also writes which tokens are learned (.mask,
    one uint8 per token) and leaves out examples of fewer than 2 tokens (nothing to predict)."""
    dtype = np.dtype(task.dtype)
    documents: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    masks: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    fine_tuning = task.cfg.source in FINETUNE_SOURCES
    for piece in task.pieces:
        for chunk in itertools.batched(read_piece(task.cfg.source, piece, task.cfg.text_field), _ENCODE_CHUNK_DOCS):
            texts: dict[str, list[str]] = {split: [] for split in SPLITS}
            for key, document in chunk:
                split = "eval" if in_eval_split(key, task.cfg.eval_fraction) else "train"
                if not fine_tuning:
                    texts[split].append(document)
                    continue
                encoder = _worker_encoder(task.cfg.source, task.cfg.tokenizer, task.cfg.chat_template)
                ids, trained = encoder.row(document, key)
                if ids.size >= 2:
                    documents[split].append(ids.astype(dtype))
                    masks[split].append(trained.astype(np.uint8))
            for split in SPLITS:
                documents[split] += encode_documents(texts[split], _worker_tokenizer(task.cfg.tokenizer), dtype)
    root = Path(task.root)
    entry: dict[str, Any] = {"bytes": sum(piece.nbytes for piece in task.pieces), "files": {}}
    for split, arrays in documents.items():
        tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype)
        arrays_of = {"tokens": tokens, "docs": np.cumsum([array.size for array in arrays], dtype=np.int64)}
        if fine_tuning:
            arrays_of["mask"] = np.concatenate(masks[split]) if masks[split] else np.zeros(0, np.uint8)
        for suffix, data in arrays_of.items():
            name, content = f"{split}/{task.index:06d}.{suffix}", data.tobytes()
            write_atomic(root / name, content)
            entry["files"][name] = {"size": len(content), "sha256": hashlib.sha256(content).hexdigest()}
        entry[split] = {"tokens": int(tokens.size), "documents": len(arrays)}
    _write_json(root / _LEDGER / f"{task.index:06d}.json", entry)  # last: the shard counts as done from here
    return entry


def write_atomic(path: Path, data: bytes) -> None:
    """Write under a temporary name in the same directory, flush to disk, rename: readers see all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")
    with open(temporary, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def _write_json(path: Path, value: Any) -> None:
    write_atomic(path, json.dumps(value).encode())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def _clear_unversioned(root: Path) -> None:
    """Remove the files of a store of format 1 (no generations; never anything else in a user's data.store)."""
    (root / _MANIFEST).unlink(missing_ok=True)
    for name in (_LEDGER, *SPLITS):
        shutil.rmtree(root / name, ignore_errors=True)


def _remove_temporary_files(root: Path) -> None:
    for name in (_LEDGER, *SPLITS):
        for path in (root / name).glob("*.tmp-*"):
            path.unlink()


@contextlib.contextmanager
def store_lock(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on the store directory (released by the OS if this process dies)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / ".lock", "a")
    except OSError as e:
        raise UserError(
            f"The token store directory {root} cannot be written ({e.strerror}). Set data.store to a writable "
            "directory, or JAXSCALE_CACHE to move the default cache."
        ) from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
