"""The docs: every guide reachable from the README and the site's nav, and the getting-started page's commands
run as written.

`mkdocs build --strict` (broken links, missing references) runs in `.ci/run`, where the `docs` extra is installed.
The getting-started test copies the checkout's tracked files into a temporary directory and runs each ```bash
block there in order, as a newcomer would paste them, with the environment this suite runs in: `scripts/setup.sh`
has already been run (it would reinstall jaxscale from the copy), and a block that starts with
`# not run by tests/test_docs.py:` says why it is left out (a download, an accelerator).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SKIP_MARK = "# not run by tests/test_docs.py:"
GENERATED_PAGES = {"config-reference.md"}  # written by scripts/docs_hooks.py at build time


def nav_pages() -> list[str]:
    """The page files of mkdocs.yml's nav, in order."""
    config = yaml.load((REPO / "mkdocs.yml").read_text(), Loader=yaml.SafeLoader)
    return [page for entry in config["nav"] for page in entry.values()]


def bash_blocks(markdown: str) -> list[str]:
    """The bodies of the ```bash blocks of a markdown text."""
    return re.findall(r"^```bash\n(.*?)^```", markdown, flags=re.MULTILINE | re.DOTALL)


def test_every_guide_is_in_the_nav_and_linked_from_the_readme():
    pages = nav_pages()
    written = {p.name for p in (REPO / "docs").glob("*.md")}
    assert written | GENERATED_PAGES == set(pages), "docs/*.md and mkdocs.yml's nav name different pages"
    readme = (REPO / "README.md").read_text()
    linked = set(re.findall(r"\]\(docs/([\w\-]+\.md)", readme))
    assert set(pages) - GENERATED_PAGES - {"index.md"} <= linked, "a guide the README does not link to"
    assert len(readme.splitlines()) < 150


def test_the_readme_and_the_home_page_say_the_same():
    readme = (REPO / "README.md").read_text()
    assert (REPO / "docs" / "index.md").read_text() == readme.replace("](docs/", "](")


@pytest.mark.slow
def test_the_getting_started_commands_run_as_written(tmp_path):
    blocks = bash_blocks((REPO / "docs" / "getting-started.md").read_text())
    assert len(blocks) >= 4
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    sandbox = tmp_path / "checkout"
    for name in tracked.splitlines():
        if (REPO / name).is_file():
            (sandbox / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, sandbox / name)
    (sandbox / ".venv").symlink_to(Path(sys.prefix))
    env = {**os.environ, "JAXSCALE_CACHE": str(tmp_path / "cache")}
    env.pop("XLA_FLAGS", None)  # the commands emulate their own devices, as on a newcomer's machine
    ran = 0
    for block in blocks:
        if block.startswith(SKIP_MARK):
            continue
        script = block.replace("scripts/setup.sh", "true")
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script], cwd=sandbox, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, f"{block}\nexit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        ran += 1
    assert ran >= 4
    assert (sandbox / "runs" / "first" / "report.png").stat().st_size > 0
