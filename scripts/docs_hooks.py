"""mkdocs hooks (mkdocs.yml `hooks:`): the pages the code writes, at each build.

Neither is committed, so neither can drift from the code: the config reference page
(`jaxscale.config_reference` reads every key's type, default, allowed values and meaning from the
config dataclasses and their comments) and the parallelism page's rule table (`jaxscale.sharding`'s
strategy tables, where the marker `<!-- rule-table -->` stands).
"""

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

from jaxscale.config_reference import reference_markdown
from jaxscale.sharding import STRATEGIES

RULE_TABLE_MARKER = "<!-- rule-table -->"


def rule_table_markdown() -> str:
    """A table of logical dimension names (rows) by `mesh.strategy` (columns): the mesh axes each maps to."""
    names = sorted({name for rules in STRATEGIES.values() for name in rules})
    lines = ["| logical name | " + " | ".join(f"`{s}`" for s in STRATEGIES) + " |"]
    lines.append("|---" * (len(STRATEGIES) + 1) + "|")
    for name in names:
        axes = [rules.get(name, ()) for rules in STRATEGIES.values()]
        cells = [", ".join(f"`{axis}`" for axis in mapped) or "replicated" for mapped in axes]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def on_files(files: Files, config: MkDocsConfig) -> Files:
    files.append(File.generated(config, "config-reference.md", content=reference_markdown()))
    return files


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    return markdown.replace(RULE_TABLE_MARKER, rule_table_markdown())
