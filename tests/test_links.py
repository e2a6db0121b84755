"""The README and the docs stay in step with the files they name: every relative link and image path points to a
file that exists, every #anchor to a heading of its page, and the README stays a front door (under 15,000
characters; the lab notebook lives in docs/)."""

import re
from collections import Counter
from pathlib import Path

import pytest

from conftest import ROOT

PAGES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
README_LIMIT = 15_000


def prose(text: str, inline_code: bool = False) -> str:
    """The text without code blocks (fenced, or indented: the commands) and, unless kept, inline code spans."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    text = "\n".join(line for line in text.split("\n") if not line.startswith("    "))
    return text if inline_code else re.sub(r"`[^`\n]*`", "", text)


def anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens, -1, -2 ... for repeats."""
    seen, ids = Counter(), set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", prose(page.read_text(), inline_code=True), flags=re.M):
        slug = "".join(c for c in heading.lower() if c.isalnum() or c in " -_").replace(" ", "-")
        ids.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
        seen[slug] += 1
    return ids


def links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page.read_text())) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_exist(page):
    missing = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            missing.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            missing.append(f"{target} (no such heading)")
    assert not missing, f"{page.relative_to(ROOT)}: {missing}"


def test_pages_link_something():
    """The link pattern still finds the README's links (a changed pattern must not pass by finding none)."""
    found = links(ROOT / "README.md")
    assert "docs/real_models.md#the-papers-settings-on-one-gpu" in found and "docs/shapes.md" in found


def test_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text) < README_LIMIT, f"README.md has {len(text):,} characters; move detail to docs/"
    for page in ("docs/shapes.md", "docs/experiments.md", "docs/benchmark.md", "docs/healthy_run.md"):
        assert f"]({page}" in text, f"the README does not link {page}"
