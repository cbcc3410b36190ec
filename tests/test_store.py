"""The token store: prepared once (resumably, in parallel), checked against its sources, read by memory map."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_runner import REPO, run_cli, stopped_at_exit

from jaxscale.config import DataConfig
from jaxscale.data import TokenBatches, iter_documents, open_store, prepare
from jaxscale.data import store as store_module
from jaxscale.data.sources import list_files, plan_pieces, read_piece
from jaxscale.errors import UserError

SEQ_LEN = 16


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    directory = tmp_path / "corpus"
    directory.mkdir()
    for i in range(60):
        (directory / f"doc{i:02d}.txt").write_text(f"document {i} " + "the quick brown fox " * (i % 9 + 1))
    return directory


def text_config(corpus: Path, **overrides: object) -> DataConfig:
    settings = {"source": "text", "paths": str(corpus / "*.txt"), "eval_fraction": 0.2}
    return DataConfig(**(settings | {"store": str(corpus.parent / "store")} | overrides))


def all_windows(cfg: DataConfig, split: str) -> np.ndarray:
    """Every window of one epoch of `split`, in window order: [num_windows, seq_len + 1]."""
    windows = open_store(cfg).windows(split, SEQ_LEN)
    return np.stack([np.append(w["inputs"], w["targets"][-1]) for w in (windows[k] for k in range(len(windows)))])


def test_shards_workers_and_windows_across_shard_boundaries_give_one_stream(corpus: Path) -> None:
    one, many = (text_config(corpus, store=str(corpus.parent / name)) for name in ("one", "many"))
    one_shard = prepare(dataclasses.replace(one, workers=1))
    sharded = prepare(dataclasses.replace(many, workers=2), shard_bytes=300)
    assert (one_shard.built_shards, one_shard.workers) == (1, 1) and sharded.built_shards > 5 and sharded.workers == 2
    for split in ("train", "eval"):
        np.testing.assert_array_equal(all_windows(one, split), all_windows(many, split))
        # The stream is the split's documents in corpus order, each followed by eos.
        documents = [np.append(np.frombuffer(t.encode(), np.uint8), 256) for t in iter_documents(one, split)]
        stream = np.concatenate(documents)
        windows = all_windows(one, split)
        np.testing.assert_array_equal(windows[:-1, :-1].reshape(-1), stream[: (len(windows) - 1) * SEQ_LEN])


def test_prepare_again_is_a_no_op_and_an_interrupted_build_resumes(corpus: Path, monkeypatch) -> None:
    cfg = text_config(corpus, workers=1)
    build_shard = store_module._build_shard

    def fail_on_shard_3(task):
        if task.index == 3:
            raise KeyboardInterrupt  # the build is stopped after shards 0..2 are in the ledger
        return build_shard(task)

    monkeypatch.setattr(store_module, "_build_shard", fail_on_shard_3)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, shard_bytes=300)
    assert not (Path(cfg.store) / "manifest.json").exists()
    monkeypatch.setattr(store_module, "_build_shard", build_shard)
    resumed = prepare(cfg, shard_bytes=300)
    total = len(json.loads((Path(cfg.store) / "plan.json").read_text())["shards"])
    assert resumed.built_shards == total - 3

    again = prepare(cfg, shard_bytes=300)
    assert again.built_shards == 0 and again.store.manifest == resumed.store.manifest
    fresh = text_config(corpus, store=str(corpus.parent / "fresh"))
    prepare(fresh, shard_bytes=300)
    np.testing.assert_array_equal(all_windows(cfg, "train"), all_windows(fresh, "train"))


def test_a_changed_source_is_refused_until_prepared_again(corpus: Path) -> None:
    cfg = text_config(corpus)
    TokenBatches(cfg, "train", SEQ_LEN, 4)
    before = [open_store(cfg).tokens(split) for split in ("train", "eval")]
    (corpus / "doc07.txt").write_text("this document was rewritten after the store was prepared")
    with pytest.raises(UserError, match=r"doc07\.txt has changed\. Run `jaxscale prepare CONFIG`"):
        TokenBatches(cfg, "train", SEQ_LEN, 4)
    (corpus / "new.txt").write_text("a new file")
    with pytest.raises(UserError, match=r"new\.txt is new, .*doc07\.txt has changed"):
        TokenBatches(cfg, "train", SEQ_LEN, 4)
    assert prepare(cfg).built_shards == 1
    TokenBatches(cfg, "train", SEQ_LEN, 4)
    # Either split may hold the changed documents (a hash of their path decides).
    assert [open_store(cfg).tokens(split) for split in ("train", "eval")] != before


def write_tokenizer(path: Path, words: list[str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(path))


def test_a_changed_tokenizer_is_refused_until_prepared_again(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"hello world {i}"}) + "\n" for i in range(100)))
    write_tokenizer(tmp_path / "tokenizer.json", ["hello", "world"])
    cfg = DataConfig(source="jsonl", paths=str(corpus), tokenizer=str(tmp_path / "tokenizer.json"), eval_fraction=0.1)
    TokenBatches(cfg, "train", 4, 2)
    write_tokenizer(tmp_path / "tokenizer.json", ["world", "hello"])
    changed = r"tokenizer data\.tokenizer='.*tokenizer\.json' \(or a file beside it\) has changed\. Run `jaxscale"
    with pytest.raises(UserError, match=changed):
        TokenBatches(cfg, "train", 4, 2)
    prepare(cfg)
    assert TokenBatches(cfg, "train", 4, 2).rows(0, [0])["inputs"].max() <= 3


def test_jsonl_pieces_keep_line_numbers(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"text": f"line {i} " * (i % 5 + 1)}) if i % 17 else "" for i in range(1, 301)]
    corpus.write_text("\n".join(lines) + "\n")
    cfg = DataConfig(source="jsonl", paths=str(corpus))
    whole = [doc for p in plan_pieces("jsonl", list_files(cfg)) for doc in read_piece("jsonl", p, "text")]
    pieces = plan_pieces("jsonl", list_files(cfg), piece_bytes=500)
    assert len(pieces) > 10
    assert [doc for p in pieces for doc in read_piece("jsonl", p, "text")] == whole
    assert whole[-1][0] == f"{corpus}:300"

    lines[249] = json.dumps({"body": "no text here"})
    corpus.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=rf"{corpus}:250 has no string field data\.text_field='text'"):
        prepare(DataConfig(source="jsonl", paths=str(corpus), store=str(tmp_path / "store")), shard_bytes=500)


def bad_input(tmp_path: Path, kind: str) -> tuple[list[str], str]:
    """Overrides that give a `kind` of bad input, and the message expected (naming file and line)."""
    if kind == "unreadable":
        (tmp_path / "part.parquet").write_bytes(b"this is not parquet")
        return ["data.source=parquet", f"data.paths={tmp_path}/*.parquet"], rf"{tmp_path}/part\.parquet cannot be read"
    if kind == "empty":
        (tmp_path / "a.txt").write_text("some text")
        (tmp_path / "b.txt").write_text("")
        return ["data.source=text", f"data.paths={tmp_path}/*.txt"], rf"{tmp_path}/b\.txt is empty\. Remove it"
    if kind == "missing field":
        (tmp_path / "c.jsonl").write_text('{"text": "fine"}\n\n{"content": "wrong key"}\n')
        return ["data.source=jsonl", f"data.paths={tmp_path}/c.jsonl"], rf"{tmp_path}/c\.jsonl:3 has no string field"
    return [f"data.paths={tmp_path}/*.txt"], r"data\.paths='.*' is set, but data\.source=stdlib .* would ignore it"


# train reads its store through the same checks as prepare; one case shows that it refuses too.
@pytest.mark.parametrize(
    ("command", "kind"),
    [("prepare", "unreadable"), ("prepare", "empty"), ("prepare", "missing field"), ("prepare", "paths with stdlib")]
    + [("train", "paths with stdlib")],
)
def test_bad_input_exits_2_naming_the_file_and_line(tmp_path: Path, command: str, kind: str) -> None:
    overrides, message = bad_input(tmp_path, kind)
    result = run_cli(command, "configs/tiny.yaml", f"run.dir={tmp_path / 'run'}", *overrides)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1].startswith("jaxscale: error: ")  # after any progress bar
    assert re.search(message, result.stderr), result.stderr


def test_store_settings_and_rowless_parquet_are_refused_with_the_fix(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"data\.workers=-1 must be 0 \(one per CPU core\) or a number"):
        prepare(text_config(corpus, workers=-1))
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(UserError, match=rf"store directory {tmp_path}/file/store cannot be written .* data\.store"):
        prepare(text_config(corpus, store=str(tmp_path / "file" / "store")))
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    with pytest.raises(UserError, match=rf"{tmp_path}/empty\.parquet holds no rows\. Remove it"):
        prepare(DataConfig(source="parquet", paths=str(tmp_path / "*.parquet")))


def test_prepare_command_builds_once_then_reports_up_to_date(corpus: Path) -> None:
    overrides = ["data.source=text", f"data.paths={corpus}/*.txt", f"data.store={corpus.parent / 'cli'}"]
    first = run_cli("prepare", "configs/tiny.yaml", *overrides, "log.progress=false")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "1 shards" in first.stdout and "MB/s" in first.stdout
    second = run_cli("prepare", "configs/tiny.yaml", *overrides)
    assert "is up to date (train " in second.stdout


def test_resume_from_a_checkpoint_with_the_store_is_bitwise(corpus: Path, tmp_path: Path) -> None:
    from jaxscale.config import load_config
    from jaxscale.training.loop import train

    common = [
        "data.source=text",
        f"data.paths={corpus}/*.txt",
        f"data.store={tmp_path / 'store'}",
        "train.seq_len=32",
        "model.compute_dtype=float32",
        "optim.decay_steps=4",  # the same schedule whatever train.steps
        "checkpoint.every=2",
        "train.eval_every=0",
        "train.eval_batches=1",
        "log.every=1",
        "log.progress=false",
        "log.tensorboard=false",
    ]

    def losses(run_dir: Path, steps: int) -> dict[int, float]:
        train(load_config("configs/tiny.yaml", [*common, f"run.dir={run_dir}", f"train.steps={steps}"]))
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {row["step"]: row["loss"] for row in rows if "loss" in row}

    straight = losses(tmp_path / "straight", 4)
    losses(tmp_path / "resumed", 2)
    resumed = losses(tmp_path / "resumed", 4)
    assert [resumed[s] for s in (3, 4)] == [straight[s] for s in (3, 4)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STEP, GLOBAL_BATCH = 3, 16


def read_own_rows(process_id: int, port: int, store_cfg: str, out: str) -> None:
    """One of two processes x 4 CPU devices: assemble the batch of STEP and record each window read."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxscale.data.loader import process_row_ids, to_global_batch
    from jaxscale.data.store import StoreWindows

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", 4)
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    read: list[int] = []
    get = StoreWindows.__getitem__
    StoreWindows.__getitem__ = lambda self, index: (read.append(int(index)), get(self, index))[1]
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    batches = TokenBatches(DataConfig(**json.loads(store_cfg)), "train", SEQ_LEN, GLOBAL_BATCH)
    read.clear()  # count only the reads of the step
    row_ids = process_row_ids(sharding, (GLOBAL_BATCH, SEQ_LEN))
    rows = batches.rows(STEP, row_ids)
    jax.block_until_ready(to_global_batch(rows, row_ids, sharding, (GLOBAL_BATCH, SEQ_LEN)))
    Path(out).write_text(json.dumps({"windows": read, "rows": row_ids.tolist(), "inputs": rows["inputs"].tolist()}))
    jax.distributed.shutdown()


