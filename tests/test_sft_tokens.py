"""Fine-tuning examples tokenized as Hugging Face does: whole text once, masks from character offsets.

The reference is the `tokenizers` library encoding the whole rendered text, which is what transformers'
`apply_chat_template(tokenize=True)` (no special tokens added: the template writes them) and
`tokenizer(prompt + completion)` (special tokens added) do; the chat text is rendered here by a jinja2
environment set up as transformers sets it up. The trained tokens are checked against spans found in the
text independently (each assistant message's trimmed content and its end token, searched for in order).
scripts/check_hf_parity.py compares the same rows with transformers itself.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from hf_tokenizers import (
    LLAMA3_GENERATION_TEMPLATE,
    byte_level,
    chat_rows,
    prompt_completion_rows,
    sentencepiece_style,
)

from jaxscale.config import DataConfig
from jaxscale.data import build_tokenizer
from jaxscale.data.chat import ChatTemplate
from jaxscale.data.examples import ExampleEncoder
from jaxscale.data.finetune import FineTuneBatches
from jaxscale.errors import UserError

ROWS = 50


def hf_render(template: str, messages: list[dict], tokens: dict[str, str], add_generation_prompt=False) -> str:
    """The chat as transformers renders it: its sandbox, options, extension and globals (generation tags not
    needed here)."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.globals["raise_exception"] = raise_exception
    return environment.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **tokens
    )


def spans_of(text: str, messages: list[dict], end: str, trim: bool) -> list[tuple[int, int]]:
    """Where each assistant message's content, then `end`, lies in the rendered text, found in order."""
    spans, position = [], 0
    for message in messages:
        content = message["content"].strip() if trim else message["content"]
        if message["role"] == "assistant":
            start = text.index(content + end, position)
            spans.append((start, start + len(content) + len(end)))
            position = start + len(content) + len(end)
        else:
            position = text.index(content, position) + len(content)
    return spans


