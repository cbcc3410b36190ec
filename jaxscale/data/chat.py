"""Chat templates rendered as transformers' `apply_chat_template` renders them.

Where the template comes from (`data.chat_template`, else the directory of `data.tokenizer`): a
`chat_template.jinja` file (recent transformers save it; it wins over the config's, as there), or a
tokenizer_config.json's `chat_template`: a string, or named templates (a list of {"name", "template"}), of
which "default" is used ("tool_use" for a conversation with `tools`, as transformers picks). Special tokens
(`bos_token`, `eos_token`, ...) are the template variables of the same names, read from the
tokenizer_config.json beside the template, else from the tokenizer.

The environment is transformers': jinja2's ImmutableSandboxedEnvironment (no file or attribute access) with
trim_blocks and lstrip_blocks, the loop controls extension (`{% break %}`, `{% continue %}`), the
`{% generation %}` tag, `raise_exception(message)`, `strftime_now(format)` (today's date: a template that
prints it renders differently on another day) and a `tojson` filter that is json.dumps (no HTML escaping,
`indent`, `separators`, `sort_keys`, `ensure_ascii` as keywords). A template that does not parse, calls
`raise_exception` or fails while rendering is a UserError naming the template file, the Jinja line and the
data row.
"""

from __future__ import annotations

import contextlib
import json
import traceback
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from jaxscale.config import DataConfig
from jaxscale.data.tokenizers import SPECIAL_TOKEN_KEYS, Tokenizer, token_text, tokenizer_path
from jaxscale.errors import UserError

# Roles a conversation may hold: OpenAI's and Hugging Face's (tool results are `tool`, Llama 3.1 also
# calls them `ipython`). A typo such as "assitant" would otherwise be rendered, or dropped, by the template.
ROLES = ("system", "developer", "user", "assistant", "tool", "ipython")
Span = tuple[int, int]  # characters [start, end) of a rendered conversation


class _TemplateRaised(Exception):
    """`raise_exception(message)` called by a template."""


def _generation_extension():  # -> type[jinja2.ext.Extension]; built on first use, so that jinja2 loads lazily
    import jinja2
    from jinja2.ext import Extension

    class GenerationTracker(Extension):
        """`{% generation %}...{% endgeneration %}`: records where the enclosed text lands in the rendered
        output, as transformers' AssistantTracker does (the length of the blocks rendered before it)."""

        tags = {"generation"}

        def __init__(self, environment: jinja2.Environment) -> None:
            super().__init__(environment)
            environment.extend(track_generation=self.track)
            self._blocks: list[str] | None = None
            self._spans: list[Span] | None = None

        def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_generation", []), [], [], body).set_lineno(lineno)

        def _generation(self, caller: Any) -> str:
            text = caller()
            if self._blocks is not None and self._spans is not None:
                start = sum(map(len, self._blocks))
                self._spans.append((start, start + len(text)))
            return text

        @contextlib.contextmanager
        def track(self, blocks: list[str], spans: list[Span]) -> Iterator[None]:
            self._blocks, self._spans = blocks, spans
            try:
                yield
            finally:
                self._blocks = self._spans = None

    return GenerationTracker


def _environment():  # -> jinja2.sandbox.ImmutableSandboxedEnvironment
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise _TemplateRaised(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys=False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_generation_extension(), loopcontrols]
    )
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    return environment


