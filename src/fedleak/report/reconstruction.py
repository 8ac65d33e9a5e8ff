"""The outputs of rebuilding one captured update (``fedleak reconstruct``): ``reconstruction.npz``,
``results.json`` and a self-contained ``report.html`` with a verdict (how many of the inferred batch are
certified, by which route), every sample's reason, the images and the attack's notes.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fedleak.reconstruction import Reconstruction
from fedleak.report.grid import image_grid
from fedleak.report.output import environment_info, staged_output, write_atomic, write_bytes_atomic, write_json
from fedleak.report.render import plural, render
from fedleak.report.views import STATUS_TEXT, Column, Finding, ImageGrid, Provenance, Setting, Verdict, provenance

OUTPUT_FILES = ("reconstruction.npz", "results.json", "report.html")


@dataclass(frozen=True)
class ReconstructionRun:
    """One attack on one captured update: its result, and what it was given (file names, as the user gave them)."""

    reconstruction: Reconstruction
    input_shape: tuple[int, ...]
    model: str
    update: str
    attack: str
    seed: int = 0
    options: Mapping[str, object] = field(default_factory=dict)  # what the attack was told (budget, the loss, ...)


@dataclass(frozen=True)
class SampleRow:
    number: int
    label: int
    certified: bool
    route: str
    reason: str


@dataclass(frozen=True)
class ReconstructionView:
    title: str
    subtitle: str
    verdict: Verdict
    columns: tuple[Column, ...]
    samples: tuple[SampleRow, ...]
    grid: ImageGrid | None
    notes: tuple[str, ...]
    settings: tuple[Setting, ...]
    provenance: Provenance
    status_text: dict[str, str]


def _route(sample) -> str:
    return str(getattr(sample, "route", "") or "")


def _verdict(rec: Reconstruction, routes: list[str]) -> Verdict:
    n, cert = len(rec), rec.num_certified
    size = rec.batch_size
    of = f"of the {size} inferred" if size is not None else "(batch size not inferred)"
    headline = f"{cert} {of} sample(s) certified" + (
        ": exact copies of the client's inputs, with their labels, proven from the update alone." if cert else ".")
    findings = []
    by_route = Counter(r for r, s in zip(routes, rec.samples) if s.certified and r)
    route_text = (" Route: " + ", ".join(f"{v} by {k}" for k, v in by_route.items()) + ".") if by_route else ""
    if cert:
        findings.append(Finding("Certified", f"{plural(cert, 'sample')}: each is one of the batch's inputs with its "
                                             f"true label.{route_text}", "certified", "bad"))
    if n - cert:
        unc_routes = Counter(r for r, s in zip(routes, rec.samples) if not s.certified and r)
        extra = (" Route: " + ", ".join(f"{v} by {k}" for k, v in unc_routes.items()) + ".") if unc_routes else ""
        findings.append(Finding("Uncertified", f"{plural(n - cert, 'sample')} rebuilt without a certificate: "
                                               "estimates that may be blends of samples or wrong; each one's reason is "
                                               f"below.{extra}", "estimated, uncertified", "warn"))
    if size is not None and size > n:
        findings.append(Finding("Not rebuilt", f"{size - n} of the {size} inferred sample(s): the attack returned "
                                               "nothing for them.", "", "good"))
    level = "bad" if cert else ("warn" if n else "good")
    return Verdict(headline, tuple(findings), level)


def _display_range(x: np.ndarray) -> tuple[float, float]:
    """[0, 1] when the rebuilt values (nearly) lie in it, else their own min and max."""
    finite = x[np.isfinite(x)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    if lo >= -0.05 and hi <= 1.05:
        return 0.0, 1.0
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def build_reconstruction_view(run: ReconstructionRun) -> ReconstructionView:
    rec = run.reconstruction
    records = rec.samples if len(rec.samples) == len(rec) else ()
    routes = [_route(s) for s in records]
    rows = tuple(SampleRow(i, int(rec.labels[i]), bool(rec.certified[i]), routes[i] if routes else "",
                           records[i].reason if records else "") for i in range(len(rec)))
    grid = None
    x = rec.inputs.detach().float().numpy().reshape(len(rec), *run.input_shape) if len(rec) else None
    if x is not None:
        status = ["certified" if r.certified else "uncertified" for r in rows]
        lo, hi = _display_range(x)
        grid = image_grid(f"The {plural(len(rec), 'rebuilt sample')}", [("rebuilt by the server", x)], status,
                          [r.reason for r in rows], [f"y={r.label}" for r in rows], value_range=(lo, hi),
                          label_text="its rebuilt label")
    columns = (Column("sample", "number of the rebuilt sample (the batch is unordered)", left=True),
               Column("label", "the label the attack recovered"),
               Column("certified", "proven to be one of the batch's inputs with its true label", left=True),
               Column("route", "the method that produced the sample", left=True),
               Column("reason", "why it is certified, or why not", left=True))
    settings = (Setting("model", run.model), Setting("update", run.update), Setting("attack", run.attack),
                Setting("input shape", "×".join(map(str, run.input_shape))),
                Setting("inferred batch size", "unknown" if rec.batch_size is None else str(rec.batch_size)),
                Setting("whole batch certified", "yes" if rec.batch_certified else "no"),
                Setting("attack time", f"{1000 * rec.seconds:.1f} ms"), Setting("seed", str(run.seed)),
                *(Setting(name.replace("_", " "), str(value)) for name, value in run.options.items()))
    return ReconstructionView(
        "What this update reveals", f"attack {run.attack} on {Path(run.update).name}, model {Path(run.model).name}",
        _verdict(rec, routes), columns, rows, grid, tuple(rec.notes), settings,
        provenance(rec.seconds, run.seed, "results.json and reconstruction.npz"), STATUS_TEXT)


def render_reconstruction(run: ReconstructionRun) -> str:
    return render("reconstruction.html", view=build_reconstruction_view(run))


def reconstruction_payload(run: ReconstructionRun) -> dict[str, object]:
    """Everything ``results.json`` holds."""
    rec = run.reconstruction
    return {
        "kind": "fedleak-reconstruction",
        "seed": run.seed,
        "settings": {"model": run.model, "update": run.update, "attack": run.attack,
                     "input_shape": list(run.input_shape), "options": dict(run.options)},
        "environment": environment_info(),
        "summary": {"rebuilt": len(rec), "certified": rec.num_certified, "inferred_batch_size": rec.batch_size,
                    "batch_certified": rec.batch_certified, "label_counts": rec.label_counts, "seconds": rec.seconds,
                    "notes": list(rec.notes)},
        "samples": [asdict(s) for s in rec.samples],
    }


def write_reconstruction(run: ReconstructionRun, out: str | os.PathLike[str]) -> tuple[Path, Path, Path]:
    """Write ``reconstruction.npz`` (``x``, ``y``, ``certified``), ``results.json`` and ``report.html`` into
    ``out``: all rendered first, then written all-or-nothing."""
    rec = run.reconstruction
    buf = io.BytesIO()
    np.savez_compressed(buf, x=rec.inputs.detach().numpy(), y=rec.labels.numpy(), certified=rec.certified.numpy())
    page = render_reconstruction(run)
    payload = reconstruction_payload(run)
    with staged_output(out, OUTPUT_FILES) as stage:
        write_bytes_atomic(stage / "reconstruction.npz", buf.getvalue())
        write_atomic(stage / "report.html", page)
        write_json(stage / "results.json", payload)
    folder = Path(out)
    return folder / "reconstruction.npz", folder / "results.json", folder / "report.html"