def test_each_of_two_processes_reads_only_the_windows_of_its_rows(corpus: Path, monkeypatch) -> None:
    cfg = text_config(corpus)  # not prepared yet: both processes find it missing, one builds, the other waits
    port = free_port()
    outs = [corpus.parent / f"process{i}.json" for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(i), str(port), json.dumps(cfg.__dict__), str(outs[i])],
            env=os.environ | {"PYTHONPATH": str(REPO)},  # this checkout's jaxscale, whatever is installed
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    with stopped_at_exit(*procs):
        for proc in procs:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-3000:]
    results = [json.loads(out.read_text()) for out in outs]

    read_here: list[int] = []
    get = store_module.StoreWindows.__getitem__
    monkeypatch.setattr(store_module.StoreWindows, "__getitem__", lambda s, i: (read_here.append(i), get(s, i))[1])
    whole = TokenBatches(cfg, "train", SEQ_LEN, GLOBAL_BATCH).rows(STEP, range(GLOBAL_BATCH))

    assert [len(r["rows"]) for r in results] == [8, 8] and not set(results[0]["rows"]) & set(results[1]["rows"])
    assert [len(r["windows"]) for r in results] == [8, 8]  # one window per own row, no more
    assert sorted(results[0]["windows"] + results[1]["windows"]) == sorted(read_here[-GLOBAL_BATCH:])
    union = np.zeros_like(whole["inputs"])
    for r in results:
        union[r["rows"]] = r["inputs"]
    np.testing.assert_array_equal(union, whole["inputs"])


