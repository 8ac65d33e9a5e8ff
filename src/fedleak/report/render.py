"""One Jinja2 environment for every HTML report, and the number formats all reports share.

Templates live in ``fedleak/report/templates`` (shipped as package data): ``base.html`` (style, header,
provenance footer, shared macros) and one page per report. They are given typed view models (frozen
dataclasses built by :mod:`fedleak.report.audit`, :mod:`fedleak.report.reconstruction` and
:mod:`fedleak.report.federation`), never raw results, and format every number with the filters below:

* ``pct``: a fraction as a whole percentage that never rounds a non-zero value to "0%" ("<1%") nor a
  value short of all to "100%" (">99%"); blank for None/NaN.
* ``psnr``: dB with one decimal, "≥100" at the metric's cap; blank for None/NaN or when the count of samples
  it averages over (the filter's argument) is 0.
* ``num``: a number with the given decimals; blank for None/NaN.
* ``of``: "k of n".

Jinja2 is imported only when a page is rendered.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

from fedleak.image_metrics import PSNR_CAP


def _missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return not math.isfinite(float(value))
    except (TypeError, ValueError):
        return True


def percent(value: float | None) -> str:
    """``value`` (a fraction, 0..1) as a whole percentage: "<1%" for 0 < value < 0.5%, ">99%" for
    99.5% <= value < 100%; never "0%" for a non-zero value or "100%" for less than all. Blank for None/NaN."""
    if _missing(value):
        return ""
    p = 100.0 * float(value)
    text = f"{p:.0f}"
    if p > 0.0 and text == "0":  # below 0.5% (or exactly 0.5%, which rounds to even)
        return "<1%"
    if p < 100.0 and text == "100":
        return ">99%"
    return f"{text}%"


def psnr_text(value: float | None, count: int | None = None) -> str:
    """A PSNR in dB ("≥100" at the metric's cap); blank for None/NaN or when ``count`` (the samples it is a mean
    over) is 0."""
    if _missing(value) or (count is not None and count <= 0):
        return ""
    v = float(value)
    return f"≥{PSNR_CAP:.0f}" if v >= PSNR_CAP else f"{v:.1f}"


def number(value: float | None, digits: int = 1) -> str:
    """``value`` with ``digits`` decimals (whole numbers as they are); blank for None/NaN."""
    if _missing(value):
        return ""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{float(value):.{digits}f}"


def count_of(count: int, total: int) -> str:
    """"k of n"."""
    return f"{int(count)} of {int(total)}"


def plural(count: int, word: str, many: str | None = None) -> str:
    """"1 sample", "3 samples"."""
    return f"{int(count)} {word if int(count) == 1 else (many or word + 's')}"


FILTERS = {"pct": percent, "psnr": psnr_text, "num": number, "of": count_of, "plural": plural}


@lru_cache(maxsize=1)
def environment():
    """The one Jinja2 environment: package templates, autoescape on, undefined names are errors."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("fedleak.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(FILTERS)
    return env


def render(template: str, **context: Any) -> str:
    """Render the package template ``template`` (e.g. ``"audit.html"``) with ``context``."""
    return environment().get_template(template).render(**context)
