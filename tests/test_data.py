"""Data pipeline: sources, split, packing, step-indexed rows, and sharded global batches."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxscale.config import DataConfig
from jaxscale.data import ByteTokenizer, GlobalBatchLoader, TokenBatches, build_tokenizer, eval_batches, iter_documents
from jaxscale.data.store import encode_documents
from jaxscale.errors import UserError

SEQ_LEN = 16


@pytest.fixture
def text_dir(tmp_path: Path) -> Path:
    for i in range(40):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"document number {i}: " + "lorem ipsum " * (i % 7 + 1))
    return tmp_path


@pytest.fixture
def jsonl_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"line {i} says hello", "id": i}) for i in range(200)) + "\n")
    return path


def text_config(text_dir: Path, **overrides: object) -> DataConfig:
    return DataConfig(**{"source": "text", "paths": str(text_dir / "*.txt"), "eval_fraction": 0.2, **overrides})


def test_same_seed_and_step_give_same_rows(text_dir: Path) -> None:
    first = TokenBatches(text_config(text_dir), "train", SEQ_LEN, 8).rows(5, range(8))
    again = TokenBatches(text_config(text_dir), "train", SEQ_LEN, 8).rows(5, range(8))
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])


def test_different_seed_gives_different_rows(text_dir: Path) -> None:
    seed0 = TokenBatches(text_config(text_dir, seed=0), "train", SEQ_LEN, 8).rows(0, range(8))
    seed1 = TokenBatches(text_config(text_dir, seed=1), "train", SEQ_LEN, 8).rows(0, range(8))
    assert not np.array_equal(seed0["inputs"], seed1["inputs"])


def test_rows_fetched_in_two_halves_match_all_at_once(text_dir: Path) -> None:
    batches = TokenBatches(text_config(text_dir), "train", SEQ_LEN, 8)
    whole = batches.rows(3, range(8))
    halves = [batches.rows(3, [6, 7, 4, 5]), batches.rows(3, np.arange(4))]
    for name in whole:
        np.testing.assert_array_equal(whole[name], np.concatenate([halves[1][name], halves[0][name][[2, 3, 0, 1]]]))


def test_rows_have_documented_shapes_and_targets_are_inputs_shifted(text_dir: Path) -> None:
    rows = TokenBatches(text_config(text_dir), "train", SEQ_LEN, 4).rows(0, range(4))
    assert rows["inputs"].shape == rows["targets"].shape == rows["loss_mask"].shape == (4, SEQ_LEN)
    assert (rows["inputs"].dtype, rows["targets"].dtype, rows["loss_mask"].dtype) == (np.int32, np.int32, np.float32)
    np.testing.assert_array_equal(rows["inputs"][:, 1:], rows["targets"][:, :-1])


def test_packing_puts_eos_after_each_document_and_drops_empty_ones() -> None:
    tokens = np.concatenate(encode_documents(["ab", "", "c", *[""] * 2000], ByteTokenizer(), np.dtype(np.uint16)))
    np.testing.assert_array_equal(tokens, [97, 98, 256, 99, 256])
    assert tokens.dtype == np.uint16


def test_one_epoch_covers_the_packed_stream_once_and_masks_only_the_padded_tail(tmp_path: Path) -> None:
    first, second = "abcdefghijklmnopqrst", "ABCDEFGHIJKLMNOPQRST"
    (tmp_path / "a.txt").write_text(first)
    (tmp_path / "b.txt").write_text(second)
    batches = TokenBatches(DataConfig(source="text", paths=str(tmp_path / "*.txt"), eval_fraction=0.0), "train", 8, 6)
    assert batches.tokens_per_epoch == 42 and batches.num_windows == 6  # ceil(41 targets / 8)

    stream = np.array([*first.encode(), 256, *second.encode(), 256, *[0] * 7])
    expected = sorted(tuple(stream[k * 8 : k * 8 + 9]) for k in range(6))
    rows = batches.rows(0, range(6))
    windows = np.concatenate([rows["inputs"], rows["targets"][:, -1:]], axis=1)
    assert sorted(map(tuple, windows)) == expected
    assert rows["loss_mask"].sum() == 41  # every token but the first is a target once; the padded tail is not

    next_epoch = batches.rows(1, range(6))
    assert sorted(map(tuple, next_epoch["inputs"])) == sorted(map(tuple, rows["inputs"]))
    assert not np.array_equal(next_epoch["inputs"], rows["inputs"])  # each epoch has its own order


def test_eval_and_train_documents_are_disjoint_and_cover_the_corpus(jsonl_file: Path) -> None:
    cfg = DataConfig(source="jsonl", paths=str(jsonl_file), eval_fraction=0.25)
    train, held_out = set(iter_documents(cfg, "train")), set(iter_documents(cfg, "eval"))
    assert not train & held_out
    assert len(train | held_out) == 200
    assert 20 < len(held_out) < 80


def test_split_of_a_document_does_not_change_when_files_are_added(text_dir: Path) -> None:
    before = set(iter_documents(text_config(text_dir), "eval"))
    (text_dir / "aaa_new.txt").write_text("a brand new document")
    after = set(iter_documents(text_config(text_dir), "eval"))
    assert before <= after and after - before <= {"a brand new document"}


def test_parquet_source_reads_the_text_column(tmp_path: Path) -> None:
    texts = [f"row {i}" for i in range(30)]
    pq.write_table(pa.table({"body": texts, "n": list(range(30))}), tmp_path / "part.parquet")
    cfg = DataConfig(source="parquet", paths=str(tmp_path / "*.parquet"), text_field="body", eval_fraction=0.0)
    assert list(iter_documents(cfg, "train")) == texts


def test_hf_tokenizer_uses_its_eos_token(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "</s>": 3}
    hf = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(["</s>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    tokenizer = build_tokenizer(DataConfig(tokenizer=str(tmp_path / "tokenizer.json")))
    assert (tokenizer.vocab_size, tokenizer.eos_id) == (4, 3)
    np.testing.assert_array_equal(tokenizer.encode("hello world"), [1, 2])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"source": "text", "paths": "/no/such/dir/*.txt"}, r"data\.paths pattern '/no/such/dir/\*\.txt' matches no"),
        ({"source": "jsonl", "paths": ""}, r"data\.paths is empty"),
        ({"source": "csv"}, r"data\.source='csv' is not a known source"),
        ({"tokenizer": "/no/such/tokenizer.json"}, r"data\.tokenizer='/no/such/tokenizer\.json' is neither"),
        ({"eval_fraction": 1.0}, r"data\.eval_fraction=1\.0 must be"),
    ],
)
def test_config_mistakes_raise_user_errors_naming_the_key(overrides: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        TokenBatches(DataConfig(**overrides), "train", SEQ_LEN, 4)


def test_missing_text_field_names_the_key(jsonl_file: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"no string field data\.text_field='content'"):
        TokenBatches(DataConfig(source="jsonl", paths=str(jsonl_file), text_field="content"), "train", SEQ_LEN, 4)
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "part.parquet")
    with pytest.raises(UserError, match=r"no column data\.text_field='text'; its columns are body"):
        TokenBatches(DataConfig(source="parquet", paths=str(tmp_path / "*.parquet")), "train", SEQ_LEN, 4)


def test_empty_eval_split_says_to_raise_eval_fraction(text_dir: Path) -> None:
    with pytest.raises(UserError, match=r"eval split .* holds no documents"):
        TokenBatches(text_config(text_dir, eval_fraction=0.0), "eval", SEQ_LEN, 4)


def test_stdlib_source_builds_a_compact_byte_stream() -> None:
    batches = TokenBatches(DataConfig(), "train", 128, 16)
    assert batches.vocab_size == 257
    assert batches.tokens_per_epoch > 5_000_000
    rows = batches.rows(0, range(16))
    assert rows["inputs"].max() <= 256 and rows["loss_mask"].all()


def batch_sharding(model_axis: int = 1) -> NamedSharding:
    n = len(jax.devices())
    mesh = jax.make_mesh((n // model_axis, model_axis), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    return NamedSharding(mesh, PartitionSpec("data"))


@pytest.mark.parametrize("model_axis", [1, 2])
def test_loader_assembles_exactly_the_rows_of_the_step(text_dir: Path, model_axis: int) -> None:
    if len(jax.devices()) % model_axis:
        pytest.skip("needs an even number of devices")
    sharding = batch_sharding(model_axis)
    global_batch = 2 * len(jax.devices())
    batches = TokenBatches(text_config(text_dir), "train", SEQ_LEN, global_batch)
    with GlobalBatchLoader(batches, sharding, start_step=3, prefetch=2) as loader:
        for expected_step in (3, 4):
            step, batch = next(loader)
            assert step == expected_step and loader.last_wait_s >= 0.0
            rows = batches.rows(step, range(global_batch))
            for name, value in batch.items():
                assert value.shape == (global_batch, SEQ_LEN) and value.sharding == sharding
                np.testing.assert_array_equal(np.asarray(value), rows[name])


def test_eval_batches_are_the_first_steps_of_the_eval_split(text_dir: Path) -> None:
    global_batch = len(jax.devices())
    batches = TokenBatches(text_config(text_dir), "eval", SEQ_LEN, global_batch)
    held_out = eval_batches(batches, batch_sharding(), num_batches=2)
    assert len(held_out) == 2
    np.testing.assert_array_equal(np.asarray(held_out[1]["targets"]), batches.rows(1, range(global_batch))["targets"])


class _FailingBatches:
    global_batch, seq_len = len(jax.devices()), 4

    def rows(self, step: int, row_ids: object) -> dict[str, np.ndarray]:
        raise RuntimeError(f"disk gone at step {step}")


def test_loader_reraises_errors_from_its_thread_and_closes_cleanly() -> None:
    loader = GlobalBatchLoader(_FailingBatches(), batch_sharding(), start_step=7, prefetch=1)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="disk gone at step 7"):
        next(loader)
    loader.close()
    assert not any(thread.name == "jaxscale-data" and thread.is_alive() for thread in threading.enumerate())


# Valid inside JSON strings, left raw by json.dumps(ensure_ascii=False), and line breaks to str.splitlines.
UNICODE_BREAKS = "\u2028\u2029\u0085"


def test_jsonl_is_split_on_newlines_only_with_the_same_line_numbers_in_every_reader(tmp_path: Path) -> None:
    from jaxscale.data import prepare
    from jaxscale.data.finetune import FineTuneBatches
    from jaxscale.data.sources import list_files, plan_pieces, read_piece
    from jaxscale.generate import read_prompts
    from jaxscale.training.goodput import read_rows

    rows = [
        {"text": f"row {i} {UNICODE_BREAKS} end", "prompt": f"p{i}{UNICODE_BREAKS}", "completion": "c"}
        for i in range(3)
    ]
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\r\n\n", encoding="utf-8")  # a Windows line end and a blank line too
    assert len(path.read_text(encoding="utf-8").splitlines()) == 3 * 7 + 1  # what splitlines would see

    cfg = DataConfig(source="jsonl", paths=str(path), eval_fraction=0.0)
    documents = [doc for piece in plan_pieces("jsonl", list_files(cfg)) for doc in read_piece("jsonl", piece, "text")]
    assert documents == [(f"{path}:{i + 1}", row["text"]) for i, row in enumerate(rows)]
    assert read_prompts(None, str(path)) == [row["prompt"] for row in rows]
    (tmp_path / "metrics.jsonl").write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    assert read_rows(tmp_path) == rows
    finetune = DataConfig(source="prompt_completion", paths=str(path), eval_fraction=0.0)
    assert FineTuneBatches(finetune, "train", 64, 1).describe()["data_examples"] == 3

    # A bad row after them is named by the same line number by every reader.
    path.write_text("\n".join([*lines, "{not json"]) + "\n", encoding="utf-8")
    where = rf"{path}:4 is not valid JSON"
    with pytest.raises(UserError, match=where):
        [doc for piece in plan_pieces("jsonl", list_files(cfg)) for doc in read_piece("jsonl", piece, "text")]
    with pytest.raises(UserError, match=where):
        read_prompts(None, str(path))
    with pytest.raises(UserError, match=where):
        prepare(finetune)  # fine-tuning rows are tokenized into the store, as documents are