if __name__ == "__main__":
    read_own_rows(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])


def shard_file(cfg: DataConfig, split: str = "train") -> Path:
    """The largest tokens file of `split` in the store's current generation."""
    store = open_store(cfg)
    names = [name for name in store.manifest["files"] if name.startswith(f"{split}/") and name.endswith(".tokens")]
    return store.path / max(names, key=lambda name: store.manifest["files"][name]["size"])


def test_a_truncated_shard_is_named_on_open_and_rebuilt_by_prepare(corpus: Path) -> None:
    cfg = text_config(corpus)
    prepare(cfg, shard_bytes=300)
    want = all_windows(cfg, "train")
    damaged = shard_file(cfg)
    size = damaged.stat().st_size
    os.truncate(damaged, size - 3)  # not even a whole token: the reader would fail on the buffer's size
    message = rf"is damaged: {damaged} holds {size - 3} bytes where the manifest says {size}\. Run `jaxscale prepare"
    with pytest.raises(UserError, match=message):
        TokenBatches(cfg, "train", SEQ_LEN, 4)
    overrides = ["data.source=text", f"data.paths={corpus}/*.txt", f"data.store={cfg.store}", "data.eval_fraction=0.2"]
    result = run_cli("prepare", "configs/tiny.yaml", *overrides, "log.progress=false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"damaged: {damaged} holds {size - 3} bytes" in result.stdout and " 1 shards" in result.stdout
    np.testing.assert_array_equal(all_windows(cfg, "train"), want)  # the other shards were linked, not rebuilt
    assert "is up to date" in run_cli("prepare", "configs/tiny.yaml", *overrides).stdout


def test_prepare_verify_finds_a_changed_byte_that_sizes_do_not(corpus: Path) -> None:
    cfg = text_config(corpus)
    prepare(cfg, shard_bytes=300)
    want = all_windows(cfg, "train")
    damaged = shard_file(cfg)
    data = bytearray(damaged.read_bytes())
    data[0] ^= 0xFF
    damaged.write_bytes(bytes(data))
    assert prepare(cfg, shard_bytes=300).built_shards == 0  # sizes alone cannot see it
    result = prepare(cfg, shard_bytes=300, verify=True)
    assert result.damaged == (f"{damaged} does not match its sha256",) and result.built_shards == 1
    np.testing.assert_array_equal(all_windows(cfg, "train"), want)
    assert "every file matches its checksum" in store_module.format_prepared(prepare(cfg, verify=True))


def test_a_rebuild_is_a_new_generation_and_a_running_reader_keeps_its_files(corpus: Path) -> None:
    cfg = text_config(corpus)
    running = TokenBatches(cfg, "train", SEQ_LEN, 4)  # holds its generation's reader lock, as a training run
    before = running.rows(3, range(4))
    old_store = open_store(cfg)
    old = old_store.path
    (corpus / "doc07.txt").write_text("this document was rewritten while a run was reading the store")
    (corpus / "new.txt").write_text("and a new document arrived " * 20)
    rebuilt = prepare(cfg)
    assert rebuilt.built_shards == 1 and rebuilt.store.path != old and old.is_dir()
    for key, value in running.rows(3, range(4)).items():
        np.testing.assert_array_equal(value, before[key])  # the old generation, untouched
    assert sum(rebuilt.store.tokens(s) for s in ("train", "eval")) > sum(old_store.tokens(s) for s in ("train", "eval"))
    store_module._READING.pop(str(old)).close()  # the reader exits
    prepare(cfg)
    assert not old.exists() and sorted(p.name for p in Path(cfg.store).glob("gen-*")) == [rebuilt.store.path.name]
