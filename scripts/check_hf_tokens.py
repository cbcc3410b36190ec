"""Fine-tuning token ids of jaxscale against transformers' own tokenizers (no torch needed).

The two tokenizer directories of tests/hf_tokenizers.py (SentencePiece-style with Mistral's template,
tokenizer_class LlamaTokenizer; byte-level with Llama 3's, PreTrainedTokenizerFast) and one with a
`{% generation %}` template are loaded with `transformers.AutoTokenizer.from_pretrained`. For chat rows
jaxscale's ids must equal `apply_chat_template(messages, tokenize=True)`, and with the generation template
its trained tokens must equal `return_assistant_tokens_mask`; for prompt/completion rows the ids must
equal `tokenizer(prompt + completion + tokenizer.eos_token)` (TRL's SFTTrainer) and the trained tokens
TRL's completion mask (the tokens past `len(tokenizer(prompt))`) where the prompt's tokens are a prefix.
Prints the rows compared and equal per check; exits 1 on any difference.

    pip install transformers -e .   # in a venv of its own (no torch needed), then:
    python scripts/check_hf_tokens.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import transformers

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # this checkout's jaxscale, and the tokenizers of its tests

from hf_tokenizers import (  # noqa: E402
    LLAMA3_GENERATION_TEMPLATE,
    byte_level,
    chat_rows,
    prompt_completion_rows,
    sentencepiece_style,
)

from jaxscale.config import DataConfig  # noqa: E402
from jaxscale.data.examples import ExampleEncoder  # noqa: E402
from jaxscale.data.tokenizers import build_tokenizer  # noqa: E402

ROWS = 200


def as_list(value: object) -> list[int]:
    ids = value["input_ids"] if isinstance(value, dict | transformers.BatchEncoding) else value
    return [int(i) for i in ids]


def check_directory(name: str, path: Path, system: bool, generation: bool) -> list[tuple[str, int, int]]:
    """(check, rows compared, rows equal) for one tokenizer directory."""
    hf = transformers.AutoTokenizer.from_pretrained(str(path.parent))
    tokenizer = build_tokenizer(DataConfig(tokenizer=str(path)))
    chat = ExampleEncoder(DataConfig(source="chat", tokenizer=str(path)), tokenizer)
    completion = ExampleEncoder(DataConfig(source="prompt_completion", tokenizer=str(path)), tokenizer)
    results = []

    equal = masks = 0
    rows = chat_rows(ROWS, seed=11, system=system)
    for row in rows:
        ids, trained = chat.chat(row["messages"], None, "row")
        want = hf.apply_chat_template(
            row["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=generation
        )
        equal += as_list(want) == ids.tolist()
        if generation:
            masks += [int(m) for m in want["assistant_masks"]] == trained.astype(int).tolist()
    results.append((f"{name}: chat ids == apply_chat_template(tokenize=True)", len(rows), equal))
    if generation:
        results.append((f"{name}: trained == return_assistant_tokens_mask", len(rows), masks))

    equal = masks = prefixes = 0
    rows = prompt_completion_rows(ROWS, seed=5)
    for row in rows:
        ids, trained = completion.prompt_completion(row["prompt"], row["completion"])
        text = row["completion"] if row["completion"].endswith(hf.eos_token) else row["completion"] + hf.eos_token
        want = as_list(hf(row["prompt"] + text))
        equal += want == ids.tolist()
        prompt = as_list(hf(row["prompt"]))
        if want[: len(prompt)] == prompt:  # where TRL's count-based mask is well defined
            prefixes += 1
            masks += [0] * len(prompt) + [1] * (len(want) - len(prompt)) == trained.astype(int).tolist()
    results.append((f"{name}: prompt/completion ids == tokenizer(prompt + completion + eos)", len(rows), equal))
    results.append((f"{name}: trained == TRL's completion mask (prompt tokens a prefix)", prefixes, masks))
    return results


def main() -> int:
    print(f"transformers {transformers.__version__}")
    failed = False
    with tempfile.TemporaryDirectory() as work:
        root = Path(work)
        directories = [
            ("sentencepiece", sentencepiece_style(root / "sp"), False, False),
            ("byte_level", byte_level(root / "bl"), True, False),
            ("byte_level+generation", byte_level(root / "gen", template=LLAMA3_GENERATION_TEMPLATE), True, True),
        ]
        for name, path, system, generation in directories:
            for check, compared, equal in check_directory(name, path, system, generation):
                failed |= equal != compared
                print(f"{check}: {equal}/{compared} equal")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
