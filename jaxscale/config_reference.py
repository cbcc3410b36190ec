"""The config reference: every key of every config section, its type, default, allowed values and meaning.

All of it is read from jaxscale/config.py itself, never written a second time: the dataclass fields give
the keys, types and defaults; the comment beside a field (or the comment lines right above it) gives its
meaning; the tables validation uses (`CHOICES`, `_RANGES`) give the allowed values. `jaxscale config
--reference` prints it as Markdown, and the docs build writes the same text into the config reference page.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import tokenize
import typing
from dataclasses import dataclass

from jaxscale.config import _RANGES, AUTO, CHOICES, Config


@dataclass(frozen=True)
class KeyDoc:
    key: str  # section.name
    type: str
    default: str
    allowed: str  # the choices or the range validation enforces; "" when any value of the type goes
    meaning: str


def field_comments(cls: type) -> dict[str, str]:
    """Each field of dataclass `cls` and its comment: the comment lines right above it, then the one beside it."""
    source = inspect.getsource(cls)
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    lines = source.splitlines()
    found = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, line = [], node.lineno - 1
        while line >= 1 and line in comments and lines[line - 1].lstrip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        beside = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        found[node.target.id] = " ".join(above + beside)
    return found


def _type_name(hint: typing.Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def _allowed(key: str, default: typing.Any) -> str:
    if key in CHOICES:
        return " \\| ".join(str(choice) for choice in CHOICES[key])
    if key in _RANGES:
        low, low_ok, high, high_ok, _ = _RANGES[key]
        span = f"{'[' if low_ok else '('}{low}, {high if high is not None else 'inf'}{']' if high_ok else ')'}"
        return f"{AUTO} \\| {span}" if default == AUTO else span  # a number, or the planner's choice
    return ""


def reference() -> list[KeyDoc]:
    """Every key of every config section, in the order config.py declares them."""
    docs = []
    defaults = Config()
    for section in dataclasses.fields(Config):
        cls = type(getattr(defaults, section.name))
        comments = field_comments(cls)
        hints = typing.get_type_hints(cls)
        for item in dataclasses.fields(cls):
            key = f"{section.name}.{item.name}"
            default = getattr(getattr(defaults, section.name), item.name)
            docs.append(
                KeyDoc(key, _type_name(hints[item.name]), repr(default), _allowed(key, default), comments[item.name])
            )
    return docs


def reference_markdown() -> str:
    """The reference as Markdown: a table per section, headed by the section's docstring."""
    out = [
        "# Config reference",
        "",
        "Every key of a run's config: a `section.key=value` override, or a YAML section.",
        "",
    ]
    defaults, docs = Config(), reference()
    for section in dataclasses.fields(Config):
        doc = inspect.getdoc(type(getattr(defaults, section.name))) or ""
        out += [f"## {section.name}", ""]
        if doc and not doc.startswith(type(getattr(defaults, section.name)).__name__ + "("):
            out += [doc, ""]
        out += ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        for d in docs:
            if d.key.startswith(f"{section.name}."):
                cells = [
                    f"`{d.key}`",
                    d.type.replace("|", "\\|"),
                    f"`{d.default}`",
                    d.allowed,
                    d.meaning.replace("|", "\\|"),
                ]
                out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)
