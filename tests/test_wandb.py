"""log.wandb=true: every logged row reaches a W&B run (offline here: no network), and a resume continues it."""

import json
from pathlib import Path

import pytest
from test_checkpoint import run

wandb_pb2 = pytest.importorskip("wandb.proto.wandb_internal_pb2")

_BLOCK = 32 * 1024  # the .wandb file is a LevelDB-style log: 32 KiB blocks of records with 7-byte headers
_FULL, _LAST = 1, 4


def wandb_records(path: Path) -> list[bytes]:
    """The records of a run's .wandb file (W&B's offline store), joined across blocks."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, position = [], b"", 7
    while position + 7 <= len(data):
        if _BLOCK - position % _BLOCK < 7:  # a block's tail too short for a header is padding
            position += _BLOCK - position % _BLOCK
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (_FULL, _LAST):
            records.append(pending)
            pending = b""
    return records


def wandb_history(path: Path) -> tuple[str, list[dict]]:
    """(run id, the history rows) of a run's .wandb file."""
    run_id, rows = "", []
    for data in wandb_records(path):
        record = wandb_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    return run_id, rows


@pytest.mark.slow  # two runs, each starting W&B's service: about a minute on 2 cores
def test_every_logged_row_reaches_an_offline_wandb_run_and_a_resume_continues_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run(tmp_path, "train.steps=5", "log.wandb=true", "log.wandb_project=tests")
    run(tmp_path, "train.steps=8", "log.wandb=true", "log.wandb_project=tests")

    run_id = (tmp_path / "wandb_id").read_text()
    files = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2  # one W&B run, written by two attempts
    histories = [wandb_history(f) for f in files]
    assert [h[0] for h in histories] == [run_id, run_id]

    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    step_rows = [row for row in logged if "loss" in row]
    sent = [row for _, rows in histories for row in rows if "loss" in row]
    assert [row["step"] for row in sent] == [row["step"] for row in step_rows] == [1, 2, 3, 4, 5, 6, 7, 8]
    for wrote, got in zip(step_rows, sent, strict=True):
        numbers = {k: v for k, v in wrote.items() if isinstance(v, int | float) and v is not None and k != "time"}
        assert {k: got[k] for k in numbers} == numbers
    assert [row["event"] for _, rows in histories for row in rows if "event" in row] == [
        "start",
        "end",
        "start",
        "end",
    ]
