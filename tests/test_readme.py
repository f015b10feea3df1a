"""The README and docs/ stay true to the code and to each other: docs/configuration.md is what the
declarations render (config_schema.py's Run, Wandb, Lora and Model, each loss's fields in losses.py), as
the YAML files are (test_train.py checks those), so no hand-kept key table can drift; every relative link
of the README, docs/ and the folders' READMEs reaches a file and, with a #anchor, a heading of it; and
the README stays short enough to read top to bottom (at most README_MAX_LINES lines)."""

import re

import pytest

from training import config_schema
from utils import REPO_DIR

pytestmark = pytest.mark.unit

README_MAX_LINES = 300


def test_the_readme_is_at_most_300_lines():
    lines = (REPO_DIR / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move details to a page of docs/"


def test_the_configuration_page_is_written_from_the_declarations():
    """docs/configuration.md is what `python config_schema.py` writes: every key with its declared default,
    allowed values and comment, so no hand-kept key table can drift from the code."""
    page = config_schema.CONFIGURATION_PAGE
    assert page.read_text(encoding="utf-8") == config_schema.configuration_markdown(), \
        f"{page} differs from the declarations: run config_schema.py"


PAGES = [REPO_DIR / "README.md", *sorted((REPO_DIR / "docs").glob("*.md")),
         *sorted((REPO_DIR / "benchmarks").glob("README.md")), *sorted((REPO_DIR / "experiments").rglob("README.md"))]


def anchors(text):
    """The #anchors GitHub gives the headings of a Markdown text: lower case, punctuation dropped, spaces as
    hyphens, a repeated heading numbered -1, -2, ..."""
    seen, out = {}, set()
    for heading in re.findall(r"^#{1,6} (.+?)\s*$", strip_code_blocks(text), flags=re.M):
        heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def strip_code_blocks(text):
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def relative_links(text):
    """The targets of the Markdown links and images of a text that point into the repository (not URLs),
    outside code blocks and code spans."""
    text = re.sub(r"`[^`\n]*`", "", strip_code_blocks(text))
    targets = re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def broken_links(page):
    """'target: why' for each relative link of `page` (a Path) whose file or #anchor does not exist."""
    broken = []
    for target in relative_links(page.read_text(encoding="utf-8")):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text(encoding="utf-8")):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO_DIR)))
def test_every_relative_link_resolves_to_a_file_and_heading(page):
    assert broken_links(page) == []


def test_a_broken_link_or_anchor_is_found(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A `code` heading: λ = 0\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md) [ok](other.md#a-code-heading-λ--0) [ok](#here) ![ok](other.md)\n"
                    "# Here\n`[not a link](nowhere.md)` [web](https://example.com/x.md)\n"
                    "[gone](missing.md) [bad anchor](other.md#nowhere)\n")
    assert broken_links(page) == ["missing.md: no such file", "other.md#nowhere: no heading #nowhere in other.md"]
