"""Meta's Llama 3.1 Instruct chat template (tests/fixtures/llama-3.1-instruct.jinja) through jaxscale's data path and
`generate --chat`, against the prompt format Meta documents for Llama 3.1, written out here by hand.

The reference does not render the template: a conversation is the system block (always there: "Cutting Knowledge
Date" and "Today Date", then the system message if the conversation opens with one), then each message as
<|start_header_id|>ROLE<|end_header_id|>\\n\\n, its content stripped, <|eot_id|>; BOS first. The learned tokens are
each assistant message's stripped content and its <|eot_id|>. scripts/check_walkthrough.py compares the same
template's ids with transformers' `apply_chat_template` itself.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from hf_tokenizers import ODD, WORDS, llama31_instruct

from jaxscale.config import DataConfig
from jaxscale.data import build_tokenizer
from jaxscale.data.examples import ExampleEncoder
from jaxscale.generate import Conversation, chat_template, encode_prompts

DATE = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"


def documented(messages: list[dict], generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """The text of Meta's Llama 3.1 format and the [start, end) characters of each assistant answer and its
    <|eot_id|>."""
    system = messages[0]["content"].strip() if messages[0]["role"] == "system" else ""
    rest = messages[1:] if messages[0]["role"] == "system" else messages
    text = f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{DATE}{system}<|eot_id|>"
    spans = []
    for message in rest:
        text += f"<|start_header_id|>{message['role']}<|end_header_id|>\n\n"
        if message["role"] == "assistant":
            spans.append((len(text), len(text) + len(message["content"].strip()) + len("<|eot_id|>")))
        text += message["content"].strip() + "<|eot_id|>"
    if generation_prompt:
        text += "<|start_header_id|>assistant<|end_header_id|>\n\n"
    return text, spans


def conversations(count: int, seed: int) -> list[list[dict]]:
    """1-3 exchanges each, half after a system message; contents with odd spacing, non-ASCII and special-looking
    text."""
    rng = random.Random(seed)

    def phrase() -> str:
        words = [rng.choice(WORDS) if rng.random() > 0.2 else rng.choice(ODD) for _ in range(rng.randint(1, 10))]
        return rng.choice(["", " ", "\n"]) + " ".join(words) + rng.choice(["", " ", ".", "?\n"])

    rows = []
    for _ in range(count):
        messages = [{"role": "system", "content": phrase()}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 3)):
            messages += [{"role": "user", "content": phrase()}, {"role": "assistant", "content": phrase()}]
        rows.append(messages)
    return rows


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> DataConfig:
    path = llama31_instruct(tmp_path_factory.mktemp("llama31"))
    return DataConfig(source="chat", tokenizer=str(path))


def test_meta_template_gives_the_documented_ids_and_learns_each_answer_and_its_eot(data):
    tokenizer = build_tokenizer(data)
    encoder = ExampleEncoder(data, tokenizer)
    eot = tokenizer.eos_id
    for number, messages in enumerate(conversations(50, seed=0)):
        ids, learned = encoder.chat(messages, None, f"row {number}")
        text, spans = documented(messages)
        encoding = tokenizer.encode_offsets(text, add_special_tokens=False)
        starts, ends = encoding.offsets[:, 0], encoding.offsets[:, 1]
        want = np.array([any(s < b and e > a for a, b in spans) for s, e in zip(starts, ends, strict=True)])
        np.testing.assert_array_equal(ids, encoding.ids, err_msg=f"row {number}")
        np.testing.assert_array_equal(learned, want, err_msg=f"row {number}")
        assert (ids == tokenizer.bos_id).sum() == 1 and ids[0] == tokenizer.bos_id
        assert ids[-1] == eot and learned[-1], "each example ends with a learned <|eot_id|>"
        assert learned.sum() >= len(spans) and not learned[: len(tokenizer.encode(text[: spans[0][0]]))].any()


def test_eos_ids_are_the_generation_configs_list_and_eot_ends_examples(data):
    tokenizer = build_tokenizer(data)
    names = ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]
    assert tokenizer.eos_ids == tuple(tokenizer.encode(n)[0] for n in names)
    assert tokenizer.eos_id == tokenizer.encode("<|eot_id|>")[0]
    assert tokenizer.bos_id == tokenizer.encode("<|begin_of_text|>")[0] == tokenizer.vocab_size - 256


def test_chat_prompt_is_the_documented_prompt_and_the_start_of_its_training_example(data):
    tokenizer = build_tokenizer(data)
    encoder = ExampleEncoder(data, tokenizer)
    cfg = type("Run", (), {"data": data})()
    template = chat_template(cfg, tokenizer)
    for messages in conversations(10, seed=1):
        question = messages[:-1]
        texts, (ids,) = encode_prompts([Conversation(question)], tokenizer, template)
        want, _ = documented(question, generation_prompt=True)
        assert texts[0] == want
        np.testing.assert_array_equal(ids, tokenizer.encode(want))
        example, learned = encoder.chat(messages, None, "row")
        np.testing.assert_array_equal(example[: len(ids)], ids)
        assert learned[len(ids) :].all(), "the answer after the prompt is learned, through its <|eot_id|>"
