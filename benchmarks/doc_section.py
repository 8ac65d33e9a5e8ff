"""A benchmark's section of docs/benchmarks.md: the text between its ``<!-- name:start -->`` and
``<!-- name:end -->`` markers, rewritten in place (appended under its heading where the markers are missing),
the file written atomically."""

from __future__ import annotations

from pathlib import Path

from fedleak.report.output import write_atomic

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def write_section(name: str, body: str, heading: str, doc: Path = DOC) -> None:
    """Put ``body`` (markdown, without the markers) between section ``name``'s markers in ``doc``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body}\n{end}"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text += f"\n## {heading}\n\n{block}\n"
    write_atomic(doc, text)
