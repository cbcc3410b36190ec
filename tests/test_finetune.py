"""Fine-tuning data: prompt/completion and chat rows, loss on the answers only, truncation counted."""

import json
import os

import numpy as np
import pytest

import jaxscale
from jaxscale.config import DataConfig
from jaxscale.data import ByteTokenizer
from jaxscale.data.chat import ChatTemplate
from jaxscale.data.finetune import FineTuneBatches
from jaxscale.errors import UserError
from jaxscale.training.goodput import read_rows

EOS = 256  # the byte tokenizer's
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def trained_targets(rows: dict[str, np.ndarray], row: int) -> str:
    """The target text of one row where it carries loss (eos shown as |)."""
    targets = rows["targets"][row][rows["loss_mask"][row] > 0]
    return "".join("|" if t == EOS else chr(t) for t in targets)


def all_rows(batches: FineTuneBatches, count: int) -> list[dict[str, np.ndarray]]:
    """Every example once: each is row 0 of the step that lands on it, whatever the shuffle."""
    return [batches.rows(step, [0]) for step in range(count)]


def test_prompt_tokens_carry_no_loss(tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Q: 2+2?", "completion": " 4"}])
    cfg = DataConfig(source="prompt_completion", paths=path, eval_fraction=0.0)
    rows = FineTuneBatches(cfg, "train", seq_len=16, global_batch=1).rows(0, [0])
    assert trained_targets(rows, 0) == " 4|"
    assert "".join(chr(t) for t in rows["inputs"][0][:7]) == "Q: 2+2?"


def test_a_chat_template_renders_the_conversation_as_written(tmp_path):
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": TEMPLATE, "bos_token": {"content": "<s>"}}))
    template = ChatTemplate.load(DataConfig(source="chat", chat_template=str(config)), ByteTokenizer())
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert template.render(messages) == "<s><|user|>\nhi<|end|>\n<|assistant|>\nhello<|end|>\n"
    assert template.render(messages[:1], add_generation_prompt=True) == "<s><|user|>\nhi<|end|>\n<|assistant|>\n"


def test_chat_rows_train_on_the_assistant_turns_only(tmp_path):
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": TEMPLATE, "bos_token": "<s>"}))
    conversation = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "ciao"},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation}])
    cfg = DataConfig(source="chat", paths=path, chat_template=str(config), eval_fraction=0.0)
    rows = FineTuneBatches(cfg, "train", seq_len=128, global_batch=1).rows(0, [0])
    # Each answer and the template's own closing of it; never the system, user or assistant-opening text.
    assert trained_targets(rows, 0) == "yo<|end|>\nciao<|end|>\n|"


@pytest.mark.slow  # 20-45 s on 2 busy cores; the default suite outgrew 15 min (sequence parallelism compiles slower)
def test_long_examples_are_truncated_counted_and_logged(tmp_path):
    # Rows go to train or eval by a hash of path:line, and the path is pytest's (random) temporary
    # folder: 30 of each kind make an empty eval split, or no long row in train, practically impossible.
    rows = [{"prompt": f"{i}" + "p" * 40, "completion": "c" * 40} for i in range(30)]
    rows += [{"prompt": f"{i}short", "completion": "yes"} for i in range(30)]
    path = write_jsonl(tmp_path / "pc.jsonl", rows)
    overrides = ["data.source=prompt_completion", f"data.paths={path}", "data.eval_fraction=0.3"]
    overrides += ["train.seq_len=32", "train.global_batch=8", "train.steps=2", f"run.dir={tmp_path / 'run'}"]
    overrides += ["log.progress=false", "log.tensorboard=false", "checkpoint.every=0", "train.eval_batches=1"]
    overrides += ["model.d_model=32", "model.n_layers=2", "model.d_ff=64", "model.head_dim=8"]
    cfg = jaxscale.load_config("configs/tiny.yaml", overrides)
    batches = FineTuneBatches(cfg.data, "train", 32, 8)
    assert batches.truncated >= 1
    long_row = next(r for r in all_rows(batches, 12) if r["inputs"][0][1] == ord("p"))
    assert len(long_row["inputs"][0]) == 32 and trained_targets(long_row, 0) == ""  # cut inside its prompt
    summary = jaxscale.train(cfg)
    assert np.isfinite(summary["final_loss"]) and np.isfinite(summary["final_eval_loss"])
    start = next(r for r in read_rows(tmp_path / "run") if r.get("event") == "start")
    assert (
        start["data_truncated_examples"] == batches.truncated
        and start["data_examples"] == batches.describe()["data_examples"]
        and 0.5 < start["data_fill_ratio"] <= 1.0  # several examples to a row
    )


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "q"}, r"pc.jsonl:2 needs string fields 'prompt' and 'completion'"),
        ("not json", r"pc.jsonl:2 is not valid JSON"),
    ],
)
def test_a_bad_row_is_named_by_file_and_line(tmp_path, row, message):
    path = tmp_path / "pc.jsonl"
    path.write_text(
        json.dumps({"prompt": "a", "completion": "b"})
        + "\n"
        + (row if isinstance(row, str) else json.dumps(row))
        + "\n"
    )
    with pytest.raises(UserError, match=message):
        FineTuneBatches(DataConfig(source="prompt_completion", paths=str(path), eval_fraction=0.0), "train", 16, 1)


def test_chat_rows_without_messages_and_a_byte_tokenizer_without_template_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"text": "x"}])
    with pytest.raises(UserError, match="data.source=chat needs a chat template; set data.chat_template"):
        FineTuneBatches(DataConfig(source="chat", paths=path, eval_fraction=0.0), "train", 16, 1)
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": TEMPLATE}))
    cfg = DataConfig(source="chat", paths=path, chat_template=str(config), eval_fraction=0.0)
    with pytest.raises(UserError, match=r"chat.jsonl:1 needs a field 'messages'"):
        FineTuneBatches(cfg, "train", 16, 1)


def test_a_fine_tuning_source_in_a_mixture_is_refused():
    from jaxscale.data.mixture import mixture_parts

    cfg = DataConfig(mixture=[{"source": "stdlib", "weight": 1.0}, {"source": "chat", "paths": "c.jsonl", "weight": 1}])
    with pytest.raises(UserError, match=r"data.mixture\[1\] has source chat: a mixture draws windows of pretraining"):
        mixture_parts(cfg)


def test_a_cut_short_row_table_is_built_again(tmp_path):
    rows = [{"prompt": f"q{i}" * (i % 5 + 1), "completion": f"a{i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "pc.jsonl", rows)
    cfg = DataConfig(source="prompt_completion", paths=path, eval_fraction=0.0, store=str(tmp_path / "store"))
    want = FineTuneBatches(cfg, "train", 32, 4).rows(2, range(4))
    (spans,) = (tmp_path / "store").glob("gen-*/train/rows-32-segmented.spans")
    os.truncate(spans, spans.stat().st_size - 8)  # as a crash while writing it would, were it not renamed whole
    got = FineTuneBatches(cfg, "train", 32, 4).rows(2, range(4))
    assert spans.stat().st_size % 16 == 0 and all(np.array_equal(got[k], want[k]) for k in want)