class ChatTemplate:
    """A chat template (see the module docstring). `path` is the file it was read from, for messages."""

    def __init__(self, sources: dict[str, str], path: Path, tokens: dict[str, str]) -> None:
        import jinja2

        self.path = path
        self._environment = _environment()
        self._tokens = tokens
        self._templates = {}
        for name, source in sources.items():
            try:
                self._templates[name] = self._environment.from_string(source)
            except jinja2.TemplateSyntaxError as e:
                raise UserError(
                    f"The chat template{self._name(name)} {path} does not parse: line {e.lineno}: {e.message}. "
                    "Fix the template, or point data.chat_template at another."
                ) from None
        self._tracks = {name: _has_generation(source) for name, source in sources.items()}

    @classmethod
    def load(cls, cfg: DataConfig, tokenizer: Tokenizer) -> ChatTemplate:
        """The template of `data.chat_template` (a .jinja file, a tokenizer_config.json or a directory holding
        either), else of the directory of `data.tokenizer`."""
        where = template_file(cfg)
        if where.suffix == ".jinja":
            config_path = where.parent / "tokenizer_config.json"
            config = _read_json(config_path) if config_path.is_file() else {}
            sources = {"default": _read_text(where)}
        else:
            config = _read_json(where)
            sources = _named_templates(config.get("chat_template"), where)
        tokens = dict(tokenizer.special_tokens)
        tokens |= {k: text for k in SPECIAL_TOKEN_KEYS if (text := token_text(config.get(k))) is not None}
        return cls(sources, where, tokens)

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = False,
        tools: list | None = None,
        where: str = "",
    ) -> str:
        """The conversation as text, as apply_chat_template(tokenize=False) gives it."""
        return self._render(messages, add_generation_prompt, tools, where)[0]

    def render_with_spans(
        self, messages: list[dict[str, Any]], tools: list | None, where: str
    ) -> tuple[str, list[Span]]:
        """The conversation as text, and the spans of it that the model learns to write.

        With `{% generation %}` blocks in the template: those blocks (what transformers'
        return_assistant_tokens_mask marks). Otherwise each assistant message's span runs from the end of
        the conversation before it rendered with the generation prompt, to the end of the conversation
        through it: its content and whatever the template closes the turn with (an end-of-turn token). That
        needs each turn to render alike whatever follows it; a template that does not is refused, naming
        the row.
        """
        text, spans = self._render(messages, False, tools, where)
        if self._tracks[self._choose(tools)]:
            return text, spans
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            opened = self._render(messages[:i], True, tools, where)[0]
            through = self._render(messages[: i + 1], False, tools, where)[0]
            if not (through.startswith(opened) and text.startswith(through)):
                raise UserError(
                    f"{where}: the chat template {self.path} renders turn {i + 1} of this conversation differently "
                    "when later turns follow, so the assistant's text cannot be told apart. Use a template that "
                    "marks it with {% generation %} blocks (data.chat_template), or fix that row."
                )
            spans.append((len(opened), len(through)))
        return text, spans

    def _choose(self, tools: list | None) -> str:
        return "tool_use" if tools is not None and "tool_use" in self._templates else "default"

    def _render(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool, tools: list | None, where: str
    ) -> tuple[str, list[Span]]:
        name = self._choose(tools)
        template = self._templates[name]
        blocks: list[str] = []
        spans: list[Span] = []
        variables = self._tokens | {"messages": messages, "tools": tools, "documents": None}
        try:
            with self._environment.track_generation(blocks, spans):
                for block in template.generate(**variables, add_generation_prompt=add_generation_prompt):
                    blocks.append(block)
        except _TemplateRaised as e:
            raise UserError(
                f"{where}: the chat template{self._name(name)} {self.path} (line {_template_line(e)}) refuses this "
                f'conversation: "{e}". Fix that row, or use another template (data.chat_template).'
            ) from None
        except Exception as e:  # what jinja2 or the sandbox raise for a template that cannot render this row
            raise UserError(
                f"{where}: the chat template{self._name(name)} {self.path} fails at line {_template_line(e)}: "
                f"{type(e).__name__}: {e}. Fix the template or that row."
            ) from None
        return "".join(blocks), spans

    def _name(self, name: str) -> str:
        """' 'tool_use' of' where a file holds several templates, else nothing."""
        return f" '{name}' of" if len(self._templates) > 1 else ""


def template_file(cfg: DataConfig) -> Path:
    """The file the chat template of `cfg` is read from: a .jinja file or a tokenizer_config.json."""
    if cfg.chat_template:
        where = Path(cfg.chat_template).expanduser()
    elif cfg.tokenizer != "byte":
        where = tokenizer_path(cfg).parent
    else:
        raise UserError(
            "data.source=chat needs a chat template; set data.chat_template to a chat_template.jinja or a "
            "tokenizer_config.json that holds one (data.tokenizer=byte has none)."
        )
    if where.is_dir():
        jinja = where / "chat_template.jinja"
        where = jinja if jinja.is_file() else where / "tokenizer_config.json"
    return where


def check_messages(row: Any, where: str) -> tuple[list[dict[str, Any]], list | None]:
    """The `messages` (and `tools`, or None) of a data.source=chat row, or a UserError naming `where`."""
    messages = row.get("messages") if isinstance(row, dict) else None
    if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
        raise UserError(
            f'{where} needs a field \'messages\': a list of {{"role": ..., "content": ...}} (data.source=chat); '
            "fix that row."
        )
    for number, message in enumerate(messages, start=1):
        role = message.get("role")
        if role not in ROLES:
            raise UserError(
                f"{where}: message {number} has role {role!r}, which is not one of {', '.join(ROLES)}. Fix that row."
            )
        content = message.get("content")
        if not (isinstance(content, str) or (content is None and message.get("tool_calls"))):
            raise UserError(
                f"{where}: message {number} ({role}) needs a string 'content' (or 'tool_calls'); fix that row."
            )
    tools = row.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise UserError(f"{where}: 'tools' must be a list of tool schemas; fix that row.")
    return messages, tools


def _has_generation(source: str) -> bool:
    """Whether a template marks text with {% generation %} (the test transformers makes)."""
    import re

    return re.search(r"\{%-?\s*generation\s*-?%\}", source) is not None


def _template_line(error: BaseException) -> int | str:
    """The template line a rendering error was raised at (jinja2 puts template lines in the traceback)."""
    lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__) if frame.filename == "<template>"]
    return lines[-1] if lines else "?"


def _named_templates(value: Any, path: Path) -> dict[str, str]:
    """tokenizer_config.json's chat_template: a string, or a list of {"name", "template"} (or a dict of them)."""
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(isinstance(v, dict) for v in value):
        value = {v.get("name"): v.get("template") for v in value}
    if isinstance(value, dict) and value and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        if "default" not in value:
            raise UserError(
                f"{path} holds chat templates named {', '.join(value)}, none named 'default'. Write the one to use "
                "to a .jinja file and set data.chat_template to it."
            )
        return value
    raise UserError(
        f"{path} has no chat_template (a string, or a list of named templates). Point data.chat_template at a "
        "chat_template.jinja or a tokenizer_config.json that holds one."
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"data.chat_template: {path} cannot be read ({e}).") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"data.chat_template: {path} cannot be read as JSON ({e}).") from None
    if not isinstance(value, dict):
        raise UserError(f"data.chat_template: {path} holds no JSON object.")
    return value
