"""Every relative link in the README, CONTRIBUTING.md and docs/ points at a file of the checkout, and
every #anchor into a Markdown file at one of its headings (GitHub's slugs): a moved section or file
breaks this test, not a reader's click."""

import re
from pathlib import Path

import pytest

from conftest import REPO

DOCS = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(m) for m in re.findall(r"^#+\s+(.*)$", text, re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc):
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked here (no network)
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            broken.append(f"{target} (no file {path.relative_to(REPO) if path.is_relative_to(REPO) else path})")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target} (no heading #{anchor} in {path.name})")
    assert not broken, f"{doc.relative_to(REPO)}: broken links: {broken}"


def test_the_check_sees_links_and_anchors():
    readme = LINK.findall((REPO / "README.md").read_text())
    assert any(t.startswith("docs/") for t in readme)
    assert slug("Evaluate jobs: three phases on one GPU") == "evaluate-jobs-three-phases-on-one-gpu"
    assert "evaluate-jobs-three-phases-on-one-gpu" in anchors(REPO / "docs" / "cluster.md")