def overlapping(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    return np.array([any(s < b and e > a for a, b in spans) for s, e in offsets])


@pytest.fixture(scope="module")
def tokenizers_dir(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {"sentencepiece": sentencepiece_style(root / "sp"), "byte_level": byte_level(root / "bl")}


KINDS = {  # the template's end-of-answer text, whether it trims contents, and whether it allows system messages
    "sentencepiece": ("</s>", False, False),
    "byte_level": ("<|eot_id|>", True, True),
}


@pytest.mark.parametrize("kind", KINDS)
def test_chat_ids_equal_the_whole_rendered_text_and_the_mask_is_the_assistant_spans(tokenizers_dir, kind):
    from tokenizers import Tokenizer

    path = tokenizers_dir[kind]
    end, trim, system = KINDS[kind]
    reference = Tokenizer.from_file(str(path))
    config = json.loads((path.parent / "tokenizer_config.json").read_text())
    tokens = {k: config[k] for k in ("bos_token", "eos_token")}
    encoder = ExampleEncoder(
        DataConfig(source="chat", tokenizer=str(path)), build_tokenizer(DataConfig(tokenizer=str(path)))
    )
    for number, row in enumerate(chat_rows(ROWS, seed=7, system=system), start=1):
        text = hf_render(config["chat_template"], row["messages"], tokens)
        want = reference.encode(text, add_special_tokens=False)
        ids, trained = encoder.chat(row["messages"], None, f"row {number}")
        np.testing.assert_array_equal(ids, want.ids, err_msg=f"row {number}: {text!r}")
        spans = spans_of(text, row["messages"], end, trim)
        np.testing.assert_array_equal(trained, overlapping(want.offsets, spans), err_msg=f"row {number}")
        # Each answer is learned whole, through the template's end token.
        learned = {c for (s, e), t in zip(want.offsets, trained, strict=True) if t for c in range(s, e)}
        assert all(set(range(a, b)) <= learned for a, b in spans), f"row {number}"
        assert ids[-1] == reference.token_to_id(end)  # the template's own end token, and nothing after it


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_completion_ids_are_the_tokenizer_on_the_whole_text_with_bos_and_eos(tokenizers_dir, kind):
    from tokenizers import Tokenizer

    path = tokenizers_dir[kind]
    reference = Tokenizer.from_file(str(path))
    tokenizer = build_tokenizer(DataConfig(tokenizer=str(path)))
    encoder = ExampleEncoder(DataConfig(source="prompt_completion", tokenizer=str(path)), tokenizer)
    eos_text = {"sentencepiece": "</s>", "byte_level": "<|eot_id|>"}[kind]
    bos = {"sentencepiece": "<s>", "byte_level": "<|begin_of_text|>"}[kind]
    for number, row in enumerate(prompt_completion_rows(ROWS, seed=3), start=1):
        prompt, completion = row["prompt"], row["completion"]
        # TRL's SFTTrainer: the completion gets the eos_token text, then tokenizer(prompt + completion).
        want = reference.encode(prompt + completion + eos_text, add_special_tokens=True)
        ids, trained = encoder.prompt_completion(prompt, completion)
        np.testing.assert_array_equal(ids, want.ids, err_msg=f"row {number}")
        assert ids[0] == reference.token_to_id(bos) and ids[-1] == reference.token_to_id(eos_text)
        span = [(len(prompt), len(prompt) + len(completion) + len(eos_text))]
        np.testing.assert_array_equal(trained, overlapping(want.offsets, span), err_msg=f"row {number}")
    assert (tokenizer.bos_id, tokenizer.eos_id) == (reference.token_to_id(bos), reference.token_to_id(eos_text))


def test_eos_and_bos_come_from_the_models_files(tokenizers_dir):
    from tokenizers import Tokenizer

    path = tokenizers_dir["byte_level"]
    reference = Tokenizer.from_file(str(path))
    tokenizer = build_tokenizer(DataConfig(tokenizer=str(path.parent)))  # the directory works too
    eot, end_of_text = reference.token_to_id("<|eot_id|>"), reference.token_to_id("<|end_of_text|>")
    assert tokenizer.eos_id == eot  # tokenizer_config's eos_token: the document separator
    assert tokenizer.eos_ids == (end_of_text, eot)  # generation_config's list: what ends a generation
    assert tokenizer.bos_id == reference.token_to_id("<|begin_of_text|>") and not tokenizer.adds_eos
    np.testing.assert_array_equal(tokenizer.encode("hi", add_special_tokens=True), reference.encode("hi").ids)


def test_add_bos_and_eos_token_in_tokenizer_config_decide_when_the_post_processor_differs(tmp_path):
    from tokenizers import Tokenizer

    path = sentencepiece_style(tmp_path / "sp")
    plain = Tokenizer.from_file(str(path))
    plain.post_processor = None
    plain.save(str(path))
    config = json.loads((path.parent / "tokenizer_config.json").read_text()) | {"add_eos_token": True}
    (path.parent / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = build_tokenizer(DataConfig(tokenizer=str(path)))
    body = plain.encode("hello world", add_special_tokens=False).ids
    assert tokenizer.encode("hello world", add_special_tokens=True).tolist() == [1, *body, 2]
    assert (tokenizer.bos_id, tokenizer.adds_eos) == (1, True)
    # The tokenizer's own eos: TRL would append a second </s>; jaxscale does not.
    ids, trained = ExampleEncoder(DataConfig(source="prompt_completion"), tokenizer).prompt_completion("a b", " c")
    assert ids.tolist() == [1, *plain.encode("a b c", add_special_tokens=False).ids, 2]
    assert trained[-1] and not trained[1]


def test_generation_blocks_mark_the_trained_text(tmp_path):
    path = byte_level(tmp_path / "gen", template=LLAMA3_GENERATION_TEMPLATE)
    tokenizer = build_tokenizer(DataConfig(tokenizer=str(path)))
    cfg = DataConfig(source="chat", tokenizer=str(path))
    template = ChatTemplate.load(cfg, tokenizer)
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": " hello! "},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "ciao"},
    ]
    text, spans = template.render_with_spans(messages, None, "row")
    assert [text[a:b] for a, b in spans] == ["hello!<|eot_id|>", "ciao<|eot_id|>"]
    ids, trained = ExampleEncoder(cfg, tokenizer).chat(messages, None, "row")
    assert tokenizer.decode(ids[trained]) == "hello!ciao"  # the end tokens are special: decode leaves them out
    assert int(np.sum(ids[trained] == tokenizer.eos_id)) == 2


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_templates_are_read_as_transformers_reads_them(tmp_path):
    tokenizer = build_tokenizer(DataConfig(tokenizer=str(byte_level(tmp_path / "bl"))))
    messages = [{"role": "user", "content": "a<b>"}, {"role": "assistant", "content": "c"}]
    # chat_template.jinja beside the tokenizer wins over tokenizer_config.json's.
    write(tmp_path / "bl" / "chat_template.jinja", "{% for m in messages %}{{ m.content }}|{% endfor %}")
    assert (
        ChatTemplate.load(DataConfig(tokenizer=str(tmp_path / "bl" / "tokenizer.json")), tokenizer).render(messages)
        == "a<b>|c|"
    )
    # Named templates: "default" is used, and "tool_use" for a conversation with tools.
    named = [
        {"name": "default", "template": "D{{ messages | length }}"},
        {"name": "tool_use", "template": "T{{ tools | tojson }}"},
    ]
    config = write(tmp_path / "named.json", json.dumps({"chat_template": named}))
    template = ChatTemplate.load(DataConfig(chat_template=config), tokenizer)
    assert template.render(messages) == "D2" and template.render(messages, tools=[{"a": "<é>"}]) == 'T[{"a": "<é>"}]'
    # Loop controls, HF's tojson (no HTML escaping, keywords), strftime_now, bos_token from the config.
    source = (
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{{ m | tojson(indent=None, sort_keys=True) }}{% endfor %}{{ strftime_now('%Y') }}{{ eos_token }}"
    )
    template = ChatTemplate.load(DataConfig(chat_template=write(tmp_path / "t.jinja", source)), tokenizer)
    assert template.render(messages) == '{"content": "a<b>", "role": "user"}' + str(datetime.now().year) + "<|eot_id|>"


def chat_config(tmp_path: Path, template: str) -> DataConfig:
    path = write(tmp_path / "tokenizer_config.json", json.dumps({"chat_template": template}))
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}] * 2
    rows.append({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]})
    data = write(tmp_path / "chat.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return DataConfig(source="chat", paths=data, chat_template=path, eval_fraction=0.0)


@pytest.mark.parametrize(
    "template, message",
    [
        # Mistral's: a system message raises with the template's own words, and the line it is on.
        (
            "{% for m in messages %}\n{% if m.role == 'system' %}\n{{ raise_exception('Only user and assistant roles "
            "are supported!') }}\n{% endif %}{{ m.content }}{% endfor %}",
            r"chat\.jsonl:3: the chat template .*tokenizer_config\.json \(line 3\) refuses this conversation: \"Only "
            r"user and assistant roles are supported!\"",
        ),
        (
            "{% for m in messages %}{{ m.content }}\n{{ m.missing.deeper }}{% endfor %}",
            r"chat\.jsonl:1: the chat template .*tokenizer_config\.json fails at line 2: UndefinedError",
        ),
        (
            "{% for m in messages %}\n{{ m.content }\n{% endfor %}",
            r"The chat template .*tokenizer_config\.json does not parse: line 2",
        ),
        ("{{ ''.__class__.__mro__ }}", r"chat\.jsonl:1: the chat template .* fails at line 1: SecurityError"),
    ],
    ids=["raise_exception", "undefined", "syntax", "sandbox"],
)
def test_a_template_that_fails_is_a_user_error_naming_file_and_line(tmp_path, template, message):
    with pytest.raises(UserError, match=message):
        FineTuneBatches(chat_config(tmp_path, template), "train", 32, 1)


@pytest.mark.parametrize(
    "messages, message",
    [
        ([{"role": "assitant", "content": "x"}], r"chat\.jsonl:1: message 1 has role 'assitant', which is not one of"),
        ([{"role": "user", "content": 3}], r"chat\.jsonl:1: message 1 \(user\) needs a string 'content'"),
    ],
)
def test_a_chat_row_with_an_unknown_role_or_no_content_is_refused(tmp_path, messages, message):
    cfg = chat_config(tmp_path, "{% for m in messages %}{{ m.content }}{% endfor %}")
    write(Path(cfg.paths), json.dumps({"messages": messages}) + "\n")
    with pytest.raises(UserError, match=message):
        FineTuneBatches(cfg, "train", 32, 1)


def test_a_template_that_renders_a_turn_differently_later_is_refused(tmp_path):
    # Like templates that drop earlier reasoning: the last assistant turn renders unlike the earlier ones.
    template = "{% for m in messages %}{{ m.content if loop.last else m.content[:1] }};{% endfor %}"
    cfg = chat_config(tmp_path, template)
    rows = [
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "ab"},
                {"role": "user", "content": "r"},
            ]
        }
    ]
    write(Path(cfg.paths), json.dumps(rows[0]) + "\n")
    with pytest.raises(
        UserError, match=r"chat\.jsonl:1: the chat template .* renders turn 2 of this conversation differently"
    ):
        FineTuneBatches(cfg, "train", 32, 1)
