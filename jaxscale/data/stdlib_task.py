"""An instruction task with no download: complete a Python standard library function from its signature and
docstring.

Every function and method (at any depth) of the running interpreter's standard library that has a docstring
gives one example: the prompt is its source from the first decorator or `def` line through the line that ends
the docstring, the completion the remaining lines of its body. Both are dedented by the `def` line's
indentation, so `prompt + completion` parses alone (`ast.parse`). Files are read in sorted order and functions
in source order, so the list is the same on every machine with the same Python.

Skipped: bodies of nothing but `pass` or `...` after the docstring, a statement on the docstring's last line, and
examples longer than `max_bytes` UTF-8 bytes (prompt + completion; as the fine-tuning rows add eos, a task made
with `max_bytes=train.seq_len` fits a row of the byte tokenizer whole, and of any tokenizer with fewer tokens
than bytes). Nothing is truncated. An example is held out when a hash of its qualified name
(`json/decoder.py:JSONDecoder.decode`) says so, like documents (jaxscale.data.sources.in_eval_split): the split
is fixed whatever else changes.
"""

from __future__ import annotations

import ast
import functools
import json
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path

from jaxscale.data.sources import in_eval_split
from jaxscale.errors import UserError

# Directories of tests: about two thirds of the library's bytes (most of the parsing time), a fifth of the examples, and
# those mostly the bodies of test cases.
_LEFT_OUT = {"test", "tests", "idle_test"}


@dataclass(frozen=True)
class FunctionExample:
    """One function: `name` its qualified name (file relative to the library, then the class path)."""

    name: str
    prompt: str
    completion: str

    def as_json(self) -> str:
        return json.dumps({"name": self.name, "prompt": self.prompt, "completion": self.completion})


def stdlib_root() -> Path:
    """The running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def function_examples(root: Path, max_bytes: int) -> list[FunctionExample]:
    """Every example of the `.py` files under `root` in a fixed order; site-packages and the test suites left out."""
    names = sorted(path.relative_to(root).as_posix() for path in root.rglob("*.py"))
    return [
        example
        for name in names
        if not (name.startswith("site-packages/") or set(name.split("/")[:-1]) & _LEFT_OUT)
        for example in _file_examples(root / name, name)
        if len((example.prompt + example.completion).encode("utf-8")) <= max_bytes
    ]


@functools.cache
def _stdlib_examples(max_bytes: int) -> tuple[FunctionExample, ...]:
    # Parsing the library takes seconds; a run reads the train and the eval split.
    return tuple(function_examples(stdlib_root(), max_bytes))


def stdlib_function_examples(split: str, eval_fraction: float, max_bytes: int) -> list[FunctionExample]:
    """The `split` ("train" or "eval") of the standard library's examples of at most `max_bytes`."""
    want_eval = split == "eval"
    return [e for e in _stdlib_examples(max_bytes) if in_eval_split(e.name, eval_fraction) == want_eval]


def _file_examples(path: Path, name: str) -> list[FunctionExample]:
    try:
        source = path.read_text(encoding="utf-8")
        with warnings.catch_warnings():  # old escape sequences in a few files: not ours to report
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(source)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return []  # the library ships a few files for other Python versions or encodings, e.g. lib2to3 tests
    lines = source.splitlines(keepends=True)
    examples = []

    def visit(node: ast.AST, qualname: str) -> None:
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                visit(child, qualname)  # functions inside if/try blocks keep their enclosing name
                continue
            inner = f"{qualname}.{child.name}" if qualname else child.name
            if not isinstance(child, ast.ClassDef):
                example = _example(child, lines, f"{name}:{inner}")
                if example is not None:
                    examples.append(example)
            visit(child, inner)

    visit(tree, "")
    return examples


def _example(function: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str], name: str) -> FunctionExample | None:
    """The example of one function, or None when it has no docstring or no body worth completing."""
    if ast.get_docstring(function, clean=False) is None:
        return None
    docstring, rest = function.body[0], function.body[1:]
    trivial = all(isinstance(s, ast.Pass) or _is_ellipsis(s) for s in rest)
    if trivial or rest[0].lineno <= docstring.end_lineno:
        return None
    first = min([function.lineno, *(d.lineno for d in function.decorator_list)])
    indent = lines[function.lineno - 1][: function.col_offset]
    prompt = _dedent(lines[first - 1 : docstring.end_lineno], indent)
    completion = _dedent(lines[docstring.end_lineno : function.end_lineno], indent)
    return FunctionExample(name, prompt, completion if completion.endswith("\n") else completion + "\n")


def _is_ellipsis(statement: ast.stmt) -> bool:
    return (
        isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant) and statement.value.value is ...
    )


def _dedent(lines: list[str], indent: str) -> str:
    """`lines` joined, each without the leading `indent` where it has it (lines inside strings may not)."""
    return "".join(line[len(indent) :] if line.startswith(indent) else line for line in lines)


def write_task(out_dir: str | Path, eval_fraction: float, max_bytes: int) -> dict[str, int]:
    """Write the task as `train.jsonl` and `eval.jsonl` under `out_dir` (rows of name, prompt, completion);
    returns the number of rows of each."""
    if not 0.0 < eval_fraction < 1.0:
        raise UserError(f"--eval-fraction {eval_fraction} must be above 0 and below 1, e.g. 0.05.")
    if max_bytes < 1:
        raise UserError(f"--max-bytes {max_bytes} must be positive, e.g. 512 (the seq_len to train with).")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out} cannot be created ({e.strerror}); choose another OUT_DIR.") from None
    counts = {}
    for split in ("train", "eval"):
        examples = stdlib_function_examples(split, eval_fraction, max_bytes)
        (out / f"{split}.jsonl").write_text("".join(e.as_json() + "\n" for e in examples), encoding="utf-8")
        counts[split] = len(examples)
    return counts
