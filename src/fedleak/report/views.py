"""View models the report templates share: the verdict, column legends, figures, image grids, provenance.

Each report builds these (plus its own row types) from typed results in Python; the templates only lay them
out and format numbers (:mod:`fedleak.report.render`).
"""

from __future__ import annotations

from dataclasses import dataclass

# what a frame in an image grid means; also the CSS class of the frame and of its reason
STATUS_TEXT = {
    "certified": "certified and verified equal to the original (label too)",
    "false": "FALSE CERTIFICATE: certified, but not a distinct sample of the batch",
    "uncertified": "rebuilt without a certificate: an estimate the server cannot verify",
    "missing": "not rebuilt",
    "withheld": "withheld by the client: not in its update",
}


@dataclass(frozen=True)
class Finding:
    """One line of a verdict: who (the threat), what leaked (a sentence with numbers), how sure."""

    threat: str
    text: str
    certainty: str = ""  # "certified", "estimated", "none", "withheld"
    level: str = ""  # CSS class: "bad" (leaks), "warn" (partial / estimated), "good" (nothing leaked)


@dataclass(frozen=True)
class Verdict:
    """What a report concludes, first on the page: a headline and one finding per threat."""

    headline: str
    findings: tuple[Finding, ...] = ()
    level: str = ""  # "bad", "warn", "good": the headline's colour
    alarm: str = ""  # a false certificate: shown in red above everything else


@dataclass(frozen=True)
class Column:
    """A table column and the definition written in the legend row under the table."""

    name: str
    definition: str
    left: bool = False  # text column (left-aligned)


@dataclass(frozen=True)
class Figure:
    uri: str  # an inline data: URI
    alt: str
    caption: str = ""


@dataclass(frozen=True)
class Advice:
    """One item of "What to do"."""

    topic: str
    text: str


@dataclass(frozen=True)
class Setting:
    """One row of a two-column settings table."""

    name: str
    value: str


@dataclass(frozen=True)
class Card:
    """One sample of an image grid: its images (data URIs, one per grid row; "" blank), the frame's status
    (a key of :data:`STATUS_TEXT`), a caption (labels), the key of its reason in the grid's legend and, for a
    record of features, their values (shown when the image is pointed at)."""

    number: str  # "#3", or "extra" for a certified sample beyond the batch
    images: tuple[str, ...]
    status: str
    caption: str
    key: str = ""
    values: tuple[str, ...] = ()  # per image, a record's feature values in words (tabular data); else empty


@dataclass(frozen=True)
class ReasonGroup:
    """Samples that share a status and a reason, listed under a grid or a table."""

    key: str
    status: str
    reason: str
    samples: str  # "#0, #3-#7"
    count: int


@dataclass(frozen=True)
class ImageGrid:
    title: str
    rows: tuple[str, ...]  # the name of each image row
    cards: tuple[Card, ...]
    reasons: tuple[ReasonGroup, ...]
    note: str = ""  # display range, columns left out
    label_text: str = ""  # what a card's caption says, e.g. "its label (true → rebuilt)"


@dataclass(frozen=True)
class Provenance:
    python: str
    platform: str
    packages: str
    seconds: float | None = None
    seed: int | None = None
    files: str = "results.json"


def provenance(seconds: float | None = None, seed: int | None = None, files: str = "results.json") -> Provenance:
    """This machine's Python, platform and package versions, for a report's footer."""
    from fedleak.report.output import environment_info

    env = environment_info()
    pkgs = ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v)
    return Provenance(env["python"], env["platform"], pkgs, seconds, seed, files)
