"""The user documentation's links: every one stays inside the repository and lands on a file and, with an anchor, on
one of its headings (GitHub's anchors: lower case, punctuation dropped, spaces as hyphens)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(path: Path) -> set[str]:
    heads = (m.group(1) for m in re.finditer(r"^#+\s+(.+?)\s*$", path.read_text(), re.MULTILINE))
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_link_lands_inside_the_repository(doc):
    for target in LINK.findall(doc.read_text()):
        assert "://" not in target, f"{doc.name}: a link outside the repository: {target}"
        name, _, anchor = target.partition("#")
        path = (doc.parent / name).resolve() if name else doc
        assert path.exists() and ROOT in path.parents, f"{doc.name}: no file {name}"
        if anchor and path.suffix == ".md":
            assert anchor in anchors(path), f"{doc.name}: no heading '{anchor}' in {path.name}"
