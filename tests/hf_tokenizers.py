"""Two Hugging Face tokenizer directories built with the `tokenizers` library, and rows to encode with them.

- `sentencepiece_style`: Mistral/Llama-2-like. BPE with byte fallback, a Metaspace pre-tokenizer ("▁",
  prepended to the first word only, the text not split), <unk> <s> </s>, a post-processor that puts <s>
  first, add_bos_token true, and Mistral's [INST] chat template (which raises on roles that do not alternate).
- `byte_level`: Llama-3-like. Byte-level BPE with Llama 3's split pattern, <|begin_of_text|> put first by a
  TemplateProcessing post-processor, <|start_header_id|> / <|end_header_id|> / <|eot_id|>, eos_token
  <|eot_id|>, generation_config.json eos ids [<|end_of_text|>, <|eot_id|>], and Llama 3's chat template.

Shared by tests/test_sft_tokens.py and scripts/check_hf_parity.py (which loads the same directories in
transformers).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# The same rendering with the assistant's part marked, as templates written for return_assistant_tokens_mask do.
LLAMA3_GENERATION_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Meta's chat template of Llama-3.1-8B-Instruct (its tokenizer_config.json `chat_template`, unchanged: the same text
# in two public copies of that file compared), kept byte for byte; LLAMA31_TEMPLATE_SHA256 guards it.
LLAMA31_TEMPLATE = (Path(__file__).parent / "fixtures" / "llama-3.1-instruct.jinja").read_text(encoding="utf-8")
LLAMA31_TEMPLATE_SHA256 = "e10ca381b1ccc5cf9db52e371f3b6651576caee0a630b452e2816b2d404d4b65"
# Llama 3.1's special tokens in their order (transformers' convert_llama_weights_to_hf, "3.1"): ids 128000-128255.
LLAMA31_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    *(f"<|reserved_special_token_{i}|>" for i in range(3, 248)),
]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)

WORDS = (
    "the a of to and in is it you that he was for on are with as his they be at one have this from or had by "
    "hot word but what some we can out other were all there when up use your how said an each she which do "
    "their time if will way about many then them write would like so these her long make thing see him two "
    "function return value list answer question model token train data python café naïve über"
).split()
ODD = ["漢字", "😀", "é", "\t", "  ", "\n", "\n\n", "1234567", "x=1;", "'s", "...", "[/INST]", "<s>", "dn't"]


def _phrase(rng: random.Random, low: int = 1, high: int = 12) -> str:
    words = [rng.choice(WORDS) if rng.random() > 0.15 else rng.choice(ODD) for _ in range(rng.randint(low, high))]
    text = " ".join(words)
    return rng.choice(["", " ", "\n"]) + text + rng.choice(["", " ", ".", "?\n", "  "])


def corpus(count: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [_phrase(rng, 5, 30) for _ in range(count)]


def chat_rows(count: int, seed: int, system: bool) -> list[dict]:
    """Conversations of 1-3 user/assistant exchanges; with `system`, some open with a system message."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        messages = [{"role": "system", "content": _phrase(rng)}] if system and rng.random() < 0.4 else []
        for _ in range(rng.randint(1, 3)):
            messages += [{"role": "user", "content": _phrase(rng)}, {"role": "assistant", "content": _phrase(rng)}]
        rows.append({"messages": messages})
    return rows


def prompt_completion_rows(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"prompt": _phrase(rng) + rng.choice(["", ":", " Answer:"]), "completion": _phrase(rng)} for _ in range(count)
    ]


def sentencepiece_style(directory: Path) -> Path:
    """Build the SentencePiece-style directory (see the module docstring); returns its tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    directory.mkdir(parents=True, exist_ok=True)
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trained.train_from_iterator(
        corpus(), trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    )
    spec = json.loads(trained.to_str())
    # Byte-fallback pieces <0x00>..<0xFF> right after the special tokens, as in Llama 2 and Mistral.
    learned = [
        t for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1]) if t not in ("<unk>", "<s>", "</s>")
    ]
    vocab = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *learned]
    spec["model"].update(vocab={t: i for i, t in enumerate(vocab)}, byte_fallback=True, fuse_unk=True)
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "chat_template": MISTRAL_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return directory / "tokenizer.json"


def byte_level(directory: Path, template: str = LLAMA3_TEMPLATE) -> Path:
    """Build the Llama-3-like directory (see the module docstring); returns its tokenizer.json."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=LLAMA3_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(seed=1), trainer)
    bos = tokenizer.token_to_id("<|begin_of_text|>")
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
                special_tokens=[("<|begin_of_text|>", bos)],
            ),
        ]
    )
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "chat_template": template,
        "clean_up_tokenization_spaces": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    eos_ids = [tokenizer.token_to_id("<|end_of_text|>"), tokenizer.token_to_id("<|eot_id|>")]
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": eos_ids}))
    return directory / "tokenizer.json"


def llama31_instruct(directory: Path, texts: list[str] = (), bpe_size: int = 600) -> Path:
    """Build the Llama-3.1-Instruct-like directory (see the module docstring): a byte-level BPE of `bpe_size` tokens
    trained on the corpus and `texts`, then the 256 special tokens. Returns its tokenizer.json."""
    import hashlib

    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    assert hashlib.sha256(LLAMA31_TEMPLATE.encode()).hexdigest() == LLAMA31_TEMPLATE_SHA256, "template changed"
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE(ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator([*corpus(seed=2), *texts], trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA31_SPECIALS])
    ids = {t: tokenizer.token_to_id(t) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")}
    assert ids["<|begin_of_text|>"] == tokenizer.get_vocab_size() - 256
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|>:0 $A:0",
                pair="<|begin_of_text|>:0 $A:0 <|begin_of_text|>:1 $B:1",
                special_tokens=[("<|begin_of_text|>", ids["<|begin_of_text|>"])],
            ),
        ]
    )
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "bos_token": "<|begin_of_text|>",
        "chat_template": LLAMA31_TEMPLATE,
        "clean_up_tokenization_spaces": True,
        "eos_token": "<|eot_id|>",
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    specials = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    generation = {
        "bos_token_id": ids["<|begin_of_text|>"],
        "do_sample": True,
        "eos_token_id": [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]],
        "temperature": 0.6,
        "top_p": 0.9,
    }
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return directory / "tokenizer.json"
